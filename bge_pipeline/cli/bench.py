"""`bge-pipeline bench`: the seed's test_embedding_speed.py, and `--pipeline`, the backfill's costs measured apart;
`--index` compares IVFFLAT and HNSW over vector and halfvec on the user's own vectors.

Every figure is printed with what produced it (model, backend, device, threads, texts, batch size) because a
speed without its conditions cannot be compared. `--json` prints one JSON object on stdout; the human lines go to
stderr then.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import psycopg
from psycopg import sql as psql
from tqdm import tqdm

from bge_pipeline.cli.index_bench import DEFAULT_QUERIES, DEFAULT_ROWS, run_index_bench
from bge_pipeline.cli.measure import Output, bench_database, corpus_path, repeated
from bge_pipeline.cli.scale import run_scale_bench
from bge_pipeline.core import migration as phases
from bge_pipeline.core import sql
from bge_pipeline.core.backfill import Batch, write_vectors
from bge_pipeline.core.corpus import create_seed_table, load_segments
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import Encoder, ModelLoadError
from bge_pipeline.core.int8_gate import is_int8, measure_int8
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.shape_model import resolve_model

DEFAULT_BATCH_SIZES = (16, 32, 64, 128, 256)
DEFAULT_TEXTS = 1000
DEFAULT_PIPELINE_ROWS = 5000
END_TO_END_TARGET = 0.95  # end-to-end rows/s as a share of bare encoding
WRITE_RATIO_TARGET = 1.5  # unnest UPDATE against executemany
WRITE_ROWS_PER_SECOND_TARGET = 20_000
RSS_FLAT_TOLERANCE = 1.10  # last batch's RSS within 10% (or 64 MiB) of the first's counts as flat
RSS_FLAT_SLACK_BYTES = 64 * 2**20

log = logging.getLogger(__name__)


# --- the command ------------------------------------------------------------------------------------------


def register_command(commands: argparse._SubParsersAction) -> None:
    """Add `bench` to the `bge-pipeline` command."""
    bench = commands.add_parser(
        "bench",
        help="encoding throughput per batch size (the seed's test_embedding_speed.py); --pipeline: the backfill's "
        "costs; --index: index and vector types compared on your vectors",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--model",
        help="model folder or name; shape:bge-small = random-weight bge-small stand-in (default: EMBEDDING_MODEL)",
    )
    bench.add_argument(
        "--backend",
        help="torch, torch-bf16, onnx, onnx-int8, openvino or auto; a comma list measures each in this run "
        "(default: EMBEDDING_BACKEND)",
    )
    bench.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: EMBEDDING_DEVICE)")
    bench.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=DEFAULT_BATCH_SIZES,
        metavar="N,N,...",
        help=f"encoder batch sizes to measure (default: {','.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    bench.add_argument("--texts", type=int, default=DEFAULT_TEXTS, help="texts per measurement (default: 1000)")
    bench.add_argument(
        "--baseline-model", metavar="M", help="also measure M at the best batch size and print the speedup"
    )
    bench.add_argument(
        "--corpus",
        type=Path,
        help="JSONL of segments (default: the shared SOTU corpus if present, else the bundled 1,000-segment sample)",
    )
    bench.add_argument(
        "--pipeline",
        action="store_true",
        help="measure encoding, the write path, the end-to-end backfill, the index build and RSS on a throwaway table",
    )
    bench.add_argument(
        "--scale",
        action="store_true",
        help="the whole graph through Dagster on --rows seed-shaped rows with a fast stand-in encoder: each phase's "
        "seconds, disk growth against the plan, a concurrent reader's waits (a fresh embedded PostgreSQL)",
    )
    bench.add_argument(
        "--index",
        action="store_true",
        help="ivfflat and hnsw over vector and halfvec: build seconds, bytes, recall@10 at the search path's settings, "
        "query p50/p99, write rows/s, and a recommendation; on the configured table's vectors (DATABASE_URL) or "
        "encoded corpus texts (--model applies to those)",
    )
    bench.add_argument(
        "--rows",
        type=int,
        help=f"--pipeline, --scale: rows to migrate, the corpus repeated under new ids past its end (default: "
        f"{DEFAULT_PIPELINE_ROWS}); --index: vectors to index (default: {DEFAULT_ROWS:,})",
    )
    bench.add_argument(
        "--queries",
        type=int,
        default=DEFAULT_QUERIES,
        help=f"--index: held-out query vectors, never in the table (default: {DEFAULT_QUERIES})",
    )
    bench.add_argument(
        "--batch-rows", type=int, help="--pipeline: rows per backfill batch (default: BACKFILL_BATCH_ROWS)"
    )
    bench.add_argument(
        "--no-old-index",
        action="store_true",
        help="--pipeline: seed the table without the guide's IVFFLAT index on the old column, which "
        "every vector write otherwise also updates",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object on stdout (human lines go to stderr)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(handler=run_bench)


def _int_list(raw: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r}: give at least one batch size, each 1 or more")
    return values


def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    """The `bench` handler: encoding by batch size, or with --pipeline the whole backfill path, or --scale, or --index."""
    modes = [flag for flag in ("scale", "pipeline", "index") if getattr(args, flag)]
    if len(modes) > 1:
        raise ValueError(f"--{' and --'.join(modes)}: choose one")
    if args.rows is None:
        args.rows = DEFAULT_ROWS if args.index else DEFAULT_PIPELINE_ROWS
    if args.texts < 1 or args.rows < 1:
        raise ValueError("--texts and --rows must be 1 or more")
    if args.queries < 1:
        raise ValueError("--queries must be 1 or more")
    out = Output(args.json)
    if args.index:
        result = run_index_bench(args, settings, out)
    elif args.scale:
        result = run_scale_bench(args, settings, out)
    elif args.pipeline:
        result = run_pipeline_bench(args, settings, out)
    else:
        result = run_encoding_bench(args, settings, out)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


# --- what is measured ---------------------------------------------------------------------------------------


def load_texts(limit: int, path: Optional[Path]) -> tuple[list[Any], list[str], str]:
    """Ids, texts and a description of the fixed sample: the first `limit` segments, in file order."""

    segments = load_segments(path, limit=limit)
    source = path.name if path is not None else "the bundled sotu_sample.jsonl.gz"
    if len(segments) < limit:
        log.warning(f"{source} holds only {len(segments):,} segments: measuring those")
    return [s.id for s in segments], [s.text for s in segments], source


@dataclass
class LoadedModel:
    encoder: Any
    requested: str
    source: str
    backend: str
    load_seconds: float


def load_model(name: str, device: str, backend: str) -> LoadedModel:
    """Load `name` (or the bge-small shape stand-in) as an Encoder with its own dimension."""
    started = time.perf_counter()
    source = resolve_model(name)
    try:
        encoder = Encoder.load(source, None, device, None, backend)
    except ModelLoadError as error:
        raise ModelLoadError(
            f"{error}; for speed figures without the real weights use --model shape:bge-small"
        ) from None
    encoder.name = name
    return LoadedModel(encoder, name, source, encoder.backend, time.perf_counter() - started)


def measure_encoding(
    encoder: Any, texts: Sequence[str], batch_size: int, progress: bool, label: str = ""
) -> dict[str, Any]:
    """Texts/s for one batch size: a warm-up first (kernel selection, allocator), then the timed pass."""
    # Warm-up: a full batch on a GPU (kernel autotuning is per shape), a few texts on a CPU (where a full batch of
    # 256 would double the run's time for nothing).
    warmup = batch_size if encoder.device.startswith("cuda") else min(batch_size, 8)
    encoder.encode(list(texts[:warmup]), batch_size=batch_size)
    with tqdm(
        total=len(texts),
        desc=label or f"batch_size={batch_size}",
        unit="text",
        disable=not progress,
        leave=False,
        file=sys.stderr,
    ) as bar:
        _synchronize(encoder.device)
        started = time.perf_counter()
        vectors = encoder.encode(list(texts), batch_size=batch_size, progress=bar.update)
        _synchronize(encoder.device)
        seconds = time.perf_counter() - started
    return {
        "batch_size": batch_size,
        "texts": len(texts),
        "seconds": round(seconds, 3),
        "texts_per_second": round(len(texts) / seconds, 2),
        "dimensions": int(vectors.shape[1]),
    }


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def machine_facts(device: str) -> dict[str, Any]:
    """What the figures depend on: CPU threads, GPU name, torch, load average."""
    import torch

    facts: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def run_encoding_bench(args: argparse.Namespace, settings: Settings, out: Output) -> dict[str, Any]:
    """The seed's speed test: texts/s per batch size and backend, the best, and the speedup over a baseline."""
    model = args.model or settings.embedding_model
    device = args.device or settings.embedding_device
    backends = [b.strip() for b in (args.backend or settings.embedding_backend).split(",") if b.strip()]
    path = corpus_path(args.corpus)
    _ids, texts, source = load_texts(args.texts, path)
    progress = not args.no_progress
    runs: list[dict[str, Any]] = []
    loaded_models: list[LoadedModel] = []
    for backend in backends:
        loaded = load_model(model, device, backend)
        loaded_models.append(loaded)
        encoder = loaded.encoder
        if len(loaded_models) == 1:
            facts = machine_facts(encoder.device)
            out.line(f"Model: {model} ({loaded.source}), {encoder.dimensions} dims")
            out.line(
                f"Device: {encoder.device}"
                + (f" ({facts['gpu']})" if "gpu" in facts else f", {facts['torch_threads']} torch threads")
                + f", torch {facts['torch']}, load average {facts['load_average_1m']}"
            )
            out.line(f"Texts: {len(texts):,} segments of {source}, mean {np.mean([len(t) for t in texts]):.0f} chars")
        out.line(f"Backend: {loaded.backend} (requested {backend}; loaded in {loaded.load_seconds:.1f}s)")
        for batch_size in args.batch_sizes:
            run = measure_encoding(encoder, texts, batch_size, progress, f"{loaded.backend} batch_size={batch_size}")
            run["backend"] = loaded.backend
            runs.append(run)
            out.line(
                f"  batch_size={batch_size:<4} {run['texts_per_second']:>10,.1f} texts/sec  ({run['seconds']:.1f}s)"
            )
    best = max(runs, key=lambda r: r["texts_per_second"])
    out.line(
        f"✅ Best encoding throughput: {best['texts_per_second']:,.0f} texts/sec "
        f"(batch_size={best['batch_size']}, backend={best['backend']}, device={loaded_models[0].encoder.device})"
    )
    result: dict[str, Any] = {
        "mode": "encode",
        "model": model,
        "model_source": loaded_models[0].source,
        "dimensions": loaded_models[0].encoder.dimensions,
        "corpus": source,
        "texts": len(texts),
        **machine_facts(loaded_models[0].encoder.device),
        "runs": runs,
        "best": best,
    }
    if len(loaded_models) > 1:
        result["backend_speedups"] = _backend_speedups(runs, out)
        result["backend_agreement"] = _backend_agreement(loaded_models, texts, out)
    int8 = next((loaded.encoder for loaded in loaded_models if is_int8(loaded.backend)), None)
    if int8 is not None:
        result["int8_gate"] = _int8_gate(int8, texts, settings.int8_min_agreement, out)
    if args.baseline_model:
        baseline = load_model(args.baseline_model, device, "torch")
        measured = measure_encoding(
            baseline.encoder, texts, best["batch_size"], progress, f"baseline batch_size={best['batch_size']}"
        )
        speedup = best["texts_per_second"] / measured["texts_per_second"]
        out.line(
            f"🚀 Speedup vs {args.baseline_model}: {speedup:,.1f}x faster "
            f"({measured['texts_per_second']:,.1f} texts/sec at batch_size={best['batch_size']}, same texts, same run)"
        )
        result["baseline"] = {"model": args.baseline_model, **measured, "speedup": round(speedup, 2)}
    return result


