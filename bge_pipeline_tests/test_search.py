"""The query path as a user meets it: search_segments and `bge-pipeline search` on a migrated table."""

from __future__ import annotations

import itertools
import os
from typing import Any

import dagster as dg
import psycopg
import pytest

from bge_pipeline import search_segments
from bge_pipeline.core.corpus import Segment, create_seed_table
from bge_pipeline.core.search import SearchError, run_search
from bge_pipeline.core.settings import Settings
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.faultkit import plain, with_database
from bge_pipeline_tests.helpers import ALL_ASSETS_AND_CHECKS

TABLE_ROWS = 300
_numbers = itertools.count()


class MigratedTable:
    """A `segments` table taken through `embeddings*` by Dagster, and a way to make settings for it."""

    def __init__(self, url: str, minilm_path: str, segments: list[Segment], result: dg.ExecuteInJobResult) -> None:
        self.url = url
        self.minilm_path = minilm_path
        self.segments = segments
        self.result = result

    def settings(self, **overrides: Any) -> Settings:
        values = {
            "DATABASE_URL": self.url,
            "EMBEDDING_MODEL": self.minilm_path,
            "EMBEDDING_DEVICE": "cpu",
            "RERANKER_MODEL": self.minilm_path,  # MiniLM with a random one-label head: real code path, scores meaningless
            "BACKFILL_BATCH_ROWS": "100",
        }
        values.update({key.upper(): str(value) for key, value in overrides.items()})
        return Settings.from_mapping(values)

    def resources(self, **overrides: Any) -> dict[str, Any]:
        return build_resources(self.settings(**overrides), from_environment=False)

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(plain(self.url), autocommit=True)


def migrate_table(
    server_url: str, minilm_path: str, segments: list[Segment], rows: int = TABLE_ROWS, **overrides: Any
) -> MigratedTable:
    """A fresh database holding the guide's starting table, migrated to MiniLM the way the demo does it."""

    name = f"search_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(plain(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    chosen = segments[:rows]
    with psycopg.connect(plain(url), autocommit=True) as conn:
        create_seed_table(conn, chosen)
    table = MigratedTable(url, minilm_path, chosen, result=None)  # type: ignore[arg-type]
    table.result = dg.materialize(
        ALL_ASSETS_AND_CHECKS,
        selection="embeddings*",
        resources=table.resources(**overrides),
    )
    assert table.result.success
    return table


_shared_tables: dict[str, MigratedTable] = {}


def shared_migrated_table(server_url: str, minilm_path: str, segments: list[Segment]) -> MigratedTable:
    """One 300-row migrated table per test session, for the modules that only read it (encoding is the cost)."""
    if server_url not in _shared_tables:
        _shared_tables[server_url] = migrate_table(server_url, minilm_path, segments)
    return _shared_tables[server_url]


@pytest.fixture(scope="module")
def migrated(server_url: str, minilm_path: str, segments: list[Segment]) -> MigratedTable:
    return shared_migrated_table(server_url, minilm_path, segments)


def _index_lists(table: MigratedTable) -> int:
    with table.connect() as conn:
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE relname = 'segments_embedding_ivfflat_idx'"
        ).fetchone()[0]
    return int(next(o for o in options if o.startswith("lists=")).split("=")[1])


def test_search_returns_return_top_k_hits_from_a_small_table_with_100_lists(migrated: MigratedTable) -> None:
    # The guide's formula gives 300 rows 100 lists of ~3 rows: with pgvector's default probes = 1 a query
    # would come back with a handful of rows.
    assert _index_lists(migrated) == 100
    hits = search_segments("taxes on imports and tariffs", settings=migrated.settings())
    assert len(hits) == 20
    assert len({hit.id for hit in hits}) == 20
    assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)
    assert all(hit.rerank_score is None for hit in hits)
    assert all(isinstance(hit.text, str) and hit.text for hit in hits)


def test_search_honours_return_top_k_and_an_explicit_top_k(migrated: MigratedTable) -> None:
    assert len(search_segments("the army and the navy", settings=migrated.settings(return_top_k=7))) == 7
    assert len(search_segments("the army and the navy", top_k=3, settings=migrated.settings())) == 3


