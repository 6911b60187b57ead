"""The IVFFLAT index on the model's column, with the operator class the queries use."""

import dagster as dg

from bge_pipeline.core.migration import build_index
from bge_pipeline.core.sql import INDEX_OPCLASS
from bge_pipeline.defs.assets.column import GROUP
from bge_pipeline.defs.assets.embeddings import embeddings
from bge_pipeline.defs.resources import DatabaseResource, MigrationResource


@dg.asset(
    deps=[embeddings],
    group_name=GROUP,
    kinds={"postgres", "pgvector"},
    owners=["team:search"],
    description="IVFFLAT (vector_cosine_ops, matching `<=>`) on the new vectors, built before the swap so search never lacks an index.",
)
def embedding_index(
    context: dg.AssetExecutionContext, database: DatabaseResource, migration: MigrationResource
) -> dg.MaterializeResult:
    result = build_index(database.get(), migration.target(), context.log)
    return dg.MaterializeResult(
        metadata={
            "index": dg.MetadataValue.text(result.name),
            "column": dg.MetadataValue.text(result.column),
            "operator_class": dg.MetadataValue.text(INDEX_OPCLASS),
            "lists": dg.MetadataValue.int(result.lists),
            "rows": dg.MetadataValue.int(result.rows),
            "built": dg.MetadataValue.bool(result.built),
            "build_seconds": dg.MetadataValue.float(round(result.seconds, 3)),
        }
    )
