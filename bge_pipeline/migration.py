"""The migration's phases as plain functions over the resources: the assets call these, as do the jobs."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import dagster as dg
import psycopg

from bge_pipeline import sql
from bge_pipeline.backfill import Backfill, BackfillStats, Batch, write_vectors
from bge_pipeline.catalog import (
    MigrationError,
    RecordedModel,
    TableState,
    read_table_state,
    require_table,
    unfinished_migrations,
    writable_column,
)
from bge_pipeline.database import DatabaseResource
from bge_pipeline.encoder import Encoder
from bge_pipeline.sql import Table

SWAP_ATTEMPTS = 3


class MigrationResource(dg.ConfigurableResource):
    """Which table and columns to migrate, and how the backfill batches, retries and indexes."""

    schema_name: str = "public"
    table: str = "segments"
    id_column: str = "id"
    text_column: str = "text"
    embedding_column: str = "embedding"
    model: str
    dimensions: int
    partitions: int = 8
    batch_rows: int = 1000
    max_retries: int = 3
    retry_base_seconds: float = 1.0
    ivfflat_lists: Optional[int] = None
    keep_old_embeddings: bool = True

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


def prepare_staging_column(db: DatabaseResource, migration: MigrationResource, encoder: Encoder) -> StagingResult:
    """Add `embedding_<dims>` for the configured model, or confirm the table already carries its vectors.

    Unlike the guide, the old index keeps serving searches on the old column until the swap.
    """
    with db.connect() as conn:  # a missing table or column is refused before the extension or state table is made
        require_table(conn, migration.schema_name, migration.table, migration.id_column, migration.text_column)
    db.ensure_pgvector()
    if encoder.dimensions != migration.dimensions:  # Encoder.load already refused a mismatched model
        raise MigrationError(f"EMBEDDING_DIMENSIONS={migration.dimensions} but the encoder has {encoder.dimensions}")
    with db.connect() as conn:
        state = migration.read_state(conn)
        table = state.table
        column = migration.writable_column(state)
        if column is None:
            stale = unfinished_migrations(state, migration.model, migration.dimensions)
            if stale:
                raise MigrationError(
                    f"{table.name} has an unfinished migration in {', '.join(stale)}: finish it with that "
                    "EMBEDDING_MODEL, or run the rollback_staging_column job with it before changing models"
                )
            column = table.staging_column
            conn.execute(sql.add_vector_column(table, column, migration.dimensions))
            conn.execute(sql.UPSERT_MODEL, (table.schema, table.name, column, migration.model, migration.dimensions))
            conn.execute(sql.comment_column(table, column, f"bge-pipeline: {migration.model} ({migration.dimensions} dims)"))
            created = True
        else:
            created = False
        for statement in sql.create_stale_vector_trigger(table, [column]):
            conn.execute(statement)
    return StagingResult(column=column, created=created, migrated=column == table.live_column)


# --- Phase 2 ----------------------------------------------------------------------------------------------


def backfill(
    db: DatabaseResource,
    migration: MigrationResource,
    encoder: Encoder,
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


def build_index(db: DatabaseResource, migration: MigrationResource, log: logging.Logger) -> IndexResult:
    """IVFFLAT with vector_cosine_ops on the model's column; kept when a valid one exists, rebuilt when not."""
    with db.connect() as conn:
        state = migration.read_state(conn)
    return ensure_index(db, state, migration.target_column(state), migration.ivfflat_lists, log)


def ensure_index(
    db: DatabaseResource, state: TableState, column: str, lists_override: Optional[int], log: logging.Logger
) -> IndexResult:
    """Build the IVFFLAT index of `column` unless a valid one with the wanted parameters exists."""
    table = state.table
    with db.connect() as conn:
        rows = conn.execute(sql.count_vectors(table, column)).fetchone()[0]
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
        for statement in sql.INDEX_BUILD_SETTINGS:
            conn.execute(statement)
        log.info(f"Building IVFFLAT index {name} on {table.name}.{column}: {rows:,} vectors, lists={lists}")
        with _IndexProgress(db, table, log):
            conn.execute(sql.create_ivfflat_index(table, column, name, lists))
        conn.execute(sql.analyze(table))
    return IndexResult(column, name, lists, rows, built=True, seconds=time.perf_counter() - started)


class _IndexProgress(threading.Thread):
    """Logs pg_stat_progress_create_index every 10 s while an index builds."""

    def __init__(self, db: DatabaseResource, table: sql.Table, log: logging.Logger) -> None:
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


