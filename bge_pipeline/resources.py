"""Settings -> resources: the one place where configuration becomes Dagster resources."""

from typing import Any

import dagster as dg

from bge_pipeline.database import DatabaseResource
from bge_pipeline.encoder import EncoderResource, RerankerResource
from bge_pipeline.migration import MigrationResource
from bge_pipeline.settings import Settings


def build_resources(settings: Settings, from_environment: bool = True) -> dict[str, Any]:
    """The pipeline's resources for `settings`.

    With `from_environment`, the database URL is passed as an EnvVar, so the UI shows the variable's name and
    never its value (the password).
    """
    database_url: Any = settings.database_url
    if settings.database_url and from_environment:
        database_url = dg.EnvVar("DATABASE_URL")
    return {
        "database": DatabaseResource(database_url=database_url, embedded_pgdata=settings.embedded_pgdata),
        "encoder": EncoderResource(
            model=settings.embedding_model,
            dimensions=settings.embedding_dimensions,
            device=settings.embedding_device,
            batch_size=settings.embedding_batch_size,
            backend=settings.embedding_backend,
            query_prefix=settings.query_prefix,
        ),
        "reranker": RerankerResource(
            model=settings.reranker_model,
            enabled=settings.enable_reranker,
            device=settings.embedding_device,
            batch_size=settings.rerank_batch_size,
        ),
        "migration": MigrationResource(
            schema_name=settings.embedding_schema,
            table=settings.embedding_table,
            id_column=settings.embedding_id_column,
            text_column=settings.embedding_text_column,
            embedding_column=settings.embedding_column,
            model=settings.embedding_model,
            dimensions=settings.embedding_dimensions,
            partitions=settings.backfill_partitions,
            batch_rows=settings.backfill_batch_rows,
            max_retries=settings.backfill_max_retries,
            ivfflat_lists=settings.ivfflat_lists,
            keep_old_embeddings=settings.keep_old_embeddings,
        ),
    }
