"""Definitions: where assets, checks, jobs and resources are wired together."""

import dagster as dg

from bge_pipeline import checks, jobs, quality
from bge_pipeline.assets import backfill, column, index, swap
from bge_pipeline.resources import build_resources
from bge_pipeline.settings import current_settings

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([column, backfill, index, swap]),
    asset_checks=dg.load_asset_checks_from_modules([checks, quality]),
    jobs=[
        jobs.migration_job,
        jobs.reembed_job,
        jobs.rollback_staging_vectors,
        jobs.rollback_staging_column,
        jobs.restore_old_embeddings_job,
    ],
    schedules=[jobs.reembed_schedule],
    sensors=[jobs.pending_rows_sensor],
    resources=build_resources(current_settings()),
    # One process per run: the model loads once and owns the GPU; parallelism comes from runs (partitions).
    executor=dg.in_process_executor,
)
