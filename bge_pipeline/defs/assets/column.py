"""Phase 1: the staging column that receives the new model's vectors."""

import dagster as dg

from bge_pipeline.core.migration import prepare_staging_column
from bge_pipeline.defs.resources import DatabaseResource, EncoderResource, MigrationResource

GROUP = "embedding_migration"


@dg.asset(
    group_name=GROUP,
    kinds={"postgres", "pgvector"},
    owners=["team:search"],
    description="Phase 1: the `embedding_<dims>` column for the configured model, recorded with its model name.",
)
def staging_embedding_column(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    encoder: EncoderResource,
    migration: MigrationResource,
) -> dg.MaterializeResult:
    # The model loads before a column is made, so one of another dimension is refused with nothing created.
    result = prepare_staging_column(database.get(), migration.target(), encoder.get)
    if result.migrated:
        context.log.info(
            f"{migration.embedding_table}.{result.column} already holds {migration.embedding_model} vectors: nothing to stage"
        )
    return dg.MaterializeResult(
        metadata={
            "column": dg.MetadataValue.text(result.column),
            "created": dg.MetadataValue.bool(result.created),
            "already_migrated": dg.MetadataValue.bool(result.migrated),
            "model": dg.MetadataValue.text(migration.embedding_model),
            "dimensions": dg.MetadataValue.int(migration.embedding_dimensions),
            "database": dg.MetadataValue.text(database.get().description),
        }
    )
