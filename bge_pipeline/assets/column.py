"""Phase 1: the staging column that receives the new model's vectors."""

import dagster as dg

from bge_pipeline.database import DatabaseResource
from bge_pipeline.encoder import EncoderResource
from bge_pipeline.migration import MigrationResource, prepare_staging_column

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
    # Loading the model first refuses a model whose dimension differs from the column about to be created.
    model = encoder.get()
    result = prepare_staging_column(database, migration, model)
    if result.migrated:
        context.log.info(f"{migration.table}.{result.column} already holds {migration.model} vectors: nothing to stage")
    return dg.MaterializeResult(
        metadata={
            "column": dg.MetadataValue.text(result.column),
            "created": dg.MetadataValue.bool(result.created),
            "already_migrated": dg.MetadataValue.bool(result.migrated),
            "model": dg.MetadataValue.text(migration.model),
            "dimensions": dg.MetadataValue.int(migration.dimensions),
            "database": dg.MetadataValue.text(database.description),
        }
    )
