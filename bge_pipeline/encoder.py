"""The encoder and reranker: model loading, device choice and batching, shared by the pipeline and the API."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import dagster as dg
import numpy as np

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
    """The guide's tuning table: 256 on a GPU, 64 on a CPU."""
    return 256 if device.startswith("cuda") else 64


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def _model_source(setting: str, model: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{setting}={model!r} is a file: point it at a model directory")
        return str(path.resolve())
    return model


def load_sentence_transformer(model: str, device: str, backend: str = "torch") -> Any:
    """Load a sentence-transformers model from a local directory or the Hugging Face cache.

    `backend` "onnx" or "openvino" keeps sentence-transformers' tokenizer, pooling and normalisation and runs
    only the transformer through an ONNX graph exported once from the torch weights (see `attach_runtime`);
    "auto" is onnx on a CPU when onnxruntime is installed, torch otherwise.
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
        attach_runtime(loaded, source, runtime)
    loaded.bge_pipeline_backend = runtime  # what actually runs, after any fallback
    if device.startswith("cuda") and runtime == "torch":
        loaded.half()  # fp16 on GPU: twice the throughput, cosine agreement with fp32 above 0.999
    return loaded


# --- the ONNX and OpenVINO backends -----------------------------------------------------------------------
#
# sentence-transformers' own backend="onnx" needs optimum-onnx, which pins transformers<4.58 and would downgrade
# transformers 5 and sentence-transformers 6 (shared/ENVIRONMENT.md); its openvino extra pulls a CUDA torch.
# So the transformer is exported here with torch.onnx (needs only `onnx`) and run with onnxruntime or OpenVINO,
# both of which install without touching torch or transformers.

ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
EXPORT_MARKER = "bge_pipeline_export.json"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _runtime_installed(backend: str) -> bool:
    import importlib.util

    module = {"onnx": "onnxruntime", "openvino": "openvino"}[backend]
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec("onnx") is not None


def resolve_backend(requested: str, device: str) -> str:
    """The backend that will run: onnx/openvino only on a CPU with the runtime installed, else torch (logged)."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        # Measured on this project's 2-core CPU machines: see docs/performance.md. On a GPU, torch fp16 wins.
        return "onnx" if not device.startswith("cuda") and _runtime_installed("onnx") else "torch"
    if requested not in ("onnx", "openvino"):
        raise ModelLoadError(f"EMBEDDING_BACKEND={requested!r} is not one of torch, onnx, openvino, auto")
    if device.startswith("cuda"):
        log.warning(f"EMBEDDING_BACKEND={requested} runs on the CPU only here: using torch (fp16) on {device}")
        return "torch"
    if not _runtime_installed(requested):
        package = "onnxruntime onnx" if requested == "onnx" else "openvino onnx"
        log.warning(
            f"EMBEDDING_BACKEND={requested} but {package.split()[0]} is not installed: falling back to torch "
            f"(pip install {package}, or pip install 'bge-pipeline[onnx]')"
        )
        return "torch"
    return requested


def onnx_export_path(source: str) -> Path:
    """`<model dir>/onnx/model.onnx` when the model folder is writable, else a folder under the cache."""
    local = Path(source)
    if local.is_dir():
        candidate = local / ONNX_DIR
        if (candidate / ONNX_FILE).is_file() or os.access(candidate if candidate.is_dir() else local, os.W_OK):
            return candidate / ONNX_FILE
    return _cached_export_path(source)


def _cached_export_path(source: str) -> Path:
    from bge_pipeline.shape_model import default_cache_dir

    digest = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    return default_cache_dir() / "onnx" / f"{Path(source).name}-{digest}" / ONNX_FILE


def _weights_signature(transformer: Any) -> dict[str, Any]:
    """What the export was made from: a changed checkpoint (same folder, new weights) triggers a new export."""
    folder = Path(getattr(transformer.model, "name_or_path", "") or "")
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    return {
        "files": {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files},
        "torch": _torch_version(),
    }


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def export_onnx(loaded: Any, source: str) -> Path:
    """Export the model's transformer to ONNX once; later loads reuse the file next to the model (or in the cache)."""
    import torch

    transformer = loaded[0]
    path = onnx_export_path(source)
    marker = path.parent / EXPORT_MARKER
    signature = _weights_signature(transformer)
    if path.is_file():
        if not marker.is_file():
            return path  # shipped with the model (e.g. by optimum): same inputs and output, use it as is
        try:
            if json.loads(marker.read_text()) == signature:
                return path
        except (OSError, ValueError):
            pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only model folder that os.access() did not catch (root on a read-only mount)
        path = _cached_export_path(source)
        marker = path.parent / EXPORT_MARKER
        path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bert = transformer.model

    class _LastHiddenState(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    sample = transformer.tokenizer(["an export probe", "a second, longer export probe text"], padding=True, return_tensors="pt")
    args = tuple(sample.get(name, torch.zeros_like(sample["input_ids"])).to("cpu") for name in ONNX_INPUTS)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*ONNX_INPUTS, "last_hidden_state")}
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    was_training = bert.training
    bert.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            # dynamo=False: the TorchScript exporter needs no onnxscript and exports BERT with dynamic axes.
            torch.onnx.export(
                _LastHiddenState(bert),
                args,
                str(partial),
                input_names=list(ONNX_INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes=dynamic,
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(partial, path)  # atomic: a concurrent loader sees the old file or the whole new one
        marker.write_text(json.dumps(signature))
    finally:
        bert.train(was_training)
        partial.unlink(missing_ok=True)
    log.info(f"Exported {source} to ONNX in {time.perf_counter() - started:.1f}s: {path}")
    return path


def attach_runtime(loaded: Any, source: str, backend: str) -> None:
    """Run `loaded`'s transformer through onnxruntime or OpenVINO; tokenising, pooling and normalising stay ST's."""
    import torch

    transformer = loaded[0]
    path = export_onnx(loaded, source)
    if backend == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}

        def infer(feeds: dict[str, np.ndarray]) -> np.ndarray:
            return session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0]

    else:
        import openvino as ov

        # f32: OpenVINO's CPU plugin otherwise runs in bf16/f16 where the CPU has it, which moves the vectors.
        compiled = ov.Core().compile_model(
            str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        )
        names = {name for port in compiled.inputs for name in port.get_names()}
        output = compiled.output(0)

        def infer(feeds: dict[str, np.ndarray]) -> np.ndarray:
            return compiled({k: v for k, v in feeds.items() if k in names})[output]

    def forward(input_ids: Any = None, attention_mask: Any = None, token_type_ids: Any = None, **_: Any) -> dict:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feeds = {
            "input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False),
            "token_type_ids": token_type_ids.cpu().numpy().astype(np.int64, copy=False),
        }
        return {"last_hidden_state": torch.from_numpy(np.ascontiguousarray(infer(feeds)))}

    # sentence-transformers' Transformer module calls `self.model.forward(**features)` and reads
    # `last_hidden_state`; an instance attribute shadows BertModel.forward, so only the transformer changes.
    transformer.model.forward = forward
    log.info(f"EMBEDDING_BACKEND={backend}: running the transformer from {path}")


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
        self, model: Any, name: str, device: str, batch_size: int, dimensions: int, backend: str = "torch"
    ) -> None:
        self.model = model
        self.backend = backend
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.dimensions = dimensions
        self._lock = threading.Lock()  # one encode at a time: the model is not re-entrant on a GPU

    @classmethod
    def load(
        cls,
        model: str,
        dimensions: int,
        device: str = "auto",
        batch_size: Optional[int] = None,
        backend: str = "torch",
    ) -> "Encoder":
        """Load the model and refuse it, before anything is written, if its dimension is not `dimensions`."""
        resolved = resolve_device(device)
        loaded = load_sentence_transformer(model, resolved, backend)
        produced = loaded.get_embedding_dimension()
        if produced is None:
            produced = int(loaded.encode(["dimension probe"], convert_to_numpy=True).shape[1])
        if produced != dimensions:
            raise DimensionMismatchError(
                f"EMBEDDING_DIMENSIONS={dimensions} but EMBEDDING_MODEL={model!r} produces {produced}-dim vectors: "
                f"set EMBEDDING_DIMENSIONS={produced} or choose a {dimensions}-dim model"
            )
        runtime = getattr(loaded, "bge_pipeline_backend", backend)
        log.info(f"Loaded {model} on {resolved} ({runtime}), {produced} dims")
        return cls(loaded, model, resolved, batch_size or default_batch_size(resolved), dimensions, runtime)

    @property
    def max_seq_length(self) -> int:
        return int(getattr(self.model, "max_seq_length", 512) or 512)

    def encode(
        self,
        texts: Sequence[str],
        batch_size: Optional[int] = None,
        prefix: str = "",
        progress: Optional[ProgressCallback] = None,
    ) -> np.ndarray:
        """Encode `texts` into an (n, dims) float32 array; on CUDA out-of-memory, halve the batch and go on."""
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        # Longest first, like sentence-transformers does inside one call, so each chunk pads to similar lengths.
        order = np.argsort([-len(text) for text in texts], kind="stable")
        ordered = [prefix + texts[i] for i in order]
        output = np.empty((len(texts), self.dimensions), dtype=np.float32)
        size = batch_size or self.batch_size
        start = 0
        with self._lock:
            while start < len(ordered):
                chunk = ordered[start : start + size]
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
        return output

    def _shrink_after_oom(self, size: int) -> int:
        import torch

        torch.cuda.empty_cache()
        smaller = max(1, size // 2)
        log.warning(f"CUDA out of memory at batch size {size}: continuing with EMBEDDING_BATCH_SIZE={smaller}")
        self.batch_size = min(self.batch_size, smaller)
        return smaller


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


class EncoderResource(dg.ConfigurableResource):
    """The sentence-transformers encoder, loaded once per run on first use (steps that never encode never load)."""

    model: str
    dimensions: int
    device: str = "auto"
    batch_size: Optional[int] = None
    backend: str = "torch"
    query_prefix: str = ""

    def get(self) -> Encoder:
        return shared_encoder(self.model, self.dimensions, self.device, self.batch_size, self.backend)


class RerankerResource(dg.ConfigurableResource):
    """The optional cross-encoder reranker, loaded on first use."""

    model: str
    enabled: bool = False
    device: str = "auto"
    batch_size: int = 64

    def get(self) -> Reranker:
        return shared_reranker(self.model, self.device, self.batch_size)


# One load per process and configuration: a run's steps, the API and a test session share the model.
_load_lock = threading.Lock()


@lru_cache(maxsize=4)
def _cached_encoder(*key: Any) -> Encoder:
    return Encoder.load(*key)


@lru_cache(maxsize=2)
def _cached_reranker(*key: Any) -> Reranker:
    return Reranker.load(*key)


def shared_encoder(
    model: str, dimensions: int, device: str = "auto", batch_size: Optional[int] = None, backend: str = "torch"
) -> Encoder:
    """The process's encoder for this configuration, loaded on first use."""
    with _load_lock:
        return _cached_encoder(model, dimensions, device, batch_size, backend)


def shared_reranker(model: str, device: str = "auto", batch_size: int = 64) -> Reranker:
    """The process's reranker for this configuration, loaded on first use."""
    with _load_lock:
        return _cached_reranker(model, device, batch_size)
