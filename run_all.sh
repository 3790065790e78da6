#!/usr/bin/env bash
# run_all.sh: the whole pipeline from environment variables (README, "run_all.sh configuration").
#   bash run_all.sh                          # demo data -> steps 5-8 on the CPU
#   USE_REPO_EMBD=1 TASK=harmless bash run_all.sh   # published embeddings -> steps 5-8
#   RUN_GPU_STEPS=1 bash run_all.sh          # steps 1-4 on a GPU, then 5-8
#   RUN_GPU_STEPS=1 NUM_SHARDS=8 PRINT_JOBS=slurm bash run_all.sh > jobs.sh   # the same as SLURM job arrays
#   FORCE=1 bash run_all.sh                  # redo steps 5-8 even where they are up to date
# Every value is validated before any work starts; file names come from step 5's manifest.
# Steps 5-8 resume: a rerun skips each step whose record in $OUTPUT_DIR/.run_state still matches
# (run_state.py), so a run killed at any point is finished by running it again.
# Relative paths given in variables are relative to the caller's directory; the defaults (data/,
# distill_out/, embd/...) are folders of this checkout. Ctrl-C, SIGTERM or SIGHUP stops the running
# step cleanly and exits with 130 / 143 / 129.
if [ -z "${BASH_VERSION:-}" ]; then  # POSIX sh up to here: sh (dash) would fail on pipefail below
    echo "run_all.sh: error: run it with bash (bash run_all.sh), not sh" >&2
    exit 2
