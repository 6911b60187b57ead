"""On a CPU, `EMBEDDING_BACKEND=auto` measures before it chooses: which runtime (torch in fp32, torch with bf16
matrix products where the CPU has them, or the fused ONNX graph) and which forward-pass size (a token budget, or
whole batches as sentence-transformers runs them) encode this model fastest on this machine.

No fixed rule holds for every model or every machine: on an AMD core without AVX-512 the bge-small shape measured
1.11x faster on ONNX than on torch on one day and 0.79x on another, and all-MiniLM-L6-v2 ran about 1.2x faster on
torch, so a fixed ONNX default made a 3,000-row MiniLM run 0.70x a plain sentence-transformers script; on a
Sapphire Rapids core torch-bf16 runs 2x fp32, and best with passes of up to 64 rows and 4,096 tokens, where fp32
prefers 16. So the first load of a model on a machine times each candidate on the same 128 texts (a second round
for those within reach of the best, interleaved, the best time of each) and keeps the fastest; the choice is
remembered next to the model's ONNX export (one file, keyed by the CPU and the batch setting), so later loads pay
nothing (the first pays 20-40 s). EMBEDDING_BATCH_SIZE, when set, is the upper bound every candidate keeps to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from bge_pipeline.core.corpus import load_segments
from bge_pipeline.core.runtimes import (
    BF16,
    RuntimeUnavailable,
    attach_runtime,
    detach_runtime,
    export_folder,
    native_bf16,
    runtime_installed,
)

if TYPE_CHECKING:
    from bge_pipeline.core.encoder import Encoder

log = logging.getLogger(__name__)

TUNING_FILE = "bge_pipeline_tuning.json"
TUNING_TEXTS = 128
ROUNDS = 2  # candidates timed once a round, rounds interleaved: a load change hits all of them alike
WITHIN_REACH = 0.8  # a second round only for candidates at 0.8x the best's rate or more
SMALL_BATCH, LARGE_BATCH = 16, 32  # the project's CPU default and sentence-transformers'
WIDE_BATCH, WIDE_TOKENS = 64, 4096  # the pass that bf16 tiles fill best


@dataclass(frozen=True)
class Candidate:
    backend: str  # torch, torch-bf16 or onnx
    batch_size: int
    tokens_per_pass: Optional[int]  # None: whole batches

    @property
    def label(self) -> str:
        passes = f"{self.tokens_per_pass}-token passes" if self.tokens_per_pass else "whole batches"
        return f"{self.backend}, batch {self.batch_size}, {passes}"


@dataclass(frozen=True)
class Tuning:
    chosen: Candidate
    rates: dict[str, float]  # texts/s by candidate label
    remembered: bool  # read back from an earlier load, not measured now

    def describe(self) -> str:
        measured = ", ".join(f"{label} {rate:.1f}" for label, rate in self.rates.items())
        how = "remembered" if self.remembered else "measured"
        return f"EMBEDDING_BACKEND=auto on this CPU ({how}: {measured} texts/s): running {self.chosen.label}"


def runtimes() -> list[str]:
    """The float runtimes this machine can run: bf16 only where the CPU multiplies it natively."""
    return [
        backend
        for backend in ("onnx", "torch", BF16)
        if runtime_installed(backend) and (backend != BF16 or native_bf16())
    ]


def candidates(budget: int, explicit_batch: Optional[int], backends: Optional[list[str]] = None) -> list[Candidate]:
    """What is timed: each runtime with small passes held to a token budget, with wide passes, and with whole
    batches of EMBEDDING_BATCH_SIZE (sentence-transformers' 32 when unset); no pass takes more rows than the
    setting."""
    bound = explicit_batch or WIDE_BATCH
    shapes = {
        (min(SMALL_BATCH, bound), budget),
        (min(WIDE_BATCH, bound), WIDE_TOKENS),
        (explicit_batch or LARGE_BATCH, None),
    }
    ordered = sorted(shapes, key=lambda shape: (shape[1] is None, shape[1] or 0, shape[0]))
    return [Candidate(backend, rows, tokens) for backend in backends or runtimes() for rows, tokens in ordered]


@lru_cache(maxsize=1)
def tuning_texts() -> list[str]:
    """Texts of every length in the bundled sample, as a table holds them."""
    texts = sorted((segment.text for segment in load_segments(limit=640)), key=len)
    return texts[:: max(1, len(texts) // TUNING_TEXTS)][:TUNING_TEXTS]


def machine_key(explicit_batch: Optional[int]) -> str:
    """The CPU (model and the instruction sets that change which candidate wins), its cores, and the batch
    setting: a tuning taken on another machine, or before a VM moved host, is not reused."""
    return f"{platform.machine()}-{cpu_signature()}-{os.cpu_count()}cpu-batch{explicit_batch or 'default'}"


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "cpu"
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    model = fields.get("model name", "").strip()
    flags = sorted(
        flag for flag in fields.get("flags", "").split() if flag.startswith(("avx", "amx")) or "vnni" in flag
    )
    return hashlib.sha1(f"{model}|{' '.join(flags)}".encode()).hexdigest()[:10]


def tune_cpu(encoder: Encoder, source: str, budget: int, explicit_batch: Optional[int]) -> Tuning:
    """Choose and apply the fastest candidate for `encoder` (loaded on torch): the one remembered for this model, CPU
    and batch setting, or, when none is (or its runtime no longer attaches), the fastest measured now."""
    path = export_folder(source) / TUNING_FILE
    key = machine_key(explicit_batch)
    record = _read(path)
    tuning = (
        Tuning(Candidate(**record[key]["chosen"]), record[key]["rates"], remembered=True) if key in record else None
    )
    if tuning is not None:
        try:
            _apply(encoder, source, tuning.chosen)
        except RuntimeUnavailable as error:
            log.warning(f"{error}: timing the candidates again")
            tuning = None
    if tuning is None:
        tuning = _measure(encoder, source, candidates(budget, explicit_batch))
        record[key] = {"chosen": asdict(tuning.chosen), "rates": tuning.rates}
        _write(path, record)
        _apply(encoder, source, tuning.chosen)
    log.info(tuning.describe())
    return tuning


def _measure(encoder: Encoder, source: str, options: list[Candidate]) -> Tuning:
    texts = tuning_texts()
    best: dict[str, float] = {}
    timed = options
    for _ in range(ROUNDS):
        for candidate in timed:
            if candidate not in options:
                continue
            try:
                _apply(encoder, source, candidate)
            except RuntimeUnavailable as error:  # its graph failed the agreement check on this model: not a choice
                log.warning(f"{error}: not tuned")
                options = [option for option in options if option.backend != candidate.backend]
                continue
            encoder.encode(texts[:8])  # warm-up: the first pass pays for kernel and graph setup
            seconds = _seconds(encoder, texts)
            best[candidate.label] = min(seconds, best.get(candidate.label, seconds))
        fastest = min(best.values())
        timed = [option for option in options if fastest / best[option.label] >= WITHIN_REACH]
    rates = {label: round(len(texts) / seconds, 1) for label, seconds in best.items()}
    chosen = max(options, key=lambda candidate: rates[candidate.label])
    return Tuning(chosen, rates, remembered=False)


def _seconds(encoder: Encoder, texts: list[str]) -> float:
    started = time.perf_counter()
    encoder.encode(texts)
    return time.perf_counter() - started


def _apply(encoder: Encoder, source: str, candidate: Candidate) -> None:
    if candidate.backend != encoder.backend:
        detach_runtime(encoder.model)
        encoder.backend = "torch"  # what runs until (unless) the candidate's runtime attaches
        if candidate.backend != "torch":
            encoder.backend = attach_runtime(encoder.model, source, candidate.backend)
    encoder.batch_size = candidate.batch_size
    encoder.tokens_per_pass = candidate.tokens_per_pass


def _read(path: Any) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _write(path: Any, record: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(record, sort_keys=True))
        os.replace(partial, path)  # atomic: a concurrent loader reads the old record or the whole new one
    except OSError as error:  # a read-only folder: measured again next time, nothing worse
        log.warning(f"could not remember the CPU tuning in {path}: {error}")
