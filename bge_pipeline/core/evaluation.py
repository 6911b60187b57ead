"""Retrieval quality: recall@k and nDCG@k of ANN search, exact search and search+rerank on a judged query set
(`judged_set`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from bge_pipeline.core import sql
from bge_pipeline.core.database import scalar
from bge_pipeline.core.encoder import ModelLoadError, Reranker, encoder_for, reranker_for
from bge_pipeline.core.judged_set import EvalQuery, ndcg_at_k, recall_at_k
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.quality import ann_versus_exact
from bge_pipeline.core.search import database_for, rerank_hits, search_target
from bge_pipeline.core.settings import Settings


@dataclass
class MethodScore:
    """One retrieval method's figures over the query set."""

    method: str
    recall: float
    ndcg: float
    queries: int
    seconds_per_query: float


@dataclass
class EvalReport:
    """Every method's figures, with what they were measured on."""

    k: int
    queries: int
    queries_skipped: int
    rows: int
    column: str
    candidates: int
    encode_seconds: float
    scores: list[MethodScore]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The table `bge-pipeline eval` prints."""
        k = self.k
        lines = [
            f"{self.queries} queries against {self.column} ({self.rows:,} rows), {self.candidates} candidates per query"
            + (f"; {self.queries_skipped} skipped (their rows are not in the table)" if self.queries_skipped else ""),
            f"{'method':<16} {f'recall@{k}':>10} {f'nDCG@{k}':>8} {'ms/query':>9}   (database and reranker time; "
            f"encoding the queries took {self.encode_seconds * 1000 / max(self.queries, 1):.0f} ms/query more)",
        ]
        for score in self.scores:
            lines.append(
                f"{score.method:<16} {score.recall:>10.3f} {score.ndcg:>8.3f} {score.seconds_per_query * 1000:>9.1f}"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


def _score(method: str, rankings: list[list[int]], queries: Sequence[EvalQuery], k: int, seconds: float) -> MethodScore:
    return MethodScore(
        method=method,
        recall=float(np.mean([recall_at_k(r, q.relevant_ids, k) for r, q in zip(rankings, queries)])),
        ndcg=float(np.mean([ndcg_at_k(r, q.relevant_ids, k) for r, q in zip(rankings, queries)])),
        queries=len(queries),
        seconds_per_query=seconds / max(len(queries), 1),
    )


# --- the evaluation ---------------------------------------------------------------------------------------


def load_reranker(settings: Settings) -> tuple[Optional[Reranker], str]:
    """The reranker when ENABLE_RERANKER is true and RERANKER_MODEL loads; otherwise None and why."""
    if not settings.enable_reranker:
        return None, "search+rerank skipped: ENABLE_RERANKER is false"
    try:
        return reranker_for(settings), ""
    except ModelLoadError as error:
        return None, f"search+rerank skipped: {error}"


def evaluate(
    queries: Sequence[EvalQuery],
    settings: Settings,
    k: int = 10,
    reranker: Optional[Reranker] = None,
) -> EvalReport:
    """recall@k and nDCG@k of ANN, exact and (with a reranker) reranked search over `queries`."""
    if not queries:
        raise ValueError("the query set is empty")
    database = database_for(settings)
    candidates = max(settings.rerank_top_k, k)
    with database.connect() as conn:
        target = search_target(conn, MigrationTarget.from_settings(settings))
        relevant = [i for q in queries for i in q.relevant_ids]
        present = {r[0] for r in conn.execute(sql.rows_present(target.table, target.column), (relevant,))}
        rows = int(scalar(conn, sql.count_vectors(target.table, target.column)))
    kept = [q for q in queries if set(q.relevant_ids) & present]
    if not kept:
        raise ValueError(
            f"none of the {len(queries)} queries' relevant ids is in {target.table.name}.{target.column}: "
            "evaluate the table the query set was built for (`bge-pipeline demo`), or pass --queries"
        )
    started = time.perf_counter()
    vectors = encoder_for(settings).encode([q.query for q in kept], prefix=settings.query_prefix)
    encode_seconds = time.perf_counter() - started

    runs = [ann_versus_exact(database, target, vector, candidates, k) for vector in vectors]
    ann_seconds = sum(run.ann_seconds for run in runs)
    scores = [
        _score("ann", [[hit.id for hit in run.approximate[:k]] for run in runs], kept, k, ann_seconds),
        _score("exact", [[hit.id for hit in run.exact] for run in runs], kept, k, sum(r.exact_seconds for r in runs)),
    ]
    if reranker is not None:
        started = time.perf_counter()
        reranked = [
            [hit.id for hit in rerank_hits(reranker, q.query, run.approximate, k)] for q, run in zip(kept, runs)
        ]
        scores.append(_score("ann+rerank", reranked, kept, k, ann_seconds + time.perf_counter() - started))
    return EvalReport(
        k=k,
        queries=len(kept),
        queries_skipped=len(queries) - len(kept),
        rows=rows,
        column=f"{target.table.name}.{target.column}",
        candidates=candidates,
        encode_seconds=encode_seconds,
        scores=scores,
        notes=[],
    )
