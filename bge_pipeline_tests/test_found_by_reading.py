"""Five bugs found by reading the code, each shown the way a user would meet it, each fixed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import psycopg
import pytest

from bge_pipeline.core import rollback, sql
from bge_pipeline.core.catalog import MigrationError, RecordedModel
from bge_pipeline.core.database import Database
from bge_pipeline.core.migration import MigrationTarget, build_index
from bge_pipeline.core.settings import Settings
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.faultkit import plain, snapshot, with_database
from bge_pipeline_tests.helpers import materialize

pytestmark = pytest.mark.pgvector
log = logging.getLogger(__name__)


@pytest.mark.unit
def test_backups_of_a_long_table_name_never_share_a_name() -> None:
    """A 45-byte table name made `<table>_embedding_backup_1536` and `..._384` truncate to one name, so the next
    swap dropped the earlier backup while its record stayed."""
    table = sql.Table("public", "t" * 45, "id", "text", "embedding", "embedding_384")
    names = {table.backup_table(dims) for dims in (384, 768, 1024, 1536)}
    assert len(names) == 4 and all(len(name.encode()) <= 63 for name in names)


def test_restore_refuses_a_column_that_holds_another_models_vectors(settings: Settings, seed_table, connect) -> None:
    """After the swap kept the 1536-dim backup, a new migration to another 1536-dim model made `embedding_1536`:
    restoring must not pour the old vectors into it beside that model's."""
    seed_table(rows=30)
    assert materialize(build_resources(settings, from_environment=False), "embeddings*").success
    with connect() as conn:
        conn.execute("ALTER TABLE segments ADD COLUMN embedding_1536 vector(1536)")
        conn.execute(
            sql.UPSERT_MODEL, RecordedModel("other/model-1536", 1536).row("public", "segments", "embedding_1536")
        )
        before = snapshot(conn)
    with pytest.raises(MigrationError, match="embedding_1536 holds 'other/model-1536' vectors"):
        rollback.restore_backup(Database.from_settings(settings), MigrationTarget.from_settings(settings), 1536, log)
    with connect() as conn:
        assert snapshot(conn) == before


def test_an_index_build_leaves_no_settings_on_pooled_connections(settings: Settings, seed_table) -> None:
    seed_table(rows=30)
    assert materialize(build_resources(settings, from_environment=False), "embeddings").success
    database, target = Database.from_settings(settings), MigrationTarget.from_settings(settings)
    with database.connect() as conn:
        default = conn.execute("SHOW maintenance_work_mem").fetchone()[0]
    assert build_index(database, target, log).built
    seen = set()
    for _ in range(12):  # past the pool's size: every connection it holds is checked out once
        with database.connect() as conn:
            seen.add(conn.execute("SHOW maintenance_work_mem").fetchone()[0])
    assert seen == {default}


def test_a_latin1_database_is_migrated_whole(server_url: str, minilm_path: str) -> None:
    """The write's text guard compared md5 of the server's bytes with md5 of UTF-8: in LATIN1, every row with an
    accent was silently never written and the NULL-count check failed without saying why."""
    with psycopg.connect(plain(server_url), autocommit=True) as conn:
        conn.execute("CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    url = with_database(server_url, "latin")
    texts = {1: "plain ascii", 2: "café au lait, naïve façade", 3: "Señor Müller's Straße"}
    with psycopg.connect(plain(url), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE segments (id bigint PRIMARY KEY, text text, embedding vector(1536))")
        for key, text in texts.items():
            conn.execute("INSERT INTO segments (id, text) VALUES (%s, %s)", (key, text))
    settings = Settings.from_mapping({"DATABASE_URL": url, "EMBEDDING_MODEL": minilm_path, "EMBEDDING_DEVICE": "cpu"})
    result = materialize(build_resources(settings, from_environment=False), "embeddings")
    assert result.success
    with psycopg.connect(plain(url)) as conn:
        missing = conn.execute("SELECT id FROM segments WHERE embedding_384 IS NULL ORDER BY id").fetchall()
    assert missing == []


def test_backup_keeps_the_urls_connection_options(seed_table, database_url: str, tmp_path) -> None:
    """`bge-pipeline backup` rebuilt the connection from host, port, user and database alone: `sslmode=require`
    and every other option in DATABASE_URL were dropped. The embedded server has no SSL, so a kept
    `sslmode=require` shows as pg_dump's refusal."""
    seed_table(rows=3)

    def backup(url: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DATABASE_URL": url}
        command = [sys.executable, "-m", "bge_pipeline.cli", "backup", "--out", str(tmp_path / "t.dump")]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert backup(f"{database_url}&application_name=bge_backup").returncode == 0
    refused = backup(f"{database_url}&sslmode=require")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        'bge-pipeline: error: pg_dump of public.segments failed: pg_dump: error: sslmode value "require" invalid '
        "when SSL support is not compiled in"
    ]
