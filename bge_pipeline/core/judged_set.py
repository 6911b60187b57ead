"""The judged query set and its metrics: queries with the ids of the rows that answer them, recall@k and nDCG@k.

The shipped set (`data/sotu_eval.jsonl`) is built by `build_queries()` from the bundled 1,000-segment sample;
rebuild it with `python -m bge_pipeline.cli.evaluate bge_pipeline/data/sotu_eval.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources as package_files
from pathlib import Path
from typing import Optional

from bge_pipeline.core.corpus import Segment

EVAL_SET = "sotu_eval.jsonl"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 8, 30


@dataclass(frozen=True)
class EvalQuery:
    """A query and the ids of the rows that answer it."""

    query: str
    relevant_ids: tuple[int, ...]


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
