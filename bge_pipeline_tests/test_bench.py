"""The speed tools as a user runs them: `bge-pipeline bench` and `bench --pipeline` print sane figures, the ONNX
and OpenVINO backends give the torch vectors, the stand-in model has bge-small's shape, and OOM halves the batch.

Tiny inputs and the 6-layer MiniLM keep this file near a minute on two cores; the figures printed are not checked
against targets (those are benchmarks, run by hand: docs/performance.md)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from bge_pipeline.core.encoder import Encoder
from bge_pipeline.core.runtimes import EXPORT_MARKER, MIN_COSINE, native_bf16, resolve_backend

TEXTS = [
    "",
    "a",
    "The State of the Union is strong.",
    "Fellow-Citizens of the Senate and House of Representatives: I embrace with great satisfaction the opportunity.",
    " ".join(["the congress shall have power to lay and collect taxes"] * 120),  # past 512 tokens: truncated
]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bge_pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full_env,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_bench_prints_throughput_per_batch_size_and_the_best(minilm_path: str) -> None:
    done = run_cli(
        "bench",
        "--model",
        minilm_path,
        "--texts",
        "32",
        "--batch-sizes",
        "8,16",
        "--device",
        "cpu",
        "--backend",
        "torch",
        "--baseline-model",
        minilm_path,
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "batch_size=8 " in done.stdout and "batch_size=16" in done.stdout
    assert "✅ Best encoding throughput:" in done.stdout
    assert "🚀 Speedup vs" in done.stdout
    assert "Device: cpu" in done.stdout


def test_bench_json_reports_rates_for_each_backend(minilm_path: str) -> None:
    done = run_cli(
        "bench",
        "--model",
        minilm_path,
        "--texts",
        "16",
        "--batch-sizes",
        "8,16",
        "--device",
        "cpu",
        "--backend",
        "torch,onnx",
        "--json",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # --json: stdout is one JSON object, the human lines are on stderr
    assert [(r["backend"], r["batch_size"]) for r in result["runs"]] == [
        ("torch", 8),
        ("torch", 16),
        ("onnx", 8),
        ("onnx", 16),
    ]
    assert all(0 < r["texts_per_second"] < 100_000 and r["texts"] == 16 for r in result["runs"])
    assert result["dimensions"] == 384 and result["device"] == "cpu"
    assert result["best"]["texts_per_second"] == max(r["texts_per_second"] for r in result["runs"])
    assert result["backend_agreement"]["onnx"] >= 0.999
    assert set(result["backend_speedups"]) == {"torch", "onnx"}


def test_bench_reports_the_int8_gate_beside_int8s_speed(minilm_path: str) -> None:
    """int8's figure that matters: how many float neighbours it keeps, and the judged set's nDCG@10 for each."""
    pytest.importorskip("onnxruntime")
    common = ["--model", minilm_path, "--texts", "16", "--batch-sizes", "16", "--device", "cpu", "--no-progress"]
    done = run_cli("bench", *common, "--backend", "onnx,onnx-int8", "--json", env={"INT8_MIN_AGREEMENT": "0.5"})
    assert done.returncode == 0, done.stderr[-2000:]
    gate = json.loads(done.stdout)["int8_gate"]
    assert 0.5 < gate["neighbour_agreement"] < 1.0 and gate["passed"] and gate["floor"] == 0.5
    assert gate["ndcg_int8"] > 0.5 and gate["ndcg_float"] > 0.5
    assert "onnx-int8 gate: int8 neighbours agree with float ones at" in done.stderr and "passes" in done.stderr


@pytest.mark.pgvector
def test_pipeline_bench_measures_encoding_writes_backfill_index_and_rss(
    minilm_path: str, database_url: str, connect: Any
) -> None:
    done = run_cli(
        "bench",
        "--pipeline",
        "--model",
        minilm_path,
        "--rows",
        "120",
        "--batch-rows",
        "30",
        "--device",
        "cpu",
        "--backend",
        "torch",
        "--json",
        "--no-progress",
        env={"DATABASE_URL": database_url},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rows"] == 120 and result["rows_embedded"] == 120
    for key in (
        "encode_texts_per_second",
        "write_unnest_rows_per_second",
        "write_executemany_rows_per_second",
        "end_to_end_rows_per_second",
    ):
        assert result[key] > 0, key
    assert result["end_to_end_ratio"] > 0  # its size is a benchmark's figure: on a loaded machine 120 rows swing it
    assert result["index_build_seconds"] > 0 and result["index_lists"] == 100
    assert result["index_build_settings"]["maintenance_work_mem"] == "1GB"
    assert result["rss_per_batch"]["batches"] == 4
    assert result["rss_per_batch"]["peak_mib"] <= result["peak_rss_mib"] + 1
    for line in (
        "Bare encoding:",
        "Write, unnest:",
        "Write, executemany:",
        "End-to-end backfill:",
        "Index build:",
        "RSS per batch:",
    ):
        assert line in done.stderr
    with connect() as conn:  # on a DATABASE_URL server the bench leaves nothing behind
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'bge_bench_%'").fetchall()
        functions = conn.execute("SELECT proname FROM pg_proc WHERE proname LIKE 'bge_bench_%'").fetchall()
        models = conn.execute("SELECT count(*) FROM bge_pipeline_models WHERE table_name LIKE 'bge_bench_%'").fetchone()
    assert tables == [] and functions == [] and models[0] == 0


@pytest.mark.parametrize(("backend", "graph"), [("onnx", "model_fused.onnx"), ("openvino", "model.onnx")])
def test_exported_backends_give_the_torch_vectors(minilm_path: str, backend: str, graph: str) -> None:
    pytest.importorskip("openvino" if backend == "openvino" else "onnxruntime")
    reference = Encoder.load(minilm_path, 384, "cpu", 4, "torch").encode(TEXTS)
    encoder = Encoder.load(minilm_path, 384, "cpu", 4, backend)
    assert encoder.backend == backend
    vectors = encoder.encode(TEXTS)
    cosines = np.sum(vectors * reference, axis=1)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    assert np.all(cosines >= 0.99999), cosines  # fp32 graphs: torch's vectors to float rounding
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    record = json.loads((Path(minilm_path) / "onnx" / EXPORT_MARKER).read_text())
    engine = "openvino" if backend == "openvino" else "onnxruntime"
    assert graph in record["made"] and record["agreement"][f"{engine}:{graph}"] >= 0.99999


def test_int8_runs_on_request_with_its_per_vector_cosine_logged(
    minilm_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Real weights quantise loosely: all-MiniLM-L6-v2's int8 graph gives vectors at cosine ~0.987 to torch's on the
    probe texts. That is logged, not a refusal: the int8 gate judges what it does to retrieval (test_int8_gate)."""
    pytest.importorskip("onnxruntime")
    with caplog.at_level(logging.INFO, logger="bge_pipeline"):
        encoder = Encoder.load(minilm_path, 384, "cpu", 4, "onnx-int8")
    assert encoder.backend == "onnx-int8"
    assert "EMBEDDING_BACKEND=onnx-int8: running the transformer from" in caplog.text
    record = json.loads((Path(minilm_path) / "onnx" / EXPORT_MARKER).read_text())
    lowest = record["agreement"]["onnxruntime:model_int8.onnx"]
    assert lowest < 0.999  # remembered: not measured again
    reference = Encoder.load(minilm_path, 384, "cpu", 4, "torch").encode(TEXTS)
    cosines = np.sum(encoder.encode(TEXTS) * reference, axis=1)
    assert np.all(cosines > 0.9) and np.any(cosines < 0.999)  # close, not equal: int8 vectors are their own kind


