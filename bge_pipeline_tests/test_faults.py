"""Faults injected for real: SIGKILL of the migration process, a PostgreSQL restart, terminated backends."""

from __future__ import annotations

import dataclasses
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest

from bge_pipeline.core.backfill import BatchFailedError
from bge_pipeline.core.corpus import create_seed_table
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import shared_encoder
from bge_pipeline.core.migration import MigrationTarget, backfill, prepare_staging_column
from bge_pipeline_tests.faultkit import (
    DIMENSIONS,
    CatalogWatcher,
    assert_vectors_match_texts,
    cli_environment,
    column_types,
    indexes,
    kill_hard,
    plain,
    read_rows,
    settings_for,
    start_cli,
    throwaway_server,
    wait_for,
)

pytestmark = pytest.mark.pgvector

ROWS = 120
STAGING = f"embedding_{DIMENSIONS}"


def _count_staged(conn: psycopg.Connection) -> int:
    try:
        return conn.execute(f"SELECT count({STAGING}) FROM segments").fetchone()[0]
    except psycopg.errors.UndefinedColumn:
        return 0


def _wait_for_line(log: Path, pattern: str, process: Any, timeout_seconds: float) -> None:
    def seen() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended (rc {process.returncode}) before {pattern!r}:\n{log.read_text()[-3000:]}"
            )
        return pattern in log.read_text(errors="replace")

    wait_for(seen, timeout_seconds, pattern, interval_seconds=0.01)


