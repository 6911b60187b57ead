"""On a CPU, `EMBEDDING_BACKEND=auto` measures before it chooses: which runtime (torch or the fused ONNX graph) and
which forward-pass size (a token budget, or whole batches as sentence-transformers runs them) encode this model
fastest on this machine.

No fixed rule holds for every model or every day: on these two cores the bge-small shape measured 1.11x faster on
ONNX than on torch on one day and 0.79x on another, and all-MiniLM-L6-v2 runs about 1.2x faster on torch, so a
fixed ONNX default made a 3,000-row MiniLM run 0.70x a plain sentence-transformers script. So the first load of a model on a machine times each candidate on the same
128 texts (two interleaved rounds, the best of each) and keeps the fastest; the choice is remembered next to the
model's ONNX export (one file, keyed by machine and batch size), so later loads pay nothing (the first pays ~25 s
for MiniLM). EMBEDDING_BATCH_SIZE, when set, is the upper bound every candidate keeps to.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional

from bge_pipeline.core.corpus import load_segments
from bge_pipeline.core.runtimes import attach_runtime, detach_runtime, export_folder

if TYPE_CHECKING:
    from bge_pipeline.core.encoder import Encoder

log = logging.getLogger(__name__)

TUNING_FILE = "bge_pipeline_tuning.json"
TUNING_TEXTS = 128
ROUNDS = 2  # every candidate timed once a round, rounds interleaved: a load change hits all of them alike
SMALL_BATCH, LARGE_BATCH = 16, 32  # the project's CPU default and sentence-transformers'


@dataclass(frozen=True)
class Candidate:
    backend: str  # torch or onnx
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


def candidates(budget: int, explicit_batch: Optional[int]) -> list[Candidate]:
    """What is timed: each runtime with small passes held to a token budget, and with whole batches of
    EMBEDDING_BATCH_SIZE (sentence-transformers' 32 when unset); no pass takes more rows than the setting."""
    large = explicit_batch or LARGE_BATCH
    shapes = [(min(SMALL_BATCH, large), budget), (large, None)]
    return [Candidate(backend, rows, tokens) for backend in ("onnx", "torch") for rows, tokens in shapes]


@lru_cache(maxsize=1)
def tuning_texts() -> list[str]:
    """Texts of every length in the bundled sample, as a table holds them."""
    texts = sorted((segment.text for segment in load_segments(limit=640)), key=len)
    return texts[:: max(1, len(texts) // TUNING_TEXTS)][:TUNING_TEXTS]


def machine_key(explicit_batch: Optional[int]) -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu-batch{explicit_batch or 'default'}"


def tune_cpu(encoder: Encoder, source: str, budget: int, explicit_batch: Optional[int]) -> Tuning:
    """Choose and apply the fastest candidate for `encoder` (loaded with the ONNX graph attached)."""
    path = export_folder(source) / TUNING_FILE
    key = machine_key(explicit_batch)
    record = _read(path)
    if key in record:
        tuning = Tuning(Candidate(**record[key]["chosen"]), record[key]["rates"], remembered=True)
    else:
        tuning = _measure(encoder, source, candidates(budget, explicit_batch))
        record[key] = {"chosen": asdict(tuning.chosen), "rates": tuning.rates}
        _write(path, record)
    _apply(encoder, source, tuning.chosen)
    log.info(tuning.describe())
    return tuning


def _measure(encoder: Encoder, source: str, options: list[Candidate]) -> Tuning:
    texts = tuning_texts()
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for candidate in options:
            _apply(encoder, source, candidate)
            encoder.encode(texts[:8])  # warm-up: the first pass pays for kernel and graph setup
            seconds = _seconds(encoder, texts)
            best[candidate.label] = min(seconds, best.get(candidate.label, seconds))
    rates = {label: round(len(texts) / seconds, 1) for label, seconds in best.items()}
    chosen = max(options, key=lambda candidate: rates[candidate.label])
    return Tuning(chosen, rates, remembered=False)


def _seconds(encoder: Encoder, texts: list[str]) -> float:
    started = time.perf_counter()
    encoder.encode(texts)
    return time.perf_counter() - started


def _apply(encoder: Encoder, source: str, candidate: Candidate) -> None:
    if candidate.backend == "torch":
        detach_runtime(encoder.model)
    elif encoder.backend != "onnx":
        attach_runtime(encoder.model, source, "onnx")
    encoder.backend = candidate.backend
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
