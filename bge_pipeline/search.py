"""The query path: embed the query, retrieve candidates through the IVFFLAT index, rerank, return the best."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import psycopg

from bge_pipeline import sql
from bge_pipeline.catalog import TableState
from bge_pipeline.database import DatabaseResource
from bge_pipeline.encoder import Encoder, Reranker
from bge_pipeline.migration import MigrationResource
from bge_pipeline.settings import Settings, current_settings

# Probe enough lists to hold this many times the rows asked for: on a small table the guide's formula makes
# 100 lists of a few rows each, and probing sqrt(lists) of them would return fewer rows than asked.
OVERSAMPLING = 4
ITERATIVE_SCAN_VERSION = (0, 8, 0)
SNIPPET_CHARS = 90


class SearchError(ValueError):
    """A query or a table that search cannot serve; the message says why and what to do."""


@dataclass(frozen=True)
class Hit:
    """One search result: the row's id and text, its cosine distance to the query and its rerank score."""

    id: int
    text: str
    distance: float
    rerank_score: Optional[float] = None


@dataclass(frozen=True)
class SearchTarget:
    """The column a query runs against and what the index there looks like."""

    table: sql.Table
    column: str
    index: Optional[str]
    lists: Optional[int]
    estimated_rows: int
    iterative_scan: bool


@dataclass
class SearchOutcome:
    """Hits plus how they were found, for the CLI and for checks."""

    query: str
    hits: list[Hit]
    target: SearchTarget
    candidates: int
    probes: Optional[int]
    reranked: bool
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def validate_query(query: str) -> str:
    """Refuse what cannot be searched, with a message a user can act on."""
    if not isinstance(query, str):
        raise SearchError(f"the query must be text, not {type(query).__name__}")
    if not query.strip():
        raise SearchError("the query is empty: give some words to search for")
    return query


def probes_for(lists: Optional[int], estimated_rows: int, limit: int) -> Optional[int]:
    """ivfflat.probes for a query asking for `limit` rows: pgvector's sqrt(lists), generalised, or enough lists to
    hold OVERSAMPLING times the rows asked for, whichever is more."""
    if not lists:
        return None
    rows = max(estimated_rows, 1)
    # sqrt(lists) probes scan rows^-1/4 of a table with the ideal sqrt(rows) lists; scanning that share keeps
    # recall when the guide's floor of 100 lists over-partitions a small table.
    share = max(rows**-0.25, 1 / math.sqrt(lists))
    needed = math.ceil(OVERSAMPLING * limit * lists / rows)
    return max(1, min(lists, max(math.ceil(share * lists), needed)))


def search_target(conn: psycopg.Connection, migration: MigrationResource) -> SearchTarget:
    """The column the configured model owns, with its index; an error naming the fix when there is none."""
    state = migration.read_state(conn)
    column = migration.writable_column(state)  # raises MigrationError when a staging column holds another model
    if column is None:
        raise SearchError(_no_column_message(state, migration))
    table = state.table
    name = table.index_name(column)
    index = state.index(name)
    usable = index is not None and index.serves(column)
    estimated = conn.execute(sql.ESTIMATED_ROWS, (table.schema, table.name)).fetchone()
    rows = int(estimated[0]) if estimated and estimated[0] is not None else -1
    if rows < 0:  # never analysed: count once rather than guess
        rows = int(conn.execute(sql.count_vectors(table, column)).fetchone()[0])
    version = conn.execute(sql.VECTOR_VERSION).fetchone()
    return SearchTarget(
        table=table,
        column=column,
        index=name if usable else None,
        lists=(index.lists if usable and index else None),
        estimated_rows=rows,
        iterative_scan=bool(version) and _version_tuple(version[0]) >= ITERATIVE_SCAN_VERSION,
    )


