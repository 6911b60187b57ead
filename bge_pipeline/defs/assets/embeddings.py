"""Phase 2: the new model's vectors, partition by partition (`embedding_batches`) and as a whole (`embeddings`)."""

from typing import Optional

import dagster as dg

from bge_pipeline.core.backfill import BackfillStats, Batch
from bge_pipeline.core.migration import backfill, prepare_staging_column
from bge_pipeline.core.plan import check_room
from bge_pipeline.defs.assets.column import GROUP, int8_metadata, staging_embedding_column
from bge_pipeline.defs.resources import DatabaseResource, EncoderResource, MigrationResource


def backfill_partitions(buckets: int) -> dg.StaticPartitionsDefinition:
    """Buckets of a hash of the id, BACKFILL_PARTITIONS of them: fixed when the definitions load, so loading
    needs no database, and two partitions never share a row."""
    width = len(str(buckets - 1))
    return dg.StaticPartitionsDefinition([f"{i:0{width}d}" for i in range(buckets)])


# One GPU for the encoding step's pod. dagster-k8s reads this op tag only under k8s_job_executor (a pod per
# step); with the in-process executor the K8sRunLauncher sizes the run's pod from the run tag of the same name
# or the Helm chart's runK8sConfig (deploy/README.md). Elsewhere the tag is inert.
GPU_POD_CONFIG = {
    "container_config": {"resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


def build_embedding_batches(buckets: int) -> dg.AssetsDefinition:
    """Phase 2 by partition, with BACKFILL_PARTITIONS partitions."""

    @dg.asset(
        name="embedding_batches",
        deps=[staging_embedding_column],
        partitions_def=backfill_partitions(buckets),
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
        keys = context.partition_keys  # one key, or a range when a run covers several partitions
        column, stats = backfill(
            database.get(),
            migration.target(),
            encoder.get,
            [int(key) for key in keys],
            context.log,
            _observer(context, keys[0] if len(keys) == 1 else None),
        )
        return dg.MaterializeResult(metadata=backfill_metadata(column, stats, encoder.embedding_model))

    return embedding_batches


@dg.asset(
    deps=["embedding_batches"],
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
    db, target = database.get(), migration.target()
    # Phase 1 is idempotent: running it here lets `--select 'embeddings*'` migrate a table from scratch. The model
    # loads only where a column must be made or a row embedded: a migrated table's run loads none.
    check_room(db, target)
    staged = prepare_staging_column(db, target, encoder.get)
    column, stats = backfill(
        db, target, encoder.get, list(range(target.partitions)), context.log, _observer(context, None)
    )
    gate = int8_metadata(staged.int8) if staged.int8 else {}
    return dg.MaterializeResult(metadata={**backfill_metadata(column, stats, encoder.embedding_model), **gate})


def backfill_metadata(column: str, stats: BackfillStats, model: str) -> dict[str, dg.MetadataValue]:
    """The figures a user asks of a backfill, typed so the UI can plot them across materializations."""
    encoder = stats.encoder  # None: nothing was pending, so the model was never loaded
    return {
        "column": dg.MetadataValue.text(column),
        "rows_embedded": dg.MetadataValue.int(stats.rows_embedded),
        "texts_encoded": dg.MetadataValue.int(stats.texts_encoded),
        "rows_copied": dg.MetadataValue.int(stats.rows_copied),  # cast from the live column: VECTOR_TYPE changed
        "rows_skipped_null_text": dg.MetadataValue.int(stats.rows_skipped_null_text),
        "rows_pending_before": dg.MetadataValue.int(stats.rows_pending_before),
        "rows_total": dg.MetadataValue.int(stats.rows_total),
        "batches": dg.MetadataValue.int(stats.batches),
        "retries": dg.MetadataValue.int(stats.retries),
        "seconds": dg.MetadataValue.float(round(stats.seconds, 3)),
        "rows_per_second": dg.MetadataValue.float(round(stats.rows_per_second, 1)),
        "encode_seconds": dg.MetadataValue.float(round(stats.encode_seconds, 3)),
        "write_seconds": dg.MetadataValue.float(round(stats.write_seconds, 3)),
        "model": dg.MetadataValue.text(model),
        "model_loaded": dg.MetadataValue.bool(encoder is not None),
        "device": dg.MetadataValue.text(encoder.device if encoder else "-"),
        "backend": dg.MetadataValue.text(encoder.backend if encoder else "-"),
        "batch_size": dg.MetadataValue.int(encoder.batch_size if encoder else 0),
        "tokens_per_pass": dg.MetadataValue.int((encoder.tokens_per_pass or 0) if encoder else 0),  # 0: no budget
        "encoder_choice": dg.MetadataValue.text((encoder.tuning or "as configured") if encoder else "-"),
    }


def _observer(context: dg.AssetExecutionContext, partition: Optional[str]):
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
                    "device": dg.MetadataValue.text(stats.encoder.device if stats.encoder else "-"),
                },
            )
        )

    return observe