def swap_columns(
    db: DatabaseResource, migration: MigrationResource, encoder: Encoder, log: logging.Logger
) -> SwapResult:
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
        backup = _back_up_old_vectors(db, migration, state, old.vector_dimensions)
        log.info(f"Kept the old vectors of {table.name}.{table.live_column} in {backup}")
    topped_up = 0
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        _, stats = backfill(db, migration, encoder, list(range(migration.partitions)), log)
        topped_up += stats.rows_embedded
        with db.connect() as conn:
            conn.execute(sql.SWAP_LOCK_TIMEOUT)
            conn.execute(sql.lock_table(table))
            pending = conn.execute(sql.count_pending(table, table.staging_column)).fetchone()[0]
            if pending and attempt < SWAP_ATTEMPTS:
                conn.rollback()
                log.info(f"{pending} rows arrived without a vector before the lock (attempt {attempt}): embedding them")
                continue
            if pending and pending <= migration.batch_rows:
                # Writers keep adding rows between catch-up and lock: embed the last few under the lock.
                topped_up += _embed_under_lock(conn, migration, table, encoder)
                pending = conn.execute(sql.count_pending(table, table.staging_column)).fetchone()[0]
            _refuse_unless_swappable(conn, migration, pending)
            _promote(conn, table, table.staging_column, RecordedModel(migration.model, migration.dimensions), True)
        return SwapResult(
            True,
            table.live_column,
            table.index_name(table.live_column),
            topped_up,
            backup,
            old.vector_dimensions if old else None,
        )
    raise AssertionError("unreachable: the last attempt swaps or refuses")


def _embed_under_lock(conn: psycopg.Connection, migration: MigrationResource, table: Table, encoder: Encoder) -> int:
    buckets = list(range(migration.partitions))
    statement = sql.select_pending_batch(table, table.staging_column, migration.partitions, buckets, after=False)
    rows = conn.execute(statement, {"scope": buckets, "limit": migration.batch_rows}).fetchall()
    batch = Batch(0, [row[0] for row in rows], [row[1] for row in rows])
    return write_vectors(conn, table, table.staging_column, batch, encoder.encode(batch.texts))


def _refuse_unless_swappable(conn: psycopg.Connection, migration: MigrationResource, pending: int) -> None:
    """The swap's guards, checked under the table lock: each refusal names its reason and count."""
    state = migration.read_state(conn)
    table = state.table
    if pending:
        raise MigrationError(
            f"Swap refused: {pending} rows of {table.name} have text but no vector in {table.staging_column}"
        )
    wrong = conn.execute(sql.count_wrong_dimensions(table, table.staging_column), (migration.dimensions,)).fetchone()[0]
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


def _promote(conn: psycopg.Connection, table: Table, column: str, model: RecordedModel, owned: bool) -> None:
    """Inside the caller's locked transaction: `column` and its index take the live names."""
    conn.execute(sql.drop_column(table, table.live_column))
    conn.execute(sql.rename_column(table, column, table.live_column))
    conn.execute(sql.rename_index(table, table.index_name(column), table.index_name(table.live_column)))
    conn.execute(sql.DELETE_MODEL, (table.schema, table.name, column))
    conn.execute(sql.UPSERT_MODEL, (table.schema, table.name, table.live_column, model.model, model.dimensions))
    conn.execute(
        sql.comment_column(table, table.live_column, f"bge-pipeline: {model.model} ({model.dimensions} dims)")
    )
    # Only vectors this pipeline can recompute are NULLed when their text changes.
    statements = sql.create_stale_vector_trigger(table, [table.live_column]) if owned else sql.drop_stale_vector_trigger(table)
    for statement in statements:
        conn.execute(statement)


def _back_up_old_vectors(
    db: DatabaseResource, migration: MigrationResource, state: TableState, dimensions: Optional[int]
) -> str:
    table = state.table
    backup = table.backup_table(dimensions or 0)
    recorded = state.models.get(table.live_column)
    with db.connect() as conn:
        conn.execute(sql.drop_table(table.schema, backup))
        conn.execute(sql.create_backup_table(table, backup, table.live_column))
        conn.execute(
            sql.UPSERT_MODEL,
            (
                table.schema,
                table.name,
                backup,
                recorded.model if recorded else "unrecorded (before bge-pipeline)",
                dimensions or 0,
            ),
        )
    return backup


# --- rollback and restore ---------------------------------------------------------------------------------


@dataclass
class RollbackPlan:
    """What a destructive job will do, said before it does it."""

    description: str
    rows: int


def plan_clear_staging(db: DatabaseResource, migration: MigrationResource) -> RollbackPlan:
    """The guide's `alembic downgrade 005`: the staging column stays, its vectors go."""
    with db.connect() as conn:
        state = migration.read_state(conn)
        column = _staging_or_refuse(state)
        rows = conn.execute(sql.count_vectors(state.table, column)).fetchone()[0]
    return RollbackPlan(f"set the {rows:,} vectors of {state.table.name}.{column} to NULL", rows)


