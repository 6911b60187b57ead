"""`bge-pipeline bench --index` as a user runs it: four index/vector type combinations measured on the configured
table's vectors or on encoded corpus texts, a recommendation drawn from the figures, nothing left behind.

The runs encode with the lookup stand-in (bge-small's embeddings, no transformer layers) through --model: MiniLM
would spend a minute of two loaded cores on the 1,520 texts. Figures are checked for sanity, not against targets.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable

import numpy as np
import psycopg
import pytest

from bge_pipeline.cli import index_bench
from bge_pipeline.cli.index_bench import Combination, corpus_texts, hold_out, recall_at_k, recommend
from bge_pipeline.cli.main import main
from bge_pipeline.core import migration as phases
from bge_pipeline.core.corpus import load_segments
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import Encoder
from bge_pipeline.core.search import Hit
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.shape_model import build_lookup_model

LEFTOVERS = "SELECT tablename FROM pg_tables WHERE tablename LIKE 'bge_bench_index_%'"


@pytest.fixture(scope="session")
def lookup_model() -> str:
    return str(build_lookup_model())


def run_index_bench(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["bench", "--index", "--json", "--no-progress", "--device", "cpu", "--backend", "torch", *args]) == 0
    return json.loads(capsys.readouterr().out)  # --json: stdout is one JSON object, the human lines are on stderr


def fill_embeddings_column(settings: Settings, model: str) -> None:
    """Phases 1 and 2 as the assets run them: the configured model's column, every row's vector in it."""
    database, migration = Database.from_settings(settings), phases.MigrationTarget.from_settings(settings)
    encoder = Encoder.load(model, 384, "cpu", 64, "torch")
    phases.prepare_staging_column(database, migration, encoder)
    phases.backfill(database, migration, encoder, list(range(migration.partitions)), logging.getLogger(__name__))
    database.dispose()


# --- on a real database ---------------------------------------------------------------------------------------


@pytest.mark.pgvector
def test_index_bench_on_the_corpus_measures_four_combinations_and_recommends(
    lookup_model: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)  # a fresh embedded PostgreSQL, corpus texts encoded
    result = run_index_bench(capsys, "--rows", "1500", "--queries", "20", "--model", lookup_model)

    assert (result["rows"], result["queries"], result["dimensions"]) == (1500, 20, 384)
    assert result["source"] == f"corpus encoded with {lookup_model}"
    by = {(c["index_type"], c["vector_type"]): c for c in result["combinations"]}
    assert set(by) == {("ivfflat", "vector"), ("ivfflat", "halfvec"), ("hnsw", "vector"), ("hnsw", "halfvec")}
    for combination in by.values():
        assert 0.8 <= combination["recall_at_10"] <= 1.0, combination
        assert combination["build_seconds"] > 0 and combination["write_rows_per_second"] > 0
        assert 0 < combination["query_p50_ms"] <= combination["query_p99_ms"]
    for method in ("ivfflat", "hnsw"):
        full, half = by[(method, "vector")], by[(method, "halfvec")]
        assert half["index_bytes"] < 0.7 * full["index_bytes"], (method, half, full)
        assert half["table_bytes"] < 0.7 * full["table_bytes"], (method, half, full)
    assert by[("ivfflat", "vector")]["parameters"]["lists"] == 100  # the guide's floor
    assert by[("hnsw", "vector")]["parameters"]["ef_search"] == 200  # RERANK_TOP_K's candidates
    assert result["recommendation"].startswith("Recommendation: INDEX_TYPE=")
    assert result["recommended_index_type"] in ("ivfflat", "hnsw")
    assert result["cpu_count"] >= 1 and result["pgvector"]


@pytest.mark.pgvector
def test_index_bench_samples_the_configured_table_and_leaves_nothing_behind(
    lookup_model: str,
    seed_table: Callable[..., Any],
    make_settings: Callable[..., Settings],
    connect: Callable[[], psycopg.Connection],
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed_table(1000)
    fill_embeddings_column(make_settings(embedding_model=lookup_model), lookup_model)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("EMBEDDING_MODEL", lookup_model)

    result = run_index_bench(capsys, "--rows", "5000", "--queries", "20")

    assert result["source"] == "table" and "public.segments.embedding_384" in result["source_detail"]
    assert (result["rows"], result["queries"]) == (980, 20)  # all 1,000 vectors, 20 of them held out
    assert len(result["combinations"]) == 4
    with connect() as conn:
        assert conn.execute(LEFTOVERS).fetchall() == []
        assert conn.execute("SELECT count(embedding_384) FROM segments").fetchone()[0] == 1000  # untouched


@pytest.mark.pgvector
def test_index_bench_drops_its_tables_when_a_measurement_fails(
    lookup_model: str,
    database_url: str,
    connect: Callable[[], psycopg.Connection],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def disk_full(*_: Any, **__: Any) -> float:
        raise RuntimeError("could not extend file: No space left on device")

    monkeypatch.setenv("DATABASE_URL", database_url)  # no segments table there: the corpus is encoded
    monkeypatch.setattr(index_bench, "measure_writes", disk_full)
    argv = ["bench", "--index", "--rows", "200", "--queries", "10", "--model", lookup_model, "--no-progress"]
    assert main([*argv, "--device", "cpu", "--backend", "torch"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    with connect() as conn:
        assert conn.execute(LEFTOVERS).fetchall() == []


# --- the rules, without a database ----------------------------------------------------------------------------


def hits(*distances: float) -> list[Hit]:
    return [Hit(number, "", distance) for number, distance in enumerate(distances)]


@pytest.mark.unit
def test_a_hit_as_close_as_the_exact_tenth_counts_as_found() -> None:
    exact = hits(*[d / 10 for d in range(10)])
    tie = hits(*[d / 10 for d in range(9)], 0.9)  # another row with the 10th's vector: as right as it
    missed = hits(*[d / 10 for d in range(9)], 0.95)
    assert recall_at_k(tie, exact) == 1.0
    assert recall_at_k(missed, exact) == 0.9
    assert recall_at_k(hits(0.0, 0.1), exact) == 0.2  # a short answer misses the rest


def combination(index_type: str, vector_type: str, recall: float, p99_ms: float, **figures: Any) -> Combination:
    halved = vector_type == "halfvec"
    defaults: dict[str, Any] = dict(
        build_seconds=1.0 if index_type == "ivfflat" else 6.0,
        table_bytes=8_000_000 if halved else 16_000_000,
        index_bytes=9_000_000 if halved else 18_000_000,
        query_p50_ms=p99_ms / 2,
        write_rows_per_second=9_000.0 if index_type == "ivfflat" else 900.0,
        parameters={},
    )
    return Combination(index_type, vector_type, recall_at_10=recall, query_p99_ms=p99_ms, **{**defaults, **figures})


@pytest.mark.unit
def test_hnsw_and_halfvec_are_recommended_when_the_figures_say_so_with_their_costs() -> None:
    chosen = recommend(
        [
            combination("ivfflat", "vector", 0.93, 4.0),
            combination("ivfflat", "halfvec", 0.92, 4.0),
            combination("hnsw", "vector", 0.99, 4.5),
            combination("hnsw", "halfvec", 0.985, 4.4),
        ]
    )
    assert (chosen.index_type, chosen.vector_type) == ("hnsw", "halfvec")
    assert "900 rows/s against ivfflat's 9,000" in chosen.reason  # the write rate it costs
    assert "6.00 s against 1.00 s" in chosen.reason  # and the build time
    assert "pick ivfflat instead" in chosen.reason
    assert "(0.50x)" in chosen.reason  # halfvec's index bytes against vector's


@pytest.mark.unit
def test_ivfflat_and_vector_are_recommended_when_hnsw_finds_no_more_and_halfvec_loses_recall() -> None:
    chosen = recommend(
        [
            combination("ivfflat", "vector", 0.99, 3.0),
            combination("ivfflat", "halfvec", 0.95, 3.0),
            combination("hnsw", "vector", 0.995, 3.0),
            combination("hnsw", "halfvec", 0.95, 3.0),
        ]
    )
    assert (chosen.index_type, chosen.vector_type) == ("ivfflat", "vector")
    assert "loses more than 0.01" in chosen.line


@pytest.mark.unit
def test_more_rows_than_segments_are_distinct_real_sentences() -> None:
    segments = [" ".join(segment.text.split()) for segment in load_segments()]  # the bundled 1,000
    texts = corpus_texts(None, 1500)
    assert len(texts) == len(set(texts)) == 1500
    assert all(any(" ".join(text.split()) in segment for segment in segments) for text in texts[:200])  # real text
    assert corpus_texts(None, 1500) == texts  # the same sample on every run
    assert all(re.search(r"\w", text) and len(text.split()) >= 4 for text in texts)


@pytest.mark.unit
def test_queries_are_held_out_of_the_indexed_rows() -> None:
    vectors = np.arange(30, dtype=np.float32).reshape(30, 1)
    rows, queries = hold_out(vectors, 25, 5)
    assert (len(rows), len(queries)) == (25, 5) and not set(rows.ravel()) & set(queries.ravel())
    rows, queries = hold_out(vectors, 100, 20)  # fewer vectors than asked: a tenth held out
    assert (len(rows), len(queries)) == (27, 3)


@pytest.mark.unit
def test_bench_modes_are_one_at_a_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--index", "--scale"]) == 2
    assert "--scale and --index: choose one" in capsys.readouterr().err
