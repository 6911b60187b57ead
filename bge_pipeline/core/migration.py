"""The migration's phases as plain functions over the resources: the assets call these, as do the jobs."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import psycopg
from psycopg.sql import Composed

from bge_pipeline.core import sql
from bge_pipeline.core.backfill import Backfill, BackfillStats, Batch, write_vectors
from bge_pipeline.core.catalog import (
    Index,
    MigrationError,
    RecordedModel,
    TableState,
    read_table_state,
    require_table,
    unfinished_migrations,
    writable_column,
)
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.encoder import Encoder, EncoderSource, resolve_encoder
from bge_pipeline.core.int8_gate import (
    DEFAULT_MIN_AGREEMENT,
    SAMPLE_TEXTS,
    Int8Agreement,
    is_int8,
    measure_int8,
    precision,
)
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
    index_type: str = "ivfflat"
    hnsw_m: Optional[int] = None
    hnsw_ef_construction: Optional[int] = None
    vector_type: str = "vector"
    int8_min_agreement: float = DEFAULT_MIN_AGREEMENT
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
            index_type=settings.index_type,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            vector_type=settings.vector_type,
            int8_min_agreement=settings.int8_min_agreement,
            keep_old_embeddings=settings.keep_old_embeddings,
            disk_check=settings.disk_check,
        )

    @property
    def staging_column(self) -> str:
        return f"{self.embedding_column}_{self.dimensions}"

    @property
    def recorded(self) -> RecordedModel:
        """The record a column this target writes carries."""
        return RecordedModel(self.model, self.dimensions, self.vector_type)

    @property
    def index(self) -> IndexSpec:
        return IndexSpec(self.index_type, self.vector_type, self.ivfflat_lists, self.hnsw_m, self.hnsw_ef_construction)

    def conversion_source(self, state: TableState) -> Optional[str]:
        """The live column when it holds this model's vectors in another type (VECTOR_TYPE changed after the
        swap): the staging column is then filled from it by a cast, no encoder needed."""
        live = state.models.get(state.table.live_column)
        if live is None or (live.model, live.dimensions) != (self.model, self.dimensions):
            return None
        return state.table.live_column if live.vector_type != self.vector_type else None

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
        return writable_column(state, self.recorded)

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


HNSW_DEFAULTS = {"m": 16, "ef_construction": 64}  # pgvector's, used where HNSW_M / HNSW_EF_CONSTRUCTION are unset


def describe_options(options: dict[str, int]) -> str:
    """An index build's WITH (...) parameters for people: `m=24, ef_construction=100`."""
    return ", ".join(f"{name}={value}" for name, value in options.items()) or "pgvector's defaults"


@dataclass(frozen=True)
class IndexSpec:
    """The index a column should have: INDEX_TYPE under the cosine operator class of VECTOR_TYPE, with its
    build parameters (None: the guide's formula for lists, pgvector's defaults for m and ef_construction)."""

    method: str = "ivfflat"
    vector_type: str = "vector"
    lists: Optional[int] = None
    m: Optional[int] = None
    ef_construction: Optional[int] = None

    @property
    def given(self) -> dict[str, Optional[int]]:
        """The method's build parameters as set (None: left to the formula or to pgvector)."""
        if self.method == "ivfflat":
            return {"lists": self.lists}
        return {"m": self.m, "ef_construction": self.ef_construction}

    def options(self, rows: int) -> dict[str, int]:
        """The WITH (...) parameters of the build on `rows` vectors."""
        if self.method == "ivfflat":
            return {"lists": ivfflat_lists(rows, self.lists)}
        return {name: value for name, value in self.given.items() if value is not None}

    def met_by(self, index: Index, column: str) -> bool:
        """Whether an existing index is this one: same method and operator class, and every parameter given
        explicitly equal (the lists formula's value changes with the rows, so a kept index is not rebuilt for it)."""
        return (
            index.serves(column)
            and index.method == self.method
            and index.opclass == sql.cosine_opclass(self.vector_type)
            and all(value is None or index.option(name) == value for name, value in self.given.items())
        )

    def kept_options(self, index: Index) -> dict[str, int]:
        """A kept index's parameters as the catalog has them (one left to pgvector's default is not stored)."""
        found = {name: index.option(name) for name in self.given}
        return {name: value for name, value in found.items() if value is not None}


