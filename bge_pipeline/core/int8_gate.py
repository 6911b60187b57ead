"""Whether int8 vectors may stand in for the float ones, judged by what retrieval sees.

Per-vector cosine is the wrong yardstick: all-MiniLM-L6-v2's int8 graph gives cosine 0.966-0.987 to the float
vectors, which a 0.999 check refuses, yet what a search returns depends only on how the rows rank. So the gate
measures ranking: each sampled text's 10 nearest neighbours among the table's sampled texts under the int8 vectors
against those under the float vectors (the share they agree on), and nDCG@10 of both on the judged query set over
the bundled sample. Below INT8_MIN_AGREEMENT the int8 run is refused, naming both figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

from bge_pipeline.core.corpus import load_segments
from bge_pipeline.core.encoder import Encoder, shared_encoder
from bge_pipeline.core.judged_set import load_queries, ndcg_at_k
from bge_pipeline.core.neighbours import neighbour_overlap, unit_rows
from bge_pipeline.core.shape_model import resolve_model

INT8_RUNTIME = "onnx-int8"
DEFAULT_MIN_AGREEMENT = 0.95
SAMPLE_TEXTS = 1000  # the table's texts the neighbours are taken among (topped up from the bundled sample)
QUERY_ROWS = 200  # of which this many are queries
K = 10


def is_int8(runtime: Optional[str]) -> bool:
    """Whether vectors from `runtime` (an encoder's backend, or a model record's) are int8 ones."""
    return runtime == INT8_RUNTIME


def precision(runtime: Optional[str]) -> str:
    return "int8" if is_int8(runtime) else "float"


@dataclass(frozen=True)
class Int8Agreement:
    """What int8 does to retrieval on this table and on the judged set."""

    neighbour_agreement: float  # recall@10 of the int8 neighbours against the float neighbours
    sampled_texts: int
    ndcg_float: float
    ndcg_int8: float
    floor: float

    @property
    def passed(self) -> bool:
        return self.neighbour_agreement >= self.floor

    def describe(self) -> str:
        return (
            f"int8 neighbours agree with float ones at {self.neighbour_agreement:.3f} (recall@{K} over "
            f"{self.sampled_texts} of the table's texts; floor INT8_MIN_AGREEMENT={self.floor}); judged-set "
            f"nDCG@{K} {self.ndcg_int8:.3f} int8 against {self.ndcg_float:.3f} float"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def float_reference(int8: Encoder) -> Encoder:
    """The same model on the float ONNX graph (torch's vectors to float rounding), for comparison; a stand-in named
    by its alias (`shape:bge-small`, as bench names it) loads from its folder."""
    return shared_encoder(resolve_model(int8.name), int8.dimensions, int8.device, int8.batch_size, "onnx")


@lru_cache(maxsize=8)
def judged_ndcg(encoder: Encoder, k: int = K) -> float:
    """Mean nDCG@k of exact search over the bundled sample with `encoder`'s vectors, on the shipped query set
    (once per loaded encoder: the figure depends on nothing else)."""
    segments = load_segments()
    documents = unit_rows(list(encoder.encode([segment.text for segment in segments])))
    queries = load_queries()
    asked = unit_rows(list(encoder.encode([query.query for query in queries])))
    ids = np.asarray([segment.id for segment in segments])
    rankings = ids[np.argsort(-(asked @ documents.T), axis=1)[:, :k]]
    return float(np.mean([ndcg_at_k(list(r), q.relevant_ids, k) for r, q in zip(rankings, queries)]))


def measure_int8(
    int8: Encoder, texts: Sequence[str], floor: float = DEFAULT_MIN_AGREEMENT, reference: Optional[Encoder] = None
) -> Int8Agreement:
    """The gate's figures for `int8` on `texts` (the table's own, sampled) and on the judged set."""
    reference = reference or float_reference(int8)
    sample = [text for text in texts if text and text.strip()][:SAMPLE_TEXTS]
    if len(sample) < QUERY_ROWS:  # a small table: too few neighbours to rank, so the bundled sample joins in
        sample += [segment.text for segment in load_segments()][: SAMPLE_TEXTS - len(sample)]
    agreement = neighbour_overlap(
        unit_rows(list(reference.encode(sample))), unit_rows(list(int8.encode(sample))), QUERY_ROWS, K
    )
    return Int8Agreement(
        neighbour_agreement=agreement,
        sampled_texts=len(sample),
        ndcg_float=judged_ndcg(reference),
        ndcg_int8=judged_ndcg(int8),
        floor=floor,
    )
