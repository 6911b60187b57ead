"""What the new vectors did to retrieval: index recall, old-vs-new neighbour agreement and self-retrieval."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import psycopg

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import TableState
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import Encoder
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.search import Hit, SearchTarget, as_array, exact_search, retrieve, search, search_target

MIN_RECALL = 0.95
MIN_SELF_RETRIEVAL = 0.9


@dataclass(frozen=True)
class AnnVersusExact:
    """One query's candidates through the index and its true nearest rows."""

    approximate: list[Hit]
    exact: list[Hit]
    probes: Optional[int]
    ann_seconds: float
    exact_seconds: float

    def recall(self, k: int) -> float:
        truth = {hit.id for hit in self.exact[:k]}
        return len(truth & {hit.id for hit in self.approximate[:k]}) / len(truth) if truth else 1.0


def ann_versus_exact(
    database: Database,
    target: SearchTarget,
    vector: np.ndarray,
    candidates: int,
    k: int,
    probes: Optional[int] = None,
    iterative_scan: Optional[bool] = None,
) -> AnnVersusExact:
    """Search once through the index (the search path's settings unless overridden) and once exactly."""
    started = time.perf_counter()
    with database.connect() as conn:
        approximate, probes_used = retrieve(
            conn,
            target,
            vector,
            candidates,
            probes=probes,
            iterative_scan=iterative_scan,
            complete=probes is None and iterative_scan is None,
        )
    searched = time.perf_counter()
    with database.connect() as conn:  # a transaction of its own: index scans stay off only for it
        exact = exact_search(conn, target, vector, k)
    return AnnVersusExact(approximate, exact, probes_used, searched - started, time.perf_counter() - searched)


def sample_vectors(database: Database, target: SearchTarget, rows: int) -> list[tuple[Any, np.ndarray]]:
    """A deterministic sample of ids with their vectors."""
    with database.connect() as conn:
        found = conn.execute(sql.sample_vectors(target.table, target.column), (rows,)).fetchall()
    return [(row[0], as_array(row[1])) for row in found]


@dataclass(frozen=True)
class Recall:
    mean: float
    lowest: float
    sampled_rows: int
    probes: Optional[int]
    seconds: float


def index_recall(
    database: Database,
    target: SearchTarget,
    sample_rows: int,
    k: int,
    candidates: int,
    probes: Optional[int] = None,
    iterative_scan: Optional[bool] = None,
) -> Recall:
    """Recall@k of the index against exact search, with sampled rows' own vectors as queries."""
    started = time.perf_counter()
    runs = [
        ann_versus_exact(database, target, vector, candidates, k, probes, iterative_scan)
        for _, vector in sample_vectors(database, target, sample_rows)
    ]
    recalls = [run.recall(k) for run in runs]
    return Recall(
        mean=float(np.mean(recalls)) if recalls else 1.0,
        lowest=min(recalls) if recalls else 1.0,
        sampled_rows=len(recalls),
        probes=runs[-1].probes if runs else None,
        seconds=time.perf_counter() - started,
    )


def old_vectors(state: TableState, new_column: str) -> Optional[tuple[str, str]]:
    """(relation, column) holding the previous model's vectors: the live column before the swap, its backup after."""
    table = state.table
    live = state.columns.get(table.live_column)
    if new_column != table.live_column and live is not None and live.typname == "vector":
        return table.name, table.live_column
    backups = sorted(backup.relation for backup in state.backups.values())
    return (backups[0], table.live_column) if backups else None


@dataclass(frozen=True)
class Agreement:
    share: float
    sampled_rows: int


def _neighbours(
    conn: psycopg.Connection, statement: psycopg.sql.Composed, row_id: Any, vector: np.ndarray, k: int
) -> set[Any]:
    for setting in sql.DISABLE_INDEX_SCANS:
        conn.execute(setting)
    return {row[0] for row in conn.execute(statement, {"id": row_id, "query": vector, "limit": k}).fetchall()}


def neighbour_agreement(
    database: Database, state: TableState, new_column: str, old: tuple[str, str], sample_rows: int, k: int
) -> Agreement:
    """The share of each sampled row's k nearest neighbours that the old and the new vectors agree on."""
    table = state.table
    relation, old_column = old
    sample = sample_vectors(database, SearchTarget(table, new_column, None, None, 0, False), sample_rows)
    with database.connect() as conn:
        statement = sql.vectors_by_id(table.schema, relation, table.id_column, old_column)
        before_vectors = {r[0]: as_array(r[1]) for r in conn.execute(statement, ([row_id for row_id, _ in sample],))}
    old_query = sql.neighbour_ids(table.schema, relation, table.id_column, old_column)
    new_query = sql.neighbour_ids(table.schema, table.name, table.id_column, new_column)
    overlaps = []
    for row_id, vector in sample:
        if row_id not in before_vectors:
            continue
        with database.connect() as conn:
            before = _neighbours(conn, old_query, row_id, before_vectors[row_id], k)
            after = _neighbours(conn, new_query, row_id, vector, k)
        overlaps.append(len(before & after) / k)
    return Agreement(float(np.mean(overlaps)) if overlaps else 0.0, len(overlaps))


@dataclass(frozen=True)
class SelfRetrieval:
    share: float
    sampled_rows: int
    missed: list[Any]


def self_retrieval(
    database: Database,
    migration: MigrationTarget,
    encoder: Encoder,
    query_prefix: str,
    sample_rows: int,
    k: int,
    candidates: int,
) -> SelfRetrieval:
    """Sampled rows' own texts, searched through the query path: how many find their own row in the top k."""
    with database.connect() as conn:
        target = search_target(conn, migration)
        rows = conn.execute(sql.sample_rows(target.table, target.column), (sample_rows,)).fetchall()
    rows = [(r[0], r[1]) for r in rows if r[1] and r[1].strip()]
    # One batch for all the sampled texts: the check costs one encode, not one per row.
    vectors = encoder.encode([text for _, text in rows], prefix=query_prefix)
    missed = []
    for (row_id, text), vector in zip(rows, vectors):
        outcome = search(text, database, migration, encoder, candidates=candidates, top_k=k, query_vector=vector)
        if not any(hit.id == row_id for hit in outcome.hits):
            missed.append(row_id)
    found = len(rows) - len(missed)
    return SelfRetrieval(found / len(rows) if rows else 1.0, len(rows), missed)
