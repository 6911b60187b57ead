"""`bge-pipeline demo`: the guide's starting table from the bundled sample, migrated through Dagster."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from dotenv import dotenv_values

from bge_pipeline.cli.dev import dagster_instance, storage_environment
from bge_pipeline.cli.models import demo_settings
from bge_pipeline.core import sql
from bge_pipeline.core.corpus import OLD_DIMENSIONS, create_seed_table, load_segments
from bge_pipeline.core.database import Database
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.settings import DOTENV_FILE, Settings
from bge_pipeline.core.verification import verify

# Dagster's run tags for a run over a range of partitions (what a backfill of the range sets).
PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"


def register_command(commands: argparse._SubParsersAction) -> None:
    """`bge-pipeline demo`."""
    parser = commands.add_parser(
        "demo", help="seed a `segments` table from the bundled sample and migrate it through Dagster"
    )
    parser.add_argument("--rows", type=int, default=1000, help="how many of the bundled 1,000 segments to load")
    parser.add_argument("--force", action="store_true", help="replace an existing table on a DATABASE_URL server")
    parser.add_argument("--verbose", action="store_true", help="print Dagster's event log too")
    parser.set_defaults(handler=lambda args, settings: run_demo(settings, args.rows, args.force, args.verbose))


def run_demo(settings: Settings, rows: int = 1000, force: bool = False, verbose: bool = False) -> int:
    """Seed `segments` (1536-dim old vectors, the guide's index), run `embeddings*`, print the verification."""
    # Only here: the other commands start without Dagster.
    import dagster as dg

    from bge_pipeline.defs.assets.embeddings import backfill_partitions
    from bge_pipeline.defs.definitions import build_definitions

    settings = demo_settings(settings)
    database, target = Database.from_settings(settings), MigrationTarget.from_settings(settings)
    print(f"Database: {database.description}")
    database.ensure_pgvector()
    with database.connect() as conn:
        exists = conn.execute(sql.TABLE_COLUMNS, (settings.embedding_schema, settings.embedding_table)).fetchone()
        if exists and settings.database_url and not force:
            raise RuntimeError(
                f"EMBEDDING_TABLE={settings.embedding_table!r} already exists on DATABASE_URL's server: "
                "the demo replaces it, so pass --force if that is what you want"
            )
        segments = load_segments(limit=rows)
        create_seed_table(conn, segments, settings.embedding_table, settings.embedding_schema)
    print(
        f"Seeded {settings.embedding_table}: {len(segments):,} State of the Union segments, {OLD_DIMENSIONS}-dim old vectors"
    )

    defs = build_definitions(settings, from_environment=False)
    storage = storage_environment(settings)
    partitions = backfill_partitions(settings.backfill_partitions).get_partition_keys()
    # The guide's step-by-step option, recorded in the instance `bge-pipeline dev` and `dagster dev` show, so the UI
    # afterwards has every asset materialized: Phase 1, every backfill partition in one run, then `embeddings*`.
    steps = [
        ("staging_embedding_column", {}),
        ("embedding_batches", {PARTITION_RANGE_START: partitions[0], PARTITION_RANGE_END: partitions[-1]}),
        ("embeddings*", {}),
    ]
    started = time.perf_counter()
    results = {}
    with dagster_instance(storage) as instance:
        for selection, tags in steps:
            results[selection] = result = dg.materialize(
                [*defs.assets, *defs.asset_checks],  # type: ignore[misc]
                selection=selection,
                resources=defs.resources,
                instance=instance,
                tags=tags,
                run_config={"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "ERROR"}}}},
                raise_on_error=False,
            )
            if not result.success:
                break
    seconds = time.perf_counter() - started
    if not result.success:
        failure = next((event.event_specific_data.error for event in result.all_events if event.is_step_failure), None)
        print(f"The migration run failed: {failure.message.strip() if failure else 'see --verbose'}")
        return 1
    embedded = results["embedding_batches"].asset_materializations_for_node("embedding_batches")[0].metadata
    print(
        f"Migrated in {seconds:.1f}s through Dagster: {embedded['rows_embedded'].value:,} rows embedded at "
        f"{embedded['rows_per_second'].value:,.1f} rows/s on {embedded['device'].value} "
        f"({embedded['backend'].value}, batch size {embedded['batch_size'].value}"
        + (
            f", at most {embedded['tokens_per_pass'].value:,} tokens a pass)"
            if embedded["tokens_per_pass"].value
            else ")"
        )
    )
    for check in result.get_asset_check_evaluations():
        print(f"check {check.check_name:<24} {'passed' if check.passed else 'FAILED'}")
    verification = verify(database, target)
    print("\n".join(verification.lines()))
    later = {"EMBEDDING_MODEL": settings.embedding_model, "EMBEDDING_QUERY_PREFIX": settings.query_prefix}
    remember(Path(DOTENV_FILE), {**later, **{k: v for k, v in storage.items() if k == "DAGSTER_PG_URL"}})
    return 0 if verification.complete else 1


def remember(env_file: Path, values: dict[str, str]) -> None:
    """Add to `.env` (which Dagster's CLI reads from the working directory) the settings it does not set yet."""
    present = dotenv_values(env_file) if env_file.is_file() else {}
    missing = {k: v for k, v in values.items() if k not in present and k not in os.environ}
    if not missing:
        return
    existing = env_file.read_text() if env_file.is_file() else ""
    separator = "" if not existing or existing.endswith("\n") else "\n"
    lines = "".join(f"{key}={value}\n" for key, value in missing.items())
    env_file.write_text(f"{existing}{separator}{lines}")
    print(f"Wrote {', '.join(missing)} to {env_file} for `dagster dev` and `dagster asset materialize` here")