def test_int8_runs_where_its_vectors_agree(caplog: pytest.LogCaptureFixture) -> None:
    """The bge-small stand-in's random weights quantise well (cosine ~0.9998): there `onnx-int8` runs int8."""
    pytest.importorskip("onnxruntime")
    from bge_pipeline.core.shape_model import resolve_model

    model = resolve_model("shape:bge-small")
    encoder = Encoder.load(model, 384, "cpu", 4, "onnx-int8")
    assert encoder.backend == "onnx-int8"
    reference = Encoder.load(model, 384, "cpu", 4, "torch").encode(TEXTS)
    assert np.all(np.sum(encoder.encode(TEXTS) * reference, axis=1) >= 0.999)


def test_auto_on_a_cpu_times_each_runtime_and_pass_size_once_and_remembers_the_fastest(
    minilm_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("onnxruntime")
    from bge_pipeline.core import autotune

    monkeypatch.setattr(autotune, "TUNING_FILE", "test_tuning.json")  # not the record real loads use
    record = autotune.export_folder(minilm_path) / "test_tuning.json"
    record.unlink(missing_ok=True)
    try:
        with caplog.at_level(logging.INFO, logger="bge_pipeline"):
            measured = Encoder.load(minilm_path, 384, "cpu", None, "auto")
        assert measured.tuning is not None and "(measured:" in measured.tuning
        rates = json.loads(record.read_text())[autotune.machine_key(None)]["rates"]
        assert set(rates) == expected_labels(None)
        fastest = max(rates, key=rates.get)
        assert measured.tuning.endswith(f"running {fastest}") and fastest.startswith(measured.backend)
        assert "EMBEDDING_BACKEND=auto on this CPU (measured:" in caplog.text
        # The runtime chosen is the one that runs, a float one: torch's vectors (the ONNX graph gives them to float
        # rounding) or, with bf16 products, within the float runtimes' check.
        reference = Encoder.load(minilm_path, 384, "cpu", 4, "torch").encode(TEXTS)
        floor = MIN_COSINE if measured.backend == "torch-bf16" else 0.99999
        assert np.all(np.sum(measured.encode(TEXTS) * reference, axis=1) >= floor)

        again = Encoder.load(minilm_path, 384, "cpu", None, "auto")
        assert again.tuning is not None and "(remembered:" in again.tuning
        assert (again.backend, again.batch_size, again.tokens_per_pass) == (
            measured.backend,
            measured.batch_size,
            measured.tokens_per_pass,
        )
        # EMBEDDING_BATCH_SIZE is the upper bound: whole batches of it, or 16-row passes within the token budget.
        capped = Encoder.load(minilm_path, 384, "cpu", 64, "auto")
        assert capped.batch_size in (16, 64) and (capped.tokens_per_pass or 0) in (0, 1024, 4096)
        assert set(json.loads(record.read_text())[autotune.machine_key(64)]["rates"]) == expected_labels(64)
    finally:
        record.unlink(missing_ok=True)


def expected_labels(explicit: Optional[int]) -> set[str]:
    """Every runtime this CPU runs as a float (bf16 only where it is native) with each of the three pass shapes."""
    runtimes = ["onnx", "torch"] + (["torch-bf16"] if native_bf16() else [])
    shapes = ["batch 16, 1024-token passes", "batch 64, 4096-token passes", f"batch {explicit or 32}, whole batches"]
    return {f"{runtime}, {shape}" for runtime in runtimes for shape in shapes}


def test_bf16_runs_where_the_cpu_multiplies_it_with_vectors_within_the_float_check(
    minilm_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On AMX or AVX512-BF16 the transformer's matrix products run in bf16 and the rest in fp32: all-MiniLM-L6-v2's
    vectors stay at cosine >= 0.999 to fp32's (0.99998 measured), like fp16 on a GPU."""
    if not native_bf16():
        pytest.skip("this CPU has no native bf16 (AMX or AVX512-BF16)")
    with caplog.at_level(logging.INFO, logger="bge_pipeline"):
        encoder = Encoder.load(minilm_path, 384, "cpu", 16, "torch-bf16")
    assert encoder.backend == "torch-bf16"
    assert "EMBEDDING_BACKEND=torch-bf16: matrix products in bf16 (cosine to fp32 >=" in caplog.text
    reference = Encoder.load(minilm_path, 384, "cpu", 16, "torch").encode(TEXTS)
    vectors = encoder.encode(TEXTS)
    cosines = np.sum(vectors * reference, axis=1)
    assert vectors.dtype == np.float32 and np.all(cosines >= 0.999) and np.any(cosines < 0.9999999), cosines
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    record = json.loads((Path(minilm_path) / "onnx" / EXPORT_MARKER).read_text())
    assert record["agreement"]["torch:bf16"] >= 0.999


def test_auto_is_onnx_on_a_cpu_and_torch_on_a_gpu_or_without_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib.util

    pytest.importorskip("onnxruntime")
    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cuda") == "torch"  # torch fp16 is the GPU path
    assert resolve_backend("onnx-int8", "cuda:0") == "torch"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a)
    )
    with caplog.at_level(logging.WARNING, logger="bge_pipeline.runtimes"):
        assert resolve_backend("onnx", "cpu") == "torch"
        assert resolve_backend("auto", "cpu") == "torch"
    assert "onnxruntime is not installed: falling back to torch" in caplog.text