def _no_column_message(state: TableState, migration: MigrationResource) -> str:
    live = state.table.live_column
    holder = state.models.get(live)
    held = f" {live} holds {holder.model!r} ({holder.dimensions} dims) vectors;" if holder else ""
    return (
        f"{state.table.name} has no column with EMBEDDING_MODEL={migration.model!r} vectors to search:{held} "
        "set EMBEDDING_MODEL to the model that filled the column, or run the migration (embeddings*) first"
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def retrieve(
    conn: psycopg.Connection,
    target: SearchTarget,
    vector: np.ndarray,
    limit: int,
    probes: Optional[int] = None,
    iterative_scan: Optional[bool] = None,
    complete: bool = True,
) -> tuple[list[Hit], Optional[int]]:
    """The `limit` nearest rows through the index, and the probes used; the caller's transaction scopes the settings.

    `probes`, `iterative_scan` and `complete=False` override the search path's choices (the recall check uses
    them to show what a bad setting costs).
    """
    probes = probes if probes is not None else probes_for(target.lists, target.estimated_rows, limit)
    iterative = target.iterative_scan if iterative_scan is None else iterative_scan
    if probes is not None:
        # set_config(..., true) is SET LOCAL: the next query on this pooled connection gets the server default.
        conn.execute(sql.SET_PROBES, (str(probes),))
        if iterative:
            conn.execute(sql.SET_ITERATIVE_SCAN)
    hits = _fetch(conn, sql.ann_candidates(target.table, target.column), vector, limit)
    if complete and len(hits) < limit and probes is not None and target.lists and probes < target.lists:
        # Without iterative scans (pgvector < 0.8) a probe can come back short: probing every list cannot.
        conn.execute(sql.SET_PROBES, (str(target.lists),))
        hits = _fetch(conn, sql.ann_candidates(target.table, target.column), vector, limit)
        probes = target.lists
    return hits, probes


def exact_search(conn: psycopg.Connection, target: SearchTarget, vector: np.ndarray, limit: int) -> list[Hit]:
    """The true nearest rows: a sequential scan, the index switched off for this transaction only."""
    for statement in sql.DISABLE_INDEX_SCANS:
        conn.execute(statement)
    return _fetch(conn, sql.nearest_neighbours(target.table, target.column), vector, limit)


def as_array(value: Any) -> np.ndarray:
    """A float32 array from what pgvector's psycopg loader returns (a `Vector` in pgvector-python >= 0.3)."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _fetch(conn: psycopg.Connection, statement: Any, vector: np.ndarray, limit: int) -> list[Hit]:
    rows = conn.execute(statement, {"query": np.asarray(vector, dtype=np.float32), "limit": limit}).fetchall()
    return [Hit(int(row[0]), row[1], float(row[2])) for row in rows]


def rerank_hits(reranker: Reranker, query: str, hits: Sequence[Hit], top_k: int) -> list[Hit]:
    """The hits in the cross-encoder's order, best first, each carrying its score."""
    scores = reranker.scores(query, [hit.text for hit in hits])
    order = np.argsort(-scores, kind="stable")[:top_k]  # stable: equal scores keep the index's order
    return [
        Hit(hits[i].id, hits[i].text, hits[i].distance, float(scores[i])) for i in order
    ]


def search(
    query: str,
    database: DatabaseResource,
    migration: MigrationResource,
    encoder: Encoder,
    query_prefix: str = "",
    reranker: Optional[Reranker] = None,
    candidates: int = 200,
    top_k: int = 20,
    query_vector: Optional[np.ndarray] = None,
) -> SearchOutcome:
    """Embed `query` (unless its vector is given), retrieve `candidates` through the index, rerank, keep `top_k`."""
    validate_query(query)
    if top_k < 1 or candidates < 1:
        raise SearchError(f"top_k ({top_k}) and the number of candidates ({candidates}) must be at least 1")
    started = time.perf_counter()
    if query_vector is None:
        query_vector = encoder.encode([query], prefix=query_prefix)[0]
    encoded = time.perf_counter()
    limit = max(candidates, top_k)
    with database.connect() as conn:
        target = search_target(conn, migration)
        found, probes = retrieve(conn, target, query_vector, limit)
    retrieved = time.perf_counter()
    hits = rerank_hits(reranker, query, found, top_k) if reranker is not None else found[:top_k]
    finished = time.perf_counter()
    return SearchOutcome(
        query=query,
        hits=hits,
        target=target,
        candidates=len(found),
        probes=probes,
        reranked=reranker is not None,
        seconds=finished - started,
        timings={
            "encode_seconds": encoded - started,
            "retrieve_seconds": retrieved - encoded,
            "rerank_seconds": finished - retrieved,
        },
    )


@lru_cache(maxsize=4)
def resources_for(settings: Settings) -> dict[str, Any]:
    """The pipeline's resources for `settings`, built once per configuration."""
    from bge_pipeline.resources import build_resources

    # Cached: one engine (connection pool) per configuration, not one per query.
    return build_resources(settings, from_environment=False)


def run_search(
    query: str,
    top_k: Optional[int] = None,
    settings: Optional[Settings] = None,
    resources: Optional[dict[str, Any]] = None,
    rerank: Optional[bool] = None,
) -> SearchOutcome:
    """search_segments with the details: which column, how many candidates, which probes, how long."""
    validate_query(query)  # before any model loads
    settings = settings or current_settings()
    resources = resources or resources_for(settings)
    encoder_resource = resources["encoder"]
    use_reranker = settings.enable_reranker if rerank is None else rerank
    with resources["database"].connect() as conn:
        search_target(conn, resources["migration"])  # a table the model cannot search fails before any model loads
    return search(
        query,
        database=resources["database"],
        migration=resources["migration"],
        encoder=encoder_resource.get(),
        query_prefix=encoder_resource.query_prefix,
        reranker=resources["reranker"].get() if use_reranker else None,
        candidates=settings.rerank_top_k,
        top_k=top_k or settings.return_top_k,
    )


def search_segments(
    query: str,
    top_k: Optional[int] = None,
    settings: Optional[Settings] = None,
    resources: Optional[dict[str, Any]] = None,
) -> list[Hit]:
    """The RETURN_TOP_K (or `top_k`) best segments for `query`, reranked when ENABLE_RERANKER is true."""
    return run_search(query, top_k=top_k, settings=settings, resources=resources).hits


# --- the `bge-pipeline search` command ---------------------------------------------------------------------


def cli_settings(settings: Settings) -> Settings:
    """The demo's model choice: the packaged MiniLM when the default bge-small is not in the local cache."""
    from bge_pipeline.demo import demo_settings

    with contextlib.redirect_stdout(sys.stderr):  # its notice must not mix with --json output
        return demo_settings(settings)


def snippet(text: str, width: int = SNIPPET_CHARS) -> str:
    """One line of at most `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3].rstrip() + "..."


def format_outcome(outcome: SearchOutcome) -> list[str]:
    """The readable table `bge-pipeline search` prints."""
    target = outcome.target
    how = (
        f"{target.index} (probes {outcome.probes} of {target.lists} lists)"
        if target.index
        else "a sequential scan (no IVFFLAT index on the column)"
    )
    lines = [
        f"{target.table.name}.{target.column}: {outcome.candidates} candidates via {how}, "
        f"{'reranked by the cross-encoder' if outcome.reranked else 'not reranked'}, "
        f"{outcome.seconds * 1000:.0f} ms",
        f"{'rank':>4}  {'id':>8}  {'distance':>8}  {'rerank':>8}  text",
    ]
    for rank, hit in enumerate(outcome.hits, start=1):
        score = f"{hit.rerank_score:8.4f}" if hit.rerank_score is not None else f"{'-':>8}"
        lines.append(f"{rank:>4}  {hit.id:>8}  {hit.distance:8.4f}  {score}  {snippet(hit.text)}")
    if not outcome.hits:
        lines.append("(no rows with vectors to search)")
    return lines


def _search_command(args: argparse.Namespace, settings: Settings) -> int:
    settings = cli_settings(settings)
    outcome = run_search(args.query, top_k=args.top_k, settings=settings, rerank=args.rerank)
    if args.json:
        print(
            json.dumps(
                {
                    "query": outcome.query,
                    "column": outcome.target.column,
                    "candidates": outcome.candidates,
                    "probes": outcome.probes,
                    "reranked": outcome.reranked,
                    "seconds": round(outcome.seconds, 4),
                    "hits": [asdict(hit) for hit in outcome.hits],
                }
            )
        )
    else:
        print("\n".join(format_outcome(outcome)))
    return 0


def register_command(commands: argparse._SubParsersAction) -> None:
    """`bge-pipeline search "QUERY"`."""
    parser = commands.add_parser("search", help="search the table with the configured model (and reranker)")
    parser.add_argument("query", help="what to look for")
    parser.add_argument("--top-k", type=int, default=None, help="how many hits to print (default RETURN_TOP_K)")
    rerank = parser.add_mutually_exclusive_group()
    rerank.add_argument("--rerank", dest="rerank", action="store_true", default=None, help="rerank even if ENABLE_RERANKER is false")
    rerank.add_argument("--no-rerank", dest="rerank", action="store_false", help="skip the reranker")
    parser.add_argument("--json", action="store_true", help="print the hits as JSON")
    parser.set_defaults(handler=_search_command)
