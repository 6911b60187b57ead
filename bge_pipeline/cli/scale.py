"""`bge-pipeline bench --scale --rows N`: the whole graph through Dagster on N seed-shaped rows, the database side
measured: each phase's seconds, disk growth against the plan, and how long a concurrent primary-key reader waited.

The rows are the corpus repeated under new ids, with 1536-dim old vectors and the guide's old IVFFLAT index. The
encoder is bge-small's embeddings without transformer layers (random, mean-pooled): fast enough that the
database's work shows, and its seconds are reported apart.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Any

import numpy as np
import psycopg

from bge_pipeline.cli.measure import Output, bench_database, corpus_path, repeated
from bge_pipeline.core import sql
from bge_pipeline.core.corpus import create_seed_table, load_segments
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.encoder import encoder_for
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.plan import plan_migration
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.shape_model import build_lookup_model

READER_PAUSE_SECONDS = 0.005


class PrimaryKeyReader(threading.Thread):
    """An application's reads during the migration: one row by primary key, every few milliseconds; and, once a
    second, the database's size, whose peak is what the disk must hold."""

    def __init__(self, url: str, table: str, ids: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.table, self.ids = url, table, ids
        self.waits: list[float] = []
        self.errors = 0
        self.peak_bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        query = sql.text_by_id(sql.Table("public", self.table, "id", "text", "embedding", "embedding_384"))
        sized = 0.0
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    conn.execute(query, (random.choice(self.ids),)).fetchone()
                except psycopg.Error:
                    self.errors += 1  # counted, not hidden
                self.waits.append(time.perf_counter() - started)
                if started - sized > 1.0:
                    self.peak_bytes = max(self.peak_bytes, conn.execute(sql.DATABASE_SIZE).fetchone()[0])
                    sized = started
                time.sleep(READER_PAUSE_SECONDS)

    def figures(self) -> dict[str, float]:
        waits = np.asarray(self.waits or [0.0])
        return {
            "reads": len(self.waits),
            "read_errors": self.errors,
            "read_wait_max_ms": round(float(waits.max()) * 1000, 1),
            "read_wait_p99_ms": round(float(np.percentile(waits, 99)) * 1000, 1),
        }


def _step_seconds(entries: list[Any]) -> dict[str, float]:
    """Wall seconds of each step (asset or check) from the run's event log."""
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for entry in entries:
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type_value == "STEP_START":
            started[event.step_key] = entry.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and event.step_key in started:
            seconds[event.step_key] = round(entry.timestamp - started[event.step_key], 2)
    return seconds


def run_scale_bench(args: argparse.Namespace, settings: Settings, out: Output) -> dict[str, Any]:
    """Seed, plan, migrate through Dagster with a reader running, and compare what happened with the plan."""
    # Only here: the other bench modes, and every other command, start without Dagster.
    import dagster as dg

    from bge_pipeline.defs.definitions import build_definitions

    if settings.database_url:
        raise ValueError(
            "bench --scale makes a table of N rows with 1536-dim vectors: it runs on a fresh embedded "
            "PostgreSQL only, so unset DATABASE_URL for it"
        )
    segments = repeated(load_segments(corpus_path(args.corpus)), args.rows)[: args.rows]
    model = build_lookup_model()
    with bench_database(settings) as (url, description):
        plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
        out.line(f"Database: {description}; {len(segments):,} rows; stand-in encoder {model.name}")
        started = time.perf_counter()
        with psycopg.connect(plain, autocommit=True) as conn:
            create_seed_table(conn, segments)
        seed_seconds = time.perf_counter() - started
        out.line(f"Seeded in {seed_seconds:,.1f} s (1536-dim old vectors, the guide's IVFFLAT index)")

        run_settings = settings.replace(
            database_url=url,
            embedding_model=str(model),
            embedding_dimensions=384,
            embedding_device="cpu",
            embedding_backend="torch",
            embedding_schema="public",
            embedding_table="segments",
            embedding_id_column="id",
            embedding_text_column="text",
            embedding_column="embedding",
        )
        database, target = Database.from_settings(run_settings), MigrationTarget.from_settings(run_settings)
        plan = plan_migration(database, target, encoder_for(run_settings))
        with database.connect() as conn:
            size_before = scalar(conn, sql.DATABASE_SIZE)
        reader = PrimaryKeyReader(plain, "segments", [s.id for s in segments[:: max(1, len(segments) // 10_000)]])
        reader.start()
        defs = build_definitions(run_settings, from_environment=False)
        started = time.perf_counter()
        with dg.DagsterInstance.ephemeral() as instance:
            result = dg.materialize(
                [*defs.assets, *defs.asset_checks],  # type: ignore[misc]
                selection="embeddings*",
                resources=defs.resources,
                instance=instance,
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                raise_on_error=False,
            )
            steps = _step_seconds(instance.all_logs(result.run_id))
        migrate_seconds = time.perf_counter() - started
        reader.stop.set()
        reader.join()
        with database.connect() as conn:
            size_after = scalar(conn, sql.DATABASE_SIZE)
        database.dispose()
    if not result.success:
        failure = next(e for e in result.all_events if e.is_step_failure).event_specific_data.error
        raise RuntimeError(f"the scale run failed: {failure.message.strip().splitlines()[-1]}")
    embedded = result.asset_materializations_for_node("embeddings")[0].metadata
    encode_seconds = float(embedded["encode_seconds"].value)
    figures: dict[str, Any] = {
        "mode": "scale",
        "rows": len(segments),
        "seed_seconds": round(seed_seconds, 1),
        "migration_seconds": round(migrate_seconds, 1),
        "encode_seconds": round(encode_seconds, 1),
        "migration_seconds_except_encoding": round(migrate_seconds - encode_seconds, 1),
        "write_seconds": float(embedded["write_seconds"].value),
        "steps": steps,
        "disk_growth_bytes": size_after - size_before,
        "disk_peak_growth_bytes": max(reader.peak_bytes, size_after) - size_before,
        "plan_bytes_needed": plan.bytes_needed,
        "plan_estimated_seconds": round(plan.estimated_seconds, 1),
        "plan_encode_texts_per_second": round(plan.encode_texts_per_second or 0, 1),
        **reader.figures(),
    }
    out.line(f"Migrated in {migrate_seconds:,.1f} s through Dagster, {encode_seconds:,.1f} s of it encoding")
    for step, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        out.line(f"  {step:<48} {seconds:>9,.2f} s")
    out.line(
        f"Disk: peak growth {figures['disk_peak_growth_bytes'] / 2**20:,.0f} MiB, "
        f"{figures['disk_growth_bytes'] / 2**20:,.0f} MiB after; the plan said {plan.bytes_needed / 2**20:,.0f} MiB"
    )
    out.line(f"Time: {migrate_seconds:,.0f} s; the plan said {plan.estimated_seconds:,.0f} s")
    out.line(
        f"Reader: {figures['reads']:,} primary-key reads, longest wait {figures['read_wait_max_ms']:,.1f} ms, "
        f"p99 {figures['read_wait_p99_ms']:,.1f} ms, {figures['read_errors']} errors"
    )
    return figures
