"""The query path: embed the query, retrieve candidates through the IVFFLAT index, rerank, return the best."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import psycopg

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import TableState
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.encoder import Encoder, Reranker, encoder_for, reranker_for
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.settings import Settings

# Probe enough lists to hold this many times the rows asked for: on a small table the guide's formula makes
# 100 lists of a few rows each, and probing sqrt(lists) of them would return fewer rows than asked.
OVERSAMPLING = 4
ITERATIVE_SCAN_VERSION = (0, 8, 0)
# hnsw.ef_search: pgvector's default and its ceiling. A scan returns at most ef_search rows unless iterative scans
# (pgvector >= 0.8) go on past it, so the search path asks for at least as many as it wants.
EF_SEARCH_DEFAULT, EF_SEARCH_MAX = 40, 1000


class SearchError(ValueError):
    """A query or a table that search cannot serve; the message says why and what to do."""


@dataclass(frozen=True)
class Hit:
    """One search result: the row's id (as psycopg returns it: int, uuid.UUID, str...), its text, its cosine
    distance to the query and its rerank score."""

    id: Any
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
    method: Optional[str] = None  # ivfflat, hnsw, or None without a usable index
    vector_type: str = "vector"

    def describe(self, probes: Optional[int]) -> str:
        """How the last search used the index, for people: `x_idx (probes 10 of 100 lists)`."""
        if self.index is None:
            return "a sequential scan (no usable index on the column)"
        if self.method == "hnsw":
            return f"{self.index} (hnsw, ef_search {probes})"
        return f"{self.index} (probes {probes} of {self.lists} lists)"


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


def ef_search_for(limit: int) -> int:
    """hnsw.ef_search for a query asking for `limit` rows: at least the rows wanted (pgvector's default of 40 would
    cap RERANK_TOP_K=200 at 40 candidates), within pgvector's range."""
    return max(EF_SEARCH_DEFAULT, min(limit, EF_SEARCH_MAX))


def search_target(conn: psycopg.Connection, migration: MigrationTarget) -> SearchTarget:
    """The column the configured model owns, with its index; an error naming the fix when there is none."""
    state = migration.read_state(conn)
    column = migration.writable_column(state)  # raises MigrationError when a staging column holds another model
    if column is None:
        raise SearchError(_no_column_message(state, migration))
    table = state.table
    index = state.search_index(column, migration.index_type)
    estimated = conn.execute(sql.ESTIMATED_ROWS, (table.schema, table.name)).fetchone()
    rows = int(estimated[0]) if estimated and estimated[0] is not None else -1
    if rows < 0:  # never analysed: count once rather than guess
        rows = int(scalar(conn, sql.count_vectors(table, column)))
    version = conn.execute(sql.VECTOR_VERSION).fetchone()
    return SearchTarget(
        table=table,
        column=column,
        index=index.name if index else None,
        lists=index.lists if index and index.method == "ivfflat" else None,
        estimated_rows=rows,
        iterative_scan=version is not None and iterative_scans(version[0]),
        method=index.method if index else None,
        vector_type=state.columns[column].typname,
    )


def _no_column_message(state: TableState, migration: MigrationTarget) -> str:
    live = state.table.live_column
    holder = state.models.get(live)
    held = f" {live} holds {holder.model!r} ({holder.dimensions} dims) vectors;" if holder else ""
    return (
        f"{state.table.name} has no column with EMBEDDING_MODEL={migration.model!r} vectors to search:{held} "
        "set EMBEDDING_MODEL to the model that filled the column, or run the migration (embeddings*) first"
    )


def iterative_scans(pgvector_version: str) -> bool:
    """Whether this pgvector (its extversion) scans on past ef_search / the probed lists (0.8 and later)."""
    return tuple(int(part) for part in pgvector_version.split(".")[:3] if part.isdigit()) >= ITERATIVE_SCAN_VERSION


