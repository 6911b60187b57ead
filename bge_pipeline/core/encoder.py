"""The encoder and reranker: model loading, device choice and batching, shared by the pipeline and the API."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from bge_pipeline.core.autotune import tune_cpu
from bge_pipeline.core.runtimes import RuntimeUnavailable, attach_runtime, resolve_backend
from bge_pipeline.core.settings import Settings

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int], None]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the setting."""


class DimensionMismatchError(ValueError):
    """The model's vectors do not have EMBEDDING_DIMENSIONS components."""


def resolve_device(requested: str) -> str:
    """`auto` means cuda when torch sees a GPU; an explicit `cuda` without one is an error, not a silent CPU run."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"EMBEDDING_DEVICE={requested!r} but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
            "install a CUDA build of torch, or set EMBEDDING_DEVICE=auto or cpu"
        )
    return requested


def default_batch_size(device: str) -> int:
    """256 on a GPU, as the guide's tuning table says; 16 on a CPU, not its 64: on SOTU segments, 16 encodes
    15-25% faster than 32 and 64 with every CPU runtime measured (docs/performance.md)."""
    return 256 if device.startswith("cuda") else 16


# On a CPU the cost of a forward pass can grow faster than its padded tokens: measured on SOTU segments (~49 tokens),
# 16 rows a pass (~800 tokens) beat 64 rows by 25-30% for the bge-small shape. So EMBEDDING_BATCH_SIZE is how many
# rows an encode call takes, and a pass holds at most this many padded tokens; with EMBEDDING_BACKEND=auto the
# budget is one of the pass shapes autotune times against wider passes and whole batches, per model and CPU.
CPU_TOKENS_PER_PASS = 1024


def rows_within_budget(token_lengths: Sequence[int], start: int, max_rows: int, token_budget: int) -> int:
    """How many texts from `start` fit one forward pass: at most `max_rows`, padded to the longest of them within
    `token_budget` tokens, and always at least one."""
    rows, longest = 0, 0
    while rows < max_rows and start + rows < len(token_lengths):
        longest = max(longest, token_lengths[start + rows])
        if rows and (rows + 1) * longest > token_budget:
            break
        rows += 1
    return rows


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def _model_source(setting: str, model: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{setting}={model!r} is a file: point it at a model directory")
        return str(path.resolve())
    return model


def load_sentence_transformer(model: str, device: str, backend: str = "auto") -> Any:
    """Load a sentence-transformers model from a local directory or the Hugging Face cache.

    `backend` "onnx", "onnx-int8" or "openvino" keeps sentence-transformers' tokenizer, pooling and normalisation
    and runs only the transformer through an ONNX graph exported once from the torch weights, "torch-bf16" runs it
    under bf16 autocast (bge_pipeline.runtimes); "auto" is onnx on a CPU when onnxruntime is installed, torch
    otherwise (Encoder.load tunes `auto` on a CPU instead).
    """
    from sentence_transformers import SentenceTransformer

    source = _model_source("EMBEDDING_MODEL", model)
    try:
        loaded = SentenceTransformer(source, device=device)
    except Exception as error:  # noqa: BLE001 - every failure here has the same remedy
        raise ModelLoadError(
            f"EMBEDDING_MODEL={model!r} could not be loaded ({type(error).__name__}: {_first_line(error)}); "
            "set EMBEDDING_MODEL to a local directory that holds a sentence-transformers model"
        ) from error
    runtime = resolve_backend(backend, device)
    if runtime != "torch":
        try:
            runtime = attach_runtime(loaded, source, runtime)
        except RuntimeUnavailable as error:
            log.warning(f"{error}: using torch")
            runtime = "torch"
    loaded.bge_pipeline_backend = runtime  # type: ignore[assignment]  # what actually runs, after any fallback
    if device.startswith("cuda") and runtime == "torch":
        loaded.half()  # fp16 on GPU: twice the throughput, cosine agreement with fp32 above 0.999
    return loaded


def load_cross_encoder(model: str, device: str) -> Any:
    """Load a cross-encoder reranker from a local directory or the Hugging Face cache."""
    from sentence_transformers import CrossEncoder

    source = _model_source("RERANKER_MODEL", model)
    try:
        loaded = CrossEncoder(source, device=device)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(
            f"RERANKER_MODEL={model!r} could not be loaded ({type(error).__name__}: {_first_line(error)}); "
            "set RERANKER_MODEL to a local directory that holds a cross-encoder"
        ) from error
    if device.startswith("cuda"):
        loaded.model.half()
    return loaded


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


class Encoder:
    """A loaded sentence-transformers model that returns L2-normalised float32 vectors."""

    def __init__(
        self, model: Any, name: str, device: str, batch_size: int, dimensions: int, backend: str = "auto"
    ) -> None:
        self.model = model
        self.backend = backend
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.dimensions = dimensions
        self._lock = threading.Lock()  # one encode at a time: the model is not re-entrant on a GPU
        # A GPU takes the whole batch in one pass (halved on out-of-memory); a CPU is held to a token budget.
        self.tokens_per_pass: Optional[int] = None if device.startswith("cuda") else CPU_TOKENS_PER_PASS
        self.tuning: Optional[str] = None  # what EMBEDDING_BACKEND=auto measured and chose on a CPU

    @classmethod
    def load(
        cls,
        model: str,
        dimensions: Optional[int],
        device: str = "auto",
        batch_size: Optional[int] = None,
        backend: str = "auto",
    ) -> "Encoder":
        """Load the model and refuse it, before anything is written, if its dimension is not `dimensions`
        (None: whatever it produces, for measuring)."""
        resolved = resolve_device(device)
        # A CPU's fastest runtime and pass size vary by model and chip: `auto` loads torch and tune_cpu attaches the
        # runtime it remembers or measures, so no other runtime is set up only to be replaced.
        tuned = backend == "auto" and resolved == "cpu"
        loaded = load_sentence_transformer(model, resolved, "torch" if tuned else backend)
        produced = loaded.get_embedding_dimension()
        if produced is None:
            produced = int(loaded.encode(["dimension probe"], convert_to_numpy=True).shape[1])
        if dimensions is not None and produced != dimensions:
            raise DimensionMismatchError(
                f"EMBEDDING_DIMENSIONS={dimensions} but EMBEDDING_MODEL={model!r} produces {produced}-dim vectors: "
                f"set EMBEDDING_DIMENSIONS={produced} or choose a {dimensions}-dim model"
            )
        runtime = getattr(loaded, "bge_pipeline_backend", backend)
        log.info(f"Loaded {model} on {resolved} ({runtime}), {produced} dims")
        encoder = cls(loaded, model, resolved, batch_size or default_batch_size(resolved), produced, runtime)
        if tuned:
            source = _model_source("EMBEDDING_MODEL", model)
            encoder.tuning = tune_cpu(encoder, source, CPU_TOKENS_PER_PASS, batch_size).describe()
        return encoder

    def encode(
        self,
        texts: Sequence[str],
        batch_size: Optional[int] = None,
        prefix: str = "",
        progress: Optional[ProgressCallback] = None,
    ) -> np.ndarray:
        """Encode `texts` into an (n, dims) float32 array; on CUDA out-of-memory, halve the batch and go on.

        Identical texts are encoded once (tables repeat boilerplate, headers, re-ingested documents): the model sees
        each distinct text, and every copy gets its vector.
        """
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        first_of: dict[str, int] = {}
        copies = np.fromiter((first_of.setdefault(text, len(first_of)) for text in texts), dtype=np.int64)
        distinct = list(first_of)
        # Longest first, like sentence-transformers does inside one call, so each chunk pads to similar lengths.
        order = np.argsort([-len(text) for text in distinct], kind="stable")
        ordered = [prefix + distinct[i] for i in order]
        output = np.empty((len(distinct), self.dimensions), dtype=np.float32)
        size = batch_size or self.batch_size
        start = 0
        with self._lock:  # the tokenizer too: a fast tokenizer shared by threads fails with "Already borrowed"
            lengths = self._token_lengths(ordered) if self.tokens_per_pass else None
            while start < len(ordered):
                rows = size if lengths is None else rows_within_budget(lengths, start, size, self.tokens_per_pass or 0)
                chunk = ordered[start : start + rows]
                try:
                    vectors = self.model.encode(
                        chunk,
                        batch_size=len(chunk),
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                except RuntimeError as error:
                    if not _is_out_of_memory(error) or size == 1:
                        raise
                    size = self._shrink_after_oom(size)
                    continue
                output[order[start : start + len(chunk)]] = np.asarray(vectors, dtype=np.float32)
                start += len(chunk)
                if progress:
                    progress(len(chunk))
        if progress and len(texts) > len(distinct):
            progress(len(texts) - len(distinct))
        return output[copies]

    def _token_lengths(self, texts: list[str]) -> list[int]:
        """Each text's length in the model's tokens, as its forward pass would see it (truncated to its maximum)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            return [len(text) // 4 + 2 for text in texts]  # ~4 characters a token in English, plus [CLS] and [SEP]
        limit = getattr(self.model, "max_seq_length", None) or 512
        encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit)
        return [len(ids) for ids in encoded["input_ids"]]

    def _shrink_after_oom(self, size: int) -> int:
        import torch

        torch.cuda.empty_cache()
        smaller = max(1, size // 2)
        log.warning(f"CUDA out of memory at batch size {size}: continuing with EMBEDDING_BATCH_SIZE={smaller}")
        self.batch_size = min(self.batch_size, smaller)
        return smaller


# A loaded encoder, or how to load one: steps that find nothing to encode never pay for the model.
EncoderSource = Union[Encoder, Callable[[], Encoder]]


def resolve_encoder(source: EncoderSource) -> Encoder:
    """The encoder itself, loading it now if `source` says how."""
    return source if isinstance(source, Encoder) else source()


class Reranker:
    """A loaded cross-encoder that orders candidate texts for a query."""

    def __init__(self, model: Any, name: str, batch_size: int) -> None:
        self.model = model
        self.name = name
        self.batch_size = batch_size

    @classmethod
    def load(cls, model: str, device: str = "auto", batch_size: int = 64) -> "Reranker":
        return cls(load_cross_encoder(model, resolve_device(device)), model, batch_size)

    def scores(self, query: str, texts: Sequence[str], batch_size: Optional[int] = None) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        pairs = [(query, text) for text in texts]
        raw = self.model.predict(pairs, batch_size=batch_size or self.batch_size, show_progress_bar=False)
        return np.asarray(raw, dtype=np.float32).reshape(len(texts))

    def rerank(self, query: str, texts: Sequence[str], top_k: int = 20) -> list[int]:
        """Indices of `texts`, best first, at most `top_k` of them."""
        scores = self.scores(query, texts)
        return [int(i) for i in np.argsort(-scores, kind="stable")[:top_k]]


# One load per process and configuration: a run's steps, the API and a test session share the model.
_load_lock = threading.Lock()


@lru_cache(maxsize=4)
def _cached_encoder(*key: Any) -> Encoder:
    return Encoder.load(*key)


@lru_cache(maxsize=2)
def _cached_reranker(*key: Any) -> Reranker:
    return Reranker.load(*key)


def shared_encoder(
    model: str, dimensions: int, device: str = "auto", batch_size: Optional[int] = None, backend: str = "auto"
) -> Encoder:
    """The process's encoder for this configuration, loaded on first use."""
    with _load_lock:
        return _cached_encoder(model, dimensions, device, batch_size, backend)


def shared_reranker(model: str, device: str = "auto", batch_size: int = 64) -> Reranker:
    """The process's reranker for this configuration, loaded on first use."""
    with _load_lock:
        return _cached_reranker(model, device, batch_size)


def encoder_for(settings: Settings) -> Encoder:
    """The process's encoder for the configured EMBEDDING_* settings."""
    return shared_encoder(
        settings.embedding_model,
        settings.embedding_dimensions,
        settings.embedding_device,
        settings.embedding_batch_size,
        settings.embedding_backend,
    )


def reranker_for(settings: Settings) -> Reranker:
    """The process's cross-encoder for RERANKER_MODEL."""
    return shared_reranker(settings.reranker_model, settings.embedding_device, settings.rerank_batch_size)
