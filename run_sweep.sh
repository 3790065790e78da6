#!/usr/bin/env bash
# run_sweep.sh: a grid of run_all.sh runs over seeds, then one summary table and figures
# (README, "Reproducing the paper's comparisons"; its settings: docs/sweeps.md).
#   SWEEP=annotation_quality SEEDS="1 2 3" JOBS=2 bash run_sweep.sh
#   GRID="RM_OBJECTIVE=bt,clf N_PAIRS=1,5" SEEDS="1 2" NAME=my_study bash run_sweep.sh
#   PRINT=1 SWEEP=n_sample bash run_sweep.sh > cells.txt   # one command per cell, for xargs -P,
#                                                          # GNU parallel or a SLURM array
# Every cell is a normal, resumable run_all.sh run in $SWEEP_DIR/$NAME/VAR=value,...,SEED=s; a rerun
# finishes what is missing. Other run_all.sh variables in the environment apply to every cell.
if [ -z "${BASH_VERSION:-}" ]; then  # POSIX sh up to here: sh (dash) would fail on pipefail below
    echo "run_sweep.sh: error: run it with bash (bash run_sweep.sh), not sh" >&2
    exit 2
fi
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER_DIR="$PWD"  # relative paths (SWEEP_DIR, DATA_DIR) mean what they mean to the caller

die() { echo "run_sweep.sh: error: $*" >&2; exit 2; }
SWEEP="${SWEEP:-}"
JOBS="${JOBS:-1}"
PRINT="${PRINT:-0}"
SEEDS="${SEEDS:-1 2 3}"
SWEEP_DIR="${SWEEP_DIR:-sweeps}"
PYTHON="${PYTHON:-python3}"
[[ "$JOBS" =~ ^[0-9]+$ ]] && (( JOBS > 0 )) || die "JOBS must be a positive integer, got '$JOBS'"
[[ "$PRINT" == 0 || "$PRINT" == 1 ]] || die "PRINT must be 0 or 1, got '$PRINT'"
CORES="$(nproc 2>/dev/null || echo 1)"
THREADS="${THREADS:-$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))}"  # torch/BLAS threads per cell
[[ "$THREADS" =~ ^[0-9]+$ ]] && (( THREADS > 0 )) || die "THREADS must be a positive integer, got '$THREADS'"

# Presets: the original authors' README's recommended experiments and the paper's pairing-design study. Each
# crosses its variable with both objectives; GRID overrides a preset's grid, the environment its
# fixed settings.
case "$SWEEP" in
    annotation_quality) PRESET_GRID="RM_OBJECTIVE=bt,clf ANNOTATION_QUALITY=10,1,0.5,0.1" ;;
    n_sample) PRESET_GRID="RM_OBJECTIVE=bt,clf N_SAMPLE=100,500,1000,2000" ;;
    objective) PRESET_GRID="RM_OBJECTIVE=bt,clf" ;;
    rm_model) PRESET_GRID="RM_OBJECTIVE=bt,clf RM_MODEL=mlp,lgbm" ;;  # MLP vs LightGBM members
    embedding)
        PRESET_GRID="RM_OBJECTIVE=bt,clf MODEL_NAME=gemma2b,gemma7b,llama38b"
        [[ "${USE_REPO_EMBD:-0}" == 1 ]] || die "SWEEP=embedding compares embedding models: it needs USE_REPO_EMBD=1 (demo data has no embedding model)" ;;
    pairing)
        PRESET_GRID="RM_OBJECTIVE=bt,clf PAIR_MODE=xprompt,same N_PAIRS=1,2,5"
        export CONSIDER_FIRST_N="${CONSIDER_FIRST_N:-10}" ;;  # enough candidates for 5 pairs per prompt
    small_budget)  # docs/studies/small_budget_demo.md
        PRESET_GRID="EARLY_STOPPING=member,pooled STOP_METRIC=loss,accuracy ANNOTATION_QUALITY=10,1 N_SAMPLE=100,300,1000"
        export ENSEMBLE_NUMBER="${ENSEMBLE_NUMBER:-3}" TRAINING_EPOCHS="${TRAINING_EPOCHS:-30}" LAST_STEP="${LAST_STEP:-6}" ;;
    "") PRESET_GRID="" ;;
    *) die "SWEEP must be annotation_quality, n_sample, objective, rm_model, embedding, pairing or small_budget (or empty with GRID), got '$SWEEP'" ;;
