"""Tables as applications make them: uuid and varchar keys, a schema of their own, the text under another name."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any, Callable

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from bge_pipeline.core.corpus import Segment
from bge_pipeline.core.search import search_segments
from bge_pipeline.core.settings import Settings
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.faultkit import cli_environment
from bge_pipeline_tests.helpers import check_results, materialize, step_error

pytestmark = pytest.mark.pgvector
ROWS = 150
KEYS: dict[str, tuple[str, Callable[[int], Any]]] = {
    "uuid": ("uuid", lambda i: uuid.UUID(int=(i * 2654435761) % 2**128)),
    "varchar": ("varchar(20)", lambda i: f"doc-{i:03d}"),
}


def _seed(conn: psycopg.Connection, segments: list[Segment], key_type: str, make_key: Callable[[int], Any]) -> dict:
    """`kb.notes (key <type> PRIMARY KEY, body text, embedding vector(1536))` with the guide's old index."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    register_vector(conn)
    conn.execute("CREATE SCHEMA kb")
    conn.execute(f"CREATE TABLE kb.notes (key {key_type} PRIMARY KEY, body text, embedding vector(1536))")
    rng = np.random.default_rng(7)
    keys = {}
    for i, segment in enumerate(segments):
        keys[make_key(i)] = segment.text
        old = rng.standard_normal(1536).astype(np.float32)
        conn.execute("INSERT INTO kb.notes VALUES (%s, %s, %s)", (make_key(i), segment.text, old / np.linalg.norm(old)))
    conn.execute("CREATE INDEX ON kb.notes USING ivfflat (embedding vector_l2_ops) WITH (lists = 10)")
    return keys


@pytest.fixture(params=sorted(KEYS))
def keyed_table(
    request, database_url: str, minilm_path: str, segments: list[Segment], connect
) -> tuple[Settings, dict]:
    key_type, make_key = KEYS[request.param]
    with connect() as conn:
        keys = _seed(conn, segments[:ROWS], key_type, make_key)
    settings = Settings.from_mapping(
        {
            "DATABASE_URL": database_url,
            "EMBEDDING_MODEL": minilm_path,
            "EMBEDDING_DEVICE": "cpu",
            "EMBEDDING_SCHEMA": "kb",
            "EMBEDDING_TABLE": "notes",
            "EMBEDDING_ID_COLUMN": "key",
            "EMBEDDING_TEXT_COLUMN": "body",
            "BACKFILL_BATCH_ROWS": "40",
        }
    )
    return settings, keys


def test_a_uuid_or_varchar_keyed_table_migrates_with_every_check_passing(keyed_table, connect) -> None:
    settings, keys = keyed_table
    result = materialize(build_resources(settings, from_environment=False), "embeddings*")
    assert result.success
    checks = check_results(result)
    assert set(checks) >= {"embedding_null_count", "index_recall", "old_new_agreement", "self_retrieval"}
    assert all(checks.values()), checks
    with connect() as conn:
        kinds = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'kb.notes'::regclass AND attname = 'embedding'"
        ).fetchone()
        missing = conn.execute("SELECT count(*) FROM kb.notes WHERE embedding IS NULL").fetchone()[0]
        backups = conn.execute("SELECT count(*) FROM bge_pipeline_models WHERE kind = 'backup'").fetchone()[0]
    assert kinds == ("vector(384)",) and missing == 0 and backups == 1

    # Search returns the rows' own ids, as psycopg gives them.
    text = next(iter(keys.values()))
    hits = search_segments(text, top_k=5, settings=settings)
    assert hits[0].id in keys and keys[hits[0].id] == text
    assert type(hits[0].id) is type(next(iter(keys)))


def test_the_cli_prints_ids_as_postgresql_does(keyed_table, database_url, minilm_path, tmp_path) -> None:
    settings, keys = keyed_table
    assert materialize(build_resources(settings, from_environment=False), "embeddings*").success
    text = next(iter(keys.values()))
    env = cli_environment(
        database_url,
        minilm_path,
        EMBEDDING_SCHEMA="kb",
        EMBEDDING_TABLE="notes",
        EMBEDDING_ID_COLUMN="key",
        EMBEDDING_TEXT_COLUMN="body",
    )

    def search(*flags: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bge_pipeline.cli", "search", text, "--top-k", "3", *flags]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    as_json = search("--json")
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    ids = [hit["id"] for hit in json.loads(as_json.stdout)["hits"]]
    assert ids[0] == str(next(iter(keys))) and all(isinstance(i, str) for i in ids)
    table = search()
    assert table.returncode == 0, table.stderr[-2000:]
    assert str(next(iter(keys))) in table.stdout.splitlines()[2]


def test_a_composite_key_is_refused_naming_the_setting(database_url, minilm_path, connect) -> None:
    with connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            "CREATE TABLE pages (book int, page int, text text, embedding vector(1536), PRIMARY KEY (book, page))"
        )
        conn.execute("INSERT INTO pages VALUES (1, 1, 'a page')")
    settings = Settings.from_mapping(
        {
            "DATABASE_URL": database_url,
            "EMBEDDING_MODEL": minilm_path,
            "EMBEDDING_DEVICE": "cpu",
            "EMBEDDING_TABLE": "pages",
            "EMBEDDING_ID_COLUMN": "book",
        }
    )
    result = materialize(
        build_resources(settings, from_environment=False), "staging_embedding_column", raise_on_error=False
    )
    assert not result.success
    message = step_error(result)
    assert message.startswith("bge_pipeline.core.catalog.MigrationError: EMBEDDING_ID_COLUMN='book'")
    assert message.strip().count("\n") == 0
    with connect() as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pages'::regclass AND attname = 'embedding_384'"
            ).fetchone()[0]
            == 0
        )
