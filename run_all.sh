#!/usr/bin/env bash
# run_all.sh: the whole pipeline from environment variables (README, "run_all.sh configuration").
#   bash run_all.sh                          # demo data -> steps 5-8 on the CPU
#   USE_REPO_EMBD=1 TASK=harmless bash run_all.sh   # published embeddings -> steps 5-8
#   RUN_GPU_STEPS=1 bash run_all.sh          # steps 1-4 on a GPU, then 5-8
#   FORCE=1 bash run_all.sh                  # redo steps 5-8 even where they are up to date
# Every value is validated before any work starts; file names come from step 5's manifest.
# Steps 5-8 resume: a rerun skips each step whose record in $OUTPUT_DIR/.run_state still matches
# (run_state.py), so a run killed at any point is finished by running it again.
# Relative paths given in variables are relative to the caller's directory; the defaults (data/,
# distill_out/, embd/...) are folders of this checkout. Ctrl-C or SIGTERM stops the running step
# cleanly and exits with 130 / 143.
if [ -z "${BASH_VERSION:-}" ]; then  # POSIX sh up to here: sh (dash) would fail on pipefail below
    echo "run_all.sh: error: run it with bash (bash run_all.sh), not sh" >&2
    exit 2
fi
set -euo pipefail
CALLER_DIR="$PWD"
for var in OUTPUT_DIR DATA_DIR EMBD_REPO_DIR SFT_TRAIN_FILE TRAIN_PROMPTS_FILE TEST_PROMPTS_FILE; do
    if [[ -n "${!var:-}" && "${!var}" != /* ]]; then
        printf -v "$var" '%s/%s' "$CALLER_DIR" "${!var}"
    fi
done
if [[ "${PYTHON:-}" == */* && "$PYTHON" != /* ]]; then
    PYTHON="$CALLER_DIR/$PYTHON"
fi
# Model variables are short names, hub ids or local folders: a relative value that names a folder
# of the caller's directory is that folder (as from_pretrained would find it from there).
for var in MODEL_NAME EMBED_MODEL_NAME GOLDEN_RM; do
    if [[ -n "${!var:-}" && "${!var}" != /* && -d "$CALLER_DIR/${!var}" ]]; then
        printf -v "$var" '%s/%s' "$CALLER_DIR" "${!var}"
    fi
done
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON_SET="${PYTHON:+1}"
PYTHON="${PYTHON:-python3}"
RUN_GPU_STEPS="${RUN_GPU_STEPS:-0}"
USE_REPO_EMBD="${USE_REPO_EMBD:-0}"
TASK="${TASK:-helpful}"
SFT_OBJ="${SFT_OBJ:-gpt4}"
MODEL_NAME="${MODEL_NAME:-gemma2b}"
GEN_PREF_MODEL="${GEN_PREF_MODEL:-gemma7b}"
RM_OBJECTIVE="${RM_OBJECTIVE:-bt}"
CONSIDER_FIRST_N="${CONSIDER_FIRST_N:-2}"
N_SAMPLE="${N_SAMPLE:-100}"
N_PAIRS="${N_PAIRS:-1}"                         # preference pairs per training prompt
PAIR_MODE="${PAIR_MODE:-xprompt}"               # xprompt | same
REPLACEMENT="${REPLACEMENT:-0}"                 # 1: a prompt's pairs may reuse a response (or pair)
SPLIT_SEED="${SPLIT_SEED:-0}"                   # draws the prompt partition; SEED varies training only
EVAL_PROMPTS="${EVAL_PROMPTS:-}"                # evaluation pool size; default: see step 5 --eval_prompts
ENSEMBLE_NUMBER="${ENSEMBLE_NUMBER:-10}"
TRAINING_EPOCHS="${TRAINING_EPOCHS:-30}"
DISTILL_EPOCHS="${DISTILL_EPOCHS:-20}"
LEARNING_RATE="${LEARNING_RATE:-0.0001}"                # the ORMs' (docs/studies/defaults.md)
DISTILL_LEARNING_RATE="${DISTILL_LEARNING_RATE:-0.001}" # the student's
EARLY_STOPPING="${EARLY_STOPPING:-member}"      # member | pooled | none (README, "Early stopping")
STOP_METRIC="${STOP_METRIC:-loss}"              # loss | accuracy: what early stopping minimises / maximises
MIN_VAL_PAIRS="${MIN_VAL_PAIRS:-20}"            # fewer validation pairs: no early stopping
MIN_EPOCH_STEPS="${MIN_EPOCH_STEPS:-}"          # optimizer steps an epoch takes at least (default: step 5's)
REWARD_SCALE="${REWARD_SCALE:-}"                # the annotator's s (default: step 5's, from TASK)
WEIGHT_DECAY="${WEIGHT_DECAY:-0}"               # decoupled (AdamW) weight decay of the ORMs
BAGGING="${BAGGING:-0}"                         # 1: members train on bootstrap resamples of the pairs
STANDARDIZE="${STANDARDIZE:-}"                  # 0: raw ORM inputs (default: step 5's, standardised)
ANNOTATION_QUALITY="${ANNOTATION_QUALITY:-10}"
SEED="${SEED:-6}"
OUTPUT_DIR="${OUTPUT_DIR:-distill_out}"
FORCE="${FORCE:-0}"                              # 1: rerun steps 5-8 even if up to date
DATA_ONLY="${DATA_ONLY:-0}"                      # 1: prepare DATA_DIR (demo or conversion), then stop
LAST_STEP="${LAST_STEP:-8}"                      # 5, 6, 7 or 8: stop after this CPU step
REPO_GEN_MODEL="${REPO_GEN_MODEL:-$GEN_PREF_MODEL}"   # generator named in published file names
DATA_DIR="${DATA_DIR:-}"  # default below: demo data in data/, other sources in a folder per setup
MAX_PROMPTS="${MAX_PROMPTS:-}"
EMBD_REPO_DIR="${EMBD_REPO_DIR:-embd/RM-Embeddings}"
# GPU steps 1-4 (RUN_GPU_STEPS=1); model names may be short names, hub ids or local folders.
DATASET="${DATASET:-hh-rlhf-helpful-gpt4}"
EVAL_DATASET="${EVAL_DATASET:-hh-rlhf-helpful}"
EMBED_MODEL_NAME="${EMBED_MODEL_NAME:-$MODEL_NAME}"
GOLDEN_RM="${GOLDEN_RM:-}"                      # default: the task's golden RM
N_TRAIN_SAMPLES="${N_TRAIN_SAMPLES:-10}"        # responses per training prompt
N_TEST_SAMPLES="${N_TEST_SAMPLES:-500}"         # responses per test prompt
GEN_MAX_LEN="${GEN_MAX_LEN:-128}"
GEN_BACKEND="${GEN_BACKEND:-auto}"              # auto | vllm | transformers
TP_SIZE="${TP_SIZE:-1}"                         # vllm: GPUs per model (must divide its attention heads)
RM_INPUT_FORMAT="${RM_INPUT_FORMAT:-raw}"       # raw | chat_template: how the golden RM sees a response
SFT_MAX_STEPS="${SFT_MAX_STEPS:--1}"            # -1: full epochs
SFT_TRAIN_FILE="${SFT_TRAIN_FILE:-}"            # local JSONL/CSV with prompt/completion columns
TRAIN_PROMPTS_FILE="${TRAIN_PROMPTS_FILE:-}"
TEST_PROMPTS_FILE="${TEST_PROMPTS_FILE:-}"
GPU_MAX_PROMPTS="${GPU_MAX_PROMPTS:-}"
GPU_MAX_TEST_PROMPTS="${GPU_MAX_TEST_PROMPTS:-$GPU_MAX_PROMPTS}"
# Converted or generated embeddings default to a folder named after the setup, so setups never
# overwrite each other (nor the demo data in data/).
if [[ -z "$DATA_DIR" && "$USE_REPO_EMBD" == 1 ]]; then
    DATA_DIR="data_${TASK}_${SFT_OBJ}_${MODEL_NAME}_${REPO_GEN_MODEL}${MAX_PROMPTS:+_max${MAX_PROMPTS}}"
elif [[ -z "$DATA_DIR" && "$RUN_GPU_STEPS" == 1 ]]; then
    DATA_DIR="data_gpu_${DATASET}_$(basename "$EMBED_MODEL_NAME")"
fi
DATA_DIR="${DATA_DIR:-data}"
# Demo data: a fixed size whatever N_SAMPLE (one data set per sweep), and a test set.
DEMO_PROMPTS="${DEMO_PROMPTS:-3000}"
DEMO_SEED="${DEMO_SEED:-0}"
DEMO_EMB_DIM="${DEMO_EMB_DIM:-2048}"
DEMO_TEST_PROMPTS="${DEMO_TEST_PROMPTS:-20}"
DEMO_TEST_RESPONSES="${DEMO_TEST_RESPONSES:-100}"
DEMO_N_SPLITS="${DEMO_N_SPLITS:-10}"            # responses per demo training prompt (K)

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
# The checks of cli.py's argparse types, so that bad values stop here, before any work: integers
# of at most 10 digits (bash arithmetic never overflows), sizes up to 2**31 - 1, seeds up to
# 2**32 - 1, and decimal numbers that a float64 holds (1e999 would become inf).
MAX_SIZE=2147483647
MAX_SEED=4294967295
is_int() { [[ "$1" =~ ^-?[0-9]{1,10}$ ]]; }
is_pos_int() { [[ "$1" =~ ^[0-9]{1,10}$ ]] && (( 10#$1 > 0 && 10#$1 <= MAX_SIZE )); }
is_number() { [[ "$1" =~ ^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]]; }
in_float_range() {  # a number (is_number) whose magnitude is 0 or between 1e-300 and 1e300
    [[ "$1" =~ ^-?0*([0-9]*)\.?([0-9]*)([eE]([-+]?)0*([0-9]*))?$ ]] || return 1
    local int="${BASH_REMATCH[1]}" frac="${BASH_REMATCH[2]}" sign="${BASH_REMATCH[4]}" exp="${BASH_REMATCH[5]:-0}"
    local lead_zeros="${frac%%[1-9]*}"
    [[ "$int$frac" =~ [1-9] ]] || return 0  # zero
    (( ${#exp} <= 4 )) || return 1
    exp=$((10#${exp:-0})); [[ "$sign" == - ]] && exp=$((-exp))
    local order=$(( ${#int} > 0 ? ${#int} - 1 + exp : exp - ${#lead_zeros} - 1 ))
    (( order >= -300 && order <= 300 ))
}
need_pos_int() {
    is_pos_int "${!1}" && return 0
    [[ "${!1}" =~ ^[0-9]+$ && "${!1}" =~ [1-9] ]] && die "$1 must be at most $MAX_SIZE, got '${!1}'"
    die "$1 must be a positive integer, got '${!1}'"
}
need_number() {  # need_number VAR [positive]
    is_number "${!1}" || die "$1 must be a ${2:+positive }number, got '${!1}'"
    in_float_range "${!1}" || die "$1 must be a number between 1e-300 and 1e300 in magnitude, got '${!1}'"
    [[ -z "${2:-}" ]] || { [[ ! "${!1}" =~ ^- ]] && [[ "${!1}" =~ ^[^eE]*[1-9] ]]; } \
        || die "$1 must be a positive number, got '${!1}'"
}
need_flag() { local var; for var; do [[ "${!var}" == 0 || "${!var}" == 1 ]] || die "$var must be 0 or 1, got '${!var}'"; done; }

need_flag RUN_GPU_STEPS USE_REPO_EMBD FORCE DATA_ONLY
[[ "$LAST_STEP" =~ ^[5-8]$ ]] || die "LAST_STEP must be 5, 6, 7 or 8, got '$LAST_STEP'"
[[ "$TASK" == helpful || "$TASK" == harmless ]] || die "TASK must be helpful or harmless, got '$TASK'"
# One Python process reads step 5's objectives (its registry: no list here), the interpreter's own
# path, the canonical paths of the folders and files below, and warns about environment variables
# that look like misspelt settings (cli.setting_typos). Unless PYTHON was set (a wrapper of the
# user's is kept), every later process starts that path directly: through a launcher such as pyenv's
# shim each start costs ~0.05 s (docs/performance.md). Canonical paths (os.path.realpath) make
# data/, ./data/, data/../data and the absolute path one folder: the steps' command lines, which
# key their up-to-date records (run_state.py), and the paths recorded in their JSON do not change.
PATH_VARS=(OUTPUT_DIR DATA_DIR EMBD_REPO_DIR SFT_TRAIN_FILE TRAIN_PROMPTS_FILE TEST_PROMPTS_FILE)
PATH_VALUES=()
for var in "${PATH_VARS[@]}"; do
    [[ "${!var}" != *$'\n'* ]] || die "$var must not contain a newline"
    PATH_VALUES+=("${!var}")
done
PYTHON_INFO="$("$PYTHON" -c '
import os, sys, cli, objectives
print(*objectives.OBJECTIVES)
print(sys.executable)
for path in sys.argv[1:]:
    print(os.path.realpath(path) if path else "")
for warning in cli.setting_typos(os.environ):
    print(f"run_all.sh: warning: {warning}")
print("end")  # command substitution drops trailing newlines: empty paths last would be lost
' "${PATH_VALUES[@]}" 2>/dev/null)" || die "PYTHON '$PYTHON' cannot import objectives.py of this checkout"
mapfile -t PYTHON_INFO <<< "$PYTHON_INFO"
OBJECTIVES="${PYTHON_INFO[0]}"
[[ -z "$PYTHON_SET" && -x "${PYTHON_INFO[1]}" ]] && PYTHON="${PYTHON_INFO[1]}"
for i in "${!PATH_VARS[@]}"; do printf -v "${PATH_VARS[i]}" '%s' "${PYTHON_INFO[i + 2]}"; done
for warning in "${PYTHON_INFO[@]:${#PATH_VARS[@]} + 2}"; do [[ "$warning" == end ]] || echo "$warning" >&2; done
[[ "$RM_OBJECTIVE" =~ ^[A-Za-z0-9_]+$ && " $OBJECTIVES " == *" $RM_OBJECTIVE "* ]] \
    || die "RM_OBJECTIVE must be ${OBJECTIVES// / or }, got '$RM_OBJECTIVE'"
for var in N_SAMPLE N_PAIRS ENSEMBLE_NUMBER TRAINING_EPOCHS DISTILL_EPOCHS DEMO_PROMPTS DEMO_EMB_DIM DEMO_TEST_RESPONSES DEMO_N_SPLITS; do
    need_pos_int "$var"
done
(( 10#$DEMO_N_SPLITS >= 2 )) || die "DEMO_N_SPLITS must be at least 2 (responses to compare per prompt), got '$DEMO_N_SPLITS'"
[[ "$DEMO_TEST_PROMPTS" =~ ^[0-9]{1,10}$ ]] && (( 10#$DEMO_TEST_PROMPTS <= MAX_SIZE )) \
    || die "DEMO_TEST_PROMPTS must be an integer in 0..$MAX_SIZE, got '$DEMO_TEST_PROMPTS'"
for var in SEED SPLIT_SEED DEMO_SEED; do
    [[ "${!var}" =~ ^[0-9]{1,10}$ ]] && (( 10#${!var} <= MAX_SEED )) || die "$var must be an integer in 0..$MAX_SEED, got '${!var}'"
done
[[ "$PAIR_MODE" == xprompt || "$PAIR_MODE" == same ]] || die "PAIR_MODE must be xprompt or same, got '$PAIR_MODE'"
need_flag REPLACEMENT
[[ -z "$EVAL_PROMPTS" ]] || is_pos_int "$EVAL_PROMPTS" || die "EVAL_PROMPTS must be empty or a positive integer, got '$EVAL_PROMPTS'"
is_int "$CONSIDER_FIRST_N" && (( CONSIDER_FIRST_N > 0 || CONSIDER_FIRST_N == -1 || CONSIDER_FIRST_N == -2 )) \
    || die "CONSIDER_FIRST_N must be a positive integer, -1 or -2, got '$CONSIDER_FIRST_N'"
need_number ANNOTATION_QUALITY
need_number LEARNING_RATE positive
need_number DISTILL_LEARNING_RATE positive
[[ -z "$REWARD_SCALE" ]] || need_number REWARD_SCALE positive
[[ -z "$MIN_EPOCH_STEPS" ]] || need_pos_int MIN_EPOCH_STEPS
[[ "$EARLY_STOPPING" =~ ^(member|pooled|none)$ ]] || die "EARLY_STOPPING must be member, pooled or none, got '$EARLY_STOPPING'"
[[ "$STOP_METRIC" == loss || "$STOP_METRIC" == accuracy ]] || die "STOP_METRIC must be loss or accuracy, got '$STOP_METRIC'"
[[ "$MIN_VAL_PAIRS" =~ ^[0-9]{1,10}$ ]] && (( 10#$MIN_VAL_PAIRS <= MAX_SIZE )) \
    || die "MIN_VAL_PAIRS must be an integer in 0..$MAX_SIZE, got '$MIN_VAL_PAIRS'"
need_number WEIGHT_DECAY
[[ ! "$WEIGHT_DECAY" =~ ^- ]] || die "WEIGHT_DECAY must be a number >= 0, got '$WEIGHT_DECAY'"
need_flag BAGGING
[[ -z "$STANDARDIZE" ]] || need_flag STANDARDIZE
[[ -z "$MAX_PROMPTS" ]] || is_pos_int "$MAX_PROMPTS" || die "MAX_PROMPTS must be empty or a positive integer, got '$MAX_PROMPTS'"
if [[ "$RUN_GPU_STEPS" == 1 ]]; then
    for var in N_TRAIN_SAMPLES N_TEST_SAMPLES GEN_MAX_LEN TP_SIZE; do need_pos_int "$var"; done
    [[ "$RM_INPUT_FORMAT" =~ ^(raw|chat_template)$ ]] || die "RM_INPUT_FORMAT must be raw or chat_template, got '$RM_INPUT_FORMAT'"
    for var in GPU_MAX_PROMPTS GPU_MAX_TEST_PROMPTS; do
        [[ -z "${!var}" ]] || is_pos_int "${!var}" || die "$var must be empty or a positive integer, got '${!var}'"
    done
    is_int "$SFT_MAX_STEPS" || die "SFT_MAX_STEPS must be an integer, got '$SFT_MAX_STEPS'"
    [[ "$GEN_BACKEND" =~ ^(auto|vllm|transformers)$ ]] || die "GEN_BACKEND must be auto, vllm or transformers, got '$GEN_BACKEND'"
fi
[[ "$RUN_GPU_STEPS" == 1 && "$USE_REPO_EMBD" == 1 ]] && die "set at most one of RUN_GPU_STEPS=1 and USE_REPO_EMBD=1"
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
CURRENT="setup"
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
    echo "run_all.sh: $CURRENT was stopped by SIG$(kill -l "$(($1 - 128))") (exit status $1);" \
        "run the same command again to resume" >&2
}
on_signal() {  # on_signal NAME STATUS: forward to the running steps, wait for them, exit with one line
    trap '' INT TERM
    # Every background job: steps 6 and 7 run together, and a signal may land as a job starts.
    local jobs_running
    jobs_running="$(jobs -p)"
    if [[ -n "$jobs_running" ]]; then
        kill -"$1" $jobs_running 2>/dev/null || true
        wait $jobs_running 2>/dev/null || true
    fi
    echo "run_all.sh: stopped by SIG$1 during $CURRENT; run the same command again to resume" >&2
    exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
TEMP_FILES=()
cleanup() {  # at exit: temporary files; after a failure, the folders this run created if still empty
    local status=$? dir
    rm -f ${TEMP_FILES[@]+"${TEMP_FILES[@]}"}
    if (( status != 0 )); then
        for dir in ${CREATED_DIRS[@]+"${CREATED_DIRS[@]}"}; do rmdir "$dir" 2>/dev/null || true; done
    fi
}
trap cleanup EXIT

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
    [[ "$HAVE_FLOCK" == 1 && "$data_lock" != "$output_lock" ]] || return 0
    flock -s "$data_lock"  # a downgrade: never waits
}
IN_USE=()  # flag for the data writers while other runs read DATA_DIR

# --- data: GPU steps, published embeddings, or demo data ---------------------------------------
lock_data_dir
[[ "$DATA_WRITABLE" == 1 ]] || IN_USE=(--in_use)
if [[ "$RUN_GPU_STEPS" == 1 ]]; then
    [[ "$DATA_WRITABLE" == 1 ]] \
        || die "DATA_DIR '$DATA_DIR' is in use by another run_all.sh, and steps 1-4 would rewrite it; wait for that run or set another DATA_DIR"
    GEN_ARGS=(--model_name "$MODEL_NAME" --adapter_name sft --dataset "$DATASET" --eval_dataset "$EVAL_DATASET"
              --max_len "$GEN_MAX_LEN" --output_dir "$OUTPUT_DIR")
    RM_ARGS=(${GOLDEN_RM:+--reward_model "$GOLDEN_RM"} --rm_input_format "$RM_INPUT_FORMAT")
    section "Step 1: LoRA SFT of $MODEL_NAME on $DATASET"
    timed "step 1" "$PYTHON" step1_sft.py --model_name "$MODEL_NAME" --dataset "$DATASET" --learning_rate 5e-5 \
        --epochs 2 --max_steps "$SFT_MAX_STEPS" --seed "$SEED" --output_dir "$OUTPUT_DIR" \
        ${SFT_TRAIN_FILE:+--train_file "$SFT_TRAIN_FILE"}
    section "Step 2: sample $N_TRAIN_SAMPLES responses per training prompt, $N_TEST_SAMPLES per test prompt"
    timed "step 2 (train)" "$PYTHON" step2_gen_sample.py "${GEN_ARGS[@]}" --data_class train \
        --n_samples "$N_TRAIN_SAMPLES" --split all --backend "$GEN_BACKEND" --tensor_parallel_size "$TP_SIZE" --seed "$SEED" \
        ${GPU_MAX_PROMPTS:+--max_prompts "$GPU_MAX_PROMPTS"} ${TRAIN_PROMPTS_FILE:+--prompts_file "$TRAIN_PROMPTS_FILE"}
    timed "step 2 (test)" "$PYTHON" step2_gen_sample.py "${GEN_ARGS[@]}" --data_class test \
        --n_samples "$N_TEST_SAMPLES" --split all --backend "$GEN_BACKEND" --tensor_parallel_size "$TP_SIZE" --seed "$SEED" \
        ${GPU_MAX_TEST_PROMPTS:+--max_prompts "$GPU_MAX_TEST_PROMPTS"} ${TEST_PROMPTS_FILE:+--prompts_file "$TEST_PROMPTS_FILE"}
    section "Step 3: golden reward annotation"
    for DATA_CLASS in train test; do
        timed "step 3 ($DATA_CLASS)" "$PYTHON" step3_reward_annotation.py "${GEN_ARGS[@]}" --data_class "$DATA_CLASS" \
            --split all "${RM_ARGS[@]}"
    done
    section "Step 3.5: sort responses by golden reward"
    timed "step 3.5" "$PYTHON" step3.5_processing_data.py "${GEN_ARGS[@]}" --data_class both "${RM_ARGS[@]}"
    section "Step 4: embeddings with $EMBED_MODEL_NAME -> $DATA_DIR"
    timed "step 4" "$PYTHON" step4_gen_embeddings.py "${GEN_ARGS[@]}" --embed_model_name "$EMBED_MODEL_NAME" \
        --train_test both --data_dir "$DATA_DIR" "${RM_ARGS[@]}"
elif [[ "$USE_REPO_EMBD" == 1 ]]; then
    section "Convert published embeddings from $EMBD_REPO_DIR -> $DATA_DIR"
    timed "conversion" "$PYTHON" convert_embeddings.py --embd_dir "$EMBD_REPO_DIR" --task "$TASK" \
        --sft_obj "$SFT_OBJ" --embed_model "$MODEL_NAME" --gen_model "$REPO_GEN_MODEL" \
        --output_dir "$DATA_DIR" ${MAX_PROMPTS:+--max_prompts "$MAX_PROMPTS"} ${IN_USE[@]+"${IN_USE[@]}"}
else
    if [[ -f "$DATA_DIR/demo_config.json" ]] || ! compgen -G "$DATA_DIR/EMBD-TRAIN-split_*.npy" >/dev/null; then
        section "Demo data -> $DATA_DIR"
        timed "demo data" "$PYTHON" generate_demo_data.py --output_dir "$DATA_DIR" \
            --n_prompts "$DEMO_PROMPTS" --n_splits "$DEMO_N_SPLITS" --emb_dim "$DEMO_EMB_DIM" --seed "$DEMO_SEED" \
            --n_test_prompts "$DEMO_TEST_PROMPTS" --n_test_responses "$DEMO_TEST_RESPONSES" ${IN_USE[@]+"${IN_USE[@]}"}
    else
        echo "Using embeddings in $DATA_DIR/"
    fi
fi
share_data_dir
[[ "$DATA_ONLY" == 1 ]] && exit 0

# --- steps 5-8 on the CPU, resumable --------------------------------------------------------
# run_state.py prints "[step N up to date]" instead of running a step whose record matches this
# command line, the code and the previous step's outputs (step 5: the data's fingerprint), and whose
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
resumable run_child 5 "" "$PYTHON" step5_train_rms.py \
    --embed_model_name "$EMBED_MODEL_NAME" --task "$TASK" --sft_obj "$SFT_OBJ" \
    --gen_pref_model_name "$GEN_PREF_MODEL" --rm_objective "$RM_OBJECTIVE" \
    --consider_first_n "$CONSIDER_FIRST_N" --n_sample "$N_SAMPLE" ${EVAL_PROMPTS:+--eval_prompts "$EVAL_PROMPTS"} \
    --split_seed "$SPLIT_SEED" --n_pairs "$N_PAIRS" --pair_mode "$PAIR_MODE" \
    --replacement "$([[ "$REPLACEMENT" == 1 ]] && echo replacement_true || echo replacement_false)" \
    --training_epochs "$TRAINING_EPOCHS" --learning_rate "$LEARNING_RATE" --seed "$SEED" \
    --annotation_quality "$ANNOTATION_QUALITY" --ensemble_number "$ENSEMBLE_NUMBER" \
    --early_stopping "$EARLY_STOPPING" --stop_metric "$STOP_METRIC" --min_val_pairs "$((10#$MIN_VAL_PAIRS))" --weight_decay "$WEIGHT_DECAY" \
    --bagging "$BAGGING" ${STANDARDIZE:+--standardize "$STANDARDIZE"} --data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR" \
    ${MIN_EPOCH_STEPS:+--min_epoch_steps "$MIN_EPOCH_STEPS"} ${REWARD_SCALE:+--reward_scale "$REWARD_SCALE"}
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
if (( LAST_STEP >= 7 )); then
    resumable start_child 7 5 "$PYTHON" step7_isotonic_distillation.py --output_dir "$OUTPUT_DIR" \
        --data_dir "$DATA_DIR" --task "$TASK" --rm_objective "$RM_OBJECTIVE" --distill_epochs "$DISTILL_EPOCHS" \
        --learning_rate "$DISTILL_LEARNING_RATE" --seed "$SEED" >"$STEP7_LOG" 2>"$STEP7_ERR"
    STEP7_PID=$!
fi
section "Step 6: evaluate ranking quality" "steps 6 and 7"
STATUS=0
resumable run_child 6 5 "$PYTHON" step6_eval_rms.py --output_dir "$OUTPUT_DIR" --data_dir "$DATA_DIR" || STATUS=$?
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

section "Step 8: validate Teacher, Teacher+Isotonic, Student, Student+Isotonic"
resumable run_child 8 7 "$PYTHON" step8_validate_distillation.py --output_dir "$OUTPUT_DIR" --data_dir "$DATA_DIR"

TABLE="$OUTPUT_DIR/validation_table.txt"
if [[ -f "$TABLE" && ! "$TABLE" -nt "$STEPS_STARTED" ]]; then  # step 8 was up to date: show its table
    cat "$TABLE"
fi

section "Done in $((SECONDS - step_start)) s"
echo "Outputs in $OUTPUT_DIR/ (orm_manifest.json lists the ORM checkpoints, distillation_config.json the"
echo "student and isotonic maps; validation_results.json holds the table above). Plots:"
ls "$OUTPUT_DIR"/*.png
