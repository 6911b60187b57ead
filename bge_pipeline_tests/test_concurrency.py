"""Runs racing each other and writers racing the runs: no row embedded twice, no deadlock, no write lost."""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import dagster as dg
import psycopg
import pytest

from bge_pipeline_tests.faultkit import (
    DIMENSIONS,
    assert_vectors_match_texts,
    cli_environment,
    column_types,
    kill_hard,
    migrate,
    plain,
    read_rows,
    settings_for,
    start_cli,
    wait_for,
)

pytestmark = pytest.mark.pgvector

STAGING = f"embedding_{DIMENSIONS}"
LOCK_KEY = "bge_pipeline:public.segments"


def test_racing_runs_on_one_partition_embed_each_row_once(
    database_url: str,
    connect: Callable[[], psycopg.Connection],
    seed_table: Callable[..., Any],
    minilm_path: str,
    tmp_path: Path,
) -> None:
    """Two `--partition 1` CLI runs and the unpartitioned `embeddings` asset, released at the same instant onto the
    same rows: an audit trigger sees each row's vector written exactly once, and every run finishes."""
    seed_table(rows=80)
    url = plain(database_url)
    settings = settings_for(url, minilm_path, BACKFILL_PARTITIONS=2, BACKFILL_BATCH_ROWS=10)
    assert migrate(settings, selection="staging_embedding_column").success
    with connect() as conn:
        conn.execute(
            "CREATE TABLE vector_writes (id bigint, backend integer DEFAULT pg_backend_pid(), at timestamptz DEFAULT clock_timestamp())"
        )
        conn.execute(
            """CREATE FUNCTION audit_vector_write() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO vector_writes (id) VALUES (NEW.id); RETURN NULL; END $$"""
        )
        conn.execute(
            f"CREATE TRIGGER audit_vector_write AFTER UPDATE OF {STAGING} ON segments FOR EACH ROW "
            f"WHEN (NEW.{STAGING} IS NOT NULL) EXECUTE FUNCTION audit_vector_write()"
        )
    gate = psycopg.connect(url, autocommit=True)
    # The test holds partition 1's lock until all three runs queue behind it, so they start on it together.
    gate.execute("SELECT pg_advisory_lock(hashtext(%s), 1)", (LOCK_KEY,))
    env = cli_environment(url, minilm_path, BACKFILL_PARTITIONS="2", BACKFILL_BATCH_ROWS="10")
    logs = [tmp_path / "partition_a.log", tmp_path / "partition_b.log"]
    children = [
        start_cli(env, str(tmp_path), "--select", "embedding_batches", "--partition", "1", log_path=log) for log in logs
    ]
    whole: dict[str, Any] = {}

    def run_whole() -> None:
        try:
            whole["result"] = migrate(settings, selection="embeddings", raise_on_error=False)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            whole["error"] = error

    thread = threading.Thread(target=run_whole, daemon=True)
    thread.start()
    try:
        with connect() as probe:
            wait_for(
                lambda: (
                    probe.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 1 AND NOT granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    ).fetchone()[0]
                    == 3
                ),
                240,
                "three runs waiting on partition 1",
            )
        gate.execute("SELECT pg_advisory_unlock(hashtext(%s), 1)", (LOCK_KEY,))
        for child, log in zip(children, logs):
            assert child.wait(timeout=240) == 0, log.read_text()[-3000:]
        thread.join(timeout=240)
    finally:
        gate.close()
        for child in children:
            kill_hard(child)
    assert "error" not in whole, whole.get("error")
    assert whole["result"].success
    outputs = "".join(log.read_text() for log in logs)
    assert "deadlock" not in outputs.lower()
    with connect() as conn:
        writes = conn.execute("SELECT id, count(*) FROM vector_writes GROUP BY id").fetchall()
        twice = [row for row in writes if row[1] > 1]
        assert not twice, f"rows embedded more than once: {twice[:10]}"
        assert len(writes) == 80
        assert conn.execute("SELECT count(DISTINCT backend) FROM vector_writes").fetchone()[0] >= 1
        rows = read_rows(conn, column=STAGING)
    assert assert_vectors_match_texts(minilm_path, rows) == 80