def test_a_sentence_from_a_segment_finds_that_segment_first(migrated: MigratedTable) -> None:
    segment = migrated.segments[123]
    sentence = max(segment.text.split(". "), key=len)
    hits = search_segments(sentence, settings=migrated.settings())
    assert hits[0].id == segment.id


def test_top_k_above_the_row_count_returns_the_whole_table(migrated: MigratedTable) -> None:
    hits = search_segments("commerce", top_k=TABLE_ROWS + 200, settings=migrated.settings())
    assert sorted(hit.id for hit in hits) == sorted(segment.id for segment in migrated.segments)


def test_with_the_reranker_hits_follow_the_cross_encoders_scores(migrated: MigratedTable) -> None:
    query = "peace treaties with foreign nations"
    settings = migrated.settings(enable_reranker="true", rerank_top_k=20, return_top_k=5)
    hits = search_segments(query, settings=settings)
    candidates = search_segments(query, top_k=20, settings=migrated.settings(rerank_top_k=20))

    # Independently: score every candidate with the cross-encoder itself and take the five best.
    cross_encoder = migrated.resources()["reranker"].get().model
    expected_scores = cross_encoder.predict([(query, hit.text) for hit in candidates])
    best = sorted(zip(expected_scores, [hit.id for hit in candidates]), key=lambda pair: -pair[0])[:5]

    assert len(hits) == 5
    assert [hit.id for hit in hits] == [hit_id for _, hit_id in best]
    assert [hit.rerank_score for hit in hits] == pytest.approx([float(score) for score, _ in best], abs=1e-5)
    assert all(hit.distance is not None for hit in hits)


def test_an_empty_query_is_refused_with_a_clear_message(migrated: MigratedTable) -> None:
    for query in ("", "   \n\t"):
        with pytest.raises(SearchError, match="query is empty"):
            search_segments(query, settings=migrated.settings())


def test_a_ten_thousand_word_query_and_a_punctuation_query_return_hits(migrated: MigratedTable) -> None:
    settings = migrated.settings(enable_reranker="true", rerank_top_k=5, return_top_k=3)
    long_query = " ".join(itertools.islice(itertools.cycle(["liberty", "union", "congress", "tariff"]), 10_000))
    for query in (long_query, "?!... ;;; --- ???", "🙂"):
        hits = search_segments(query, settings=settings)
        assert len(hits) == 3
        assert all(hit.rerank_score is not None for hit in hits)


def test_search_refuses_a_table_holding_another_models_vectors(migrated: MigratedTable) -> None:
    with pytest.raises(SearchError, match="holds") as refused:
        search_segments("anything", settings=migrated.settings(embedding_model="BAAI/bge-small-en-v1.5"))
    assert migrated.minilm_path in str(refused.value)


def test_search_reports_how_it_searched(migrated: MigratedTable) -> None:
    outcome = run_search("railroads", settings=migrated.settings())
    assert outcome.target.column == "embedding"
    assert outcome.target.index == "segments_embedding_ivfflat_idx"
    assert outcome.candidates == 200
    assert outcome.probes is not None and 1 <= outcome.probes <= 100


def test_cli_search_prints_a_ranked_table(
    migrated: MigratedTable, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from bge_pipeline.cli.main import main

    monkeypatch.chdir(tmp_path)  # no stray .env
    for key, value in {
        "DATABASE_URL": migrated.url,
        "EMBEDDING_MODEL": migrated.minilm_path,
        "EMBEDDING_DEVICE": "cpu",
    }.items():
        monkeypatch.setenv(key, value)
    assert main(["search", "the public debt", "--top-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["rank", "id", "distance", "rerank", "text"]
    rows, timing = lines[2:-1], lines[-1]
    assert len(rows) == 5
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
    # Where the query's time went: process start-up, model load, encoding, the SQL, the reranker.
    parts = [part.rsplit(" ", 2)[0] for part in timing.removeprefix("time: ").split(", ")]
    assert parts == ["start-up", "model load", "encode", "SQL", "rerank"]

    assert main(["search", "  "]) == 2
    assert "query is empty" in capsys.readouterr().err