def test_shape_model_has_bge_smalls_dimensions_and_parameter_count(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from bge_pipeline.core.shape_model import build_shape_model, resolve_model, shape_spec

    folder = build_shape_model(tmp_path / "shape")
    assert build_shape_model(tmp_path / "shape") == folder  # built once, then reused
    model = SentenceTransformer(str(folder), device="cpu")
    parameters = sum(p.numel() for p in model.parameters())
    assert 33_000_000 <= parameters <= 33_800_000  # bge-small-en-v1.5: about 33.4 million
    assert model.get_embedding_dimension() == 384 == shape_spec()["embedding_dimension"]
    assert model.max_seq_length == 512
    vectors = model.encode(["pooling takes the CLS token", ""], normalize_embeddings=True)
    assert vectors.shape == (2, 384)
    assert resolve_model("some/other-model") == "some/other-model"


class _FakeCudaModel:
    """Stands in for a model on a GPU: a real CUDA out-of-memory cannot be caused on a CPU-only machine, so this
    raises torch's own OOM message for batches above `limit`, the way sentence-transformers surfaces it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.batch_sizes: list[int] = []

    def encode(self, texts: list[str], batch_size: int, **_: Any) -> np.ndarray:
        self.batch_sizes.append(len(texts))
        if len(texts) > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)")
        vectors = np.ones((len(texts), 4), dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_out_of_memory_halves_the_batch_and_keeps_every_text(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)  # nothing to free without a GPU
    fake = _FakeCudaModel(limit=20)
    encoder = Encoder(fake, "fake", "cuda", batch_size=64, dimensions=4)
    vectors = encoder.encode([f"text {i}" for i in range(100)])
    assert vectors.shape == (100, 4) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert fake.batch_sizes[:3] == [64, 32, 16] and max(fake.batch_sizes[3:]) <= 16
    assert encoder.batch_size == 16  # later calls start at the size that fitted


@pytest.mark.cuda
def test_real_cuda_out_of_memory_halves_the_batch(minilm_path: str) -> None:
    import torch

    encoder = Encoder.load(minilm_path, 384, "cuda", 4096)
    free_bytes, _total = torch.cuda.mem_get_info()
    # Hold all but ~1.5 GiB so that a 4096 x 512-token batch cannot fit but small batches can.
    ballast = torch.empty(max(free_bytes - 1536 * 2**20, 0), dtype=torch.uint8, device="cuda")
    try:
        # Distinct texts: identical ones are encoded once (the encoder dedupes), and one text never runs out.
        vectors = encoder.encode([f"{i} " + " ".join(["union"] * 600) for i in range(4096)])
    finally:
        del ballast
        torch.cuda.empty_cache()
    assert vectors.shape == (4096, 384)
    assert encoder.batch_size < 4096


def test_bench_takes_any_jsonl_with_text(minilm_path: str, tmp_path: Path) -> None:
    """A user's own export: rows with `text` and nothing else, some with an `id`."""
    corpus = tmp_path / "mine.jsonl"
    rows = [{"text": f"note number {i} about the harvest"} for i in range(10)] + [{"id": "doc-1", "text": "one more"}]
    corpus.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    common = ["--model", minilm_path, "--texts", "11", "--batch-sizes", "8", "--device", "cpu", "--backend", "torch"]
    done = run_cli("bench", *common, "--corpus", str(corpus), "--no-progress", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["texts"] == 11

    corpus.write_text(json.dumps({"id": 1, "body": "no text field"}) + "\n")
    refused = run_cli("bench", *common, "--corpus", str(corpus), "--no-progress")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"bge-pipeline: error: {corpus} line 1: every row needs a `text` string"
    )


def test_scale_run_reports_phases_disk_and_a_readers_waits(tmp_path: Path) -> None:
    """`bench --scale` on a small N: the whole graph through Dagster on its own embedded server, with a reader."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "bge_pipeline.cli", "bench", "--scale", "--rows", "1500", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "HF_HUB_OFFLINE": "1", "BGE_PIPELINE_CACHE": str(tmp_path / "cache")},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["rows"] == 1500
    assert {"embeddings", "embedding_index", "live_embedding_column"} <= set(figures["steps"])
    assert figures["reads"] > 0 and figures["read_errors"] == 0 and figures["read_wait_max_ms"] > 0
    assert figures["disk_peak_growth_bytes"] > 1500 * (4 * 384 + 8)  # at least the new column
    assert 0 < figures["plan_bytes_needed"] and 0 < figures["plan_estimated_seconds"]
    assert figures["migration_seconds_except_encoding"] > 0
