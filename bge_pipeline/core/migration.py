"""The migration's phases as plain functions over the resources: the assets call these, as do the jobs."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import psycopg

from bge_pipeline.core import sql
from bge_pipeline.core.backfill import Backfill, BackfillStats, Batch, write_vectors
from bge_pipeline.core.catalog import (
    MigrationError,
    RecordedModel,
    TableState,
    read_table_state,
    require_table,
    unfinished_migrations,
    writable_column,
)
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.encoder import EncoderSource, resolve_encoder
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.sql import Table

SWAP_ATTEMPTS = 3


@dataclass(frozen=True)
class MigrationTarget:
    """Which table and columns to migrate to which model, and how the backfill batches, retries and indexes."""

    model: str
    dimensions: int
    schema_name: str = "public"
    table: str = "segments"
    id_column: str = "id"
    text_column: str = "text"
    embedding_column: str = "embedding"
    partitions: int = 8
    batch_rows: int = 1000
    max_retries: int = 3
    retry_base_seconds: float = 1.0
    ivfflat_lists: Optional[int] = None
    keep_old_embeddings: bool = True
    disk_check: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> MigrationTarget:
        """The target the settings name."""
        return cls(
            model=settings.embedding_model,
            dimensions=settings.embedding_dimensions,
            schema_name=settings.embedding_schema,
            table=settings.embedding_table,
            id_column=settings.embedding_id_column,
            text_column=settings.embedding_text_column,
            embedding_column=settings.embedding_column,
            partitions=settings.backfill_partitions,
            batch_rows=settings.backfill_batch_rows,
            max_retries=settings.backfill_max_retries,
            ivfflat_lists=settings.ivfflat_lists,
            keep_old_embeddings=settings.keep_old_embeddings,
            disk_check=settings.disk_check,
        )

    @property
    def staging_column(self) -> str:
        return f"{self.embedding_column}_{self.dimensions}"

    def read_state(self, conn: psycopg.Connection) -> TableState:
        return read_table_state(
            conn,
            self.schema_name,
            self.table,
            self.id_column,
            self.text_column,
            self.embedding_column,
            self.staging_column,
        )

    def writable_column(self, state: TableState) -> Optional[str]:
        return writable_column(state, self.model, self.dimensions)

    def target_column(self, state: TableState) -> str:
        """The column this model fills; an error naming the missing step when there is none yet."""
        column = self.writable_column(state)
        if column is None:
            raise MigrationError(
                f"{state.table.name} has no column for EMBEDDING_MODEL={self.model!r} yet: "
                "materialize staging_embedding_column (Phase 1) first"
            )
        return column


def ivfflat_lists(rows: int, override: Optional[int] = None) -> int:
    """The guide's formula, min(1000, max(100, sqrt(rows))), unless IVFFLAT_LISTS says otherwise."""
    return override or min(1000, max(100, int(math.sqrt(rows))))


# --- Phase 1 ----------------------------------------------------------------------------------------------


@dataclass
class StagingResult:
    column: str
    created: bool
    migrated: bool