fi
set -euo pipefail
# Signals first, so that one arriving at any moment stops the run with one line: Ctrl-C (SIGINT),
# SIGTERM and SIGHUP are forwarded to the running steps as SIGTERM (a step whose interpreter is still
# starting cannot lose it, as it could a SIGINT: bash starts background commands with SIGINT
# ignored), waited for, and the run exits with 128 + N.
CURRENT="setup"
on_signal() {  # on_signal NAME STATUS: stop the running steps, wait for them, exit with one line
    trap '' INT TERM HUP
    # Every background job: steps 6 and 7 run together, and a signal may land as a job starts.
    local jobs_running
    jobs_running="$(jobs -p)"
    if [[ -n "$jobs_running" ]]; then
        kill -TERM $jobs_running 2>/dev/null || true
        wait $jobs_running 2>/dev/null || true
    fi
    echo "run_all.sh: stopped by SIG$1 during $CURRENT; run the same command again to resume" >&2
    exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP
TEMP_FILES=() CREATED_DIRS=()
cleanup() {  # at exit: temporary files; after a failure, the folders this run created if still empty
    local status=$? dir
    rm -f ${TEMP_FILES[@]+"${TEMP_FILES[@]}"}
    if (( status != 0 )); then
        for dir in ${CREATED_DIRS[@]+"${CREATED_DIRS[@]}"}; do rmdir "$dir" 2>/dev/null || true; done
    fi
}
trap cleanup EXIT
CALLER_DIR="$PWD"
if [[ "${PYTHON:-}" == */* && "$PYTHON" != /* ]]; then
    PYTHON="$CALLER_DIR/$PYTHON"
fi
cd "$(dirname "${BASH_SOURCE[0]}")"
die() { echo "run_all.sh: error: $*" >&2; exit 2; }

# The settings: settings.py says which variable sets which flag of which step; a flag is passed only
# when its variable is set, so defaults, types and choices are the steps' own (their --help). Its
# preflight, the first Python process, builds every step's arguments and parses them with that
# step's own parser before any work (a bad value: one line, exit status 2), resolves the folders
# (relative to the caller's directory, then canonical, so data/, ./data/ and the absolute path key
# the same up-to-date records), warns about variables that look like misspelt settings, and prints
# bash assignments: NAME_ARGS arrays, the folders, the switches, SETTINGS_TEXT and the interpreter's
# own path. Unless PYTHON was set (a wrapper of the user's is kept), every later process starts that
# path directly: through a launcher such as pyenv's shim each start costs ~0.05 s
# (docs/performance.md).
PYTHON_SET="${PYTHON:+1}"
PYTHON="${PYTHON:-python3}"
STATUS=0
PREFLIGHT="$("$PYTHON" settings.py preflight "$CALLER_DIR")" || STATUS=$?
(( STATUS != 2 )) || exit 2  # the preflight has said why
(( STATUS == 0 )) || die "PYTHON '$PYTHON' cannot run settings.py of this checkout"
eval "$PREFLIGHT"
[[ -z "$PYTHON_SET" && -x "$PYTHON_EXECUTABLE" ]] && PYTHON="$PYTHON_EXECUTABLE"
if [[ "$PRINT_JOBS" != 0 ]]; then  # the GPU steps as job arrays for a cluster: printed, not run
    printf '%s\n' "$JOBS_TEXT"
    exit 0
fi
echo "$SETTINGS_TEXT"
threads() {  # threads N: every later process's torch, OpenMP and BLAS threads
    export OMP_NUM_THREADS="$1" MKL_NUM_THREADS="$1" OPENBLAS_NUM_THREADS="$1"
}
threads "$THREADS"

# The output folder must be usable before any work starts. It stays locked while this script and
# its steps run, so two runs never interleave their steps in one folder.
[[ -e "$OUTPUT_DIR" ]] || CREATED_DIRS=("$OUTPUT_DIR")
mkdir -p "$OUTPUT_DIR" 2>/dev/null && [[ -d "$OUTPUT_DIR" && -w "$OUTPUT_DIR" ]] \
    || die "OUTPUT_DIR '$OUTPUT_DIR' is not a writable directory"
# Locks (util-linux's flock): OUTPUT_DIR exclusively for the whole run; DATA_DIR exclusively while
# this run writes it and shared while it reads it, so data another run reads is never rewritten
# (lock_data_dir). Every process started here inherits the lock descriptors, and run_state.py
# passes them on to its step: a lock is released only when the last process that could still write
# has exited, even if this script is killed first.
HAVE_FLOCK=0
command -v flock >/dev/null && HAVE_FLOCK=1
if [[ "$HAVE_FLOCK" == 1 ]]; then
    exec {output_lock}<"$OUTPUT_DIR"
    flock -n "$output_lock" \
        || die "OUTPUT_DIR '$OUTPUT_DIR' is in use by another run_all.sh (or by a step of a killed one, which stops in a moment)"
fi

# Steps run in the background while this script waits for them, so that a SIGTERM sent to this
# script alone (a scheduler's) is forwarded to the running step instead of leaving it orphaned. If
# this script dies all the same (kill -9), the processes it started stop by themselves: each
# watches its parent (RUN_ALL_PARENT_PID, cli.watch_parent). Steps report an interrupt through this
# script's one line, not their own.
export RUN_ALL_REPORTS_INTERRUPTS=1 RUN_ALL_PARENT_PID=$$
start_child() {  # start_child COMMAND...: run it in the background (its pid in $!)
    "$@" &
}
run_child() {  # run_child COMMAND...: start_child, then wait for it and return its status
    start_child "$@"
    local status=0
    wait "$!" 2>/dev/null || status=$?  # 2>/dev/null: no "Killed (source of the job)" from bash
    report_signal "$status"
    return "$status"
}
report_signal() {  # report_signal STATUS: one line if a step was killed by a signal this script did not send
    (( $1 > 128 && $1 <= 128 + 64 )) || return 0
    echo "run_all.sh: SIG$(kill -l "$(($1 - 128))") stopped $CURRENT (exit status $1);" \
        "run the same command again to resume" >&2
}

section() { CURRENT="${2:-$1}"; printf '\n=== %s ===\n' "$1"; }  # section TITLE [NAME]: a stop now names NAME
step_start=$SECONDS
timed() {  # run a step and report its wall time
    local name="$1"; shift
    local t0=$SECONDS
    run_child "$@"
    echo "[$name took $((SECONDS - t0)) s]"
}
wait_for_lock() {  # wait_for_lock FLOCK_ARGS...: in the background, so that a signal need not wait for it
    flock "$@" >/dev/null 2>&1 &
    wait "$!"
}
# lock_data_dir: DATA_WRITABLE=1 when no other run uses DATA_DIR (this run holds it exclusively and
# may write it), else 0: other runs read it (this run holds it shared), so the data must stay as it
# is and a step that would change it refuses instead (--in_use). A run that is writing DATA_DIR is
# waited for. OUTPUT_DIR may be DATA_DIR: its lock is then already this run's, exclusively.
DATA_WRITABLE=1
lock_data_dir() {
    [[ -e "$DATA_DIR" ]] || CREATED_DIRS+=("$DATA_DIR")
    mkdir -p "$DATA_DIR" 2>/dev/null && [[ -d "$DATA_DIR" ]] || die "DATA_DIR '$DATA_DIR' is not a directory that can be created"
    [[ "$HAVE_FLOCK" == 1 ]] || return 0
    if [[ "$DATA_DIR" -ef "$OUTPUT_DIR" ]]; then
        data_lock=$output_lock
        return 0
    fi
    exec {data_lock}<"$DATA_DIR"
    flock -n "$data_lock" && return 0
    if ! flock -n -s "$data_lock"; then
        CURRENT="the wait for DATA_DIR"
        echo "Waiting for another run_all.sh that is writing DATA_DIR '$DATA_DIR' ..."
        wait_for_lock -s "$data_lock"
        flock -n "$data_lock" && return 0  # the writer has gone and no run reads the data
        wait_for_lock -s "$data_lock"      # (a failed upgrade may drop the shared lock: take it again)
    fi
    DATA_WRITABLE=0
}
share_data_dir() {  # after writing: hold DATA_DIR shared, so that other runs may read it too
    [[ "$HAVE_FLOCK" == 1 ]] || return 0
    # A writer swaps a new folder in at DATA_DIR (data_folder.py): lock that one, not the old.
    if ! [[ "/dev/fd/$data_lock" -ef "$DATA_DIR" ]]; then
        local old_lock=$data_lock
        exec {data_lock}<"$DATA_DIR"
        if [[ "$old_lock" == "$output_lock" ]]; then  # DATA_DIR is OUTPUT_DIR: it is the output lock too
            output_lock=$data_lock
            flock -n "$output_lock" || die "OUTPUT_DIR '$OUTPUT_DIR' was taken by another run while its data were rewritten"
        fi
        exec {old_lock}<&-
    fi
    [[ "$data_lock" != "$output_lock" ]] || return 0
    flock -s "$data_lock"  # a downgrade (or, after a swap, a shared lock beside other readers)
}
IN_USE=()  # flag for the data writers while other runs read DATA_DIR

# --- data: GPU steps, published embeddings, or demo data ---------------------------------------
lock_data_dir
[[ "$DATA_WRITABLE" == 1 ]] || IN_USE=(--in_use)
if [[ "$RUN_GPU_STEPS" == 1 ]]; then
    [[ "$DATA_WRITABLE" == 1 ]] \
        || die "DATA_DIR '$DATA_DIR' is in use by another run_all.sh, and steps 1-4 would rewrite it; wait for that run or set another DATA_DIR"
    section "Step 1: LoRA SFT of $MODEL_NAME on $DATASET"
    timed "step 1" "$PYTHON" step1_sft.py "${STEP1_ARGS[@]}"
    section "Step 2: sample $N_TRAIN_SAMPLES responses per training prompt, $N_TEST_SAMPLES per test prompt"
    timed "step 2 (train)" "$PYTHON" step2_gen_sample.py "${STEP2_TRAIN_ARGS[@]}"
    timed "step 2 (test)" "$PYTHON" step2_gen_sample.py "${STEP2_TEST_ARGS[@]}"
    section "Step 3: golden reward annotation"
    timed "step 3 (train)" "$PYTHON" step3_reward_annotation.py "${STEP3_TRAIN_ARGS[@]}"
    timed "step 3 (test)" "$PYTHON" step3_reward_annotation.py "${STEP3_TEST_ARGS[@]}"
    section "Step 3.5: sort responses by golden reward"
    timed "step 3.5" "$PYTHON" step3.5_processing_data.py "${STEP3_5_ARGS[@]}"
    section "Step 4: embeddings with $EMBED_MODEL_NAME -> $DATA_DIR"
    timed "step 4" "$PYTHON" step4_gen_embeddings.py "${STEP4_ARGS[@]}"
elif [[ "$USE_REPO_EMBD" == 1 ]]; then
    section "Convert published embeddings from $EMBD_REPO_DIR -> $DATA_DIR"
    timed "conversion" "$PYTHON" convert_embeddings.py "${CONVERT_ARGS[@]}" ${IN_USE[@]+"${IN_USE[@]}"}
else
    if [[ -f "$DATA_DIR/demo_config.json" ]] || ! compgen -G "$DATA_DIR/EMBD-TRAIN-split_*.npy" >/dev/null; then
        section "Demo data -> $DATA_DIR"
        timed "demo data" "$PYTHON" generate_demo_data.py "${DEMO_ARGS[@]}" ${IN_USE[@]+"${IN_USE[@]}"}
    else
        echo "Using embeddings in $DATA_DIR/"
    fi
fi
share_data_dir
[[ "$DATA_ONLY" == 1 ]] && exit 0

# --- steps 5-8 on the CPU, resumable --------------------------------------------------------
# run_state.py prints "[step N up to date]" instead of running a step whose record matches this
# command line, the code and the previous step's outputs (step 5: the data's stat key), and whose
# outputs are unchanged; otherwise it runs the step and prints "[step N took X s]".
STEPS_STARTED="$(mktemp)"  # files the steps write from here on are newer than this marker
TEMP_FILES+=("$STEPS_STARTED")
FORCE_FLAG=()
[[ "$FORCE" == 1 ]] && FORCE_FLAG=(--force)
resumable() {  # resumable run_child|start_child STEP PREVIOUS_STEP COMMAND...  (no PREVIOUS_STEP: keyed on the data)
    local how="$1" step="$2" depends=(--after "$3"); shift 3
    [[ -n "${depends[1]}" ]] || depends=(--data_dir "$DATA_DIR")
    "$how" "$PYTHON" run_state.py run --output_dir "$OUTPUT_DIR" --step "$step" "${depends[@]}" \
        "${FORCE_FLAG[@]}" -- "$@"
}

section "Step 5: train the ORM ensemble"
resumable run_child 5 "" "$PYTHON" step5_train_rms.py "${STEP5_ARGS[@]}"
stop_after() {  # stop_after N: end the run here when LAST_STEP is N
    (( LAST_STEP > $1 )) && return 0
    section "Done in $((SECONDS - step_start)) s (LAST_STEP=$LAST_STEP)"
    echo "Outputs of steps 5-$LAST_STEP in $OUTPUT_DIR/"
    exit 0
}
stop_after 5

# Step 7 reads only step 5's outputs, so it runs beside step 6: their single-threaded phases
# (start-up, metrics, plots) overlap on two cores. Its output is kept and shown after step 6's; if
# step 6 fails, step 7 is stopped, as if it had not started.
STEP7_LOG="$(mktemp)" STEP7_ERR="$(mktemp)"
TEMP_FILES+=("$STEP7_LOG" "$STEP7_ERR")
STEP7_PID=""
threads "$SIDE_THREADS"  # steps 6 and 7 share the CPUs
if (( LAST_STEP >= 7 )); then
    resumable start_child 7 5 "$PYTHON" step7_isotonic_distillation.py "${STEP7_ARGS[@]}" >"$STEP7_LOG" 2>"$STEP7_ERR"
    STEP7_PID=$!
fi
section "Step 6: evaluate ranking quality" "steps 6 and 7"
STATUS=0
resumable run_child 6 5 "$PYTHON" step6_eval_rms.py "${STEP6_ARGS[@]}" || STATUS=$?
if (( STATUS != 0 )); then
    if [[ -n "$STEP7_PID" ]]; then
        kill -TERM "$STEP7_PID" 2>/dev/null || true
        wait "$STEP7_PID" 2>/dev/null || true
    fi
    exit "$STATUS"
fi
stop_after 6

section "Step 7: isotonic calibration and distillation"
wait "$STEP7_PID" 2>/dev/null || STATUS=$?
cat "$STEP7_LOG"
cat "$STEP7_ERR" >&2
report_signal "$STATUS"
(( STATUS == 0 )) || exit "$STATUS"
stop_after 7
threads "$THREADS"

section "Step 8: validate Teacher, Teacher+Isotonic, Student, Student+Isotonic"
resumable run_child 8 7 "$PYTHON" step8_validate_distillation.py "${STEP8_ARGS[@]}"

TABLE="$OUTPUT_DIR/validation_table.txt"
if [[ -f "$TABLE" && ! "$TABLE" -nt "$STEPS_STARTED" ]]; then  # step 8 was up to date: show its table
    cat "$TABLE"
fi

section "Done in $((SECONDS - step_start)) s"
echo "Outputs in $OUTPUT_DIR/ (orm_manifest.json lists the ORM checkpoints, distillation_config.json the"
echo "student and isotonic maps; validation_results.json holds the table above). Plots:"
ls "$OUTPUT_DIR"/*.png
