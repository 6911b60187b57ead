"""INDEX_TYPE=hnsw and VECTOR_TYPE=halfvec through every path: the migration, the checks, search with its 200
candidates, eval, verify, and the conversions of a migrated table (a second index; a cast copy) with no downtime
and no encoding."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import psycopg
import pytest

from bge_pipeline.core.database import Database
from bge_pipeline.core.evaluation import evaluate
from bge_pipeline.core.judged_set import load_queries
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.plan import plan_migration
from bge_pipeline.core.rollback import restore_backup
from bge_pipeline.core.search import run_search
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.verification import verify
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.helpers import check_results, columns, indexes, materialize, metadata, vectors

pytestmark = pytest.mark.pgvector
ROWS = 400
STATE = "SELECT column_name, vector_type, index_type, kind FROM bge_pipeline_models ORDER BY column_name"


def _migrate(settings: Settings) -> Any:
    result = materialize(build_resources(settings, from_environment=False), "embeddings*")
    checks = check_results(result)
    assert all(checks.values()), checks
    return result


def _index_bytes(conn: psycopg.Connection, name: str) -> int:
    return conn.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()[0]


def test_hnsw_over_halfvec_migrates_searches_and_keeps_ndcg(
    seed_table: Callable[..., Any], make_settings: Callable[..., Settings], connect: Callable[[], psycopg.Connection]
) -> None:
    seed_table(ROWS)
    settings = make_settings(index_type="hnsw", vector_type="halfvec")
    _migrate(settings)
    with connect() as conn:
        assert columns(conn)["embedding"] == "halfvec(384)"
        made = indexes(conn)
        assert "USING hnsw (embedding halfvec_cosine_ops)" in made["segments_embedding_hnsw_idx"]
        assert not any("ivfflat" in definition for definition in made.values())  # the guide's went with its column
        assert ("embedding", "halfvec", "hnsw", "column") in conn.execute(STATE).fetchall()

    # RERANK_TOP_K candidates: pgvector's default hnsw.ef_search of 40 would have returned 40.
    outcome = run_search("taxes on imports and tariffs", settings=settings)
    assert (outcome.candidates, len(outcome.hits)) == (200, 20)
    assert outcome.target.method == "hnsw" and outcome.probes == 200  # the ef_search it set
    reranked = run_search(
        "the army and the navy", settings=settings.replace(reranker_model=settings.embedding_model), rerank=True
    )
    assert (reranked.candidates, len(reranked.hits)) == (200, 20)
    assert all(hit.rerank_score is not None for hit in reranked.hits)

    report = evaluate(load_queries(), settings)
    scores = {score.method: score for score in report.scores}
    assert scores["exact"].ndcg > 0.5  # the judged set is answerable on this table at all
    assert scores["ann"].ndcg >= 0.97 * scores["exact"].ndcg, (scores["ann"], scores["exact"])

    checked = verify(Database.from_settings(settings), MigrationTarget.from_settings(settings))
    assert checked.complete and checked.live is not None
    assert checked.live.declared_type == "halfvec(384)" and checked.live.index_method == "hnsw"

    # Re-embedding: an edited text loses its halfvec vector and the next run gives it a new one, in place.
    with connect() as conn:
        conn.execute(
            "UPDATE segments SET text = 'A new text about harbours and tariffs' WHERE id = (SELECT min(id) FROM segments)"
        )
        assert conn.execute("SELECT count(*) FROM segments WHERE embedding IS NULL").fetchone()[0] == 1
    result = materialize(build_resources(settings, from_environment=False), "embeddings")
    assert metadata(result, "embeddings")["rows_embedded"] == 1
    with connect() as conn:
        assert conn.execute("SELECT count(*) FROM segments WHERE embedding IS NULL").fetchone()[0] == 0
        assert columns(conn)["embedding"] == "halfvec(384)"


def test_a_migrated_table_converts_to_hnsw_then_to_halfvec_without_encoding_again(
    seed_table: Callable[..., Any], make_settings: Callable[..., Settings], connect: Callable[[], psycopg.Connection]
) -> None:
    seed_table(ROWS)
    plain = make_settings()
    _migrate(plain)
    with connect() as conn:
        before = vectors(conn)
        ivfflat_bytes = _index_bytes(conn, "segments_embedding_ivfflat_idx")
    database = Database.from_settings(plain)

    # INDEX_TYPE=hnsw: a second index built CONCURRENTLY, then the first dropped; nothing encoded.
    hnsw = make_settings(index_type="hnsw")
    planned = plan_migration(database, MigrationTarget.from_settings(hnsw))
    index_phase = next(phase for phase in planned.phases if phase.name == "index")
    assert "USING hnsw" in index_phase.does and "DROP INDEX CONCURRENTLY the IVFFLAT" in index_phase.does
    result = _migrate(hnsw)
    assert metadata(result, "embedding_index")["replaced"] == "segments_embedding_ivfflat_idx"
    with connect() as conn:
        made = indexes(conn)
        assert "segments_embedding_hnsw_idx" in made and "segments_embedding_ivfflat_idx" not in made
        assert ("embedding", "vector", "hnsw", "column") in conn.execute(STATE).fetchall()
        vector_hnsw_bytes = _index_bytes(conn, "segments_embedding_hnsw_idx")
        vector_column = conn.execute("SELECT avg(pg_column_size(embedding)) FROM segments").fetchone()[0]

    # VECTOR_TYPE=halfvec: a staging halfvec column filled by a cast from the live one, indexed, swapped.
    half = make_settings(index_type="hnsw", vector_type="halfvec")
    planned = plan_migration(database, MigrationTarget.from_settings(half))
    assert planned.converting_from == "embedding" and planned.encode_texts_per_second is None
    backfill_phase = next(phase for phase in planned.phases if phase.name == "phase 2")
    assert f"copy {ROWS:,} vectors from embedding as halfvec (no encoding)" in backfill_phase.does
    result = _migrate(half)
    embedded = metadata(result, "embeddings")
    assert embedded["texts_encoded"] == 0 and embedded["rows_copied"] == ROWS, embedded
    with connect() as conn:
        assert columns(conn)["embedding"] == "halfvec(384)"
        after = vectors(conn)
        half_bytes = _index_bytes(conn, "segments_embedding_hnsw_idx")
        half_column = conn.execute("SELECT avg(pg_column_size(embedding)) FROM segments").fetchone()[0]
        kept = conn.execute(STATE).fetchall()
    assert after.keys() == before.keys()
    assert max(float(np.abs(after[i] - before[i]).max()) for i in before) < 1e-3  # fp16 rounding, nothing else
    # halfvec stores 2 bytes a component: the column and its index take about half the bytes.
    assert float(half_column) < 0.55 * float(vector_column)
    assert half_bytes < 0.7 * vector_hnsw_bytes
    assert ivfflat_bytes > 0
    assert ("embedding", "halfvec", "hnsw", "column") in kept
    assert any(kind == "backup" and vector_type == "vector" for _, vector_type, _, kind in kept)

    # The full-precision vectors come back from the backup, as vector(384) with an index of INDEX_TYPE.
    restore_backup(database, MigrationTarget.from_settings(hnsw), 384, logging.getLogger("test"))
    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(384)"
        assert vectors(conn).keys() == before.keys()
        assert "USING hnsw (embedding vector_cosine_ops)" in indexes(conn)["segments_embedding_hnsw_idx"]
    assert verify(database, MigrationTarget.from_settings(hnsw)).complete
