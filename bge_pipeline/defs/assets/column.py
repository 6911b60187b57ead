"""Phase 1: the staging column that receives the new model's vectors."""

import dagster as dg

from bge_pipeline.core.int8_gate import Int8Agreement
from bge_pipeline.core.migration import prepare_staging_column
from bge_pipeline.core.plan import Plan, check_room
from bge_pipeline.defs.resources import DatabaseResource, EncoderResource, MigrationResource

GROUP = "embedding_migration"


@dg.asset(
    group_name=GROUP,
    kinds={"postgres", "pgvector"},
    owners=["team:search"],
    description="Phase 1: the `embedding_<dims>` column for the configured model, recorded with its model name.",
)
def staging_embedding_column(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    encoder: EncoderResource,
    migration: MigrationResource,
) -> dg.MaterializeResult:
    db, target = database.get(), migration.target()
    plan = check_room(db, target)  # refuses, naming the figures, where the disk cannot hold the migration
    # The model loads before a column is made, so one of another dimension is refused with nothing created.
    result = prepare_staging_column(db, target, encoder.get)
    if result.migrated:
        context.log.info(
            f"{migration.embedding_table}.{result.column} already holds {migration.embedding_model} vectors: nothing to stage"
        )
    return dg.MaterializeResult(
        metadata={
            "column": dg.MetadataValue.text(result.column),
            "created": dg.MetadataValue.bool(result.created),
            "already_migrated": dg.MetadataValue.bool(result.migrated),
            "model": dg.MetadataValue.text(migration.embedding_model),
            "dimensions": dg.MetadataValue.int(migration.embedding_dimensions),
            "database": dg.MetadataValue.text(db.description),
            **plan_metadata(plan),
            **(int8_metadata(result.int8) if result.int8 else {}),
        }
    )


def int8_metadata(gate: Int8Agreement) -> dict[str, dg.MetadataValue]:
    """The int8 gate's figures: why this column was allowed int8 vectors."""
    return {
        "int8_neighbour_agreement_at_10": dg.MetadataValue.float(round(gate.neighbour_agreement, 4)),
        "int8_min_agreement": dg.MetadataValue.float(gate.floor),
        "int8_ndcg_at_10": dg.MetadataValue.float(round(gate.ndcg_int8, 4)),
        "float_ndcg_at_10": dg.MetadataValue.float(round(gate.ndcg_float, 4)),
    }


def plan_metadata(plan: Plan) -> dict[str, dg.MetadataValue]:
    """The plan's figures (`bge-pipeline plan` prints them all), as the UI shows them beside Phase 1."""
    return {
        "rows_pending": dg.MetadataValue.int(plan.rows_pending),
        "bytes_needed": dg.MetadataValue.int(plan.bytes_needed),
        "free_bytes": dg.MetadataValue.int(plan.free_bytes)
        if plan.free_bytes is not None
        else dg.MetadataValue.text("unknown"),
        "estimated_seconds_without_encoding": dg.MetadataValue.float(round(plan.estimated_seconds, 1)),
        "plan": dg.MetadataValue.md("\n".join(f"    {line}" for line in plan.lines())),
    }
