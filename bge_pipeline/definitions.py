"""Definitions: where assets, checks, jobs and resources are wired together."""

import dagster as dg

from bge_pipeline import checks
from bge_pipeline.assets import backfill, column, index, swap
from bge_pipeline.resources import build_resources
from bge_pipeline.settings import current_settings

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([column, backfill, index, swap]),
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    resources=build_resources(current_settings()),
    # One process per run: the model loads once and owns the GPU; parallelism comes from runs (partitions).
    executor=dg.in_process_executor,
)