def _backend_speedups(runs: list[dict[str, Any]], out: Output) -> dict[str, float]:
    """Each backend's best texts/s over the first backend's best."""
    best_by_backend: dict[str, float] = {}
    for run in runs:
        best_by_backend[run["backend"]] = max(best_by_backend.get(run["backend"], 0.0), run["texts_per_second"])
    first, reference = next(iter(best_by_backend.items()))
    speedups = {backend: round(rate / reference, 2) for backend, rate in best_by_backend.items()}
    for backend, ratio in speedups.items():
        if backend != first:
            out.line(f"   {backend} vs {first}: {ratio:.2f}x (best batch size of each)")
    return speedups


def _backend_agreement(loaded_models: list[LoadedModel], texts: Sequence[str], out: Output) -> dict[str, float]:
    """Lowest cosine between each backend's vectors and the first backend's, over the texts plus edge cases."""
    probe = list(texts[:64]) + ["", "a", " ".join(["state of the union"] * 300)]
    reference = loaded_models[0].encoder.encode(probe, batch_size=8)
    agreement = {}
    for loaded in loaded_models[1:]:
        if loaded.backend in agreement or loaded.backend == loaded_models[0].backend:
            continue  # a backend that fell back to one already measured
        vectors = loaded.encoder.encode(probe, batch_size=8)
        agreement[loaded.backend] = round(float(np.min(np.sum(vectors * reference, axis=1))), 6)
        out.line(
            f"   {loaded.backend} vs {loaded_models[0].backend}: lowest cosine {agreement[loaded.backend]:.6f} "
            f"over {len(probe)} texts (incl. empty and 1,200-word)"
        )
    return agreement


