"""Unit tier: the query path's and the migration's pure rules, on hand-built objects (no database, no model)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from bge_pipeline.core import autotune, runtimes
from bge_pipeline.core.catalog import (
    Backup,
    Column,
    Index,
    MigrationError,
    RecordedModel,
    TableState,
    unfinished_migrations,
    writable_column,
)
from bge_pipeline.core.corpus import Segment
from bge_pipeline.core.encoder import Encoder, ModelLoadError, default_batch_size, resolve_device, rows_within_budget
from bge_pipeline.core.int8_gate import Int8Agreement
from bge_pipeline.core.judged_set import build_queries, load_queries, ndcg_at_k, recall_at_k
from bge_pipeline.core.migration import IndexSpec, require_same_precision
from bge_pipeline.core.neighbours import neighbour_overlap, unit_rows
from bge_pipeline.core.quality import AnnVersusExact, bounded_queries, old_vectors
from bge_pipeline.core.runtimes import resolve_backend, runtime_installed
from bge_pipeline.core.search import (
    OVERSAMPLING,
    Hit,
    SearchError,
    ef_search_for,
    probes_for,
    rerank_hits,
    validate_query,
)
from bge_pipeline.core.sql import Table

pytestmark = pytest.mark.unit

MODEL = "BAAI/bge-small-en-v1.5"
OLD_MODEL = "Alibaba-NLP/gte-Qwen2-1.5B-instruct"
TABLE = Table("public", "segments", "id", "text", "embedding", "embedding_384")


# --- probes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lists", [None, 0])
def test_no_index_means_no_probes(lists: Optional[int]) -> None:
    assert probes_for(lists, 10_000, 20) is None


@pytest.mark.parametrize("lists", [1, 10, 100, 500, 1000])
def test_probes_are_between_one_and_the_lists(lists: int) -> None:
    for rows in (0, 1, 50, 1000, 10_000, 1_000_000):
        for limit in (1, 20, 200):
            probes = probes_for(lists, rows, limit)
            assert probes is not None
            assert 1 <= probes <= lists, (rows, limit)
            # Never fewer than pgvector's own sqrt(lists) rule of thumb.
            assert probes >= min(lists, math.ceil(math.sqrt(lists))), (rows, limit)
            # Enough lists to hold OVERSAMPLING times the rows asked for (or all of them).
            if rows > 0:
                assert probes == lists or probes * rows / lists >= OVERSAMPLING * limit, (rows, limit)


def test_small_table_probes_enough_lists_for_the_candidates() -> None:
    # The guide's floor of 100 lists over 1,000 rows: 10 rows a list. 200 candidates need 80 lists at 4x.
    assert probes_for(100, 1000, 200) == 80


def test_table_too_small_for_the_request_probes_every_list() -> None:
    assert probes_for(100, 500, 200) == 100
    assert probes_for(100, 0, 1) == 100  # an unknown (never analysed) size: scan everything


def test_large_table_probes_a_small_share() -> None:
    probes = probes_for(1000, 1_000_000, 20)
    assert probes is not None and probes < 100


# --- the query --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "   ", "\n\t ", None, 42, b"bytes", ["a list"]])
def test_unsearchable_queries_are_refused(query: object) -> None:
    with pytest.raises(SearchError):
        validate_query(query)  # type: ignore[arg-type]


def test_search_error_is_a_value_error() -> None:
    assert issubclass(SearchError, ValueError)  # the CLI prints it as one line, exit 2


def test_a_query_is_returned_unchanged() -> None:
    assert validate_query("  state of the union ") == "  state of the union "


class FakeReranker:
    """Scores by a table of the text's score; what rerank_hits sees of a Reranker."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.table = scores
        self.seen: list[tuple[str, list[str]]] = []

    def scores(self, query: str, texts: list[str]) -> np.ndarray:
        self.seen.append((query, list(texts)))
        return np.array([self.table[text] for text in texts], dtype=np.float32)


