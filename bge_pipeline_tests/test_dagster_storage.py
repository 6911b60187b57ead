"""The project's dagster.yaml: runs, events and the `gpu` pool's limit live in PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from bge_pipeline.cli import dev
from bge_pipeline.defs.assets.column import staging_embedding_column
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.faultkit import socket_directory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.pgvector


def _psycopg_url(dagster_pg_url: str) -> str:
    return dagster_pg_url.replace("postgresql+psycopg2://", "postgresql://", 1)


@pytest.fixture
def dagster_pg_url(server_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database for Dagster's storage on the session's embedded server, exported as DAGSTER_PG_URL."""
    url = dev.ensure_dagster_database(server_url, f"dagster_{os.getpid()}_{os.urandom(3).hex()}")
    monkeypatch.setenv("DAGSTER_PG_URL", url)
    return url


@pytest.fixture
def dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def test_run_and_its_events_are_stored_in_postgres(
    dagster_pg_url, dagster_home, make_settings, seed_table, monkeypatch
):
    seed_table(rows=5)
    monkeypatch.chdir(dagster_home)  # the yaml's relative artifact folders land here
    resources = build_resources(make_settings(), from_environment=False)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        result = dg.materialize([staging_embedding_column], resources=resources, instance=instance)
        assert result.success

    with psycopg.connect(_psycopg_url(dagster_pg_url)) as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,)).fetchone()
        event_types = {
            row[0]
            for row in conn.execute("SELECT dagster_event_type FROM event_logs WHERE run_id = %s", (result.run_id,))
        }
        materialized = conn.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND asset_key LIKE %s "
            "AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (result.run_id, "%staging_embedding_column%"),
        ).fetchone()[0]
    assert status == ("SUCCESS",)
    # Run events keep their legacy PIPELINE_* names in the event_logs table.
    assert {"PIPELINE_START", "STEP_START", "ASSET_MATERIALIZATION", "PIPELINE_SUCCESS"} <= event_types
    assert materialized == 1


def test_gpu_pool_limit_is_stored_in_the_instance(dagster_pg_url, dagster_home):
    dev.set_pool_limit({"DAGSTER_HOME": str(dagster_home), "DAGSTER_PG_URL": dagster_pg_url}, dev.GPU_POOL, 3)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.event_log_storage.get_concurrency_info(dev.GPU_POOL).slot_count == 3
        # Pools nobody configured get dagster.yaml's default_limit.
        assert instance.global_op_concurrency_default_limit == 1


def test_bge_pipeline_dev_prepares_embedded_storage(server_url, tmp_path):
    """`bge-pipeline dev` with neither DATABASE_URL nor DAGSTER_PG_URL: the embedded server gets a `dagster` database."""
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_PG_URL", "DAGSTER_HOME")}
    env.update(EMBEDDED_PGDATA=socket_directory(server_url), GPU_CONCURRENCY="2")
    done = subprocess.run(
        [sys.executable, "-m", "bge_pipeline.cli", "dev", "--dry-run", "--", "-p", "3999"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if "=" in line and " " not in line.split("=")[0]
    )
    assert lines["DAGSTER_HOME"] == str(tmp_path)
    assert lines["DAGSTER_PG_URL"] == f"postgresql+psycopg2://postgres:@/dagster?host={socket_directory(server_url)}"
    assert "gpu pool limit: 2" in done.stdout
    assert done.stdout.strip().splitlines()[-1].endswith("dagster dev -p 3999")
    with psycopg.connect(_psycopg_url(lines["DAGSTER_PG_URL"])) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() is not None  # Dagster created its tables
