"""Phase 3: the staging column becomes `embedding`, in one transaction, with its index already built."""

from collections.abc import Iterator

import dagster as dg

from bge_pipeline.core.migration import swap_columns
from bge_pipeline.defs.assets.column import GROUP
from bge_pipeline.defs.assets.index import embedding_index
from bge_pipeline.defs.resources import DatabaseResource, EncoderResource, MigrationResource


@dg.asset(
    deps=[embedding_index],
    pool="gpu",
    group_name=GROUP,
    kinds={"postgres", "pgvector"},
    owners=["team:search"],
    description="Phase 3: drops the old column and renames the staging column and its index to the live names, atomically.",
    # Nothing to swap (the table is migrated) is no new materialization: its checks, which load the model to search,
    # keep their last results, and a no-op `embeddings*` loads no model.
    output_required=False,
)
def live_embedding_column(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    encoder: EncoderResource,
    migration: MigrationResource,
) -> Iterator[dg.MaterializeResult]:
    result = swap_columns(database.get(), migration.target(), encoder.get, context.log)
    if not result.swapped:
        context.log.info(
            f"{migration.embedding_table}.{result.column} already holds {migration.embedding_model} vectors: nothing to swap"
        )
        return
    yield dg.MaterializeResult(
        metadata={
            "column": dg.MetadataValue.text(result.column),
            "index": dg.MetadataValue.text(result.index),
            "rows_embedded_before_swap": dg.MetadataValue.int(result.rows_topped_up),
            "old_vectors_kept_in": dg.MetadataValue.text(result.backup_table or "-"),
            "old_dimensions": dg.MetadataValue.int(result.old_dimensions or 0),
            "model": dg.MetadataValue.text(migration.embedding_model),
        }
    )