def prepare_staging_column(db: Database, migration: MigrationTarget, encoder: EncoderSource) -> StagingResult:
    """Add `embedding_<dims>` for the configured model, or confirm the table already carries its vectors.

    Unlike the guide, the old index keeps serving searches on the old column until the swap.
    """
    with db.connect() as conn:  # a missing table or column is refused before the extension or state table is made
        require_table(conn, migration.schema_name, migration.table, migration.id_column, migration.text_column)
        recorded = scalar(conn, sql.STATE_TABLE_EXISTS)
        if recorded:  # a state table from before backups had a kind of their own gains it now
            for statement in sql.UPGRADE_STATE_TABLE:
                conn.execute(statement)
        needs_column = not recorded or migration.writable_column(migration.read_state(conn)) is None
    if needs_column:
        # The model loads before anything is made, so a model of another dimension is refused with the database as
        # it was (Encoder.load refuses it; an encoder given already loaded is checked here).
        model = resolve_encoder(encoder)
        if model.dimensions != migration.dimensions:
            raise MigrationError(f"EMBEDDING_DIMENSIONS={migration.dimensions} but the encoder has {model.dimensions}")
    db.ensure_pgvector()
    with db.connect() as conn:
        state = migration.read_state(conn)
        table = state.table
        column = migration.writable_column(state)
        if column is None:
            stale = unfinished_migrations(state)
            if stale:
                raise MigrationError(
                    f"{table.name} has an unfinished migration in {', '.join(stale)}: finish it with that "
                    "EMBEDDING_MODEL, or run the rollback_staging_column job with it before changing models"
                )
            column = table.staging_column
            conn.execute(sql.add_vector_column(table, column, migration.dimensions))
            conn.execute(sql.UPSERT_MODEL, (table.schema, table.name, column, migration.model, migration.dimensions))
            conn.execute(
                sql.comment_column(table, column, f"bge-pipeline: {migration.model} ({migration.dimensions} dims)")
            )
            created = True
        else:
            created = False
        for statement in sql.create_stale_vector_trigger(table, [column]):
            conn.execute(statement)
    return StagingResult(column=column, created=created, migrated=column == table.live_column)


# --- Phase 2 ----------------------------------------------------------------------------------------------


def backfill(
    db: Database,
    migration: MigrationTarget,
    encoder: EncoderSource,
    buckets: list[int],
    log: logging.Logger,
    on_batch: Any = None,
) -> tuple[str, BackfillStats]:
    """Embed the NULL rows of `buckets` into the column the configured model owns."""
    with db.connect() as conn:
        state = migration.read_state(conn)
    column = migration.target_column(state)
    stats = Backfill(
        db=db,
        encoder=encoder,
        table=state.table,
        column=column,
        partitions=migration.partitions,
        buckets=buckets,
        batch_rows=migration.batch_rows,
        max_retries=migration.max_retries,
        retry_base_seconds=migration.retry_base_seconds,
        log=log,
        on_batch=on_batch,
    ).run()
    return column, stats


# --- the index --------------------------------------------------------------------------------------------


@dataclass
class IndexResult:
    column: str
    name: str
    lists: int
    rows: int
    built: bool
    seconds: float


def build_index(db: Database, migration: MigrationTarget, log: logging.Logger) -> IndexResult:
    """IVFFLAT with vector_cosine_ops on the model's column; kept when a valid one exists, rebuilt when not."""
    with db.connect() as conn:
        state = migration.read_state(conn)
    return ensure_index(db, state, migration.target_column(state), migration.ivfflat_lists, log)


def ensure_index(
    db: Database, state: TableState, column: str, lists_override: Optional[int], log: logging.Logger
) -> IndexResult:
    """Build the IVFFLAT index of `column` unless a valid one with the wanted parameters exists."""
    table = state.table
    with db.connect() as conn:
        rows = scalar(conn, sql.count_vectors(table, column))
    name = table.index_name(column)
    lists = ivfflat_lists(rows, lists_override)
    existing = state.index(name)
    if existing and existing.serves(column) and lists_override in (None, existing.lists):
        return IndexResult(column, name, existing.lists or lists, rows, built=False, seconds=0.0)
    started = time.perf_counter()
    with db.connect(autocommit=True) as conn:
        if existing:
            log.info(f"Dropping index {name} ({'invalid' if not existing.valid else 'other parameters'})")
            conn.execute(sql.drop_index(table, name))
        log.info(f"Building IVFFLAT index {name} on {table.name}.{column}: {rows:,} vectors, lists={lists}")
        try:
            for statement in sql.INDEX_BUILD_SETTINGS:
                conn.execute(statement)
            with _IndexProgress(db, table, log):
                conn.execute(sql.create_ivfflat_index(table, column, name, lists))
        finally:
            if not conn.closed:
                for statement in sql.INDEX_BUILD_RESET:
                    conn.execute(statement)
        conn.execute(sql.analyze(table))
    return IndexResult(column, name, lists, rows, built=True, seconds=time.perf_counter() - started)