def _int8_gate(int8: Encoder, texts: Sequence[str], floor: float, out: Output) -> dict[str, Any]:
    """What the pipeline's int8 gate would say on these texts: the figure that decides, not per-vector cosine."""
    gate = measure_int8(int8, texts, floor)
    out.line(f"   onnx-int8 gate: {gate.describe()}: {'passes' if gate.passed else 'REFUSED'}")
    return gate.as_dict()


# --- --pipeline -------------------------------------------------------------------------------------------


@dataclass
class RssSampler:
    """The process's RSS after each backfill batch, to see whether memory stays flat as rows go by."""

    samples: list[int] = field(default_factory=list)

    def __call__(self, *_: Any) -> None:
        import psutil

        self.samples.append(psutil.Process().memory_info().rss)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"batches": 0}
        first, last, peak = self.samples[0], self.samples[-1], max(self.samples)
        flat = last <= max(first * RSS_FLAT_TOLERANCE, first + RSS_FLAT_SLACK_BYTES)
        return {
            "batches": len(self.samples),
            "first_mib": round(first / 2**20, 1),
            "last_mib": round(last / 2**20, 1),
            "peak_mib": round(peak / 2**20, 1),
            "flat": bool(flat),
        }


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)


def run_pipeline_bench(args: argparse.Namespace, settings: Settings, out: Output) -> dict[str, Any]:
    """Bare encoding, the write path (unnest vs executemany), the end-to-end backfill and the index build, on the
    same rows in one run, so the ratios compare like with like."""

    model = args.model or settings.embedding_model
    device = args.device or settings.embedding_device
    backend = (args.backend or settings.embedding_backend).split(",")[0].strip()
    batch_rows = args.batch_rows or settings.backfill_batch_rows
    path = corpus_path(args.corpus)
    segments = repeated(load_segments(path, limit=args.rows), args.rows)
    source = path.name if path is not None else "the bundled sotu_sample.jsonl.gz"
    loaded = load_model(model, device, backend)
    encoder = loaded.encoder
    if args.batch_sizes != DEFAULT_BATCH_SIZES:
        encoder.batch_size = args.batch_sizes[0]
    progress = not args.no_progress
    facts = machine_facts(encoder.device)
    table_name = "segments" if not settings.database_url else f"bge_bench_{uuid.uuid4().hex[:8]}"
    out.line(
        f"Model: {model} ({loaded.source}), {encoder.dimensions} dims, backend {loaded.backend}, "
        f"device {encoder.device}, encoder batch size {encoder.batch_size}"
    )
    out.line(
        f"Rows: {len(segments):,} segments of {source}, backfill batches of {batch_rows:,} rows, "
        f"{'no' if args.no_old_index else 'with the'} old column's IVFFLAT index; load average {facts['load_average_1m']}"
    )
    result: dict[str, Any] = {
        "mode": "pipeline",
        "model": model,
        "backend": loaded.backend,
        "dimensions": encoder.dimensions,
        "encoder_batch_size": encoder.batch_size,
        "batch_rows": batch_rows,
        "rows": len(segments),
        "corpus": source,
        "old_index": not args.no_old_index,
        **facts,
    }
    with bench_database(settings) as (url, description):
        out.line(f"Database: {description}, table {table_name}")
        db = Database(database_url=url)
        migration = MigrationTarget(
            table=table_name,
            model=model,
            dimensions=encoder.dimensions,
            partitions=settings.backfill_partitions,
            batch_rows=batch_rows,
            max_retries=settings.backfill_max_retries,
        )
        try:
            with db.connect() as conn:
                create_seed_table(conn, segments, table=table_name, old_index=not args.no_old_index)
            staging = phases.prepare_staging_column(db, migration, encoder)
            with db.connect() as conn:
                table = migration.read_state(conn).table
            column = staging.column
            ids = [s.id for s in segments]
            texts = [s.text for s in segments]

            # 1. Bare encoding: the same texts in the same batches the backfill reads, nothing else.
            encoder.encode(texts[:8])  # warm-up, as the backfill's first batch would pay it
            vectors = np.empty((len(texts), encoder.dimensions), dtype=np.float32)
            with tqdm(
                total=len(texts), desc="bare encoding", unit="row", disable=not progress, leave=False, file=sys.stderr
            ) as bar:
                started = time.perf_counter()
                for start in range(0, len(texts), batch_rows):
                    vectors[start : start + batch_rows] = encoder.encode(
                        texts[start : start + batch_rows], progress=bar.update
                    )
                encode_seconds = time.perf_counter() - started
            encode_rate = len(texts) / encode_seconds
            out.line(f"Bare encoding:      {encode_rate:>10,.1f} texts/s  ({encode_seconds:.1f}s)")

            # 2. The write path alone, with the vectors just computed; a VACUUM between runs gives each a clean table.
            # Two rounds, alternating, best of each: the first write on a table pays one-off costs (plans, cache).
            rates: dict[str, list[float]] = {"unnest": [], "executemany": []}
            for _round in range(2):
                for how in ("executemany", "unnest"):
                    rates[how].append(_measure_write(db, table, column, ids, texts, vectors, batch_rows, how))
            unnest_rate, executemany_rate = max(rates["unnest"]), max(rates["executemany"])
            write_ratio = unnest_rate / executemany_rate
            out.line(f"Write, unnest:      {unnest_rate:>10,.0f} rows/s  (one UPDATE ... FROM unnest per batch)")
            out.line(f"Write, executemany: {executemany_rate:>10,.0f} rows/s  (one UPDATE per row, pipelined)")
            out.line(
                f"   unnest / executemany = {write_ratio:.2f}x (best of 2 runs each) (target >= {WRITE_RATIO_TARGET}x), "
                f"unnest {'>=' if unnest_rate >= WRITE_ROWS_PER_SECOND_TARGET else '<'} "
                f"{WRITE_ROWS_PER_SECOND_TARGET:,} rows/s target"
            )
            _reset_column(db, table, column)

            # 3. End to end: migration.backfill, exactly what the `embeddings` asset runs, all partitions in one run.
            sampler = RssSampler()
            with tqdm(
                total=len(texts), desc="backfill", unit="row", disable=not progress, leave=False, file=sys.stderr
            ) as bar:

                def on_batch(batch: Any, stats: Any) -> None:
                    sampler()
                    bar.update(len(batch.ids))

                _, stats = phases.backfill(db, migration, encoder, list(range(migration.partitions)), log, on_batch)
            ratio = stats.rows_per_second / encode_rate
            rss = sampler.summary()
            out.line(
                f"End-to-end backfill:{stats.rows_per_second:>10,.1f} rows/s  ({stats.seconds:.1f}s, "
                f"{stats.rows_embedded:,} rows, {stats.batches} batches; encode {stats.encode_seconds:.1f}s, "
                f"write {stats.write_seconds:.1f}s overlapped)"
            )
            out.line(f"   end-to-end / bare encoding = {ratio:.3f} (target >= {END_TO_END_TARGET})")

            # 4. The index, built the way the embedding_index asset builds it.
            with db.connect() as conn:
                index_settings = _index_build_settings_seen(conn)
            index = phases.build_index(db, migration, log)
            out.line(
                f"Index build:        {index.seconds:>10,.2f} s  (IVFFLAT lists={index.lists}, {index.rows:,} vectors; "
                f"maintenance_work_mem={index_settings['maintenance_work_mem']}, "
                f"max_parallel_maintenance_workers={index_settings['max_parallel_maintenance_workers']})"
            )
            out.line(
                f"RSS per batch:      first {rss.get('first_mib')} MiB, last {rss.get('last_mib')} MiB, "
                f"peak {rss.get('peak_mib')} MiB over {rss['batches']} batches: "
                f"{'flat' if rss.get('flat') else 'GROWING'}; process peak {_peak_rss_mib()} MiB"
            )
        finally:
            if settings.database_url:
                _drop_throwaway_table(db, migration)
            db.dispose()
    result.update(
        {
            "encode_texts_per_second": round(encode_rate, 2),
            "write_unnest_rows_per_second": round(unnest_rate, 1),
            "write_executemany_rows_per_second": round(executemany_rate, 1),
            "write_ratio": round(write_ratio, 2),
            "write_targets_met": bool(
                write_ratio >= WRITE_RATIO_TARGET and unnest_rate >= WRITE_ROWS_PER_SECOND_TARGET
            ),
            "end_to_end_rows_per_second": round(stats.rows_per_second, 2),
            "end_to_end_seconds": round(stats.seconds, 2),
            "end_to_end_encode_seconds": round(stats.encode_seconds, 2),
            "end_to_end_write_seconds": round(stats.write_seconds, 2),
            "end_to_end_ratio": round(ratio, 3),
            "end_to_end_target_met": bool(ratio >= END_TO_END_TARGET),
            "rows_embedded": stats.rows_embedded,
            "index_build_seconds": round(index.seconds, 3),
            "index_lists": index.lists,
            "index_build_settings": index_settings,
            "rss_per_batch": rss,
            "peak_rss_mib": _peak_rss_mib(),
        }
    )
    if not args.json:
        out.line("JSON: " + json.dumps(result, sort_keys=True))
    return result


