"""bge-pipeline: move a pgvector table's embeddings to a new model, as a Dagster asset graph.

`definitions` (what `dagster ... -m bge_pipeline` loads) is imported on first use, so
`from bge_pipeline import EmbeddingsService` imports no Dagster and reads no setting. It is not called `defs`:
that name is the `bge_pipeline.defs` package, which Python sets on this module once it is imported.
"""

from typing import Any

from bge_pipeline.core.search import search_segments
from bge_pipeline.core.service import EmbeddingsService

__all__ = ["EmbeddingsService", "definitions", "search_segments"]


def __getattr__(name: str) -> Any:
    # `dagster ... -m bge_pipeline` finds `definitions` through dir() and getattr(), as it does a module attribute.
    if name == "definitions":
        from bge_pipeline.defs.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "definitions"])