def retrieve(
    conn: psycopg.Connection,
    target: SearchTarget,
    vector: np.ndarray,
    limit: int,
    probes: Optional[int] = None,
    iterative_scan: Optional[bool] = None,
    complete: bool = True,
) -> tuple[list[Hit], Optional[int]]:
    """The `limit` nearest rows through the index, and the probes (IVFFLAT) or ef_search (HNSW) used; the caller's
    transaction scopes the settings.

    `probes` (ef_search for HNSW), `iterative_scan` and `complete=False` override the search path's choices (the
    recall check uses them to show what a bad setting costs).
    """
    iterative = target.iterative_scan if iterative_scan is None else iterative_scan
    candidates = sql.ann_candidates(target.table, target.column, target.vector_type)
    # set_config(..., true) is SET LOCAL: the next query on this pooled connection gets the server default.
    if target.method == "hnsw":
        ef_search = probes if probes is not None else ef_search_for(limit)
        conn.execute(sql.SET_EF_SEARCH, (str(ef_search),))
        if iterative:
            conn.execute(sql.SET_HNSW_ITERATIVE_SCAN)
        return _fetch(conn, candidates, vector, limit), ef_search
    probes = probes if probes is not None else probes_for(target.lists, target.estimated_rows, limit)
    if probes is not None:
        conn.execute(sql.SET_PROBES, (str(probes),))
        if iterative:
            conn.execute(sql.SET_ITERATIVE_SCAN)
    hits = _fetch(conn, candidates, vector, limit)
    if complete and len(hits) < limit and probes is not None and target.lists and probes < target.lists:
        # Without iterative scans (pgvector < 0.8) a probe can come back short: probing every list cannot.
        conn.execute(sql.SET_PROBES, (str(target.lists),))
        hits = _fetch(conn, candidates, vector, limit)
        probes = target.lists
    return hits, probes


def exact_search(conn: psycopg.Connection, target: SearchTarget, vector: np.ndarray, limit: int) -> list[Hit]:
    """The true nearest rows: a sequential scan, the index switched off for this transaction only."""
    for statement in sql.DISABLE_INDEX_SCANS:
        conn.execute(statement)
    return _fetch(conn, sql.nearest_neighbours(target.table, target.column, target.vector_type), vector, limit)


def as_array(value: Any) -> np.ndarray:
    """A float32 array from what pgvector's psycopg loader returns (a `Vector` in pgvector-python >= 0.3)."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _fetch(conn: psycopg.Connection, statement: Any, vector: np.ndarray, limit: int) -> list[Hit]:
    rows = conn.execute(statement, {"query": np.asarray(vector, dtype=np.float32), "limit": limit}).fetchall()
    return [Hit(row[0], row[1], float(row[2])) for row in rows]


def rerank_hits(reranker: Reranker, query: str, hits: Sequence[Hit], top_k: int) -> list[Hit]:
    """The hits in the cross-encoder's order, best first, each carrying its score."""
    scores = reranker.scores(query, [hit.text for hit in hits])
    order = np.argsort(-scores, kind="stable")[:top_k]  # stable: equal scores keep the index's order
    return [Hit(hits[i].id, hits[i].text, hits[i].distance, float(scores[i])) for i in order]


def search(
    query: str,
    database: Database,
    migration: MigrationTarget,
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
def database_for(settings: Settings) -> Database:
    """One engine (connection pool) per configuration, not one per query."""
    return Database.from_settings(settings)


def run_search(
    query: str,
    top_k: Optional[int] = None,
    settings: Optional[Settings] = None,
    rerank: Optional[bool] = None,
) -> SearchOutcome:
    """search_segments with the details: which column, how many candidates, which probes, how long each part took."""
    validate_query(query)  # before any model loads
    settings = settings or Settings.from_env()
    database = database_for(settings)
    target = MigrationTarget.from_settings(settings)
    with database.connect() as conn:
        search_target(conn, target)  # a table the model cannot search fails before any model loads
    use_reranker = settings.enable_reranker if rerank is None else rerank
    started = time.perf_counter()
    encoder = encoder_for(settings)  # loaded once per process: the first query pays for it, later ones do not
    reranker = reranker_for(settings) if use_reranker else None
    load_seconds = time.perf_counter() - started
    outcome = search(
        query,
        database=database,
        migration=target,
        encoder=encoder,
        query_prefix=settings.query_prefix,
        reranker=reranker,
        candidates=settings.rerank_top_k,
        top_k=top_k or settings.return_top_k,
    )
    outcome.timings["model_load_seconds"] = load_seconds
    return outcome


def search_segments(query: str, top_k: Optional[int] = None, settings: Optional[Settings] = None) -> list[Hit]:
    """The RETURN_TOP_K (or `top_k`) best segments for `query`, reranked when ENABLE_RERANKER is true."""
    return run_search(query, top_k=top_k, settings=settings).hits
