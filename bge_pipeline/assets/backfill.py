"""Phase 2: the new model's vectors, partition by partition (`embedding_batches`) and as a whole (`embeddings`)."""

from typing import Optional

import dagster as dg

from bge_pipeline.assets.column import GROUP, staging_embedding_column
from bge_pipeline.backfill import BackfillStats, Batch
from bge_pipeline.database import DatabaseResource
from bge_pipeline.encoder import Encoder, EncoderResource
from bge_pipeline.migration import MigrationResource, backfill, prepare_staging_column
from bge_pipeline.settings import current_settings

_BUCKETS = current_settings().backfill_partitions
# Buckets of `id mod N`: fixed when the definitions load, so loading needs no database, and two partitions
# never share a row.
backfill_partitions = dg.StaticPartitionsDefinition([f"{i:0{len(str(_BUCKETS - 1))}d}" for i in range(_BUCKETS)])
# One GPU for the encoding step's pod. dagster-k8s reads this op tag only under k8s_job_executor (a pod per
# step); with the in-process executor the K8sRunLauncher sizes the run's pod from the run tag of the same name
# or the Helm chart's runK8sConfig (deploy/README.md). Elsewhere the tag is inert.
GPU_POD_CONFIG = {
    "container_config": {"resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


@dg.asset(
    deps=[staging_embedding_column],
    partitions_def=backfill_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=1),
    pool="gpu",
    op_tags={"dagster-k8s/config": GPU_POD_CONFIG},
    group_name=GROUP,
    kinds={"pytorch", "pgvector"},
    owners=["team:search"],
    description="Phase 2 by partition: embeds the NULL rows of one `id mod N` bucket, 1,000 rows a commit.",
)
def embedding_batches(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    encoder: EncoderResource,
    migration: MigrationResource,
) -> dg.MaterializeResult:
    buckets = [int(key) for key in context.partition_keys]
    model = encoder.get()
    column, stats = backfill(
        database, migration, model, buckets, context.log, _observer(context, model, context.partition_key)
    )
    return dg.MaterializeResult(metadata=backfill_metadata(column, stats, model))


@dg.asset(
    deps=[embedding_batches],
    pool="gpu",
    group_name=GROUP,
    kinds={"pytorch", "pgvector"},
    owners=["team:search"],
    description="Phase 2 complete: every row with text has a vector from the configured model (finishes any partition left).",
)
def embeddings(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    encoder: EncoderResource,
    migration: MigrationResource,
) -> dg.MaterializeResult:
    model = encoder.get()
    # Phase 1 is idempotent: running it here lets `--select 'embeddings*'` migrate a table from scratch.
    prepare_staging_column(database, migration, model)
    column, stats = backfill(
        database, migration, model, list(range(migration.partitions)), context.log, _observer(context, model, None)
    )
    return dg.MaterializeResult(metadata=backfill_metadata(column, stats, model))


def backfill_metadata(column: str, stats: BackfillStats, encoder: Encoder) -> dict[str, dg.MetadataValue]:
    """The figures a user asks of a backfill, typed so the UI can plot them across materializations."""
    return {
        "column": dg.MetadataValue.text(column),
        "rows_embedded": dg.MetadataValue.int(stats.rows_embedded),
        "rows_skipped_null_text": dg.MetadataValue.int(stats.rows_skipped_null_text),
        "rows_pending_before": dg.MetadataValue.int(stats.rows_pending_before),
        "rows_total": dg.MetadataValue.int(stats.rows_total),
        "batches": dg.MetadataValue.int(stats.batches),
        "retries": dg.MetadataValue.int(stats.retries),
        "seconds": dg.MetadataValue.float(round(stats.seconds, 3)),
        "rows_per_second": dg.MetadataValue.float(round(stats.rows_per_second, 1)),
        "encode_seconds": dg.MetadataValue.float(round(stats.encode_seconds, 3)),
        "write_seconds": dg.MetadataValue.float(round(stats.write_seconds, 3)),
        "device": dg.MetadataValue.text(encoder.device),
        "backend": dg.MetadataValue.text(encoder.backend),
        "model": dg.MetadataValue.text(encoder.name),
        "batch_size": dg.MetadataValue.int(encoder.batch_size),
    }


def _observer(context: dg.AssetExecutionContext, encoder: Encoder, partition: Optional[str]):
    """Per-batch observations, so the asset's plots show rows/s and rows remaining over the backfill."""

    def observe(batch: Batch, stats: BackfillStats) -> None:
        remaining = max(stats.rows_pending_before - stats.rows_embedded, 0)
        context.log_event(
            dg.AssetObservation(
                asset_key=context.asset_key,
                partition=partition,
                metadata={
                    "batch": dg.MetadataValue.int(batch.number),
                    "batch_rows_per_second": dg.MetadataValue.float(round(stats.batch_rows_per_second[-1], 1)),
                    "rows_remaining": dg.MetadataValue.int(remaining),
                    "device": dg.MetadataValue.text(encoder.device),
                },
            )
        )

    return observe