def test_rerank_orders_by_score_keeps_distances_and_cuts_to_top_k() -> None:
    hits = [Hit(1, "a", 0.1), Hit(2, "b", 0.2), Hit(3, "c", 0.3), Hit(4, "d", 0.4)]
    reranker = FakeReranker({"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7})
    ranked = rerank_hits(reranker, "q", hits, top_k=3)  # type: ignore[arg-type]
    assert [hit.id for hit in ranked] == [2, 4, 3]
    assert [hit.distance for hit in ranked] == [0.2, 0.4, 0.3]
    assert [hit.rerank_score for hit in ranked] == pytest.approx([0.9, 0.7, 0.5])
    assert reranker.seen == [("q", ["a", "b", "c", "d"])]


def test_rerank_ties_keep_the_index_order() -> None:
    hits = [Hit(i, f"t{i}", i / 10) for i in range(5)]
    ranked = rerank_hits(FakeReranker({f"t{i}": 1.0 for i in range(5)}), "q", hits, top_k=5)  # type: ignore[arg-type]
    assert [hit.id for hit in ranked] == [0, 1, 2, 3, 4]


# --- the metrics ------------------------------------------------------------------------------------------


def test_perfect_ranking_scores_one() -> None:
    assert recall_at_k([7, 8, 9], [7], 10) == 1.0
    assert ndcg_at_k([7, 8, 9], [7], 10) == 1.0
    assert ndcg_at_k([7, 8, 9], [8, 7], 10) == pytest.approx(1.0)


def test_relevant_at_rank_two() -> None:
    assert recall_at_k([5, 7, 9], [7], 10) == 1.0
    assert ndcg_at_k([5, 7, 9], [7], 10) == pytest.approx(1 / math.log2(3))


def test_relevant_missing_or_past_k_scores_zero() -> None:
    assert recall_at_k([1, 2, 3], [7], 10) == 0.0
    assert ndcg_at_k([1, 2, 3], [7], 10) == 0.0
    assert recall_at_k([1, 2, 7], [7], 2) == 0.0
    assert ndcg_at_k([1, 2, 7], [7], 2) == 0.0


def test_partial_recall_and_ndcg_with_two_relevant() -> None:
    assert recall_at_k([1, 9, 2], [1, 2, 3, 4], 3) == 0.5
    expected = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k([1, 9, 2], [1, 2], 3) == pytest.approx(expected)


def test_no_relevant_ids_scores_zero_not_a_division_error() -> None:
    assert recall_at_k([1, 2], [], 10) == 0.0
    assert ndcg_at_k([1, 2], [], 10) == 0.0


def hits(*ids: int) -> list[Hit]:
    return [Hit(i, f"text {i}", i / 100) for i in ids]


def test_ann_recall_against_exact() -> None:
    run = AnnVersusExact(approximate=hits(1, 2, 3, 5), exact=hits(1, 2, 4), probes=10, ann_seconds=0, exact_seconds=0)
    assert run.recall(3) == pytest.approx(2 / 3)
    assert run.recall(2) == 1.0
    assert run.recall(1) == 1.0


def test_ann_recall_misses_everything() -> None:
    run = AnnVersusExact(approximate=hits(7, 8), exact=hits(1, 2), probes=1, ann_seconds=0, exact_seconds=0)
    assert run.recall(2) == 0.0


def test_ann_recall_of_an_empty_table_is_one() -> None:
    assert AnnVersusExact([], [], None, 0.0, 0.0).recall(10) == 1.0


def test_query_set_skips_excerpts_found_in_two_segments() -> None:
    shared = "the union is strong and our people are resolved to meet the future together"
    segments = [
        Segment(1, source="s", year=1990, speaker="A", text=f"Opening words. {shared}."),
        Segment(2, source="s", year=1991, speaker="B", text=f"Other opening. {shared}."),
        Segment(
            3,
            source="s",
            year=1992,
            speaker="C",
            text="We will build roads and bridges across every state of this great nation.",
        ),
        Segment(4, source="s", year=1993, speaker="D", text="Too short."),
    ]
    queries = build_queries(segments)
    assert [query.relevant_ids for query in queries] == [(3,)]
    assert queries[0].query in segments[2].text
    assert build_queries(segments) == queries  # deterministic


def test_query_file_without_relevant_ids_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text('{"query": "a", "relevant_ids": [1]}\n\n{"query": "b"}\n')
    with pytest.raises(ValueError, match="line 3"):
        load_queries(path)


def test_query_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_text('{"query": "a", "relevant_ids": [1, "2"]}\n')
    [query] = load_queries(path)
    assert (query.query, query.relevant_ids) == ("a", (1, 2))


# --- which column the configured model may write ----------------------------------------------------------

OLD = Column("embedding", "vector(1536)", "vector", 1536)
NEW = Column("embedding_384", "vector(384)", "vector", 384)
TEXT = Column("text", "text", "text", -1)
ID = Column("id", "bigint", "int8", -1)


WANTED = RecordedModel(MODEL, 384)
HALF = Column("embedding_384", "halfvec(384)", "halfvec", 384)


def state(columns: list[Column], models: dict[str, RecordedModel], **extra: object) -> TableState:
    return TableState(TABLE, {column.name: column for column in [ID, TEXT, *columns]}, models, **extra)  # type: ignore[arg-type]


def test_staging_column_recorded_for_the_model_is_writable() -> None:
    current = state([OLD, NEW], {"embedding_384": RecordedModel(MODEL, 384)})
    assert writable_column(current, WANTED) == "embedding_384"


def test_live_column_recorded_for_the_model_is_writable_after_the_swap() -> None:
    current = state([Column("embedding", "vector(384)", "vector", 384)], {"embedding": RecordedModel(MODEL, 384)})
    assert writable_column(current, WANTED) == "embedding"
    assert current.migrated


def test_no_column_for_the_model_means_phase_one_first() -> None:
    assert writable_column(state([OLD], {}), WANTED) is None
    assert writable_column(state([OLD], {"embedding": RecordedModel(OLD_MODEL, 1536)}), WANTED) is None
    assert writable_column(state([], {}), WANTED) is None
    # A record for a live column that no longer exists grants nothing.
    assert writable_column(state([], {"embedding": RecordedModel(MODEL, 384)}), WANTED) is None


def test_live_column_recorded_with_other_dimensions_is_not_writable() -> None:
    current = state([Column("embedding", "vector(384)", "vector", 384)], {"embedding": RecordedModel(MODEL, 768)})
    assert writable_column(current, WANTED) is None


def test_staging_column_of_another_model_is_refused() -> None:
    current = state([OLD, NEW], {"embedding_384": RecordedModel("intfloat/e5-small-v2", 384)})
    with pytest.raises(MigrationError) as raised:
        writable_column(current, WANTED)
    message = str(raised.value)
    assert "EMBEDDING_MODEL" in message and "intfloat/e5-small-v2" in message
    assert "rollback_staging_column" in message


def test_unrecorded_staging_column_is_refused() -> None:
    # Someone else's column of the same name: the pipeline must not mix its vectors into it.
    with pytest.raises(MigrationError, match="unrecorded"):
        writable_column(state([OLD, NEW], {}), WANTED)


def test_a_column_of_the_model_in_another_vector_type_is_not_its_column() -> None:
    # VECTOR_TYPE=halfvec after a migration to vector: the live column needs converting, so it is not writable...
    live = Column("embedding", "vector(384)", "vector", 384)
    current = state([live], {"embedding": RecordedModel(MODEL, 384, "vector")})
    assert writable_column(current, RecordedModel(MODEL, 384, "halfvec")) is None
    # ...and a staging column of the other type is refused, naming both settings.
    staged = state([live, HALF], {"embedding_384": RecordedModel(MODEL, 384, "halfvec")})
    with pytest.raises(MigrationError, match="VECTOR_TYPE=vector") as raised:
        writable_column(staged, WANTED)
    assert "halfvec(384)" in str(raised.value)
    assert writable_column(staged, RecordedModel(MODEL, 384, "halfvec")) == "embedding_384"


def test_the_recorded_index_type_does_not_decide_whose_column_it_is() -> None:
    assert RecordedModel(MODEL, 384, "vector", "hnsw") == RecordedModel(MODEL, 384, "vector", "ivfflat")
    assert RecordedModel(MODEL, 384, "halfvec") != RecordedModel(MODEL, 384, "vector")


def test_migration_error_is_a_runtime_error() -> None:
    assert issubclass(MigrationError, RuntimeError)  # the CLI prints it as one line, exit 2


def test_unfinished_migration_to_other_dimensions_is_reported() -> None:
    other = Column("embedding_768", "vector(768)", "vector", 768)
    current = state(
        [OLD, other],
        {"embedding_768": RecordedModel("BAAI/bge-base-en-v1.5", 768), "embedding": RecordedModel(OLD_MODEL, 1536)},
    )
    assert unfinished_migrations(current) == ["embedding_768 (BAAI/bge-base-en-v1.5, 768 dims)"]
    # A record whose column is gone is history, not an unfinished migration.
    gone = state([OLD], {"embedding_768": RecordedModel("BAAI/bge-base-en-v1.5", 768)})
    assert unfinished_migrations(gone) == []


def test_column_vector_dimensions() -> None:
    assert NEW.vector_dimensions == 384
    assert Column("v", "vector", "vector", -1).vector_dimensions is None  # an undimensioned vector column
    assert TEXT.vector_dimensions is None


def ivfflat(**changes: object) -> Index:
    values: dict = dict(
        name="segments_embedding_384_ivfflat_idx",
        column="embedding_384",
        method="ivfflat",
        opclass="vector_cosine_ops",
        valid=True,
        options=("lists=100",),
        unique=False,
    )
    values.update(changes)
    return Index(**values)


def test_valid_cosine_ivfflat_index_serves_its_column() -> None:
    index = ivfflat()
    assert index.serves("embedding_384")
    assert index.lists == 100


@pytest.mark.parametrize(
    "changes",
    [
        {"valid": False},  # a killed CONCURRENTLY build
        {"method": "btree"},
        {"opclass": "vector_l2_ops"},  # does not serve `<=>`
        {"opclass": "vector_ip_ops"},
        {"column": "embedding"},
    ],
    ids=lambda changes: "-".join(f"{k}={v}" for k, v in changes.items()),
)
def test_other_indexes_do_not_serve(changes: dict) -> None:
    assert not ivfflat(**changes).serves("embedding_384")


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "hnsw", "options": ("m=16", "ef_construction=64")},
        {"method": "hnsw", "options": ()},
        {"opclass": "halfvec_cosine_ops"},
        {"method": "hnsw", "opclass": "halfvec_cosine_ops"},
    ],
    ids=lambda changes: "-".join(f"{k}={v}" for k, v in changes.items()),
)
def test_hnsw_and_halfvec_cosine_indexes_serve(changes: dict) -> None:
    assert ivfflat(**changes).serves("embedding_384")