# --- Phase 1 ----------------------------------------------------------------------------------------------


@dataclass
class StagingResult:
    column: str
    created: bool
    migrated: bool
    converted_from: Optional[str] = None  # the live column, when this model's vectors change type only
    int8: Optional[Int8Agreement] = None  # the gate's figures, when the column was made for int8 vectors


def prepare_staging_column(db: Database, migration: MigrationTarget, encoder: EncoderSource) -> StagingResult:
    """Add `embedding_<dims>` for the configured model, or confirm the table already carries its vectors.

    Unlike the guide, the old index keeps serving searches on the old column until the swap.
    """
    with db.connect() as conn:  # a missing table or column is refused before the extension or state table is made
        require_table(conn, migration.schema_name, migration.table, migration.id_column, migration.text_column)
        kept = scalar(conn, sql.STATE_TABLE_EXISTS)
        if kept:  # a state table from an older version gains the columns records have now
            for statement in sql.UPGRADE_STATE_TABLE:
                conn.execute(statement)
        current = migration.read_state(conn) if kept else None
        needs_column = current is None or migration.writable_column(current) is None
        converting = current is not None and migration.conversion_source(current) is not None
    runtime, gate = None, None
    if needs_column and not converting:
        # The model loads before anything is made, so a model of another dimension is refused with the database as
        # it was (Encoder.load refuses it; an encoder given already loaded is checked here).
        model = resolve_encoder(encoder)
        if model.dimensions != migration.dimensions:
            raise MigrationError(f"EMBEDDING_DIMENSIONS={migration.dimensions} but the encoder has {model.dimensions}")
        runtime, gate = model.backend, int8_gate(db, migration, model)
    db.ensure_pgvector()
    with db.connect() as conn:
        state = migration.read_state(conn)
        table = state.table
        column = migration.writable_column(state)
        source = migration.conversion_source(state)
        if column is None:
            stale = unfinished_migrations(state)
            if stale:
                raise MigrationError(
                    f"{table.name} has an unfinished migration in {', '.join(stale)}: finish it with that "
                    "EMBEDDING_MODEL, or run the rollback_staging_column job with it before changing models"
                )
            column = table.staging_column
            if source:  # the same vectors in another type: made by the live column's runtime
                runtime = state.models[source].runtime
            recorded = replace(migration.recorded, runtime=runtime)
            conn.execute(sql.add_vector_column(table, column, migration.dimensions, migration.vector_type))
            conn.execute(sql.UPSERT_MODEL, recorded.row(table.schema, table.name, column))
            conn.execute(sql.comment_column(table, column, column_comment(migration.recorded)))
            created = True
        else:
            created = False
        # While a column is converted from the live one, a changed text must stale both: else the cast would
        # copy the old text's vector into the new column.
        for statement in sql.create_stale_vector_trigger(table, [column, *([source] if source else [])]):
            conn.execute(statement)
    return StagingResult(
        column=column, created=created, migrated=column == table.live_column, converted_from=source, int8=gate
    )


def int8_gate(db: Database, migration: MigrationTarget, encoder: Encoder) -> Optional[Int8Agreement]:
    """For an int8 encoder, its retrieval agreement with the float one on the table's own texts: a column is not
    made for int8 vectors below INT8_MIN_AGREEMENT (None for a float encoder: nothing to judge)."""
    if not is_int8(encoder.backend):
        return None
    with db.connect() as conn:
        table = migration.read_state(conn).table
        texts = [row[0] for row in conn.execute(sql.sample_texts(table), (SAMPLE_TEXTS,))]
    gate = measure_int8(encoder, texts, migration.int8_min_agreement)
    if not gate.passed:
        raise MigrationError(
            f"EMBEDDING_BACKEND=onnx-int8 refused for {table.name}: {gate.describe()}; set EMBEDDING_BACKEND=onnx "
            "(float) or, accepting that loss, a lower INT8_MIN_AGREEMENT"
        )
    return gate


