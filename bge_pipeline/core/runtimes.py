"""The CPU runtimes: the model's transformer exported once to ONNX, run by onnxruntime (fp32 or int8) or OpenVINO;
or torch itself with its matrix products in bfloat16 (`torch-bf16`) on CPUs that multiply bf16 in hardware.

sentence-transformers' own backend="onnx" needs optimum-onnx, which pins transformers<4.58 and would downgrade
transformers 5 and sentence-transformers 6 (shared/ENVIRONMENT.md); its openvino extra pulls a CUDA torch. So the
transformer is exported here with torch.onnx (needs only `onnx`) and run with onnxruntime or OpenVINO, both of
which install without touching torch or transformers. Tokenising, pooling and normalising stay sentence-transformers'.

Three files are made next to the model (or under the cache when its folder is read-only), each once:
- `model.onnx`: standard ONNX operators, exported with eager attention; what OpenVINO runs.
- `model_fused.onnx`: the same graph with onnxruntime's BERT fusions (attention, layer norms, GELU); `onnx`.
- `model_int8.onnx`: the fused graph with int8 weights and dynamically quantised activations; `onnx-int8`.
Each float graph is compared with the torch vectors on probe texts before it is used; one whose cosine to them
falls below MIN_COSINE on any probe is not used, and the next more exact one runs instead (logged). The int8 graph
moves the vectors by design, so per-vector cosine is only logged for it: what it does to retrieval is judged by
int8_gate before a column is filled with its vectors.

`torch-bf16` needs no file: the transformer runs under torch's CPU autocast, which multiplies in bf16 (AMX or
AVX512-BF16 tiles; twice fp32's speed on a Sapphire Rapids core) and keeps layer norms, softmax and pooling in fp32,
so its vectors stay within MIN_COSINE of fp32's like the other float runtimes (checked on the probe texts the same way,
0.99996 measured for all-MiniLM-L6-v2). Where bf16 is emulated it is slower than fp32, so it is offered only where
the CPU has it natively.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from bge_pipeline.core.corpus import load_segments
from bge_pipeline.core.shape_model import default_cache_dir

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
PLAIN_FILE = "model.onnx"
FUSED_FILE = "model_fused.onnx"
INT8_FILE = "model_int8.onnx"
EXPORT_MARKER = "bge_pipeline_export.json"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MIN_COSINE = 0.999
PROBE_TEXTS = 32
BF16 = "torch-bf16"
# What each onnxruntime backend may run, most preferred first: int8 falls back to fp32, fused to the plain graph.
ONNX_CANDIDATES = {"onnx-int8": (INT8_FILE, FUSED_FILE, PLAIN_FILE), "onnx": (FUSED_FILE, PLAIN_FILE)}


class RuntimeUnavailable(RuntimeError):
    """No exported graph of the model gave the torch vectors."""


def runtime_installed(backend: str) -> bool:
    if backend in ("torch", BF16):
        return True
    module = "openvino" if backend == "openvino" else "onnxruntime"
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec("onnx") is not None


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16); elsewhere oneDNN emulates it, slower
    than fp32."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so looked up with a default
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def resolve_backend(requested: str, device: str) -> str:
    """The backend that will run: the ONNX ones only on a CPU with their runtime installed, torch-bf16 only on a CPU
    with native bf16, else torch (logged).

    `auto` is torch (fp16) on a GPU and the fused fp32 graph (onnx) on a CPU when onnxruntime is installed: the
    fastest runtime that gives torch's vectors. onnx-int8 is faster still but only on request: on real weights
    (all-MiniLM-L6-v2) its vectors fall to cosine 0.97-0.99 of torch's, so it must pass int8_gate's retrieval
    agreement first (docs/performance.md).
    """
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "onnx" if not device.startswith("cuda") and runtime_installed("onnx") else "torch"
    if device.startswith("cuda"):
        log.warning(f"EMBEDDING_BACKEND={requested} runs on the CPU only here: using torch (fp16) on {device}")
        return "torch"
    if requested == BF16 and not native_bf16():
        log.warning(f"EMBEDDING_BACKEND={BF16} but this CPU has no native bf16 (AMX or AVX512-BF16): using torch")
        return "torch"
    if not runtime_installed(requested):
        extra = "openvino" if requested == "openvino" else "onnxruntime onnx"
        log.warning(
            f"EMBEDDING_BACKEND={requested} but {extra.split()[0]} is not installed: falling back to torch "
            f"(pip install {extra}, or pip install 'bge-pipeline[openvino]')"
        )
        return "torch"
    return requested


def attach_runtime(loaded: Any, source: str, backend: str) -> str:
    """Run `loaded`'s transformer through `backend`'s graph; returns the backend that runs after any fallback."""
    exports = _Exports(loaded, source)
    if backend == BF16:
        return _attach_bf16(loaded, exports)
    if backend == "openvino":
        candidates: tuple[str, ...] = (PLAIN_FILE,)
        runtime: Callable[[Path], Infer] = _openvino_infer
    else:
        candidates, runtime = ONNX_CANDIDATES[backend], _onnxruntime_infer
    engine = "openvino" if backend == "openvino" else "onnxruntime"
    for file in candidates:
        path = exports.path(file)
        if path is None:
            continue
        _attach(loaded, runtime(path))
        agreement = exports.agreement(f"{engine}:{file}")
        if agreement < MIN_COSINE and file != INT8_FILE:
            log.warning(f"{path} gives vectors at cosine {agreement:.6f} to torch's (< {MIN_COSINE}): not used")
            continue
        runs = "openvino" if engine == "openvino" else "onnx-int8" if file == INT8_FILE else "onnx"
        if file != candidates[0]:
            log.warning(f"EMBEDDING_BACKEND={backend}: {candidates[0]} is not usable for {source}, running {file}")
        log.info(f"EMBEDDING_BACKEND={runs}: running the transformer from {path} (cosine to torch >= {agreement:.6f})")
        return runs
    detach_runtime(loaded)
    raise RuntimeUnavailable(f"EMBEDDING_BACKEND={backend}: no ONNX export of {source} gave the torch vectors")


def _attach_bf16(loaded: Any, exports: "_Exports") -> str:
    import torch

    transformer = loaded[0].model
    fp32_forward = type(transformer).forward.__get__(transformer)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = fp32_forward(*args, **kwargs)
        if isinstance(output, MutableMapping) and output.get("last_hidden_state") is not None:
            output["last_hidden_state"] = output["last_hidden_state"].float()  # pooling and normalising in fp32
        return output

    transformer.forward = forward  # shadows the class's forward, as _attach does: detach_runtime undoes both
    try:
        agreement = exports.agreement("torch:bf16")
    except Exception as error:  # noqa: BLE001 - an architecture autocast does not suit: torch runs, as below
        agreement, reason = 0.0, f"{type(error).__name__}: {str(error).strip()[:200]}"
    else:
        reason = f"vectors at cosine {agreement:.6f} to fp32's (< {MIN_COSINE})"
    if agreement < MIN_COSINE:
        detach_runtime(loaded)
        raise RuntimeUnavailable(f"EMBEDDING_BACKEND={BF16}: {reason}")
    log.info(f"EMBEDDING_BACKEND={BF16}: matrix products in bf16 (cosine to fp32 >= {agreement:.6f})")
    return BF16


# --- the exported files ------------------------------------------------------------------------------------


class _Exports:
    """The export folder of one model: makes each file once and remembers each file's agreement with torch."""

    def __init__(self, loaded: Any, source: str) -> None:
        self.loaded = loaded
        self.source = source
        self.folder = export_folder(source)
        self.marker = self.folder / EXPORT_MARKER
        self.signature = _weights_signature(loaded[0])
        self.record = self._read_record()
        self._reference: Optional[np.ndarray] = None

    def _read_record(self) -> dict[str, Any]:
        if (self.folder / PLAIN_FILE).is_file() and not self.marker.is_file():
            # Shipped with the model (e.g. by optimum): same inputs and output; use it and derive the others.
            return {"signature": self.signature, "made": [PLAIN_FILE], "agreement": {}, "shipped": True}
        fresh = {"signature": self.signature, "made": [], "agreement": {}}
        try:
            record = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return fresh
        if record.get("signature") != self.signature and not record.get("shipped"):
            return fresh  # new weights (or torch, onnxruntime): every file is made again
        return record

    def _save(self) -> None:
        partial = self.marker.with_name(f".{self.marker.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(self.record, sort_keys=True))
        os.replace(partial, self.marker)

    def path(self, file: str) -> Optional[Path]:
        """The file, made now if it is missing or stale; None when this model's graph cannot be made that way."""
        path = self.folder / file
        if path.is_file() and file in self.record["made"]:
            return path
        makers: dict[str, Callable[[Path], None]] = {
            PLAIN_FILE: lambda out: _export_plain(self.loaded, out),
            FUSED_FILE: lambda out: _fuse(self._made(PLAIN_FILE), out, self.loaded[0].model.config),
            INT8_FILE: lambda out: _quantize(self._made(FUSED_FILE), out),
        }
        started = time.perf_counter()
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with _quiet():
                makers[file](partial)
            os.replace(partial, path)  # atomic: a concurrent loader sees the old file or the whole new one
        except _CannotMake as reason:
            log.warning(f"{file} could not be made for {self.source}: {reason}")
            return None
        finally:
            partial.unlink(missing_ok=True)
        self.record["made"] = [*(made for made in self.record["made"] if made != file), file]
        self.record["agreement"] = {k: v for k, v in self.record["agreement"].items() if not k.endswith(f":{file}")}
        self._save()
        log.info(f"Made {path} in {time.perf_counter() - started:.1f}s")
        return path

    def _made(self, file: str) -> Path:
        path = self.path(file)
        if path is None:
            raise _CannotMake(f"{file} is missing")
        return path

    def agreement(self, key: str) -> float:
        """Lowest cosine, over the probe texts, between the attached runtime's vectors (`key` = engine:file)
        and torch's."""
        if key not in self.record["agreement"]:
            probes = probe_texts()
            if self._reference is None:
                self._reference = torch_vectors(self.loaded, probes)
            vectors = self.loaded.encode(
                probes, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
            self.record["agreement"][key] = float(np.min(np.sum(vectors * self._reference, axis=1)))
            self._save()
        return float(self.record["agreement"][key])


class _CannotMake(Exception):
    pass


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's optimizer and quantizer log a line per node at INFO, some on the root logger. Nests: making
    the fused graph makes the plain one first."""
    before = logging.root.manager.disable
    logging.disable(max(before, logging.INFO))
    try:
        yield
    finally:
        logging.disable(before)


def export_folder(source: str) -> Path:
    """`<model dir>/onnx` when the model folder is writable (or already holds one), else a folder under the cache."""
    local = Path(source)
    if local.is_dir():
        candidate = local / ONNX_DIR
        if (candidate / PLAIN_FILE).is_file() or os.access(candidate if candidate.is_dir() else local, os.W_OK):
            try:
                candidate.mkdir(exist_ok=True)
                return candidate
            except OSError:  # a read-only folder that os.access() did not catch (root on a read-only mount)
                pass
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    folder = default_cache_dir() / ONNX_DIR / f"{local.name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@lru_cache(maxsize=1)
def probe_texts() -> list[str]:
    """Texts of every length in the bundled sample, the shortest to the longest: what the agreement is measured on."""
    texts = sorted((segment.text for segment in load_segments(limit=400)), key=len)
    step = max(1, len(texts) // PROBE_TEXTS)
    return texts[::step][: PROBE_TEXTS - 1] + [texts[-1]]


def torch_vectors(loaded: Any, texts: list[str]) -> np.ndarray:
    """`loaded`'s own torch vectors, whatever runtime is attached to it."""
    patched = detach_runtime(loaded)
    try:
        return loaded.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    finally:
        if patched is not None:
            loaded[0].model.forward = patched


def _weights_signature(transformer: Any) -> dict[str, Any]:
    """What the export was made from: a changed checkpoint (same folder, new weights) triggers a new export."""

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return ""

    folder = Path(getattr(transformer.model, "name_or_path", "") or "")
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    return {
        "files": {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files},
        **{package: installed(package) for package in ("torch", "onnx", "onnxruntime", "openvino")},
    }


def _export_plain(loaded: Any, out: Path) -> None:
    import torch

    transformer = loaded[0]
    bert = transformer.model

    class _LastHiddenState(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    sample = transformer.tokenizer(
        ["an export probe", "a second, longer export probe text"], padding=True, return_tensors="pt"
    )
    args = tuple(sample.get(name, torch.zeros_like(sample["input_ids"])).to("cpu") for name in ONNX_INPUTS)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*ONNX_INPUTS, "last_hidden_state")}
    was_training, attention = bert.training, bert.config._attn_implementation
    bert.eval()
    # Eager attention exports as MatMul/Softmax, the pattern onnxruntime's optimizer fuses into one Attention op;
    # the SDPA export is not fused. Same vectors either way.
    switch = getattr(bert, "set_attn_implementation", lambda _: None)  # transformers >= 4.48
    switch("eager")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            # dynamo=False: the TorchScript exporter needs no onnxscript and exports BERT with dynamic axes.
            torch.onnx.export(
                _LastHiddenState(bert),
                args,
                str(out),
                input_names=list(ONNX_INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes=dynamic,
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        switch(attention)
        bert.train(was_training)


def _fuse(plain: Path, out: Path, config: Any) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    if not heads or not hidden:
        raise _CannotMake("the model's config names no attention heads or hidden size")
    try:
        optimized = optimize_model(str(plain), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
    except Exception as error:  # noqa: BLE001 - an architecture the optimizer does not know: run the plain graph
        raise _CannotMake(f"{type(error).__name__}: {error}") from error
    optimized.save_model_to_file(str(out))


def _quantize(fused: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel int8 weights; reduce_range keeps 7-bit weights so that CPUs without VNNI (AVX2's vpmaddubsw)
    # cannot saturate. The fused Attention's projections are quantised too (QAttention, 5% faster here); the
    # fused ops have no type information for the quantizer, hence DefaultTensorType.
    quantize_dynamic(
        str(fused),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        op_types_to_quantize=["MatMul", "Attention"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


# --- running a graph in place of the transformer -----------------------------------------------------------

Infer = Callable[[dict[str, np.ndarray]], np.ndarray]


def _onnxruntime_infer(path: Path) -> Infer:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda feeds: session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0]


def _openvino_infer(path: Path) -> Infer:
    import openvino as ov

    # f32: OpenVINO's CPU plugin otherwise runs in bf16/f16 where the CPU has it, which moves the vectors.
    compiled = ov.Core().compile_model(
        str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    )
    names = {name for port in compiled.inputs for name in port.get_names()}
    output = compiled.output(0)
    return lambda feeds: compiled({k: v for k, v in feeds.items() if k in names})[output]


def _attach(loaded: Any, infer: Infer) -> None:
    import torch

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
    loaded[0].model.forward = forward


def detach_runtime(loaded: Any) -> Optional[Callable[..., Any]]:
    """Back to the torch forward; returns the runtime's forward that was attached, if any."""
    return loaded[0].model.__dict__.pop("forward", None)
