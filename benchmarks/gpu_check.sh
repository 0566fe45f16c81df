#!/usr/bin/env bash
# dstk's GPU check, one command on a machine with a CUDA GPU (about 7 minutes on one H200):
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT (default gpu_check/) gets summary.md and summary.json
#
# 1. tests/gpu (marker gpu): the built-in default and a 100M LLaMA in bf16 under ZeRO 0-3 and QLoRA
#    NF4, each a whole run on one GPU (train, final/ reloaded to the engine's logits, rollback +
#    resume, NF4 export); NF4/FP4/int8 exports reloaded faithfully; batched generation with the KV
#    cache on a full and an NF4 model; more ranks than GPUs refused.
# 2. benchmarks/trainer_throughput.py on one GPU: dstk vs the HF Trainer on a 119M LLaMA, the same
#    data and ZeRO stage, real tokens/s and MFU against the bf16 matmul peak measured in the run.
# 3. benchmarks/gpu_summary.py: the table of both, from what 1 and 2 left in OUT.
# Each part has its own time limit, so a hang in one leaves the others' results. Exit 0 when all passed.
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=$(realpath -m "${1:-gpu_check}")
mkdir -p "$out"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here: run the GPU check on a GPU host')" || exit 2
export DSTK_GPU_FIGURES="$out/figures.jsonl" PYTHONUNBUFFERED=1
rm -f "$DSTK_GPU_FIGURES" "$out/tests.xml" "$out/throughput.json"

echo "gpu check: tests/gpu ($out/tests.log)"
# lanes share the GPU: each run is small, and start-up (imports, the launcher) is most of its time
timeout -s INT -k 30 "${DSTK_GPU_TESTS_TIMEOUT:-300}" "$py" -m pytest tests/gpu -p no:cacheprovider -o addopts="" \
    -v -ra -n "${DSTK_GPU_LANES:-6}" --dist loadgroup --junitxml "$out/tests.xml" > "$out/tests.log" 2>&1
tail -n 3 "$out/tests.log"

echo "gpu check: dstk vs the HF Trainer ($out/throughput.log)"
timeout -s INT -k 30 "${DSTK_GPU_BENCH_TIMEOUT:-200}" "$py" benchmarks/trainer_throughput.py --data variable \
    --layers 16 --micro-batch-size 32 --seq-len 512 --steps 30 --warmup-steps 10 --repeats 1 --no-trainer-compile \
    --json "$out/throughput.json" > "$out/throughput.log" 2>&1
tail -n 4 "$out/throughput.log"

"$py" benchmarks/gpu_summary.py "$out"