class _IndexProgress(threading.Thread):
    """Logs pg_stat_progress_create_index every 10 s while an index builds."""

    def __init__(self, db: Database, table: sql.Table, log: logging.Logger) -> None:
        super().__init__(daemon=True)
        self.db, self.table, self.log = db, table, log
        self.stop = threading.Event()

    def __enter__(self) -> "_IndexProgress":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(timeout=5)

    def run(self) -> None:
        while not self.stop.wait(10.0):
            try:
                with self.db.connect() as conn:
                    row = conn.execute(sql.INDEX_BUILD_PROGRESS, (self.table.schema, self.table.name)).fetchone()
            except psycopg.Error:
                continue
            if row:
                phase, blocks_done, blocks_total, tuples_done, tuples_total = row
                self.log.info(
                    f"Index build: {phase}, blocks {blocks_done:,}/{blocks_total:,}, tuples {tuples_done:,}/{tuples_total:,}"
                )


# --- Phase 3 ----------------------------------------------------------------------------------------------


@dataclass
class SwapResult:
    swapped: bool
    column: str
    index: str
    rows_topped_up: int
    backup_table: Optional[str]
    old_dimensions: Optional[int]


def swap_columns(db: Database, migration: MigrationTarget, encoder: EncoderSource, log: logging.Logger) -> SwapResult:
    """Drop the old column and rename the staging column and its index, in one transaction.

    Readers see the old column with its index until the commit, and the new one with its index after it.
    """
    with db.connect() as conn:
        state = migration.read_state(conn)
    table = state.table
    if migration.writable_column(state) == table.live_column:
        return SwapResult(False, table.live_column, table.index_name(table.live_column), 0, None, None)
    migration.target_column(state)  # refuses a staging column of another model, or none at all
    ensure_index(db, state, table.staging_column, migration.ivfflat_lists, log)
    old = state.columns.get(table.live_column)
    backup = None
    if old is not None and migration.keep_old_embeddings and old.typname == "vector":
        backup = back_up_old_vectors(db, state, old.vector_dimensions)
        log.info(f"Kept the old vectors of {table.name}.{table.live_column} in {backup}")
    index_pending_rows(db, state, log)
    topped_up = 0
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        _, stats = backfill(db, migration, encoder, list(range(migration.partitions)), log)
        topped_up += stats.rows_embedded
        with db.connect() as conn:
            conn.execute(sql.SWAP_LOCK_TIMEOUT)
            conn.execute(sql.lock_table(table))
            pending = scalar(conn, sql.count_pending(table, table.staging_column))
            if pending and attempt < SWAP_ATTEMPTS:
                conn.rollback()
                log.info(f"{pending} rows arrived without a vector before the lock (attempt {attempt}): embedding them")
                continue
            if pending and pending <= migration.batch_rows:
                # Writers keep adding rows between catch-up and lock: embed the last few under the lock.
                topped_up += _embed_under_lock(conn, migration, table, encoder)
                pending = scalar(conn, sql.count_pending(table, table.staging_column))
            _refuse_unless_swappable(conn, migration, pending)
            promote(conn, table, table.staging_column, RecordedModel(migration.model, migration.dimensions), True)
        return SwapResult(
            True,
            table.live_column,
            table.index_name(table.live_column),
            topped_up,
            backup,
            old.vector_dimensions if old else None,
        )
    raise AssertionError("unreachable: the last attempt swaps or refuses")


def index_pending_rows(db: Database, state: TableState, log: logging.Logger) -> None:
    """Build (again, if a killed build left it invalid) the partial index the swap counts waiting rows with."""
    table = state.table
    name = table.pending_index_name(table.staging_column)
    existing = state.index(name)
    with db.connect(autocommit=True) as conn:
        if existing is not None and not existing.valid:
            log.info(f"Dropping the invalid index {name} left by an interrupted build")
            conn.execute(sql.drop_index(table, name))
        conn.execute(sql.create_pending_index(table, table.staging_column))


