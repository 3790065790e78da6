#!/usr/bin/env bash
# run_all.sh: the whole pipeline from environment variables (README, "run_all.sh configuration").
#   bash run_all.sh                          # demo data -> steps 5-8 on the CPU
#   USE_REPO_EMBD=1 TASK=harmless bash run_all.sh   # published embeddings -> steps 5-8
#   RUN_GPU_STEPS=1 bash run_all.sh          # steps 1-4 on a GPU, then 5-8
# Every value is validated before any work starts; file names come from step 5's manifest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

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
ENSEMBLE_NUMBER="${ENSEMBLE_NUMBER:-10}"
TRAINING_EPOCHS="${TRAINING_EPOCHS:-2}"
DISTILL_EPOCHS="${DISTILL_EPOCHS:-20}"
LEARNING_RATE="${LEARNING_RATE:-0.001}"
ANNOTATION_QUALITY="${ANNOTATION_QUALITY:-10}"
SEED="${SEED:-6}"
OUTPUT_DIR="${OUTPUT_DIR:-distill_out}"
DATA_DIR="${DATA_DIR:-data}"
MAX_PROMPTS="${MAX_PROMPTS:-}"
EMBD_REPO_DIR="${EMBD_REPO_DIR:-embd/RM-Embeddings}"
# Demo data: prompts beyond N_SAMPLE for the calibration/student/held-out shares, and a test set.
DEMO_EXTRA_PROMPTS="${DEMO_EXTRA_PROMPTS:-1000}"
DEMO_EMB_DIM="${DEMO_EMB_DIM:-2048}"
DEMO_TEST_PROMPTS="${DEMO_TEST_PROMPTS:-20}"
DEMO_TEST_RESPONSES="${DEMO_TEST_RESPONSES:-100}"

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^-?[0-9]+$ ]]; }
is_pos_int() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 > 0 )); }
is_number() { [[ "$1" =~ ^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]]; }
need_pos_int() { is_pos_int "${!1}" || die "$1 must be a positive integer, got '${!1}'"; }
need_flag() { [[ "${!1}" == 0 || "${!1}" == 1 ]] || die "$1 must be 0 or 1, got '${!1}'"; }

need_flag RUN_GPU_STEPS
need_flag USE_REPO_EMBD
[[ "$TASK" == helpful || "$TASK" == harmless ]] || die "TASK must be helpful or harmless, got '$TASK'"
[[ "$RM_OBJECTIVE" == bt || "$RM_OBJECTIVE" == clf ]] || die "RM_OBJECTIVE must be bt or clf, got '$RM_OBJECTIVE'"
for var in N_SAMPLE ENSEMBLE_NUMBER TRAINING_EPOCHS DISTILL_EPOCHS DEMO_EXTRA_PROMPTS DEMO_EMB_DIM DEMO_TEST_RESPONSES; do
    need_pos_int "$var"
done
is_int "$DEMO_TEST_PROMPTS" && (( DEMO_TEST_PROMPTS >= 0 )) || die "DEMO_TEST_PROMPTS must be an integer >= 0, got '$DEMO_TEST_PROMPTS'"
is_int "$SEED" || die "SEED must be an integer, got '$SEED'"
is_int "$CONSIDER_FIRST_N" && (( CONSIDER_FIRST_N > 0 || CONSIDER_FIRST_N == -1 || CONSIDER_FIRST_N == -2 )) \
    || die "CONSIDER_FIRST_N must be a positive integer, -1 or -2, got '$CONSIDER_FIRST_N'"
is_number "$ANNOTATION_QUALITY" || die "ANNOTATION_QUALITY must be a number, got '$ANNOTATION_QUALITY'"
is_number "$LEARNING_RATE" && [[ ! "$LEARNING_RATE" =~ ^- ]] && [[ "$LEARNING_RATE" =~ [1-9] ]] \
    || die "LEARNING_RATE must be a positive number, got '$LEARNING_RATE'"
[[ -z "$MAX_PROMPTS" ]] || is_pos_int "$MAX_PROMPTS" || die "MAX_PROMPTS must be empty or a positive integer, got '$MAX_PROMPTS'"
[[ "$RUN_GPU_STEPS" == 1 && "$USE_REPO_EMBD" == 1 ]] && die "set at most one of RUN_GPU_STEPS=1 and USE_REPO_EMBD=1"

section() { printf '\n=== %s ===\n' "$1"; }
step_start=$SECONDS
timed() {  # run a step and report its wall time
    local name="$1"; shift
    local t0=$SECONDS
    "$@"
    echo "[$name took $((SECONDS - t0)) s]"
}

# --- data: GPU steps, published embeddings, or demo data ---------------------------------------
if [[ "$RUN_GPU_STEPS" == 1 ]]; then
    die "RUN_GPU_STEPS=1: steps 1-4 are not wired into run_all.sh yet"
elif [[ "$USE_REPO_EMBD" == 1 ]]; then
    die "USE_REPO_EMBD=1: convert_embeddings.py is not wired into run_all.sh yet"
else
    mkdir -p "$DATA_DIR"
    if [[ -f "$DATA_DIR/demo_config.json" ]] || ! compgen -G "$DATA_DIR/EMBD-TRAIN-split_*.npy" >/dev/null; then
        section "Demo data -> $DATA_DIR"
        timed "demo data" "$PYTHON" generate_demo_data.py --output_dir "$DATA_DIR" \
            --n_prompts $((N_SAMPLE + DEMO_EXTRA_PROMPTS)) --emb_dim "$DEMO_EMB_DIM" --seed "$SEED" \
            --n_test_prompts "$DEMO_TEST_PROMPTS" --n_test_responses "$DEMO_TEST_RESPONSES"
    else
        echo "Using embeddings in $DATA_DIR/"
    fi
fi

# --- steps 5-8 on the CPU --------------------------------------------------------------------
section "Step 5: train the ORM ensemble"
timed "step 5" "$PYTHON" step5_train_rms.py \
    --embed_model_name "$MODEL_NAME" --task "$TASK" --sft_obj "$SFT_OBJ" \
    --gen_pref_model_name "$GEN_PREF_MODEL" --rm_objective "$RM_OBJECTIVE" \
    --consider_first_n "$CONSIDER_FIRST_N" --n_sample "$N_SAMPLE" \
    --training_epochs "$TRAINING_EPOCHS" --learning_rate "$LEARNING_RATE" --seed "$SEED" \
    --annotation_quality "$ANNOTATION_QUALITY" --ensemble_number "$ENSEMBLE_NUMBER" \
    --data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR"

section "Step 6: evaluate ranking quality"
timed "step 6" "$PYTHON" step6_eval_rms.py --output_dir "$OUTPUT_DIR" --data_dir "$DATA_DIR"

section "Done in $((SECONDS - step_start)) s"
echo "Outputs in $OUTPUT_DIR/ (orm_manifest.json lists the checkpoints):"
ls "$OUTPUT_DIR"/*.json "$OUTPUT_DIR"/*.png