def _drop_throwaway_table(db: Database, migration: MigrationTarget) -> None:
    """On a DATABASE_URL server: leave nothing behind but what was there (table, trigger function, model row)."""
    table = sql.Table(
        migration.schema_name,
        migration.table,
        migration.id_column,
        migration.text_column,
        migration.embedding_column,
        migration.staging_column,
    )
    with db.connect() as conn:
        conn.execute(sql.drop_table(table.schema, table.name))  # its trigger goes with it, the function does not
        conn.execute(sql.drop_stale_vector_trigger(table)[1])
    try:
        with db.connect() as conn:
            conn.execute(sql.DELETE_MODEL, (table.schema, table.name, migration.staging_column))
    except psycopg.Error:
        pass  # no state table: nothing was recorded


def _reset_column(db: Any, table: Any, column: str) -> None:
    with db.connect() as conn:
        conn.execute(sql.clear_column(table, column))
    with db.connect(autocommit=True) as conn:
        conn.execute(psql.SQL("VACUUM ANALYZE {t}").format(t=table.ident))


def _measure_write(
    db: Any, table: Any, column: str, ids: list[Any], texts: list[str], vectors: np.ndarray, batch_rows: int, how: str
) -> float:
    """Rows/s writing `vectors` into an all-NULL `column`, one transaction per batch, as the backfill does."""
    _reset_column(db, table, column)
    per_row = psql.SQL(
        "UPDATE {t} SET {c} = %s WHERE {id} = %s AND {c} IS NULL AND md5(convert_to({text}, 'UTF8')) = %s"
    ).format(t=table.ident, c=psql.Identifier(column), id=table.id, text=table.text)
    written = 0
    started = time.perf_counter()
    for start in range(0, len(ids), batch_rows):
        batch = Batch(start // batch_rows, ids[start : start + batch_rows], texts[start : start + batch_rows])
        with db.connect() as conn:
            if how == "unnest":
                written += write_vectors(conn, table, column, batch, vectors[start : start + batch_rows])
            else:
                with conn.cursor() as cursor:
                    cursor.executemany(per_row, list(zip(vectors[start : start + batch_rows], batch.ids, batch.hashes)))
                written += len(batch.ids)  # executemany reports no row count
    seconds = time.perf_counter() - started
    if written != len(ids):
        raise RuntimeError(f"the {how} write updated {written} of {len(ids)} rows")
    return len(ids) / seconds


def _index_build_settings_seen(conn: Any) -> dict[str, str]:
    """The settings build_index applies on its own connection, as the server resolves them (units included)."""

    for statement in sql.INDEX_BUILD_SETTINGS:
        conn.execute(statement.as_string(conn).replace("SET ", "SET LOCAL ", 1))
    seen = {
        name: conn.execute(f"SHOW {name}").fetchone()[0]
        for name in (
            "maintenance_work_mem",
            "max_parallel_maintenance_workers",
            "max_parallel_workers",
            "max_worker_processes",
        )
    }
    conn.rollback()
    return seen
