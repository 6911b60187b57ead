"""The swap's guards: no swap while a row with text lacks a vector, while vectors of another dimension exist, or
while the staging column belongs to another model; each refusal says why and how many."""

from __future__ import annotations

import logging
from typing import Any, Callable

import psycopg
import pytest

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import MigrationError
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import shared_encoder
from bge_pipeline.core.migration import MigrationTarget, index_pending_rows, swap_columns
from bge_pipeline_tests.faultkit import DIMENSIONS, column_types, migrate, plain, settings_for, snapshot
from bge_pipeline_tests.helpers import indexes, materialize

pytestmark = pytest.mark.pgvector

STAGING = f"embedding_{DIMENSIONS}"
log = logging.getLogger(__name__)


def _resources(url: str, minilm_path: str, **overrides: Any) -> tuple[Database, MigrationTarget]:
    settings = settings_for(url, minilm_path, **overrides)
    return Database.from_settings(settings), MigrationTarget.from_settings(settings)


def _live_table(conn: psycopg.Connection) -> tuple[Any, Any]:
    """What readers of `segments` see: its columns and a checksum of its rows."""
    state = snapshot(conn)
    return column_types(conn, "segments"), state["checksums"]["public.segments"]


def test_swap_refused_while_a_row_lacks_its_vector(
    database_url: str, connect: Callable[[], psycopg.Connection], seed_table: Callable[..., Any], minilm_path: str
) -> None:
    """A row the pipeline cannot write (another application's trigger discards its vector, for real): the blocking
    `embedding_null_count` check fails with the count, the index and swap steps do not run, and a direct swap
    refuses naming the count."""
    seeded = seed_table(rows=30)
    held_back = seeded[7].id
    with connect() as conn:
        conn.execute(
            f"""CREATE FUNCTION keep_row_unembedded() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.id = {held_back} AND NEW.{STAGING} IS NOT NULL THEN RETURN NULL; END IF; RETURN NEW; END $$"""
        )
        before = _live_table(conn)
    url = plain(database_url)
    settings = settings_for(url, minilm_path)
    assert migrate(settings, selection="staging_embedding_column").success
    with connect() as conn:
        conn.execute(
            f"CREATE TRIGGER keep_row_unembedded BEFORE UPDATE OF {STAGING} ON segments FOR EACH ROW EXECUTE FUNCTION keep_row_unembedded()"
        )
    result = migrate(settings, raise_on_error=False)
    assert not result.success
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    null_count = checks["embedding_null_count"]
    assert not null_count.passed
    assert null_count.metadata["rows_missing_vector"].value == 1
    assert null_count.description and null_count.description.startswith("1 rows with text have no vector")
    assert [m.asset_key.path[-1] for m in result.get_asset_materialization_events()] == ["embeddings"]
    with connect() as conn:
        columns, _ = _live_table(conn)
        assert columns["embedding"] == "vector(1536)" and STAGING in columns

    db, migration = _resources(url, minilm_path)
    with pytest.raises(MigrationError) as refusal:
        swap_columns(db, migration, shared_encoder(minilm_path, DIMENSIONS, "cpu"), log)
    message = str(refusal.value)
    assert (
        "\n" not in message and "Swap refused: 1 rows of segments have text but no vector in embedding_384" in message
    )
    with connect() as conn:
        columns, checksum = _live_table(conn)
        assert columns["embedding"] == "vector(1536)"
        assert conn.execute(f"SELECT count(*) FROM segments WHERE {STAGING} IS NULL").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM segments").fetchone()[0] == 30
    assert before[0]["embedding"] == columns["embedding"]


def test_swap_refused_while_vectors_of_another_dimension_exist(
    database_url: str, connect: Callable[[], psycopg.Connection], seed_table: Callable[..., Any], minilm_path: str
) -> None:
    """pgvector keeps other dimensions out of a vector(384) column, so the test retypes the staging column to a bare
    `vector` (as a hand edit would) and writes two 768-dim vectors: the dimension check counts them, and no index
    can be built on the column, so the swap never starts."""
    seed_table(rows=20)
    url = plain(database_url)
    settings = settings_for(url, minilm_path)
    assert migrate(settings, selection="staging_embedding_column").success
    with connect() as conn:
        conn.execute(f"ALTER TABLE segments ALTER COLUMN {STAGING} TYPE vector")
        ids = [row[0] for row in conn.execute("SELECT id FROM segments ORDER BY id LIMIT 2").fetchall()]
        conn.execute(f"UPDATE segments SET {STAGING} = array_fill(0.1, ARRAY[768])::vector WHERE id = ANY(%s)", (ids,))
    result = migrate(settings, raise_on_error=False)
    assert not result.success
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert not checks["embedding_dimensions"].passed
    assert checks["embedding_dimensions"].metadata["vectors_with_wrong_dimensions"].value == 2
    assert "live_embedding_column" not in [m.asset_key.path[-1] for m in result.get_asset_materialization_events()]
    db, migration = _resources(url, minilm_path)
    with connect() as conn:
        before = _live_table(conn)
    with pytest.raises(Exception) as refusal:
        swap_columns(db, migration, shared_encoder(minilm_path, DIMENSIONS, "cpu"), log)
    assert "dimension" in str(refusal.value).lower()
    with connect() as conn:
        assert _live_table(conn) == before
        assert column_types(conn, "segments")["embedding"] == "vector(1536)"


def test_swap_refused_while_the_staging_column_belongs_to_another_model(
    database_url: str,
    connect: Callable[[], psycopg.Connection],
    seed_table: Callable[..., Any],
    minilm_path: str,
    tmp_path: Any,
) -> None:
    """The staging column was filled by the model at one path; EMBEDDING_MODEL now names another (the same weights
    through a symlink, so it loads): the run refuses before anything is written, naming both models."""
    seed_table(rows=20)
    url = plain(database_url)
    assert migrate(settings_for(url, minilm_path), selection="embeddings").success
    other = tmp_path / "another-model"
    other.symlink_to(minilm_path)
    with connect() as conn:
        before = snapshot(conn)
    with pytest.raises(MigrationError) as refusal:
        migrate(settings_for(url, str(other)))
    message = str(refusal.value)
    assert "\n" not in message and f"EMBEDDING_MODEL={str(other)!r}" in message and minilm_path in message
    db, migration = _resources(url, str(other))
    with pytest.raises(MigrationError):
        swap_columns(db, migration, shared_encoder(minilm_path, DIMENSIONS, "cpu"), log)
    with connect() as conn:
        assert snapshot(conn) == before


def test_the_swap_counts_waiting_rows_from_an_index_not_a_table_scan(seed_table, settings, resources, connect) -> None:
    """Under the swap's exclusive lock every reader waits: the count of rows still without a vector must read the
    partial index the swap builds first, never the table."""
    seed_table(rows=50)
    materialize(resources, "embeddings")
    database, target = Database.from_settings(settings), MigrationTarget.from_settings(settings)
    with database.connect() as conn:
        state = target.read_state(conn)
    index_pending_rows(database, state, log)
    with database.connect() as conn:
        conn.execute("ANALYZE segments")
        statement = sql.count_pending(state.table, state.table.staging_column).as_string(conn)
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {statement}"))
    assert "segments_embedding_384_pending_idx" in plan and "Seq Scan" not in plan, plan

    materialize(resources, "embeddings*")
    with connect() as conn:  # the swap drops it with the old column: the table keeps no index of ours but its own
        assert "segments_embedding_384_pending_idx" not in indexes(conn)