def test_migration_resumes_after_repeated_kills(
    database_url: str,
    connect: Callable[[], psycopg.Connection],
    seed_table: Callable[..., Any],
    minilm_path: str,
    tmp_path: Path,
) -> None:
    """kill -9 in the backfill, in the index build and in the swap, then one run to the end: same result as one
    uninterrupted run, and at every moment the table has its `embedding` column."""
    seed_table(rows=ROWS)
    url = plain(database_url)
    with connect() as conn:
        # A killed client's backend otherwise keeps working (an index build runs to the end): PostgreSQL 14+ can
        # notice the dead client mid-query, as a production server configured for it would.
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET client_connection_check_interval = '100ms'")
        texts_before = dict(conn.execute("SELECT id, text FROM segments").fetchall())
    env = cli_environment(url, minilm_path)
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    watcher = CatalogWatcher(url)
    watcher.start()
    children: list[Any] = []
    outcomes: list[str] = []
    try:
        with connect() as probe:
            # 1. The backfill: kill at a random moment after the first batch is written.
            run = start_cli(env, str(tmp_path), "--select", "embeddings*", log_path=tmp_path / "run1.log")
            children.append(run)
            wait_for(lambda: _count_staged(probe) > 0, 180, "the first batch of vectors")
            time.sleep(rng.uniform(0.0, 0.5))
            kill_hard(run)
            outcomes.append(f"backfill: killed with {_count_staged(probe)}/{ROWS} rows embedded")
            # On a fast machine the first run can finish its 120 rows and build the index before the kill: drop it,
            # so the next kill lands inside an index build, as this test means it to.
            probe.execute(f'DROP INDEX IF EXISTS "segments_{STAGING}_ivfflat_idx"')

            # 2. The index build: an old snapshot held open keeps CREATE INDEX CONCURRENTLY in its last phase, with
            # the index in the catalog but not yet valid, until the kill.
            blocker = psycopg.connect(url)
            blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            blocker.execute("SELECT 1")
            run = start_cli(env, str(tmp_path), "--select", "embeddings*", log_path=tmp_path / "run2.log")
            children.append(run)
            wait_for(
                lambda: probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query LIKE 'CREATE INDEX CONCURRENTLY%%ivfflat%%' AND wait_event_type = 'Lock'"
                ).fetchone()[0],
                180,
                "the index build to wait for the old snapshot",
            )
            time.sleep(rng.uniform(0.0, 0.5))
            kill_hard(run)
            wait_for(
                lambda: (
                    not probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND query LIKE 'CREATE INDEX CONCURRENTLY%%' AND state = 'active'"
                    ).fetchone()[0]
                ),
                30,
                "the orphaned index build to notice its client is gone",
            )
            blocker.rollback()
            blocker.close()
            left = indexes(probe, "segments")
            outcomes.append(f"index build: killed, indexes left {left}")
            assert (f"segments_{STAGING}_ivfflat_idx", "ivfflat", "vector_cosine_ops", False) in left, left

            # 3. The swap: an event trigger makes each ALTER TABLE take 0.4 s, so the swap's one transaction lasts
            # a second after its DROP COLUMN; a reader's lock holds the swap at LOCK TABLE, lets go, and the kill
            # lands a random 0-0.7 s later, inside that transaction.
            probe.execute(
                "CREATE FUNCTION slow_alter() RETURNS event_trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF tg_tag = 'ALTER TABLE' THEN PERFORM pg_sleep(0.4); END IF; END $$"
            )
            probe.execute("CREATE EVENT TRIGGER slow_alter ON ddl_command_end EXECUTE FUNCTION slow_alter()")
            log = tmp_path / "run3.log"
            run = start_cli(env, str(tmp_path), "--select", "embeddings*", log_path=log)
            children.append(run)
            _wait_for_line(log, 'Started execution of step "embedding_index_embedding_index_usable"', run, 180)
            reader = psycopg.connect(url)
            reader.execute("SELECT 1 FROM segments LIMIT 1")
            try:
                wait_for(
                    lambda: probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND query LIKE 'LOCK TABLE%%' AND wait_event_type = 'Lock'"
                    ).fetchone()[0],
                    120,
                    "the swap to wait for its lock",
                )
            finally:
                reader.rollback()
                reader.close()
            time.sleep(rng.uniform(0.0, 0.7))
            kill_hard(run)
            wait_for(
                lambda: (
                    not probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND (state LIKE 'idle in transaction%%' "
                        "OR (state = 'active' AND query NOT LIKE '%%pg_attribute%%'))"
                    ).fetchone()[0]
                ),
                30,
                "the killed swap's transaction to end",
            )
            columns = column_types(probe, "segments")
            outcomes.append(f"swap: killed inside its transaction, columns after {list(columns)}")
            assert columns["embedding"] == "vector(1536)" and STAGING in columns, columns
            probe.execute("DROP EVENT TRIGGER slow_alter")

            # 4. One run to the end.
            log = tmp_path / "run4.log"
            run = start_cli(env, str(tmp_path), "--select", "embeddings*", log_path=log)
            children.append(run)
            assert run.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        for child in children:
            kill_hard(child)
        watcher.stop()

    print(f"random seed {seed}: " + "; ".join(outcomes))
    assert len(watcher.observations) > 100, "the catalog watcher barely ran"
    assert not watcher.without_live_column(), (
        f"moments without an `embedding` column: {watcher.without_live_column()[:5]}"
    )
    with connect() as conn:
        # The state an uninterrupted run leaves: the same rows and texts, one vector(384) column holding the vectors
        # of exactly these texts, its valid cosine IVFFLAT index under the live name, no staging column left.
        columns = column_types(conn, "segments")
        assert columns == {
            "id": "bigint",
            "source": "text",
            "year": "integer",
            "speaker": "text",
            "text": "text",
            "embedding": f"vector({DIMENSIONS})",
        }
        assert indexes(conn, "segments") == [
            ("segments_embedding_ivfflat_idx", "ivfflat", "vector_cosine_ops", True),
            ("segments_pkey", "btree", "int8_ops", True),
        ]
        rows = read_rows(conn)
        assert {key: text for key, (text, _) in rows.items()} == texts_before
        assert assert_vectors_match_texts(minilm_path, rows) == ROWS
        assert conn.execute("SELECT count(*) FROM segments_embedding_backup_1536").fetchone()[0] == ROWS
        assert conn.execute(
            "SELECT column_name, dimensions FROM bge_pipeline_models WHERE table_name = 'segments' AND column_name = 'embedding'"
        ).fetchall() == [("embedding", DIMENSIONS)]


# --- PostgreSQL going away mid-backfill ---------------------------------------------------------------------


def _throwaway_migration(url: str, minilm_path: str, **fields: Any) -> tuple[Database, MigrationTarget]:
    settings = settings_for(url, minilm_path, BACKFILL_BATCH_ROWS=10)
    target = MigrationTarget.from_settings(settings)
    return Database.from_settings(settings), dataclasses.replace(target, **{"retry_base_seconds": 0.5, **fields})


