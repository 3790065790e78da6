#!/usr/bin/env bash
# GPU smoke check of steps 1-4 on tiny local models, as docs/gpu_steps.md describes; the
# models are width 256 so attention heads have GPU-kernel size 64. Needs no network. Also checks
# that step 4 in 2 shards, merged, writes the same bytes as one process on this device.
#   bash benchmarks/gpu_smoke.sh [WORK_DIR]     # default: a fresh temporary folder
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DEVICE="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
BACKEND=transformers
if [[ -n "$DEVICE" ]]; then
    echo "gpu_smoke: CUDA device: $DEVICE"
    declare -A N_SAMPLES=([train]=10 [test]=50)
    "$PYTHON" -c 'import vllm' 2>/dev/null && BACKEND=vllm \
        || echo "gpu_smoke: vllm does not import: step 2 uses the transformers backend"
else
    echo "gpu_smoke: no CUDA GPU: running steps 1-4 on the CPU (bf16 on CPU, transformers backend, fewer samples);" \
         "timings are not GPU numbers"
    declare -A N_SAMPLES=([train]=4 [test]=10)
fi

TIMES=()
timed() {  # timed NAME LOGFILE COMMAND...: run, keep its output, record the wall time
    local name="$1" log="$2"; shift 2
    local t0 t1
    t0=$(date +%s.%N)
    if ! "$@" >"$log" 2>&1; then
        echo "gpu_smoke: $name failed; its output:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    TIMES+=("$(printf '%-18s %8.2f s' "$name" "$(awk "BEGIN { print $t1 - $t0 }")")")
    grep -E "^step" "$log" || true
}

mkdir -p "$WORK"
echo "gpu_smoke: work folder $WORK"
"$PYTHON" tests/tiny_models.py "$WORK/tiny" 256 >"$WORK/tiny_paths.txt"
TINY="$WORK/tiny"
OUT="$WORK/out"
GEN=(--model_name "$TINY/policy-lm" --adapter_name sft --dataset tiny-helpful --eval_dataset tiny-helpful
     --max_len 32 --output_dir "$OUT")
RM=(--reward_model "$TINY/golden-rm")

timed "step 1" "$WORK/step1.log" "$PYTHON" step1_sft.py --model_name "$TINY/policy-lm" --dataset tiny-helpful \
    --train_file "$TINY/train_prompts.jsonl" --max_steps 10 --output_dir "$OUT"
for DATA_CLASS in train test; do
    timed "step 2 ($DATA_CLASS)" "$WORK/step2_$DATA_CLASS.log" "$PYTHON" step2_gen_sample.py "${GEN[@]}" \
        --data_class "$DATA_CLASS" --n_samples "${N_SAMPLES[$DATA_CLASS]}" --shard_index all --num_shards 1 \
        --backend "$BACKEND" --dtype bfloat16 --max_prompt_len 100 --prompts_file "$TINY/${DATA_CLASS}_prompts.jsonl"
    timed "step 3 ($DATA_CLASS)" "$WORK/step3_$DATA_CLASS.log" "$PYTHON" step3_reward_annotation.py "${GEN[@]}" \
        "${RM[@]}" --data_class "$DATA_CLASS" --shard_index all --dtype bfloat16
done
timed "step 3.5" "$WORK/step35.log" "$PYTHON" step3.5_processing_data.py "${GEN[@]}" "${RM[@]}"
for DTYPE in bfloat16 float32; do
    timed "step 4 ($DTYPE)" "$WORK/step4_$DTYPE.log" "$PYTHON" step4_gen_embeddings.py "${GEN[@]}" "${RM[@]}" \
        --embed_model_name "$TINY/embed-left" --data_dir "$WORK/data_$DTYPE" --dtype "$DTYPE" --batch_size 64
done
STEP4_SHARDED=("$PYTHON" step4_gen_embeddings.py "${GEN[@]}" "${RM[@]}" --embed_model_name "$TINY/embed-left"
               --data_dir "$WORK/data_shards" --dtype bfloat16 --batch_size 64 --num_shards 2)
for SHARD in 0 1; do
    timed "step 4 (shard $SHARD/2)" "$WORK/step4_shard$SHARD.log" "${STEP4_SHARDED[@]}" --shard_index "$SHARD"
done
timed "step 4 (merge)" "$WORK/step4_merge.log" "${STEP4_SHARDED[@]}" --merge

echo
echo "=== gpu_smoke: times (${DEVICE:-CPU}, step 2 backend $BACKEND) ==="
printf '%s\n' "${TIMES[@]}"
for part in train test; do
    echo "step 2 ($part): $(grep -o "[0-9]* tokens in [0-9.]* s = [0-9.]* tokens/s" "$WORK/step2_$part.log")"
done
for run in step4_bfloat16 step4_float32; do
    echo "$run: $(grep -o "[a-z]*: [0-9]* prompts x [0-9]* splits\|[0-9.]* embeddings/s, [a-z0-9]*" "$WORK/$run.log" \
        | paste -sd ' ' -)"
done

# bf16 embeddings against the fp32 forward of the same texts, split by split
"$PYTHON" - "$WORK/data_bfloat16" "$WORK/data_float32" <<'EOF'
import sys

import numpy as np
from rm_data import load_embedding_set  # the working folder (the repository) is on the path

for kind in ("train", "test"):
    bf16, fp32 = load_embedding_set(sys.argv[1], kind), load_embedding_set(sys.argv[2], kind)
    assert np.array_equal(bf16.rewards, fp32.rewards), "both runs read the same ranked responses"
    a, b = np.stack(bf16.embeddings), np.stack(fp32.embeddings)  # (K, N, D)
    assert a.dtype == np.float32 and b.dtype == np.float32
    worst = float(np.max(np.linalg.norm(a - b, axis=2) / np.linalg.norm(b, axis=2)))
    status = "ok" if worst < 0.05 else "FAILED"
    print(f"embeddings {kind}: {fp32.n_prompts} prompts x {fp32.n_splits}, bf16 vs fp32 worst relative "
          f"L2 error {worst:.4f} (limit 0.05): {status}")
    if worst >= 0.05:
        sys.exit(1)
EOF
if diff -r "$WORK/data_bfloat16" "$WORK/data_shards" >/dev/null; then
    echo "step 4 in 2 shards, merged: the same bytes as one process: ok"
else
    echo "step 4 in 2 shards, merged: differs from one process: FAILED" >&2
    exit 1
fi
echo "gpu_smoke: done"
