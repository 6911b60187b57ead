"""The index on the model's column (INDEX_TYPE: IVFFLAT or HNSW), with the operator class the queries use."""

import dagster as dg

from bge_pipeline.core.migration import build_index
from bge_pipeline.defs.assets.column import GROUP
from bge_pipeline.defs.assets.embeddings import embeddings
from bge_pipeline.defs.resources import DatabaseResource, MigrationResource


@dg.asset(
    deps=[embeddings],
    group_name=GROUP,
    kinds={"postgres", "pgvector"},
    owners=["team:search"],
    description="INDEX_TYPE (IVFFLAT, the default, or HNSW) under the cosine operator class of VECTOR_TYPE, matching "
    "`<=>`, on the new vectors: built CONCURRENTLY before the swap so search never lacks an index. Changing "
    "INDEX_TYPE builds the new index beside the old one, then drops the old one.",
)
def embedding_index(
    context: dg.AssetExecutionContext, database: DatabaseResource, migration: MigrationResource
) -> dg.MaterializeResult:
    result = build_index(database.get(), migration.target(), context.log)
    return dg.MaterializeResult(
        metadata={
            "index": dg.MetadataValue.text(result.name),
            "column": dg.MetadataValue.text(result.column),
            "method": dg.MetadataValue.text(result.method),
            "operator_class": dg.MetadataValue.text(result.opclass),
            **{name: dg.MetadataValue.int(value) for name, value in result.options.items()},
            "replaced": dg.MetadataValue.text(", ".join(result.retired) or "-"),
            "rows": dg.MetadataValue.int(result.rows),
            "built": dg.MetadataValue.bool(result.built),
            "build_seconds": dg.MetadataValue.float(round(result.seconds, 3)),
        }
    )
