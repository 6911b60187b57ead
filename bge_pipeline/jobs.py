"""Jobs, the re-embedding schedule and sensor, and the rollback jobs (each refuses without confirmation)."""

from typing import Callable, Iterator

import dagster as dg

from bge_pipeline import migration as phases
from bge_pipeline import sql
from bge_pipeline.assets.backfill import embeddings
from bge_pipeline.database import DatabaseResource
from bge_pipeline.migration import MigrationResource, RollbackPlan
from bge_pipeline.settings import current_settings

migration_job = dg.define_asset_job(
    "embedding_migration",
    selection=dg.AssetSelection.assets(embeddings).downstream(),
    description="The guide's three phases: embed every row, build the index, swap the columns.",
)

reembed_job = dg.define_asset_job(
    "reembed",
    selection=dg.AssetSelection.assets(embeddings),
    description="Embed rows that have text but no vector: new rows, and rows whose text changed since (a trigger "
    "NULLs their vector). Before the swap it fills the staging column; after it, the live one.",
)

reembed_schedule = dg.ScheduleDefinition(
    job=reembed_job,
    cron_schedule=current_settings().reembed_cron,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="REEMBED_CRON (default daily at 03:00).",
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
    threshold = current_settings().reembed_min_pending
    with database.connect() as conn:
        state = migration.read_state(conn)
        column = migration.writable_column(state)
        if column is None:
            yield dg.SkipReason(f"{migration.table} has no column for {migration.model} yet: run the migration")
            return
        pending = conn.execute(sql.count_pending(state.table, column)).fetchone()[0]
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


class Confirmation(dg.Config):
    """Destructive jobs do nothing until a run config says `confirm: true`."""

    confirm: bool = False


def _confirmed(
    context: dg.OpExecutionContext, config: Confirmation, plan: RollbackPlan, action: Callable[[], object]
) -> dg.Output:
    if not config.confirm:
        raise dg.Failure(
            f"Not confirmed: this job would {plan.description}. Launch it again with run config "
            f"`ops: {{{context.op.name}: {{config: {{confirm: true}}}}}}` to do it."
        )
    context.log.info(f"Confirmed: about to {plan.description}")
    action()
    return dg.Output(None, metadata={"rows": dg.MetadataValue.int(plan.rows), "done": plan.description})


@dg.op(description="The guide's `alembic downgrade 005`: clears the staging column's vectors.")
def clear_staging_vectors(
    context: dg.OpExecutionContext, config: Confirmation, database: DatabaseResource, migration: MigrationResource
) -> dg.Output:
    plan = phases.plan_clear_staging(database, migration)
    return _confirmed(context, config, plan, lambda: phases.clear_staging(database, migration))


@dg.op(description="The guide's `alembic downgrade 004`: drops the staging column; the old index never left.")
def drop_staging_column(
    context: dg.OpExecutionContext, config: Confirmation, database: DatabaseResource, migration: MigrationResource
) -> dg.Output:
    plan = phases.plan_drop_staging(database, migration)
    return _confirmed(context, config, plan, lambda: phases.drop_staging(database, migration))


class RestoreConfirmation(Confirmation):
    dimensions: int = 1536


@dg.op(description="After Phase 3: puts the old vectors back from the backup the swap kept, with an index.")
def restore_old_embeddings(
    context: dg.OpExecutionContext,
    config: RestoreConfirmation,
    database: DatabaseResource,
    migration: MigrationResource,
) -> dg.Output:
    plan = phases.plan_restore(database, migration, config.dimensions)
    return _confirmed(
        context, config, plan, lambda: phases.restore_backup(database, migration, config.dimensions, context.log)
    )


@dg.job(description="Rollback before Phase 3, step 1: NULL every vector of the staging column (needs confirm).")
def rollback_staging_vectors() -> None:
    clear_staging_vectors()


@dg.job(description="Rollback before Phase 3, step 2: remove the staging column (needs confirm).")
def rollback_staging_column() -> None:
    drop_staging_column()


@dg.job(description="Undo Phase 3 from the kept backup of the old vectors (needs confirm and `dimensions`).")
def restore_old_embeddings_job() -> None:
    restore_old_embeddings()

