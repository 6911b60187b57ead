"""bge-pipeline: move a pgvector table's embeddings to a new model, as a Dagster asset graph."""

from bge_pipeline.definitions import defs
from bge_pipeline.search import search_segments
from bge_pipeline.service import EmbeddingsService

__all__ = ["defs", "EmbeddingsService", "search_segments"]
