"""`bge-pipeline eval`: recall@k and nDCG@k of the query path on a judged query set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bge_pipeline.cli.models import demo_settings
from bge_pipeline.core.corpus import load_segments
from bge_pipeline.core.evaluation import evaluate, load_reranker
from bge_pipeline.core.judged_set import EVAL_SET, build_queries, load_queries, write_queries
from bge_pipeline.core.settings import Settings


def _eval_command(args: argparse.Namespace, settings: Settings) -> int:
    settings = demo_settings(settings)
    queries = load_queries(args.queries)
    if args.limit:
        queries = queries[: args.limit]
    reranker, why_not = load_reranker(settings)
    report = evaluate(queries, settings, k=args.k, reranker=reranker)
    if why_not:
        report.notes.append(why_not)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print("\n".join(report.lines()))
    return 0


def register_command(commands: argparse._SubParsersAction) -> None:
    """`bge-pipeline eval`."""
    parser = commands.add_parser("eval", help="recall@k and nDCG@k of ANN, exact and reranked search on a query set")
    parser.add_argument(
        "--queries", type=Path, default=None, help=f"a JSONL query set (default: the shipped {EVAL_SET})"
    )
    parser.add_argument("--k", type=int, default=10, help="the cut-off for recall and nDCG (default 10)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_eval_command)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "data" / EVAL_SET
    write_queries(build_queries(load_segments()), target)
    print(f"wrote {target}")
