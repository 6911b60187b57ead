"""Phase 3: the staging column becomes `embedding`, in one transaction, with its index already built."""

import dagster as dg

from bge_pipeline.assets.column import GROUP
from bge_pipeline.assets.index import embedding_index
from bge_pipeline.database import DatabaseResource
from bge_pipeline.encoder import EncoderResource
from bge_pipeline.migration import MigrationResource, swap_columns


@dg.asset(
    deps=[embedding_index],
    pool="gpu",
    group_name=GROUP,
    kinds={"postgres", "pgvector"},
    owners=["team:search"],
    description="Phase 3: drops the old column and renames the staging column and its index to the live names, atomically.",
)
def live_embedding_column(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    encoder: EncoderResource,
    migration: MigrationResource,
) -> dg.MaterializeResult:
    result = swap_columns(database, migration, encoder.get(), context.log)
    if not result.swapped:
        context.log.info(f"{migration.table}.{result.column} already holds {migration.model} vectors: nothing to swap")
    return dg.MaterializeResult(
        metadata={
            "swapped": dg.MetadataValue.bool(result.swapped),
            "column": dg.MetadataValue.text(result.column),
            "index": dg.MetadataValue.text(result.index),
            "rows_embedded_before_swap": dg.MetadataValue.int(result.rows_topped_up),
            "old_vectors_kept_in": dg.MetadataValue.text(result.backup_table or "-"),
            "old_dimensions": dg.MetadataValue.int(result.old_dimensions or 0),
            "model": dg.MetadataValue.text(migration.model),
        }
    )