def require_same_precision(state: TableState, column: str, encoder: Encoder) -> Encoder:
    """Refuse to write int8 vectors into a column of float ones, or the reverse: a column holds one kind."""
    recorded = state.models.get(column)
    if recorded is not None and is_int8(recorded.runtime) != is_int8(encoder.backend):
        raise MigrationError(
            f"EMBEDDING_BACKEND={encoder.backend} would write {precision(encoder.backend)} vectors into "
            f"{state.table.name}.{column}, which holds {precision(recorded.runtime)} ones ({recorded.runtime or 'float'}): "
            "set EMBEDDING_BACKEND back, or roll the column back and embed it again"
        )
    return encoder


def column_comment(recorded: RecordedModel) -> str:
    return f"bge-pipeline: {recorded.model} ({recorded.vector_type}, {recorded.dimensions} dims)"


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
    source = migration.conversion_source(state)
    copied = copy_converted(db, state.table, source, column, migration, buckets, log) if source else 0
    stats = Backfill(
        db=db,
        encoder=lambda: require_same_precision(state, column, resolve_encoder(encoder)),
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
    stats.rows_copied = copied
    return column, stats


def copy_converted(
    db: Database, table: Table, source: str, column: str, migration: MigrationTarget, buckets: list[int], log: Any
) -> int:
    """Fill `column` from `source` by a cast, batch by batch (one commit each): VECTOR_TYPE changed, the model
    did not, so no text is encoded again. Rows the source lacks are left to the encoder."""
    statement = sql.copy_by_cast(table, source, column, migration.vector_type, migration.partitions)
    copied = 0
    while True:
        with db.connect() as conn:
            rows = conn.execute(statement, {"scope": buckets, "limit": migration.batch_rows}).rowcount
        copied += rows
        if rows == 0:
            break
    if copied:
        log.info(
            f"Copied {copied:,} vectors of {table.name}.{source} into {column} as {migration.vector_type} (no encoding)"
        )
    return copied


# --- the index --------------------------------------------------------------------------------------------


@dataclass
class IndexResult:
    column: str
    name: str
    method: str
    opclass: str
    options: dict[str, int]
    rows: int
    built: bool
    seconds: float
    retired: list[str] = field(default_factory=list)  # the other method's index, dropped once this one was valid

    @property
    def lists(self) -> Optional[int]:
        return self.options.get("lists")


def build_index(db: Database, migration: MigrationTarget, log: logging.Logger) -> IndexResult:
    """INDEX_TYPE under VECTOR_TYPE's cosine operator class on the model's column; kept when a valid one with the
    wanted parameters exists, rebuilt when not."""
    with db.connect() as conn:
        state = migration.read_state(conn)
    return ensure_index(db, state, migration.target_column(state), migration.index, log)


def ensure_index(db: Database, state: TableState, column: str, spec: IndexSpec, log: logging.Logger) -> IndexResult:
    """Give `column` the index `spec` names. Changing INDEX_TYPE builds the new index beside the old one (both
    CONCURRENTLY) and drops the old one only once the new one is valid: searches keep an index throughout."""
    table = state.table
    with db.connect() as conn:
        rows = scalar(conn, sql.count_vectors(table, column))
    name = table.index_name(column, spec.method)
    existing = state.index(name)
    others = [table.index_name(column, method) for method in sql.INDEX_METHODS if method != spec.method]
    retired = [other for other in others if state.index(other) is not None]
    opclass = sql.cosine_opclass(spec.vector_type)
    started = time.perf_counter()
    kept = existing is not None and spec.met_by(existing, column)
    options = spec.kept_options(existing) if kept and existing else spec.options(rows)
    with db.connect(autocommit=True) as conn:
        if not kept:
            if existing:
                log.info(f"Dropping index {name} ({'invalid' if not existing.valid else 'other parameters'})")
                conn.execute(sql.drop_index(table, name))
            log.info(
                f"Building {spec.method.upper()} index {name} on {table.name}.{column} "
                f"({opclass}, {describe_options(options)})"
            )
            _build(db, conn, sql.create_index(table, column, name, spec.method, spec.vector_type, options), table, log)
        for other in retired:
            log.info(f"Dropping {other}: INDEX_TYPE={spec.method} replaced it with {name}")
            conn.execute(sql.drop_index(table, other))
        conn.execute(sql.SET_INDEX_TYPE, (spec.method, table.schema, table.name, column))
    seconds = 0.0 if kept else time.perf_counter() - started
    return IndexResult(column, name, spec.method, opclass, options, rows, not kept, seconds, retired)


def _build(db: Database, conn: psycopg.Connection, statement: Composed, table: Table, log: logging.Logger) -> None:
    """CREATE INDEX with the build's session settings, its progress logged; the settings do not leave with the
    connection (it goes back to the pool)."""
    try:
        for setting in sql.INDEX_BUILD_SETTINGS:
            conn.execute(setting)
        with _IndexProgress(db, table, log):
            conn.execute(statement)
    finally:
        if not conn.closed:
            for setting in sql.INDEX_BUILD_RESET:
                conn.execute(setting)
    conn.execute(sql.analyze(table))


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
    live_index = table.index_name(table.live_column, migration.index_type)
    if migration.writable_column(state) == table.live_column:
        return SwapResult(False, table.live_column, live_index, 0, None, None)
    migration.target_column(state)  # refuses a staging column of another model, or none at all
    ensure_index(db, state, table.staging_column, migration.index, log)
    old = state.columns.get(table.live_column)
    backup = None
    if old is not None and migration.keep_old_embeddings and old.is_vector:
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
            recorded = _refuse_unless_swappable(conn, migration, pending)
            promote(conn, table, table.staging_column, recorded, True)
        return SwapResult(
            True,
            table.live_column,
            live_index,
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
    model = require_same_precision(migration.read_state(conn), table.staging_column, resolve_encoder(encoder))
    return write_vectors(conn, table, table.staging_column, batch, model.encode(batch.texts))


def _refuse_unless_swappable(conn: psycopg.Connection, migration: MigrationTarget, pending: int) -> RecordedModel:
    """The swap's guards, checked under the table lock: each refusal names its reason and count; the staging
    column's record when it may be swapped in."""
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
    if recorded is None or recorded != migration.recorded:
        raise MigrationError(
            f"Swap refused: {table.name}.{table.staging_column} holds "
            f"{recorded.model if recorded else 'unrecorded'} vectors, not EMBEDDING_MODEL={migration.model!r}"
        )
    return recorded


def promote(conn: psycopg.Connection, table: Table, column: str, model: RecordedModel, owned: bool) -> None:
    """Inside the caller's locked transaction: `column` and its index take the live names."""
    conn.execute(sql.drop_index_in_transaction(table, table.pending_index_name(column)))  # its work is done
    conn.execute(sql.drop_column(table, table.live_column))
    conn.execute(sql.rename_column(table, column, table.live_column))
    for method in sql.INDEX_METHODS:
        conn.execute(
            sql.rename_index(table, table.index_name(column, method), table.index_name(table.live_column, method))
        )
    conn.execute(sql.DELETE_MODEL, (table.schema, table.name, column))
    conn.execute(sql.UPSERT_MODEL, model.row(table.schema, table.name, table.live_column))
    conn.execute(sql.comment_column(table, table.live_column, column_comment(model)))
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
    live = state.columns.get(table.live_column)
    kept = RecordedModel(
        recorded.model if recorded else "unrecorded (before bge-pipeline)",
        dimensions or 0,
        live.typname if live is not None and live.is_vector else "vector",
    )
    with db.connect() as conn:
        conn.execute(sql.drop_table(table.schema, backup))
        conn.execute(sql.create_backup_table(table, backup, table.live_column))
        conn.execute(sql.UPSERT_BACKUP, kept.row(table.schema, table.name, backup))
    return backup
