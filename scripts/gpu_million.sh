#!/usr/bin/env bash
# A million rows through the whole migration graph on one GPU: what runs on the GPU machine, from the repository
# root. docs/gpu_million.md says how to prepare it (scripts/gpu_million_wheels.sh, once, where PyPI is reachable)
# and gives the exact command for the device; scripts/gpu_million.py is the driver and says what it measures.
#
#   bash scripts/gpu_million.sh                           # 1,000,000 rows, bge-small shape, fp16 on cuda
#   PARALLEL=4 bash scripts/gpu_million.sh                # four embedding_batches runs at once, then embeddings*
#   DEVICE=cpu ROWS=20000 MODEL=tiny bash scripts/gpu_million.sh   # the dry run, on a machine without a GPU
#
# Other overrides: BATCH_SIZE, BATCH_ROWS, BARE_TEXTS, CHECK_SAMPLE_ROWS, PYTHON. Results: $OUT (the device
# tool's folder), else ./gpu_million_results.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_million_results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"

# The pipeline's imports, tried from the checkout: where they fail, the carried wheels go into a folder of their
# own on PYTHONPATH (scripts/gpu_env.sh, shared with scripts/gpu_bench.sh, says how and why).
. scripts/gpu_env.sh
gpu_env_install gpu_million

DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else
         f"gpu_million: DEVICE=cuda but torch {torch.__version__} sees no CUDA GPU; for a dry run here: DEVICE=cpu ROWS=20000 MODEL=tiny")'
fi

args=(--device "$DEVICE" --rows "${ROWS:-1000000}" --parallel "${PARALLEL:-1}" --out "$OUT_DIR")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
[ -n "${BATCH_SIZE:-}" ] && args+=(--batch-size "$BATCH_SIZE")
[ -n "${BATCH_ROWS:-}" ] && args+=(--batch-rows "$BATCH_ROWS")
[ -n "${BARE_TEXTS:-}" ] && args+=(--bare-texts "$BARE_TEXTS")
[ -n "${CHECK_SAMPLE_ROWS:-}" ] && args+=(--check-sample-rows "$CHECK_SAMPLE_ROWS")
[ -f "$WHEELS/sotu_segments.jsonl.gz" ] && [ ! -f ../shared/data/sotu_segments.jsonl ] &&
  args+=(--corpus "$WHEELS/sotu_segments.jsonl.gz")
exec "$PYTHON" scripts/gpu_million.py "${args[@]}"
