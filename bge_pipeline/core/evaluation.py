"""Retrieval quality: recall@k and nDCG@k of ANN search, exact search and search+rerank on a query set.

The shipped set (`data/sotu_eval.jsonl`) is built by `build_queries()` from the bundled 1,000-segment sample;
rebuild it with `python -m bge_pipeline.cli.evaluate bge_pipeline/data/sotu_eval.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources as package_files
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bge_pipeline.core import sql
from bge_pipeline.core.corpus import Segment
from bge_pipeline.core.database import scalar
from bge_pipeline.core.encoder import ModelLoadError, Reranker, encoder_for, reranker_for
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.quality import ann_versus_exact
from bge_pipeline.core.search import database_for, rerank_hits, search_target
from bge_pipeline.core.settings import Settings

EVAL_SET = "sotu_eval.jsonl"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 8, 30


@dataclass(frozen=True)
class EvalQuery:
    """A query and the ids of the rows that answer it."""

    query: str
    relevant_ids: tuple[int, ...]


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


# --- the query set ----------------------------------------------------------------------------------------


def _excerpt(text: str) -> Optional[str]:
    """The segment's longest sentence of 8-30 words; a 20-word middle window when it has none."""
    sentences = [s.strip() for s in SENTENCE_END.split(text) if s.strip()]
    fitting = [s for s in sentences if MIN_QUERY_WORDS <= len(s.split()) <= MAX_QUERY_WORDS]
    if fitting:
        return max(fitting, key=lambda s: (len(s.split()), s))
    words = text.split()
    if len(words) < MIN_QUERY_WORDS:
        return None
    middle = max(0, len(words) // 2 - 10)
    return " ".join(words[middle : middle + 20])


def build_queries(segments: Sequence[Segment], count: int = 100) -> list[EvalQuery]:
    """Deterministic: segments in md5(id) order, each giving an excerpt found verbatim in that segment alone."""
    ordered = sorted(segments, key=lambda s: hashlib.md5(str(s.id).encode()).hexdigest())
    queries: list[EvalQuery] = []
    for segment in ordered:
        excerpt = _excerpt(segment.text)
        # An excerpt that also occurs in another segment would have two right answers: skip it.
        if excerpt is None or sum(excerpt in other.text for other in segments) != 1:
            continue
        queries.append(EvalQuery(excerpt, (segment.id,)))
        if len(queries) == count:
            break
    return queries


def write_queries(queries: Sequence[EvalQuery], path: Path) -> None:
    """One JSON object a line: {"query": ..., "relevant_ids": [...]}."""
    with open(path, "w", encoding="utf-8") as handle:
        for query in queries:
            handle.write(json.dumps({"query": query.query, "relevant_ids": list(query.relevant_ids)}) + "\n")


def load_queries(path: Optional[Path] = None) -> list[EvalQuery]:
    """A JSONL query set (`query`, `relevant_ids`); by default the shipped SOTU set."""
    if path is None:
        text = package_files.files("bge_pipeline.data").joinpath(EVAL_SET).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    queries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "query" not in row or "relevant_ids" not in row:
            raise ValueError(f"{path or EVAL_SET} line {number}: needs 'query' and 'relevant_ids'")
        queries.append(EvalQuery(str(row["query"]), tuple(int(i) for i in row["relevant_ids"])))
    return queries


# --- the metrics ------------------------------------------------------------------------------------------


def recall_at_k(ranked_ids: Sequence[int], relevant: Sequence[int], k: int) -> float:
    """The share of the relevant ids found in the first k."""
    if not relevant:
        return 0.0
    return len(set(ranked_ids[:k]) & set(relevant)) / len(set(relevant))


def ndcg_at_k(ranked_ids: Sequence[int], relevant: Sequence[int], k: int) -> float:
    """Binary-relevance nDCG: 1.0 when the relevant ids fill the first places."""
    wanted = set(relevant)
    dcg = sum(1.0 / math.log2(rank + 2) for rank, i in enumerate(ranked_ids[:k]) if i in wanted)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(wanted), k)))
    return dcg / ideal if ideal else 0.0


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