def test_index_spec_is_met_only_by_its_method_type_and_explicit_parameters() -> None:
    hnsw = ivfflat(name="x_hnsw_idx", method="hnsw", opclass="halfvec_cosine_ops", options=("m=24",))
    assert IndexSpec("hnsw", "halfvec").met_by(hnsw, "embedding_384")  # defaults asked: any parameters do
    assert IndexSpec("hnsw", "halfvec", m=24).met_by(hnsw, "embedding_384")
    assert not IndexSpec("hnsw", "halfvec", m=16).met_by(hnsw, "embedding_384")
    assert not IndexSpec("hnsw", "vector").met_by(hnsw, "embedding_384")  # another operator class
    assert not IndexSpec("ivfflat", "halfvec").met_by(hnsw, "embedding_384")
    assert IndexSpec("ivfflat").met_by(ivfflat(), "embedding_384")
    assert not IndexSpec("ivfflat", lists=200).met_by(ivfflat(), "embedding_384")


def test_index_spec_options_leave_hnsw_defaults_to_pgvector() -> None:
    assert IndexSpec("hnsw").options(1_000_000) == {}
    assert IndexSpec("hnsw", m=32, ef_construction=128).options(10) == {"m": 32, "ef_construction": 128}
    assert IndexSpec("ivfflat").options(250_000) == {"lists": 500}


