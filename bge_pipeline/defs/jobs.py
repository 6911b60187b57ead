"""Jobs: the migration, re-embedding, and the rollback jobs (each refuses without confirmation)."""

from typing import Callable

import dagster as dg

from bge_pipeline.core import rollback
from bge_pipeline.core.rollback import RollbackPlan
from bge_pipeline.defs.assets.embeddings import embeddings
from bge_pipeline.defs.resources import DatabaseResource, MigrationResource

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
    db, target = database.get(), migration.target()
    plan = rollback.plan_clear_staging(db, target)
    return _confirmed(context, config, plan, lambda: rollback.clear_staging(db, target))


@dg.op(description="The guide's `alembic downgrade 004`: drops the staging column; the old index never left.")
def drop_staging_column(
    context: dg.OpExecutionContext, config: Confirmation, database: DatabaseResource, migration: MigrationResource
) -> dg.Output:
    db, target = database.get(), migration.target()
    plan = rollback.plan_drop_staging(db, target)
    return _confirmed(context, config, plan, lambda: rollback.drop_staging(db, target))


class RestoreConfirmation(Confirmation):
    dimensions: int = 1536


@dg.op(description="After Phase 3: puts the old vectors back from the backup the swap kept, with an index.")
def restore_old_embeddings(
    context: dg.OpExecutionContext,
    config: RestoreConfirmation,
    database: DatabaseResource,
    migration: MigrationResource,
) -> dg.Output:
    db, target = database.get(), migration.target()
    plan = rollback.plan_restore(db, target, config.dimensions)
    return _confirmed(
        context, config, plan, lambda: rollback.restore_backup(db, target, config.dimensions, context.log)
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