def _embed_under_lock(
    conn: psycopg.Connection, migration: MigrationTarget, table: Table, encoder: EncoderSource
) -> int:
    buckets = list(range(migration.partitions))
    statement = sql.select_pending_batch(table, table.staging_column, migration.partitions, buckets, after=False)
    rows = conn.execute(statement, {"scope": buckets, "limit": migration.batch_rows}).fetchall()
    batch = Batch(0, [row[0] for row in rows], [row[1] for row in rows])
    return write_vectors(conn, table, table.staging_column, batch, resolve_encoder(encoder).encode(batch.texts))


def _refuse_unless_swappable(conn: psycopg.Connection, migration: MigrationTarget, pending: int) -> None:
    """The swap's guards, checked under the table lock: each refusal names its reason and count."""
    state = migration.read_state(conn)
    table = state.table
    if pending:
        raise MigrationError(
            f"Swap refused: {pending} rows of {table.name} have text but no vector in {table.staging_column}"
        )
    # A column declared vector(EMBEDDING_DIMENSIONS) cannot hold another size: only a bare `vector` is scanned.
    declared = state.columns[table.staging_column].vector_dimensions
    wrong = (
        0
        if declared == migration.dimensions
        else scalar(conn, sql.count_wrong_dimensions(table, table.staging_column), (migration.dimensions,))
    )
    if wrong:
        raise MigrationError(
            f"Swap refused: {wrong} vectors in {table.name}.{table.staging_column} do not have "
            f"EMBEDDING_DIMENSIONS={migration.dimensions} components"
        )
    recorded = state.models.get(table.staging_column)
    if recorded != RecordedModel(migration.model, migration.dimensions):
        raise MigrationError(
            f"Swap refused: {table.name}.{table.staging_column} holds "
            f"{recorded.model if recorded else 'unrecorded'} vectors, not EMBEDDING_MODEL={migration.model!r}"
        )


def promote(conn: psycopg.Connection, table: Table, column: str, model: RecordedModel, owned: bool) -> None:
    """Inside the caller's locked transaction: `column` and its index take the live names."""
    conn.execute(sql.drop_index_in_transaction(table, table.pending_index_name(column)))  # its work is done
    conn.execute(sql.drop_column(table, table.live_column))
    conn.execute(sql.rename_column(table, column, table.live_column))
    conn.execute(sql.rename_index(table, table.index_name(column), table.index_name(table.live_column)))
    conn.execute(sql.DELETE_MODEL, (table.schema, table.name, column))
    conn.execute(sql.UPSERT_MODEL, (table.schema, table.name, table.live_column, model.model, model.dimensions))
    conn.execute(sql.comment_column(table, table.live_column, f"bge-pipeline: {model.model} ({model.dimensions} dims)"))
    # Only vectors this pipeline can recompute are NULLed when their text changes.
    statements = (
        sql.create_stale_vector_trigger(table, [table.live_column]) if owned else sql.drop_stale_vector_trigger(table)
    )
    for statement in statements:
        conn.execute(statement)


def back_up_old_vectors(db: Database, state: TableState, dimensions: Optional[int]) -> str:
    """Copy the live column's vectors (with their ids) into a backup table, recorded as a backup."""
    table = state.table
    backup = table.backup_table(dimensions or 0)
    recorded = state.models.get(table.live_column)
    with db.connect() as conn:
        conn.execute(sql.drop_table(table.schema, backup))
        conn.execute(sql.create_backup_table(table, backup, table.live_column))
        model = recorded.model if recorded else "unrecorded (before bge-pipeline)"
        conn.execute(sql.UPSERT_BACKUP, (table.schema, table.name, backup, model, dimensions or 0))
    return backup