esac
GRID_SET="${GRID:-}"
GRID="${GRID:-$PRESET_GRID}"
NAME="${NAME:-${SWEEP:-custom}}"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "NAME must be letters, digits, '.', '_' or '-', got '$NAME'"
[[ "${RUN_GPU_STEPS:-0}" == 0 ]] || die "RUN_GPU_STEPS=1 is not swept: run the GPU steps once with run_all.sh, then sweep with DATA_DIR set to their data"
# Each value once: a value listed twice would be one cell twice (one folder, one log), run side by
# side with JOBS > 1. Numbers are compared by value (10 and 10.0, 1 and 01 are one), the first
# spelling kept; other words as written.
unique_values() {  # unique_values VALUE...: one per line, duplicates dropped
    printf '%s\n' "$@" | awk '{
        key = ($0 ~ /^[-+]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][-+]?[0-9]+)?$/) ? sprintf("n%.17g", $0 + 0) : "s" $0
    } !seen[key]++'
}
read -r -a SEED_LIST <<< "$SEEDS"
(( ${#SEED_LIST[@]} > 0 )) || die "SEEDS must list at least one integer seed"
MAX_SEED=4294967295  # the steps' --seed range (cli.random_seed): 0 .. 2**32 - 1
for seed in "${SEED_LIST[@]}"; do
    [[ "$seed" =~ ^[0-9]+$ ]] && (( ${#seed} <= 10 && 10#$seed <= MAX_SEED )) \
        || die "SEEDS must be integers from 0 to $MAX_SEED (the steps' --seed), got '$seed'"
done
mapfile -t UNIQUE_SEEDS < <(unique_values "${SEED_LIST[@]}")
if (( ${#UNIQUE_SEEDS[@]} < ${#SEED_LIST[@]} )); then
    echo "run_sweep.sh: note: SEEDS lists a seed more than once; running each once: ${UNIQUE_SEEDS[*]}" >&2
    SEED_LIST=("${UNIQUE_SEEDS[@]}")
fi
if [[ -n "$SWEEP" && -n "$GRID_SET" ]]; then
    echo "run_sweep.sh: note: GRID replaces the grid of SWEEP=$SWEEP ($PRESET_GRID); SWEEP=$SWEEP still names" \
         "the sweep and sets its fixed settings" >&2
fi

# run_all.sh's variables (settings.py): the grid may set any of them.
RUN_ALL_VARS_TEXT="$("$PYTHON" "$REPO/settings.py" variables)" || die "PYTHON '$PYTHON' cannot run settings.py of $REPO"
mapfile -t RUN_ALL_VARS <<< "$RUN_ALL_VARS_TEXT"
is_run_all_var() { [[ " ${RUN_ALL_VARS[*]} " == *" $1 "* ]]; }
AXES=() AXIS_VALUES=()
for axis in $GRID; do
    var="${axis%%=*}" values="${axis#*=}"
    [[ "$axis" == *=* && -n "$values" ]] || die "GRID entries must be VAR=value1,value2,..., got '$axis'"
    is_run_all_var "$var" || die "GRID variable $var is not a run_all.sh variable"
    case "$var" in
        SEED) die "GRID cannot vary SEED: list the seeds in SEEDS" ;;
        OUTPUT_DIR | DATA_ONLY | FORCE | RUN_GPU_STEPS) die "GRID cannot vary $var" ;;
        DEMO_*) die "GRID cannot vary $var: the cells share one demo DATA_DIR (run one sweep per demo setting, each with its own DATA_DIR)" ;;
    esac
    [[ "$values" =~ ^[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*$ ]] || die "GRID values of $var must be plain words separated by commas, got '$values'"
    [[ " ${AXES[*]-} " != *" $var "* ]] || die "GRID lists $var twice: give all its values in one entry ($var=a,b)"
    IFS=, read -r -a listed <<< "$values"
    mapfile -t unique < <(unique_values "${listed[@]}")
    if (( ${#unique[@]} < ${#listed[@]} )); then
        echo "run_sweep.sh: note: GRID lists a value of $var more than once; running each once: $(IFS=,; echo "${unique[*]}")" >&2
        values="$(IFS=,; echo "${unique[*]}")"
    fi
    AXES+=("$var") AXIS_VALUES+=("$values")
done

# Settings every cell shares: the run_all.sh variables set in this environment (folders made
# absolute, so they mean what they mean here wherever a cell runs).
for var in DATA_DIR EMBD_REPO_DIR; do
    [[ -n "${!var:-}" && "${!var}" != /* ]] && export "$var=$CALLER_DIR/${!var}"
done
FIXED=()
for var in "${RUN_ALL_VARS[@]}"; do
    [[ -v "$var" && "$var" != OUTPUT_DIR && "$var" != SEED ]] && FIXED+=("$var=${!var}")
done
FIXED+=("OMP_NUM_THREADS=$THREADS" "MKL_NUM_THREADS=$THREADS" "OPENBLAS_NUM_THREADS=$THREADS")

# The cells: the cross product of the axes (first axis slowest), each with every seed.
COMBOS=("")
for i in "${!AXES[@]}"; do
    IFS=, read -r -a values <<< "${AXIS_VALUES[i]}"
    next=()
    for combo in "${COMBOS[@]}"; do
        for value in "${values[@]}"; do next+=("${combo:+$combo,}${AXES[i]}=$value"); done
    done
    COMBOS=("${next[@]}")
done
[[ "$SWEEP_DIR" == /* ]] || SWEEP_DIR="$CALLER_DIR/$SWEEP_DIR"
ROOT="$SWEEP_DIR/$NAME"
mkdir -p "$ROOT/logs" 2>/dev/null || die "SWEEP_DIR '$SWEEP_DIR' is not writable"
# Canonical (symbolic links and '..' resolved, as run_all.sh does for its paths), so that the cells'
# OUTPUT_DIR and the summary's run paths do not depend on how SWEEP_DIR was spelled.
ROOT="$(cd "$ROOT" && pwd -P)"
quote() {  # shell-quote $1, leaving plain words (paths, VAR=a,b) readable
    if [[ "$1" =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi
}
cell_command() {  # cell_command COMBO SEED [DATA_ONLY] -> one shell line
    local combo="$1" seed="$2" cell="${1:+$1,}SEED=$2" assignments=() setting
    IFS=, read -r -a settings <<< "$combo"
    for setting in "${FIXED[@]}" ${settings[@]+"${settings[@]}"} "SEED=$seed" "OUTPUT_DIR=$ROOT/$cell" ${3:+"DATA_ONLY=1"}; do
        assignments+=("${setting%%=*}=$(quote "${setting#*=}")")
    done
    printf 'cd %s && env %s bash %s > %s 2>&1' "$(quote "$CALLER_DIR")" "${assignments[*]}" \
        "$(quote "$REPO/run_all.sh")" "$(quote "$ROOT/logs/${cell}${3:+.data}.log")"
}
COMMANDS=() CELLS=()
for combo in "${COMBOS[@]}"; do
    for seed in "${SEED_LIST[@]}"; do
        COMMANDS+=("$(cell_command "$combo" "$seed")") CELLS+=("$ROOT/${combo:+$combo,}SEED=$seed")
    done
done
if [[ "$PRINT" == 1 ]]; then
    printf '%s\n' "${COMMANDS[@]}"
    exit 0
fi

echo "sweep $NAME: ${#COMBOS[@]} settings x ${#SEED_LIST[@]} seeds = ${#CELLS[@]} cells, $JOBS at a time," \
     "$THREADS threads each -> $ROOT"
start=$SECONDS
# Data first, once per setting (the seeds share it), so parallel cells never prepare it; this also
# validates every setting before any training starts.
for combo in "${COMBOS[@]}"; do
    command="$(cell_command "$combo" "${SEED_LIST[0]}" data)"
    bash -c "$command" || die "preparing the data for '${combo:-the cells}' failed: $(tail -n 1 "$ROOT/logs/${combo:+$combo,}SEED=${SEED_LIST[0]}.data.log")"
done
FAILED="$ROOT/logs/failed_cells.txt"
rm -f "$FAILED"
CELL_SCRIPTS="$(mktemp)"
trap 'rm -f "$CELL_SCRIPTS"' EXIT
for i in "${!COMMANDS[@]}"; do
    cell="$(quote "${CELLS[i]##*/}")"
    printf 'if %s; then echo "[done $(date +%%T)] "%s; else echo "[FAILED] "%s; echo %s >> %q; fi\0' \
        "${COMMANDS[i]}" "$cell" "$cell" "$cell" "$FAILED"
done > "$CELL_SCRIPTS"
# The cells run in a process group of their own (set -m), in the background while this script
# waits, so that Ctrl-C or a SIGTERM sent to this script alone (a scheduler's) reaches every running
# cell (each run_all.sh stops its step cleanly) and no new cell starts; without it the cells ran on.
# If this script dies all the same (kill -9), a watcher sends the cells SIGTERM.
stop_cells() {  # stop_cells NAME STATUS
    trap '' INT TERM
    kill "$WATCHER_PID" 2>/dev/null || true
    kill -"$1" -- -"$CELLS_PID" 2>/dev/null || true
    wait "$CELLS_PID" 2>/dev/null || true
    echo "run_sweep.sh: stopped by SIG$1; run the same command again to finish the sweep" >&2
    exit "$2"
}
WATCHER_PID=""
set -m
xargs -0 -n 1 -P "$JOBS" bash -c < "$CELL_SCRIPTS" &
CELLS_PID=$!
set +m
trap 'stop_cells INT 130' INT
trap 'stop_cells TERM 143' TERM
# The watcher reads a pipe that only this script writes to (opened after the cells started, so they
# do not hold it): when this script is gone, however it died, the read ends.
exec {ALIVE}> >(read -r _ || kill -TERM -- -"$CELLS_PID" >/dev/null 2>&1)
WATCHER_PID=$!
wait "$CELLS_PID" 2>/dev/null || true
trap - INT TERM
kill "$WATCHER_PID" 2>/dev/null || true
exec {ALIVE}>&-
echo "sweep $NAME: ${#CELLS[@]} cells in $((SECONDS - start)) s"

DONE=()
for cell in "${CELLS[@]}"; do  # finished cells (LAST_STEP may end them before step 8)
    [[ -f "$cell/orm_manifest.json" ]] && ! grep -qxF "${cell##*/}" "$FAILED" 2>/dev/null && DONE+=("$cell")
done
if (( ${#DONE[@]} )); then
    "$PYTHON" "$REPO/summarize_runs.py" --output_dir "$ROOT" "${DONE[@]}"
fi
if [[ -s "$FAILED" ]]; then
    echo "run_sweep.sh: $(wc -l < "$FAILED") of ${#CELLS[@]} cells failed (logs in $ROOT/logs/):" >&2
    cat "$FAILED" >&2
    exit 1
fi
