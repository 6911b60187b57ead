"""Undoing the migration: the guide's rollback before Phase 3, and a restore from the backup after it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import Backup, MigrationError, RecordedModel, TableState
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.migration import MigrationTarget, back_up_old_vectors, ensure_index, promote


@dataclass
class RollbackPlan:
    """What a destructive job will do, said before it does it."""

    description: str
    rows: int


def plan_clear_staging(db: Database, migration: MigrationTarget) -> RollbackPlan:
    """The guide's `alembic downgrade 005`: the staging column stays, its vectors go."""
    with db.connect() as conn:
        state = migration.read_state(conn)
        column = _staging_or_refuse(state)
        rows = scalar(conn, sql.count_vectors(state.table, column))
    return RollbackPlan(f"set the {rows:,} vectors of {state.table.name}.{column} to NULL", rows)


def clear_staging(db: Database, migration: MigrationTarget) -> int:
    with db.connect() as conn:
        state = migration.read_state(conn)
        return conn.execute(sql.clear_column(state.table, _staging_or_refuse(state))).rowcount


def plan_drop_staging(db: Database, migration: MigrationTarget) -> RollbackPlan:
    """The guide's `alembic downgrade 004`: the table as it was before Phase 1; the old index never left."""
    with db.connect() as conn:
        state = migration.read_state(conn)
        column = _staging_or_refuse(state)
        rows = scalar(conn, sql.count_vectors(state.table, column))
    return RollbackPlan(
        f"drop {state.table.name}.{column} ({rows:,} vectors), its index and its model record; "
        f"{state.table.live_column} and its index are untouched",
        rows,
    )


def drop_staging(db: Database, migration: MigrationTarget) -> None:
    with db.connect() as conn:
        state = migration.read_state(conn)
    table, column = state.table, _staging_or_refuse(state)
    with db.connect(autocommit=True) as conn:
        for method in sql.INDEX_METHODS:
            conn.execute(sql.drop_index(table, table.index_name(column, method)))
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


def plan_restore(db: Database, migration: MigrationTarget, dimensions: int) -> RollbackPlan:
    """What restoring the `dimensions`-dim backup will do, counted before it is done."""
    with db.connect() as conn:
        state = migration.read_state(conn)
        backup = _backup_or_refuse(state, dimensions)
        rows = scalar(conn, sql.count_table(state.table.schema, backup.relation))
    table = state.table
    return RollbackPlan(
        f"replace {table.name}.{table.live_column} with the {rows:,} {dimensions}-dim vectors kept in "
        f"{backup.relation} and index them"
        + (" (the current vectors are kept in a backup first)" if migration.keep_old_embeddings else ""),
        rows,
    )


def restore_backup(db: Database, migration: MigrationTarget, dimensions: int, log: logging.Logger) -> str:
    """Put the old model's column back from its backup table, with an index, swapped in atomically."""
    with db.connect() as conn:
        state = migration.read_state(conn)
    table = state.table
    backup = _backup_or_refuse(state, dimensions)
    recorded = RecordedModel(backup.model, backup.dimensions, backup.vector_type)
    column = f"{table.live_column}_{dimensions}"
    if state.has(column) and state.models.get(column) != recorded:
        # Reusing it would put the backup's vectors beside another model's in one column.
        holder = state.models.get(column)
        owner = f"{holder.model!r} vectors" if holder else "a column that is not the pipeline's"
        raise MigrationError(
            f"{table.name}.{column} holds {owner}: remove it (rollback_staging_column) before restoring"
        )
    with db.connect() as conn:
        conn.execute(sql.add_vector_column(table, column, dimensions, backup.vector_type))
        conn.execute(sql.UPSERT_MODEL, recorded.row(table.schema, table.name, column))
        conn.execute(sql.restore_from_backup(table, backup.relation, column, table.live_column))
    with db.connect() as conn:
        state = migration.read_state(conn)
    index = ensure_index(db, state, column, replace(migration.index, vector_type=backup.vector_type, lists=None), log)
    recorded = replace(recorded, index_type=index.method)
    live = state.columns.get(table.live_column)
    if live is not None and live.is_vector and migration.keep_old_embeddings:
        back_up_old_vectors(db, state, live.vector_dimensions)
    with db.connect() as conn:
        conn.execute(sql.SWAP_LOCK_TIMEOUT)
        conn.execute(sql.lock_table(table))
        promote(conn, table, column, recorded, owned=recorded == migration.recorded)
    return backup.relation


def _backup_or_refuse(state: TableState, dimensions: int) -> Backup:
    if dimensions not in state.backups:
        kept = ", ".join(f"{d} dims ({b.model})" for d, b in sorted(state.backups.items())) or "none"
        raise MigrationError(f"No backup of {dimensions}-dim vectors for {state.table.name}: kept backups: {kept}")
    return state.backups[dimensions]
