"""What starts the re-embedding job by itself: a schedule, and a sensor that counts rows waiting for a vector."""

from collections.abc import Iterator

import dagster as dg

from bge_pipeline.core import sql
from bge_pipeline.core.database import scalar
from bge_pipeline.defs.jobs import reembed_job
from bge_pipeline.defs.resources import DatabaseResource, MigrationResource


def build_reembed_schedule(cron: str) -> dg.ScheduleDefinition:
    """The re-embedding job on REEMBED_CRON (default daily at 03:00), stopped until someone turns it on."""
    return dg.ScheduleDefinition(
        job=reembed_job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Re-embeds rows without a vector on REEMBED_CRON ({cron}).",
    )


@dg.sensor(
    job=reembed_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests a re-embedding run once REEMBED_MIN_PENDING rows wait for a vector.",
)
def pending_rows_sensor(
    context: dg.SensorEvaluationContext, database: DatabaseResource, migration: MigrationResource
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    threshold = migration.reembed_min_pending
    target = migration.target()
    with database.get().connect() as conn:
        state = target.read_state(conn)
        column = target.writable_column(state)
        if column is None:
            yield dg.SkipReason(f"{target.table} has no column for {target.model} yet: run the migration")
            return
        pending = scalar(conn, sql.count_pending(state.table, column))
    if pending < threshold:
        yield dg.SkipReason(f"{pending} rows pending, below REEMBED_MIN_PENDING={threshold}")
        return
    in_flight = context.instance.get_run_records(
        dg.RunsFilter(job_name=reembed_job.name, statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED])
    )
    if in_flight:
        yield dg.SkipReason(f"{pending} rows pending; a reembed run is already in flight")
        return
    yield dg.RunRequest(tags={"rows_pending": str(pending)})