class Writer(threading.Thread):
    """An application inserting rows and rewriting texts as fast as a small app would, recording what it wrote."""

    def __init__(self, url: str, ids: list[int]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.ids = list(ids)
        self.expected: dict[int, str] = {}
        self.writes: list[tuple[float, str, int]] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        rng = random.Random(5)
        with psycopg.connect(self.url, autocommit=True) as conn:
            number = 0
            while not self.stop_event.is_set():
                number += 1
                started = time.time()  # a write held by the swap's lock finishes after it: count it when it began
                try:
                    if number % 2:
                        key = 9_000_000 + number
                        text = f"A row an application added while the migration ran, number {number}."
                        conn.execute("INSERT INTO segments (id, text) VALUES (%s, %s)", (key, text))
                        self.ids.append(key)
                        kind = "insert"
                    else:
                        key = rng.choice(self.ids)
                        text = f"Rewritten by the application, edit {number}: the text of row {key} changed."
                        conn.execute("UPDATE segments SET text = %s WHERE id = %s", (text, key))
                        kind = "update"
                    self.expected[key] = text
                    self.writes.append((started, kind, key))
                except psycopg.Error as error:
                    self.errors.append(f"{type(error).__name__}: {error}")
                time.sleep(0.15)  # about 3 inserts and 3 edits a second: slower than the encoder, even here


def test_writes_during_backfill_and_swap_are_kept_and_embedded(
    database_url: str, connect: Callable[[], psycopg.Connection], seed_table: Callable[..., Any], minilm_path: str
) -> None:
    """An application inserts rows and rewrites texts through the backfill, the index build and the swap; a rerun
    after it stops picks up the rest. No write is lost, and every row ends with the vector of its latest text.

    The phases run as three materializations: while writes keep arriving, the blocking `embedding_null_count`
    check after the backfill almost always finds a row written after the last sweep, so one `embeddings*` run
    would stop there (the swap itself tops such rows up under its lock)."""
    seeded = seed_table(rows=60)
    url = plain(database_url)
    with connect() as conn:
        texts = dict(conn.execute("SELECT id, text FROM segments").fetchall())
    writer = Writer(url, [segment.id for segment in seeded])
    settings = settings_for(url, minilm_path, BACKFILL_BATCH_ROWS=10)
    instance = dg.DagsterInstance.ephemeral()
    writer.start()
    try:
        backfilled = migrate(settings, selection="embeddings", instance=instance, raise_on_error=False)
        assert [m.asset_key.path[-1] for m in backfilled.get_asset_materialization_events()] == ["embeddings"]
        assert migrate(settings, selection="embedding_index", instance=instance).success
        with connect() as conn:  # each ALTER TABLE of the swap takes 0.4 s, so writes surely arrive while it runs
            conn.execute(
                "CREATE FUNCTION slow_alter() RETURNS event_trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF tg_tag = 'ALTER TABLE' THEN PERFORM pg_sleep(0.4); END IF; END $$"
            )
            conn.execute("CREATE EVENT TRIGGER slow_alter ON ddl_command_end EXECUTE FUNCTION slow_alter()")
        swapped = migrate(settings, selection="live_embedding_column", instance=instance, raise_on_error=False)
        with connect() as conn:
            conn.execute("DROP EVENT TRIGGER slow_alter")
        if not swapped.success:
            # Writes landing between each top-up and the lock, three times running: the swap refuses, naming the
            # count, and loses nothing; the rerun below swaps once the writes stop.
            failure = next(e for e in swapped.all_events if e.is_step_failure).step_failure_data.error
            assert re.search(r"Swap refused: \d+ rows of segments have text but no vector", str(failure)), failure
        time.sleep(0.5)  # and a few writes after the swap, for the next run to pick up
    finally:
        writer.stop_event.set()
        writer.join(timeout=30)
    assert not writer.errors, writer.errors[:5]
    windows = {}
    for run_result, step in ((backfilled, "embeddings"), (swapped, "live_embedding_column")):
        for entry in instance.all_logs(run_result.run_id):
            event = entry.dagster_event
            if (
                event
                and event.step_key == step
                and event.event_type_value in ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")
            ):
                windows[(step, event.event_type_value.replace("FAILURE", "SUCCESS"))] = entry.timestamp
    during = {
        step: [w for w in writer.writes if windows[(step, "STEP_START")] <= w[0] <= windows[(step, "STEP_SUCCESS")]]
        for step in ("embeddings", "live_embedding_column")
    }
    assert {kind for _, kind, _ in during["embeddings"]} == {"insert", "update"}, during["embeddings"]
    assert during["live_embedding_column"], "no write landed while the swap ran"
    print(
        f"{len(writer.writes)} writes: {len(during['embeddings'])} during the backfill, "
        f"{len(during['live_embedding_column'])} during the swap, which {'swapped' if swapped.success else 'refused'}"
    )

    rerun = migrate(settings)  # embeds what arrived after the swap
    assert rerun.success and all(check.passed for check in rerun.get_asset_check_evaluations())
    texts.update(writer.expected)
    with connect() as conn:
        assert "embedding" in column_types(conn, "segments") and STAGING not in column_types(conn, "segments")
        rows = read_rows(conn)
    assert {key: text for key, (text, _) in rows.items()} == texts, "a write was lost"
    assert assert_vectors_match_texts(minilm_path, rows) == len(texts)
