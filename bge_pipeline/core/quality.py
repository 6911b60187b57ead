"""What the new vectors did to retrieval: index recall, old-vs-new neighbour agreement and self-retrieval."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import TableState
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import Encoder
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.neighbours import neighbour_overlap, unit_rows
from bge_pipeline.core.search import Hit, SearchTarget, as_array, exact_search, retrieve, search, search_target

MIN_RECALL = 0.95
MIN_SELF_RETRIEVAL = 0.9
# Exact searches read every vector: the recall check spends at most this many vector comparisons, and never
# fewer than MIN_RECALL_QUERIES queries (20 queries x 10 neighbours at a million rows).
EXACT_COMPARISONS_PER_CHECK = 10_000_000
MIN_RECALL_QUERIES = 20
AGREEMENT_UNIVERSE_ROWS = 20_000


def bounded_queries(requested: int, rows: int) -> int:
    """How many exact searches a check may run on a table of `rows`: its cost stays flat as the table grows."""
    return max(min(requested, EXACT_COMPARISONS_PER_CHECK // max(rows, 1)), min(requested, MIN_RECALL_QUERIES))


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
    """Recall@k of the index against exact search, with sampled rows' own vectors as queries (as many as
    `bounded_queries` allows, so the check costs the same at any size)."""
    started = time.perf_counter()
    queries = bounded_queries(sample_rows, target.estimated_rows)
    runs = [
        ann_versus_exact(database, target, vector, candidates, k, probes, iterative_scan)
        for _, vector in sample_vectors(database, target, queries)
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
    if new_column != table.live_column and live is not None and live.is_vector:
        return table.name, table.live_column
    backups = sorted(backup.relation for backup in state.backups.values())
    return (backups[0], table.live_column) if backups else None


@dataclass(frozen=True)
class Agreement:
    share: float
    sampled_rows: int


def neighbour_agreement(
    database: Database, state: TableState, new_column: str, old: tuple[str, str], sample_rows: int, k: int
) -> Agreement:
    """The share of each sampled row's k nearest neighbours that the old and the new vectors agree on, neighbours
    taken among a fixed sample of AGREEMENT_UNIVERSE_ROWS rows: the same work at a million rows as at 100k (an
    exact search of 1536-dim old vectors reads ~6 GB at 1M rows), and the whole table below that size."""
    table = state.table
    relation, old_column = old
    with database.connect() as conn:
        ids = [row[0] for row in conn.execute(sql.sample_ids(table, new_column), (AGREEMENT_UNIVERSE_ROWS,))]
        new = {
            r[0]: as_array(r[1])
            for r in conn.execute(sql.vectors_by_id(table.schema, table.name, table.id_column, new_column), (ids,))
        }
        before = {
            r[0]: as_array(r[1])
            for r in conn.execute(sql.vectors_by_id(table.schema, relation, table.id_column, old_column), (ids,))
        }
    common = [row_id for row_id in ids if row_id in new and row_id in before]
    if len(common) <= k:
        return Agreement(0.0, 0)
    new_matrix = unit_rows([new[i] for i in common])
    old_matrix = unit_rows([before[i] for i in common])
    return Agreement(neighbour_overlap(old_matrix, new_matrix, sample_rows, k), min(sample_rows, len(common)))


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
