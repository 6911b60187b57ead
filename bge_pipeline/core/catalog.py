"""What the database says about the embeddings table, and which column the configured model may write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import psycopg

from bge_pipeline.core import sql
from bge_pipeline.core.database import scalar
from bge_pipeline.core.sql import Table


class MigrationError(RuntimeError):
    """The table is in a state the requested step must not touch; the message says why and what to do."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    typname: str
    typmod: int

    @property
    def is_vector(self) -> bool:
        """A pgvector column of full (vector) or half (halfvec) precision."""
        return self.typname in sql.VECTOR_TYPES

    @property
    def vector_dimensions(self) -> Optional[int]:
        return self.typmod if self.is_vector and self.typmod > 0 else None


@dataclass(frozen=True)
class Index:
    name: str
    column: str
    method: str
    opclass: str
    valid: bool
    options: tuple[str, ...]
    unique: bool  # a unique index on this one column alone, not partial

    def serves(self, column: str) -> bool:
        """Valid IVFFLAT or HNSW on `column` with the operator class of `<=>`: an index the queries can use."""
        return (
            self.valid
            and self.method in sql.INDEX_METHODS
            and self.opclass in sql.COSINE_OPCLASSES
            and self.column == column
        )

    def option(self, name: str) -> Optional[int]:
        """A build parameter (`lists`, `m`, `ef_construction`) as the catalog stores it; None when left default."""
        for option in self.options:
            key, _, value = option.partition("=")
            if key == name:
                return int(value)
        return None

    @property
    def lists(self) -> Optional[int]:
        return self.option("lists")

    def describe(self) -> str:
        """`hnsw (halfvec_cosine_ops, m=16, ef_construction=64)`: what the index is, for logs and reports."""
        return f"{self.method} ({', '.join([self.opclass, *self.options])})"


@dataclass(frozen=True)
class RecordedModel:
    """Whose vectors a column holds, and how they are stored: a column is written only by the model, at the
    dimensions and in the type recorded for it. The index is recorded too, but any index may change."""

    model: str
    dimensions: int
    vector_type: str = "vector"
    index_type: Optional[str] = field(default=None, compare=False)
    runtime: Optional[str] = field(default=None, compare=False)  # the encoder's backend; None: before records had it

    def describe(self) -> str:
        return f"{self.model!r} ({self.vector_type}({self.dimensions}))"

    def row(self, schema: str, table: str, column: str) -> tuple[Any, ...]:
        """The parameters of sql.UPSERT_MODEL / UPSERT_BACKUP."""
        return (schema, table, column, self.model, self.dimensions, self.vector_type, self.index_type, self.runtime)


@dataclass(frozen=True)
class Backup:
    """A table of old vectors that a swap kept (recorded as a backup, not found by its name)."""

    relation: str
    model: str
    dimensions: int
    vector_type: str = "vector"


@dataclass
class TableState:
    """One read of the catalog and of the pipeline's own model records for the table."""

    table: Table
    columns: dict[str, Column]
    models: dict[str, RecordedModel]
    indexes: list[Index] = field(default_factory=list)
    backups: dict[int, Backup] = field(default_factory=dict)  # by dimensions

    def has(self, column: str) -> bool:
        return column in self.columns

    def indexes_on(self, column: str) -> list[Index]:
        return [index for index in self.indexes if index.column == column]

    def index(self, name: str) -> Optional[Index]:
        return next((index for index in self.indexes if index.name == name), None)

    def search_index(self, column: str, preferred: str = "ivfflat") -> Optional[Index]:
        """The index queries on `column` use: one of the `preferred` method if valid, else any that serves."""
        serving = sorted((i for i in self.indexes_on(column) if i.serves(column)), key=lambda i: i.method != preferred)
        return serving[0] if serving else None

    @property
    def migrated(self) -> bool:
        return not self.has(self.table.staging_column) and self.has(self.table.live_column)