def clear_staging(db: DatabaseResource, migration: MigrationResource) -> int:
    with db.connect() as conn:
        state = migration.read_state(conn)
        return conn.execute(sql.clear_column(state.table, _staging_or_refuse(state))).rowcount


def plan_drop_staging(db: DatabaseResource, migration: MigrationResource) -> RollbackPlan:
    """The guide's `alembic downgrade 004`: the table as it was before Phase 1; the old index never left."""
    with db.connect() as conn:
        state = migration.read_state(conn)
        column = _staging_or_refuse(state)
        rows = conn.execute(sql.count_vectors(state.table, column)).fetchone()[0]
    return RollbackPlan(
        f"drop {state.table.name}.{column} ({rows:,} vectors), its index and its model record; "
        f"{state.table.live_column} and its index are untouched",
        rows,
    )


def drop_staging(db: DatabaseResource, migration: MigrationResource) -> None:
    with db.connect() as conn:
        state = migration.read_state(conn)
    table, column = state.table, _staging_or_refuse(state)
    with db.connect(autocommit=True) as conn:
        conn.execute(sql.drop_index(table, table.index_name(column)))
    with db.connect() as conn:
        conn.execute(sql.drop_column(table, column))
        conn.execute(sql.DELETE_MODEL, (table.schema, table.name, column))
        for statement in sql.drop_stale_vector_trigger(table):
            conn.execute(statement)


def _staging_or_refuse(state: TableState) -> str:
    """Any staging column (`embedding_<dims>` recorded by the pipeline), whatever model it was for."""
    table = state.table
    staged = [c for c in state.models if c != table.live_column and state.has(c)]
    if not staged:
        raise MigrationError(f"{table.name} has no staging column to roll back: Phase 3 is done or Phase 1 never ran")
    return staged[0]


def available_backups(state: TableState) -> dict[int, RecordedModel]:
    """Backups of old vectors kept by earlier swaps, by dimension."""
    prefix = state.table.backup_table_prefix
    return {
        recorded.dimensions: recorded for column, recorded in state.models.items() if column.startswith(prefix)
    }


def plan_restore(db: DatabaseResource, migration: MigrationResource, dimensions: int) -> RollbackPlan:
    with db.connect() as conn:
        state = migration.read_state(conn)
        _backup_or_refuse(state, dimensions)
        rows = conn.execute(sql.count_table(state.table.schema, state.table.backup_table(dimensions))).fetchone()[0]
    table = state.table
    return RollbackPlan(
        f"replace {table.name}.{table.live_column} with the {rows:,} {dimensions}-dim vectors kept in "
        f"{table.backup_table(dimensions)} and index them"
        + (" (the current vectors are kept in a backup first)" if migration.keep_old_embeddings else ""),
        rows,
    )


def restore_backup(db: DatabaseResource, migration: MigrationResource, dimensions: int, log: logging.Logger) -> str:
    """Put the old model's column back from its backup table, with an index, swapped in atomically."""
    with db.connect() as conn:
        state = migration.read_state(conn)
    table = state.table
    recorded = _backup_or_refuse(state, dimensions)
    column = f"{table.live_column}_{dimensions}"
    if state.has(column) and column not in state.models:
        raise MigrationError(f"{table.name}.{column} exists and is not the pipeline's: remove it before restoring")
    with db.connect() as conn:
        conn.execute(sql.add_vector_column(table, column, dimensions))
        conn.execute(sql.UPSERT_MODEL, (table.schema, table.name, column, recorded.model, dimensions))
        conn.execute(sql.restore_from_backup(table, table.backup_table(dimensions), column, table.live_column))
    with db.connect() as conn:
        state = migration.read_state(conn)
    ensure_index(db, state, column, None, log)
    live = state.columns.get(table.live_column)
    if live is not None and live.typname == "vector" and migration.keep_old_embeddings:
        _back_up_old_vectors(db, migration, state, live.vector_dimensions)
    with db.connect() as conn:
        conn.execute(sql.SWAP_LOCK_TIMEOUT)
        conn.execute(sql.lock_table(table))
        _promote(conn, table, column, recorded, owned=recorded == RecordedModel(migration.model, migration.dimensions))
    return table.backup_table(dimensions)


def _backup_or_refuse(state: TableState, dimensions: int) -> RecordedModel:
    backups = available_backups(state)
    if dimensions not in backups:
        kept = ", ".join(f"{d} dims ({m.model})" for d, m in sorted(backups.items())) or "none"
        raise MigrationError(f"No backup of {dimensions}-dim vectors for {state.table.name}: kept backups: {kept}")
    return backups[dimensions]
