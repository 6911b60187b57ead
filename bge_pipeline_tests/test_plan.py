"""`bge-pipeline plan`: rows, seconds, locks and bytes before anything changes, and Phase 1's disk guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bge_pipeline.core import plan
from bge_pipeline.core.catalog import MigrationError
from bge_pipeline.core.database import Database
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.faultkit import snapshot
from bge_pipeline_tests.helpers import columns, materialize, step_error

pytestmark = pytest.mark.pgvector


def test_plan_reports_rows_seconds_and_bytes_and_changes_nothing(
    seed_table, database_url, minilm_path, connect, tmp_path
) -> None:
    seed_table(rows=300)
    with connect() as conn:
        before = snapshot(conn)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env.update(DATABASE_URL=database_url, EMBEDDING_MODEL=minilm_path, EMBEDDING_DEVICE="cpu", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "bge_pipeline.cli", "plan", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert (figures["rows_total"], figures["rows_pending"]) == (300, 300)
    assert figures["encode_texts_per_second"] > 0 and figures["encode_device"] == "cpu"
    assert figures["bytes_by_part"]["new column"] == 300 * (4 * 384 + 8)
    assert figures["bytes_by_part"]["backup"] > 300 * 4 * 1536  # the old 1536-dim vectors, kept by the swap
    assert figures["bytes_needed"] == sum(figures["bytes_by_part"].values())
    assert figures["free_bytes"] is None and figures["fits"] is None  # a DATABASE_URL server's disk is not visible
    # Phase 2 at the slower of the measured encoder and the documented writer.
    phase_2 = next(p for p in figures["phases"] if p["name"] == "phase 2")
    assert phase_2["seconds"] == pytest.approx(
        300 / min(figures["encode_texts_per_second"], plan.WRITE_ROWS_PER_SECOND)
    )
    assert figures["estimated_seconds"] >= phase_2["seconds"]
    with connect() as conn:
        assert snapshot(conn) == before


def test_phase_1_refuses_a_disk_that_cannot_hold_the_migration(settings, seed_table, connect, monkeypatch) -> None:
    """A full disk cannot be made here on purpose, so the free space is faked (the one fake in this file); the
    figures compared with it are the table's real ones."""
    seed_table(rows=60)
    monkeypatch.setattr(plan, "free_bytes", lambda database: 2**20)
    with connect() as conn:
        before = snapshot(conn)
    result = materialize(
        build_resources(settings, from_environment=False), "staging_embedding_column", raise_on_error=False
    )
    assert not result.success
    message = step_error(result)
    assert "Not enough disk for the migration of public.segments" in message
    assert "1.0 MiB free" in message and "DISK_CHECK=false" in message
    with connect() as conn:
        assert snapshot(conn) == before

    forced = build_resources(settings.replace(disk_check=False), from_environment=False)
    done = materialize(forced, "staging_embedding_column")
    assert done.success
    staged = done.asset_materializations_for_node("staging_embedding_column")[0].metadata
    assert staged["rows_pending"].value == 60 and staged["bytes_needed"].value > 60 * (4 * 384 + 8)
    with connect() as conn:
        assert "embedding_384" in columns(conn)


def test_plan_after_the_migration_has_nothing_left(settings, seed_table) -> None:
    seed_table(rows=40)
    assert materialize(build_resources(settings, from_environment=False), "embeddings*").success
    after = plan.plan_migration(Database.from_settings(settings), MigrationTarget.from_settings(settings))
    assert after.rows_pending == 0 and after.bytes_needed == 0
    assert all(phase.seconds == 0 for phase in after.phases)


def test_check_room_passes_where_the_disk_cannot_be_seen(settings, seed_table) -> None:
    seed_table(rows=5)
    checked = plan.check_room(Database.from_settings(settings), MigrationTarget.from_settings(settings))
    assert checked.fits is None  # DATABASE_URL: unknown, so no refusal


def test_a_missing_table_is_refused_by_the_plan_in_one_line(settings) -> None:
    with pytest.raises(MigrationError, match="EMBEDDING_TABLE='segments': no such table"):
        plan.plan_migration(Database.from_settings(settings), MigrationTarget.from_settings(settings))