def test_backfill_rides_out_a_postgres_restart(minilm_path: str, segments: list[Any]) -> None:
    """The server is stopped after batch 2 and back about 1 s later (retries after 1, 2 and 4 s): the batch is
    retried with backoff and the run finishes on its own; stopped for good, the run fails naming the batch, and a rerun later completes."""
    encoder = shared_encoder(minilm_path, DIMENSIONS, "cpu")
    with throwaway_server() as server:
        url = plain(server.url)
        with psycopg.connect(url, autocommit=True) as conn:
            create_seed_table(conn, segments[:40])
        db, migration = _throwaway_migration(url, minilm_path, retry_base_seconds=1.0)
        prepare_staging_column(db, migration, encoder)
        restarts: list[threading.Thread] = []

        def restart_after_batch_two(batch: Any, stats: Any) -> None:
            if batch.number == 2 and not restarts:
                server.stop()
                restarter = threading.Timer(1.0, server.start)
                restarter.start()
                restarts.append(restarter)

        _, stats = backfill(db, migration, encoder, list(range(migration.partitions)), _Log(), restart_after_batch_two)
        restarts[0].join()
        assert stats.retries >= 1, "the restart never reached the pipeline"
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute(f"SELECT count(*) FROM segments WHERE {STAGING} IS NULL").fetchone()[0] == 0
            rows = read_rows(conn, column=STAGING)
        assert_vectors_match_texts(minilm_path, rows)

        # Not back within the retry window (3 retries, 0.1 s doubling): a clear failure naming the batch.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"UPDATE segments SET {STAGING} = NULL")
        db, migration = _throwaway_migration(url, minilm_path, retry_base_seconds=0.1)
        stopped: list[bool] = []

        def stop_for_good(batch: Any, stats: Any) -> None:
            if batch.number == 2 and not stopped:
                server.stop()
                stopped.append(True)

        with pytest.raises(BatchFailedError) as failure:
            backfill(db, migration, encoder, list(range(migration.partitions)), _Log(), stop_for_good)
        message = str(failure.value)
        assert "\n" not in message
        assert re.match(
            r"(writing batch \d+ \(ids \d+\.\.\d+, \d+ rows\)|reading batch \d+|counting rows) failed after 3 retries: "
            r"OperationalError: ",
            message,
        ), message
        server.start()
        _, stats = backfill(db, migration, encoder, list(range(migration.partitions)), _Log())
        with psycopg.connect(url, autocommit=True) as conn:
            rows = read_rows(conn, column=STAGING)
        assert_vectors_match_texts(minilm_path, rows)
        print(f"stopped for good: {message}")


def test_backfill_retries_batches_whose_backend_was_terminated(
    database_url: str, connect: Callable[[], psycopg.Connection], seed_table: Callable[..., Any], minilm_path: str
) -> None:
    """pg_terminate_backend on the connection writing a batch, twice: both batches are retried and land."""
    seed_table(rows=60)
    url = plain(database_url)
    encoder = shared_encoder(minilm_path, DIMENSIONS, "cpu")
    db, migration = _throwaway_migration(url, minilm_path, retry_base_seconds=0.2)
    prepare_staging_column(db, migration, encoder)
    with connect() as conn:
        # Slow writes, so the terminations land while a batch's UPDATE runs.
        conn.execute(
            "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE TRIGGER slow_write AFTER UPDATE ON segments FOR EACH STATEMENT EXECUTE FUNCTION slow_write()"
        )
    terminated: list[int] = []
    done = threading.Event()

    def terminate_writers() -> None:
        with connect() as conn:
            while len(terminated) < 2 and not done.is_set():
                row = conn.execute(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state = 'active' AND query LIKE '%%unnest%%' AND pid <> pg_backend_pid() LIMIT 1"
                ).fetchone()
                if row:
                    terminated.append(row[0])
                    time.sleep(0.5)
                time.sleep(0.02)

    killer = threading.Thread(target=terminate_writers, daemon=True)
    killer.start()
    try:
        _, stats = backfill(db, migration, encoder, list(range(migration.partitions)), _Log())
    finally:
        done.set()
        killer.join(timeout=10)
    assert len(terminated) == 2, terminated
    assert stats.retries >= 2
    with connect() as conn:
        rows = read_rows(conn, column=STAGING)
    assert assert_vectors_match_texts(minilm_path, rows) == 60


class _Log:
    """A logger that keeps the warnings, so a test can print the retries it caused."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    warning = info