def test_search_index_prefers_the_configured_method() -> None:
    both = state(
        [NEW],
        {},
        indexes=[ivfflat(), ivfflat(name="segments_embedding_384_hnsw_idx", method="hnsw", options=())],
    )
    found_hnsw, found_ivf = both.search_index("embedding_384", "hnsw"), both.search_index("embedding_384", "ivfflat")
    assert found_hnsw is not None and found_hnsw.method == "hnsw"
    assert found_ivf is not None and found_ivf.method == "ivfflat"
    assert state([NEW], {}, indexes=[ivfflat(valid=False)]).search_index("embedding_384") is None


def test_ef_search_covers_the_candidates_within_pgvectors_range() -> None:
    assert ef_search_for(20) == 40  # never below pgvector's default
    assert ef_search_for(200) == 200  # RERANK_TOP_K=200 gets 200 candidates, not 40
    assert ef_search_for(50_000) == 1000  # pgvector's ceiling: iterative scans go on past it


def test_index_without_lists_option() -> None:
    assert ivfflat(options=()).lists is None
    assert ivfflat(options=("fillfactor=90", "lists=250")).lists == 250


def test_old_vectors_before_and_after_the_swap() -> None:
    before = state([OLD, NEW], {})
    assert old_vectors(before, "embedding_384") == ("segments", "embedding")
    after = state(
        [Column("embedding", "vector(384)", "vector", 384)],
        {},
        backups={1536: Backup("segments_embedding_backup_1536", OLD_MODEL, 1536)},
    )
    assert old_vectors(after, "embedding") == ("segments_embedding_backup_1536", "embedding")
    assert old_vectors(state([Column("embedding", "vector(384)", "vector", 384)], {}), "embedding") is None


