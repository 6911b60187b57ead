"""Asset checks: dimensions, NULL counts and the index, each with its figures as metadata."""

from typing import Optional

import dagster as dg

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import MigrationError, TableState
from bge_pipeline.core.database import scalar
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.defs.assets.embeddings import embeddings
from bge_pipeline.defs.assets.index import embedding_index
from bge_pipeline.defs.assets.swap import live_embedding_column
from bge_pipeline.defs.resources import DatabaseResource, MigrationResource


def _model_column(database: DatabaseResource, target: MigrationTarget) -> tuple[TableState, Optional[str]]:
    with database.get().connect() as conn:
        state = target.read_state(conn)
    try:
        return state, target.writable_column(state)
    except MigrationError:
        return state, None


def _no_column(target: MigrationTarget) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False,
        description=f"{target.table} has no column holding {target.model} vectors",
        metadata={"model": dg.MetadataValue.text(target.model)},
    )


@dg.asset_check(
    asset=embeddings,
    description="The column is VECTOR_TYPE(EMBEDDING_DIMENSIONS) (vector or halfvec) and every stored vector has "
    "that many components (the declared type proves it without reading a row; a bare `vector` column is scanned).",
)
def embedding_dimensions(database: DatabaseResource, migration: MigrationResource) -> dg.AssetCheckResult:
    target = migration.target()
    state, column = _model_column(database, target)
    if column is None:
        return _no_column(target)
    declared = state.columns[column].vector_dimensions
    wrong = 0
    if declared is None:  # PostgreSQL enforces a declared dimension; only a bare `vector` can hold mixed sizes
        with database.get().connect() as conn:
            wrong = scalar(conn, sql.count_wrong_dimensions(state.table, column), (target.dimensions,))
    declared_type = state.columns[column].typname
    return dg.AssetCheckResult(
        passed=declared == target.dimensions and wrong == 0 and declared_type == target.vector_type,
        metadata={
            "column": dg.MetadataValue.text(column),
            "vector_type": dg.MetadataValue.text(declared_type),
            "declared_dimensions": dg.MetadataValue.int(declared or 0),
            "expected_dimensions": dg.MetadataValue.int(target.dimensions),
            "vectors_with_wrong_dimensions": dg.MetadataValue.int(wrong),
        },
    )


@dg.asset_check(
    asset=embeddings,
    blocking=True,
    description="No row with text lacks a vector: the swap waits for this.",
)
def embedding_null_count(database: DatabaseResource, migration: MigrationResource) -> dg.AssetCheckResult:
    target = migration.target()
    state, column = _model_column(database, target)
    if column is None:
        return _no_column(target)
    with database.get().connect() as conn:
        total, with_text, missing, null_text = conn.execute(sql.count_rows(state.table, column)).fetchone() or (0,) * 4
    return dg.AssetCheckResult(
        passed=missing == 0,
        description=None if missing == 0 else f"{missing} rows with text have no vector in {column}",
        metadata={
            "column": dg.MetadataValue.text(column),
            "rows_total": dg.MetadataValue.int(total),
            "rows_with_text": dg.MetadataValue.int(with_text),
            "rows_missing_vector": dg.MetadataValue.int(missing),
            "rows_null_text": dg.MetadataValue.int(null_text),
        },
    )


@dg.asset_check(
    asset=embedding_index,
    blocking=True,
    description="The INDEX_TYPE index (IVFFLAT or HNSW) exists, is valid and uses the cosine operator class of the "
    "column's type (vector_cosine_ops or halfvec_cosine_ops), the one `<=>` needs.",
)
def embedding_index_usable(database: DatabaseResource, migration: MigrationResource) -> dg.AssetCheckResult:
    target = migration.target()
    state, column = _model_column(database, target)
    if column is None:
        return _no_column(target)
    name = state.table.index_name(column, target.index_type)
    index = state.index(name)
    return dg.AssetCheckResult(
        passed=bool(index and target.index.met_by(index, column)),
        metadata={
            "index": dg.MetadataValue.text(name),
            "exists": dg.MetadataValue.bool(index is not None),
            "valid": dg.MetadataValue.bool(bool(index and index.valid)),
            "method": dg.MetadataValue.text(index.method if index else "-"),
            "operator_class": dg.MetadataValue.text(index.opclass if index else "-"),
            "parameters": dg.MetadataValue.text(", ".join(index.options) if index else "-"),
        },
    )


@dg.asset_check(
    asset=live_embedding_column,
    description="After the swap, `embedding` holds the configured model's vectors at its dimension, with its index.",
)
def live_embedding_model(database: DatabaseResource, migration: MigrationResource) -> dg.AssetCheckResult:
    target = migration.target()
    with database.get().connect() as conn:
        state = target.read_state(conn)
    live = state.table.live_column
    recorded = state.models.get(live)
    column = state.columns.get(live)
    index = state.index(state.table.index_name(live, target.index_type))
    passed = (
        recorded is not None
        and recorded.model == target.model
        and column is not None
        and column.vector_dimensions == target.dimensions
        and column.typname == target.vector_type
        and not state.has(state.table.staging_column)
        and index is not None
        and index.valid
    )
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "recorded_model": dg.MetadataValue.text(recorded.model if recorded else "-"),
            "declared_type": dg.MetadataValue.text(column.type if column else "-"),
            "declared_dimensions": dg.MetadataValue.int((column.vector_dimensions or 0) if column else 0),
            "index": dg.MetadataValue.text(index.describe() if index else "-"),
            "staging_column_left": dg.MetadataValue.bool(state.has(state.table.staging_column)),
            "index_valid": dg.MetadataValue.bool(bool(index and index.valid)),
        },
    )
