"""EmbeddingsService: the seed's API, backed by the same model loading as the pipeline's resources."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar, Optional

import numpy as np

from bge_pipeline.core.encoder import Encoder, Reranker, encoder_for, reranker_for
from bge_pipeline.core.settings import Settings


class EmbeddingsService:
    """The guide's `EmbeddingsService`: class methods over one process-wide encoder and reranker.

    Models come from encoder_for / reranker_for, as the pipeline's resources do, so the service, a Dagster run
    and a test in one process load each model once; an application that searches often pays the load once.
    """

    _settings: ClassVar[Optional[Settings]] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def init_from_env(cls) -> None:
        """Read the settings from the environment (and `.env`) and load the encoder now."""
        cls.init(Settings.from_env())

    @classmethod
    def init(cls, settings: Settings) -> None:
        """Use `settings`; the encoder loads here so a bad EMBEDDING_MODEL fails at start-up, not on a request."""
        with cls._lock:
            cls._settings = settings
        cls.encoder()
        if settings.enable_reranker:
            cls.reranker()

    @classmethod
    def settings(cls) -> Settings:
        """The settings the service was initialised with."""
        if cls._settings is None:
            raise RuntimeError("EmbeddingsService is not initialised: call EmbeddingsService.init_from_env() first")
        return cls._settings

    @classmethod
    def encoder(cls) -> Encoder:
        """The loaded encoder, shared with the pipeline's encoder resource."""
        return encoder_for(cls.settings())

    @classmethod
    def reranker(cls) -> Reranker:
        """The loaded cross-encoder (RERANKER_MODEL), shared with the pipeline's reranker resource."""
        return reranker_for(cls.settings())

    @classmethod
    def encode_texts(cls, texts: Sequence[str], batch_size: Optional[int] = None) -> np.ndarray:
        """A float32 array of shape (len(texts), EMBEDDING_DIMENSIONS), each row L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of texts; wrap a single text in a list")
        return cls.encoder().encode(list(texts), batch_size=batch_size)

    @classmethod
    def encode_query(cls, query: str) -> np.ndarray:
        """One query's vector, with the model's query instruction (Settings.query_prefix) in front."""
        return cls.encoder().encode([query], prefix=cls.settings().query_prefix)[0]

    @classmethod
    def rerank(cls, query: str, texts: Sequence[str], top_k: int = 20) -> list[int]:
        """Indices into `texts`, best first by the cross-encoder, at most `top_k` of them."""
        if not texts:
            return []
        return cls.reranker().rerank(query, list(texts), top_k=top_k)

    @classmethod
    def reset(cls) -> None:
        """Forget the settings (the loaded models stay cached in the process)."""
        with cls._lock:
            cls._settings = None
