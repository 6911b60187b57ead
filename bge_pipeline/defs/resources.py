"""Settings -> resources: each resource carries the settings it needs, under the settings' own names."""

from __future__ import annotations

from typing import Any, Optional

import dagster as dg
from pydantic import PrivateAttr

from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import Encoder, Reranker, encoder_for, reranker_for
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.settings import Settings


class SettingsResource(dg.ConfigurableResource):
    """A resource whose fields are settings: built from a Settings by name, and read back as one."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Any:
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})

    def settings(self) -> Settings:
        """These fields as Settings (the rest at their defaults), so core code reads them under one name."""
        return Settings.model_validate({name: getattr(self, name) for name in type(self).model_fields})


class DatabaseResource(SettingsResource):
    """The PostgreSQL database that holds the embeddings table; the embedded server when no URL is given."""

    database_url: Optional[str] = None
    embedded_pgdata: str = ".bge_pipeline/pgdata"

    _database: Optional[Database] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.get().open(context.log)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.get().dispose()

    def get(self) -> Database:
        if self._database is None:
            self._database = Database(self.database_url, self.embedded_pgdata)
        return self._database


class EncoderResource(SettingsResource):
    """The sentence-transformers encoder, loaded once per process on first use (steps that never encode never load)."""

    embedding_model: str
    embedding_dimensions: int
    embedding_device: str = "auto"
    embedding_batch_size: Optional[int] = None
    embedding_backend: str = "auto"
    embedding_query_prefix: Optional[str] = None

    def get(self) -> Encoder:
        return encoder_for(self.settings())

    @property
    def query_prefix(self) -> str:
        return self.settings().query_prefix


class RerankerResource(SettingsResource):
    """The cross-encoder reranker, loaded on first use, and how many candidates the query path retrieves."""

    reranker_model: str
    embedding_device: str = "auto"
    rerank_batch_size: int = 64
    rerank_top_k: int = 200

    def get(self) -> Reranker:
        return reranker_for(self.settings())


class MigrationResource(SettingsResource):
    """Which table and columns move to which model, and how the backfill batches, retries and indexes."""

    embedding_model: str
    embedding_dimensions: int
    embedding_schema: str = "public"
    embedding_table: str = "segments"
    embedding_id_column: str = "id"
    embedding_text_column: str = "text"
    embedding_column: str = "embedding"
    backfill_partitions: int = 8
    backfill_batch_rows: int = 1000
    backfill_max_retries: int = 3
    ivfflat_lists: Optional[int] = None
    index_type: str = "ivfflat"
    hnsw_m: Optional[int] = None
    hnsw_ef_construction: Optional[int] = None
    vector_type: str = "vector"
    int8_min_agreement: float = 0.95
    keep_old_embeddings: bool = True
    disk_check: bool = True
    reembed_min_pending: int = 1000

    def target(self) -> MigrationTarget:
        return MigrationTarget.from_settings(self.settings())


def build_resources(settings: Settings, from_environment: bool = True) -> dict[str, dg.ConfigurableResource]:
    """The pipeline's resources for `settings`.

    With `from_environment`, the database URL is passed as an EnvVar, so the UI shows the variable's name and
    never its value (the password).
    """
    database = DatabaseResource.from_settings(settings)
    if settings.database_url and from_environment:
        database = DatabaseResource(database_url=dg.EnvVar("DATABASE_URL"), embedded_pgdata=settings.embedded_pgdata)
    return {
        "database": database,
        "encoder": EncoderResource.from_settings(settings),
        "reranker": RerankerResource.from_settings(settings),
        "migration": MigrationResource.from_settings(settings),
    }
