"""`bge-pipeline search "QUERY"`: the query path from the command line, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

import psutil

from bge_pipeline.cli.models import demo_settings
from bge_pipeline.core.search import SearchOutcome, run_search
from bge_pipeline.core.settings import Settings

SNIPPET_CHARS = 90


def snippet(text: str, width: int = SNIPPET_CHARS) -> str:
    """One line of at most `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3].rstrip() + "..."


def format_outcome(outcome: SearchOutcome) -> list[str]:
    """The readable table `bge-pipeline search` prints."""
    target = outcome.target
    how = target.describe(outcome.probes)
    ids = [str(hit.id) for hit in outcome.hits]  # as PostgreSQL prints them: 42, a uuid, doc-001
    width = max([8, *map(len, ids)])
    lines = [
        f"{target.table.name}.{target.column}: {outcome.candidates} candidates via {how}, "
        f"{'reranked by the cross-encoder' if outcome.reranked else 'not reranked'}, "
        f"{outcome.seconds * 1000:.0f} ms",
        f"{'rank':>4}  {'id':>{width}}  {'distance':>8}  {'rerank':>8}  text",
    ]
    for rank, (hit, shown) in enumerate(zip(outcome.hits, ids), start=1):
        score = f"{hit.rerank_score:8.4f}" if hit.rerank_score is not None else f"{'-':>8}"
        lines.append(f"{rank:>4}  {shown:>{width}}  {hit.distance:8.4f}  {score}  {snippet(hit.text)}")
    if not outcome.hits:
        lines.append("(no rows with vectors to search)")
    return lines


def timing_line(outcome: SearchOutcome, startup_seconds: float) -> str:
    """Where a query's time went, this process's start-up (Python and imports) included."""
    timings = outcome.timings
    parts = {
        "start-up": startup_seconds,
        "model load": timings.get("model_load_seconds", 0.0),
        "encode": timings["encode_seconds"],
        "SQL": timings["retrieve_seconds"],
        "rerank": timings["rerank_seconds"],
    }
    return "time: " + ", ".join(f"{name} {seconds * 1000:,.0f} ms" for name, seconds in parts.items())


def _json_id(value: Any) -> Any:
    """Integer ids stay numbers in JSON; uuid, text and numeric ids become the strings PostgreSQL prints."""
    return value if isinstance(value, int) else str(value)


def _search_command(args: argparse.Namespace, settings: Settings) -> int:
    startup_seconds = time.time() - psutil.Process().create_time()
    settings = demo_settings(settings)
    outcome = run_search(args.query, top_k=args.top_k, settings=settings, rerank=args.rerank)
    if args.json:
        print(
            json.dumps(
                {
                    "query": outcome.query,
                    "column": outcome.target.column,
                    "candidates": outcome.candidates,
                    "index_method": outcome.target.method,
                    "probes": outcome.probes,  # ef_search where the index is HNSW
                    "reranked": outcome.reranked,
                    "seconds": round(outcome.seconds, 4),
                    "timings": {
                        "startup_seconds": round(startup_seconds, 4),
                        **{k: round(v, 4) for k, v in outcome.timings.items()},
                    },
                    "hits": [{**asdict(hit), "id": _json_id(hit.id)} for hit in outcome.hits],
                }
            )
        )
    else:
        print("\n".join([*format_outcome(outcome), timing_line(outcome, startup_seconds)]))
    return 0


def register_command(commands: argparse._SubParsersAction) -> None:
    """`bge-pipeline search "QUERY"`."""
    parser = commands.add_parser("search", help="search the table with the configured model (and reranker)")
    parser.add_argument("query", help="what to look for")
    parser.add_argument("--top-k", type=int, default=None, help="how many hits to print (default RETURN_TOP_K)")
    rerank = parser.add_mutually_exclusive_group()
    rerank.add_argument(
        "--rerank", dest="rerank", action="store_true", default=None, help="rerank even if ENABLE_RERANKER is false"
    )
    rerank.add_argument("--no-rerank", dest="rerank", action="store_false", help="skip the reranker")
    parser.add_argument("--json", action="store_true", help="print the hits as JSON")
    parser.set_defaults(handler=_search_command)