# --- the encoder's choices --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "size"), [("cpu", 16), ("cuda", 256), ("cuda:1", 256)], ids=["on-cpu", "on-gpu", "on-gpu-1"]
)
def test_default_batch_size(device: str, size: int) -> None:
    assert default_batch_size(device) == size


def test_explicit_device_is_kept() -> None:
    assert resolve_device("cpu") == "cpu"


def test_explicit_gpu_without_one_is_an_error_not_a_silent_cpu_run() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    with pytest.raises(ModelLoadError, match="EMBEDDING_DEVICE"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == "cpu"


def test_backend_choice() -> None:
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("onnx", "cuda:0") == "torch"  # the ONNX runtimes run on a CPU only
    assert resolve_backend("torch-bf16", "cuda") == "torch"  # a GPU runs fp16
    assert resolve_backend("auto", "cpu") == ("onnx" if runtime_installed("onnx") else "torch")


def test_bf16_is_refused_where_the_cpu_would_emulate_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A CPU without AMX or AVX512-BF16 cannot be had on a machine that has them: the probe is replaced (a fake of
    # the hardware, not of the code under test).
    for module in (runtimes, autotune):
        monkeypatch.setattr(module, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="bge_pipeline.core.runtimes"):
        assert resolve_backend("torch-bf16", "cpu") == "torch"
    assert "EMBEDDING_BACKEND=torch-bf16 but this CPU has no native bf16" in caplog.text
    assert "torch-bf16" not in autotune.runtimes()  # nor tuned: it would only lose


def test_cpu_tuning_candidates_keep_to_the_batch_setting() -> None:
    def shapes(explicit: Optional[int]) -> list[tuple[int, Optional[int]]]:
        return [(c.batch_size, c.tokens_per_pass) for c in autotune.candidates(1024, explicit, ["torch"])]

    # Unset: small passes within the token budget, wide passes for bf16 tiles, sentence-transformers' whole 32.
    assert shapes(None) == [(16, 1024), (64, 4096), (32, None)]
    assert shapes(64) == [(16, 1024), (64, 4096), (64, None)]  # the guide's 64 is the most rows a pass takes
    assert shapes(8) == [(8, 1024), (8, 4096), (8, None)]
    labels = [c.label for c in autotune.candidates(1024, None, ["onnx", "torch-bf16"])]
    assert labels[0] == "onnx, batch 16, 1024-token passes" and labels[-1] == "torch-bf16, batch 32, whole batches"


def test_cpu_tuning_is_keyed_by_the_cpu_and_the_batch_setting() -> None:
    key = autotune.machine_key(64)
    assert key.endswith(f"-{os.cpu_count()}cpu-batch64") and autotune.cpu_signature() in key
    assert autotune.machine_key(None).endswith("batchdefault")


@pytest.mark.parametrize(
    ("lengths", "start", "max_rows", "budget", "rows"),
    [
        ([50] * 100, 0, 64, 1024, 20),  # the guide's 64 on a CPU: 20 rows of 50 tokens fill 1,000 tokens
        ([50] * 100, 0, 16, 1024, 16),  # EMBEDDING_BATCH_SIZE stays the upper bound
        ([10] * 100, 0, 64, 1024, 64),  # short texts: the whole batch fits
        ([600, 20, 20], 0, 64, 1024, 1),  # one long text alone (padding 20-token texts to 600 would waste a pass)
        ([2000, 10], 0, 64, 1024, 1),  # a text past the budget still goes, alone
        ([50] * 30, 25, 64, 1024, 5),  # the tail
    ],
)
def test_a_cpu_pass_holds_at_most_its_token_budget(lengths, start, max_rows, budget, rows) -> None:
    assert rows_within_budget(lengths, start, max_rows, budget) == rows


@pytest.mark.parametrize(
    ("requested", "rows", "queries"),
    [(100, 10_000, 100), (100, 100_000, 100), (100, 1_000_000, 20), (100, 50_000_000, 20), (5, 1_000_000, 5)],
)
def test_the_recall_check_runs_as_many_exact_searches_as_its_budget_allows(requested, rows, queries) -> None:
    assert bounded_queries(requested, rows) == queries


# --- the int8 gate ----------------------------------------------------------------------------------------------


def test_neighbour_overlap_is_one_for_the_same_vectors_and_low_for_unrelated_ones() -> None:
    rng = np.random.default_rng(3)
    vectors = unit_rows(list(rng.standard_normal((300, 16))))
    assert neighbour_overlap(vectors, vectors, 50, 10) == 1.0
    nudged = unit_rows(list(vectors + 0.01 * rng.standard_normal(vectors.shape)))
    assert neighbour_overlap(vectors, nudged, 50, 10) > 0.9  # int8-sized noise keeps most neighbours
    unrelated = unit_rows(list(rng.standard_normal((300, 16))))
    assert neighbour_overlap(vectors, unrelated, 50, 10) < 0.2


def test_the_int8_gate_passes_at_its_floor_and_names_both_figures() -> None:
    gate = Int8Agreement(neighbour_agreement=0.95, sampled_texts=1000, ndcg_float=0.8, ndcg_int8=0.78, floor=0.95)
    assert gate.passed and not replace(gate, neighbour_agreement=0.949).passed
    described = gate.describe()
    assert "0.950" in described and "INT8_MIN_AGREEMENT=0.95" in described
    assert "0.780 int8" in described and "0.800 float" in described


def test_a_column_holds_int8_or_float_vectors_never_both() -> None:
    current = state([OLD, NEW], {"embedding_384": RecordedModel(MODEL, 384, runtime="onnx-int8")})
    int8 = Encoder(None, MODEL, "cpu", 16, 384, backend="onnx-int8")
    float_encoder = Encoder(None, MODEL, "cpu", 16, 384, backend="onnx")
    assert require_same_precision(current, "embedding_384", int8) is int8
    with pytest.raises(MigrationError, match="would write float vectors into segments.embedding_384, which holds int8"):
        require_same_precision(current, "embedding_384", float_encoder)
    # A record from before records had a runtime holds float vectors.
    legacy = state([OLD, NEW], {"embedding_384": RecordedModel(MODEL, 384)})
    assert require_same_precision(legacy, "embedding_384", float_encoder) is float_encoder
    with pytest.raises(MigrationError, match="EMBEDDING_BACKEND=onnx-int8"):
        require_same_precision(legacy, "embedding_384", int8)