def read_table_state(
    conn: psycopg.Connection,
    schema: str,
    name: str,
    id_column: str,
    text_column: str,
    live_column: str,
    staging_column: str,
) -> TableState:
    """Read the table from the catalog; refuse (naming the setting) a table or column that does not exist."""
    columns, indexes = _require_table(conn, schema, name, id_column, text_column)
    table = Table(
        schema=schema,
        name=name,
        id_column=id_column,
        text_column=text_column,
        live_column=live_column,
        staging_column=staging_column,
        id_type=columns[id_column].type,
    )
    # A record for a column that now has other dimensions outlived its column (the table was dropped and made
    # again, or the column retyped): it says nothing about the vectors there now.
    # Before Phase 1 first ran on this database there is no state table: nothing is recorded yet.
    records = conn.execute(sql.SELECT_MODELS, (schema, name)).fetchall() if scalar(conn, sql.STATE_TABLE_EXISTS) else []
    models = {
        column: RecordedModel(model, dimensions, vector_type, index_type, runtime)
        for column, model, dimensions, kind, vector_type, index_type, runtime in records
        if kind == "column" and (column not in columns or _describes(columns[column], dimensions, vector_type))
    }
    backups = {
        dimensions: Backup(relation, model, dimensions, vector_type)
        for relation, model, dimensions, kind, vector_type, *_ in records
        if kind == "backup"
    }
    return TableState(table=table, columns=columns, models=models, indexes=indexes, backups=backups)


def _describes(column: Column, dimensions: int, vector_type: str) -> bool:
    """Whether a record still fits its column's declared type (a bare `vector` fits any dimensions)."""
    return column.vector_dimensions in (None, dimensions) and (not column.is_vector or column.typname == vector_type)


def require_table(
    conn: psycopg.Connection, schema: str, name: str, id_column: str, text_column: str
) -> dict[str, Column]:
    """The table's columns from the catalog alone (it needs no table of the pipeline's): a missing table or column,
    or an id without a unique index, is refused before anything is created."""
    return _require_table(conn, schema, name, id_column, text_column)[0]


def _require_table(
    conn: psycopg.Connection, schema: str, name: str, id_column: str, text_column: str
) -> tuple[dict[str, Column], list[Index]]:
    rows = conn.execute(sql.TABLE_COLUMNS, (schema, name)).fetchall()
    if not rows:
        raise MigrationError(
            f"EMBEDDING_TABLE={name!r}: no such table in schema {schema!r} (EMBEDDING_SCHEMA) of this database"
        )
    columns = {row[0]: Column(row[0], row[1], row[2], row[3]) for row in rows}
    for setting, column in (("EMBEDDING_ID_COLUMN", id_column), ("EMBEDDING_TEXT_COLUMN", text_column)):
        if column not in columns:
            raise MigrationError(f"{setting}={column!r}: table {schema}.{name} has no such column")
    indexes = [
        Index(row[0], row[1], row[2], row[3], row[4], tuple(row[5]), row[6])
        for row in conn.execute(sql.TABLE_INDEXES, (schema, name)).fetchall()
    ]
    if not any(index.unique and index.valid and index.column == id_column for index in indexes):
        # The backfill pages through rows by id and writes each batch by id lookups (sql.WRITE_BY_ID).
        raise MigrationError(
            f"EMBEDDING_ID_COLUMN={id_column!r}: table {schema}.{name} has no unique index on that column alone "
            "(a composite key cannot name a row by one value): point it at a column that identifies rows, or add "
            f"one (CREATE UNIQUE INDEX ON {schema}.{name} ({id_column}))"
        )
    return columns, indexes


def writable_column(state: TableState, wanted: RecordedModel) -> Optional[str]:
    """The column the configured model may fill now, or None when Phase 1 must create one first.

    The rule that keeps two models' vectors out of one column: a column is written only when the pipeline
    recorded the configured model (and dimension, and vector type) for it.
    """
    table = state.table
    staging = table.staging_column
    if state.has(staging):
        recorded = state.models.get(staging)
        if recorded == wanted:
            return staging
        holder = f"model {recorded.describe()}" if recorded else "an unrecorded model"
        raise MigrationError(
            f"EMBEDDING_MODEL={wanted.model!r} VECTOR_TYPE={wanted.vector_type}: staging column {staging!r} of "
            f"{table.name} belongs to {holder}; run the rollback_staging_column job to remove it, or set "
            "EMBEDDING_MODEL and VECTOR_TYPE back"
        )
    if state.has(table.live_column) and state.models.get(table.live_column) == wanted:
        return table.live_column
    return None


def unfinished_migrations(state: TableState) -> list[str]:
    """Staging columns left by a migration to another model or dimension, which Phase 1 must not step over."""
    table = state.table
    return [
        f"{column} ({recorded.model}, {recorded.dimensions} dims)"
        for column, recorded in state.models.items()
        if column not in (table.live_column, table.staging_column) and state.has(column)
    ]
