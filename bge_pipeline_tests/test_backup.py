"""The guide's step 3, 'Backup your database before migration', done by `bge-pipeline backup`."""

import os
import subprocess
import sys

import psycopg
import pytest

from bge_pipeline.core.backup import bundled_binary, libpq_environment
from bge_pipeline_tests.faultkit import plain, with_database

pytestmark = pytest.mark.pgvector


def test_backup_dumps_the_table_and_restores_elsewhere(seed_table, database_url, server_url, connect, tmp_path) -> None:
    seed_table(rows=15)
    dump = tmp_path / "segments.dump"
    env = {**os.environ, "DATABASE_URL": database_url}

    done = subprocess.run(
        [sys.executable, "-m", "bge_pipeline.cli", "backup", "--out", str(dump)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert "Dumped public.segments" in done.stdout and dump.stat().st_size > 0
    with connect() as conn:
        conn.execute("CREATE DATABASE restored")
    restored_url = plain(with_database(server_url, "restored"))
    with psycopg.connect(restored_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")  # a table dump carries no extension: the target needs pgvector
    target = libpq_environment(server_url) | {"PGDATABASE": "restored"}
    restored = subprocess.run(
        [bundled_binary("pg_restore"), "--no-owner", "-d", "restored", str(dump)],
        env={**os.environ, **target},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restored.returncode == 0, restored.stderr
    with psycopg.connect(restored_url) as conn:
        count, dims = conn.execute("SELECT count(*), max(vector_dims(embedding)) FROM segments").fetchone()
    assert (count, dims) == (15, 1536)


def test_the_password_goes_to_pg_dump_through_the_environment_only() -> None:
    env = libpq_environment("postgresql+psycopg://app:S3cr3t@db.internal:5433/prod")
    assert env == {
        "PGHOST": "db.internal",
        "PGPORT": "5433",
        "PGUSER": "app",
        "PGDATABASE": "prod",
        "PGPASSWORD": "S3cr3t",
    }
