"""Definitions: built from one Settings when Dagster loads the code location, never at import."""

import dagster as dg

from bge_pipeline.core.settings import Settings
from bge_pipeline.defs import checks, jobs, quality_checks
from bge_pipeline.defs.assets.column import staging_embedding_column
from bge_pipeline.defs.assets.embeddings import build_embedding_batches, embeddings
from bge_pipeline.defs.assets.index import embedding_index
from bge_pipeline.defs.assets.swap import live_embedding_column
from bge_pipeline.defs.automation import build_reembed_schedule, pending_rows_sensor
from bge_pipeline.defs.resources import build_resources


def build_definitions(settings: Settings, from_environment: bool = True) -> dg.Definitions:
    """Everything Dagster shows for `settings`: the partitions, the schedule and the resources come from them."""
    return dg.Definitions(
        assets=[
            staging_embedding_column,
            build_embedding_batches(settings.backfill_partitions),
            embeddings,
            embedding_index,
            live_embedding_column,
        ],
        asset_checks=dg.load_asset_checks_from_modules([checks, quality_checks]),
        jobs=[
            jobs.migration_job,
            jobs.reembed_job,
            jobs.rollback_staging_vectors,
            jobs.rollback_staging_column,
            jobs.restore_old_embeddings_job,
        ],
        schedules=[build_reembed_schedule(settings.reembed_cron)],
        sensors=[pending_rows_sensor],
        resources=build_resources(settings, from_environment),
        # One process per run: the model loads once and owns the GPU; parallelism comes from runs (partitions).
        executor=dg.in_process_executor,
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What `dagster dev` and `dagster asset materialize -m bge_pipeline` load: the settings are read here."""
    return build_definitions(Settings.from_env())
