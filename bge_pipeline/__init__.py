"""bge-pipeline: move a pgvector table's embeddings to a new model, as a Dagster asset graph."""

from bge_pipeline.definitions import defs

__all__ = ["defs"]
