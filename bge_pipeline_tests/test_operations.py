"""Operating the migration: re-embedding new and changed rows, model changes, rollback and restore."""

from typing import Any

import dagster as dg
import numpy as np
import pytest

from bge_pipeline.core.encoder import shared_encoder
from bge_pipeline.defs import automation, jobs
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.helpers import (
    DEFAULT_DEFINITIONS,
    check_results,
    columns,
    indexes,
    materialize,
    metadata,
    vectors,
)

pytestmark = pytest.mark.pgvector


@pytest.fixture(scope="session")
def model_768(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A 768-dim sentence-transformers model: random BERT weights (speed and shape are what matter here) with
    the MiniLM tokenizer, the same BERT vocabulary."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    base = tmp_path_factory.mktemp("bert768")
    config = BertConfig(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072)
    BertModel(config).save_pretrained(base / "transformer")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(base / "transformer")
    transformer = models.Transformer(str(base / "transformer"), max_seq_length=256)
    pooling = models.Pooling(768, pooling_mode="cls")
    path = base / "model"
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()]).save(str(path))
    return str(path)


def test_new_and_changed_rows_are_reembedded(seed_table, resources, settings, connect) -> None:
    seed_table(rows=30)
    materialize(resources, "embeddings*")
    with connect() as conn:
        untouched_before = vectors(conn)[41]
        conn.execute("INSERT INTO segments (id, text) VALUES (5001, 'A new segment about the railroads.')")
        conn.execute("UPDATE segments SET text = 'The tariff was reduced on imported iron.' WHERE id = 1")
        assert conn.execute("SELECT embedding IS NULL FROM segments WHERE id = 1").fetchone()[0], (
            "a changed text makes its vector stale: the trigger NULLs it in the same statement"
        )

    result = materialize(resources, jobs.reembed_job.selection)

    encoder = shared_encoder(settings.embedding_model, 384, "cpu")
    expected = encoder.encode(["A new segment about the railroads.", "The tariff was reduced on imported iron."])
    with connect() as conn:
        stored = vectors(conn)
    assert metadata(result, "embeddings")["rows_embedded"] == 2
    assert float(stored[5001] @ expected[0]) > 0.9999
    assert float(stored[1] @ expected[1]) > 0.9999
    assert np.array_equal(stored[41], untouched_before)


def test_sensor_asks_for_a_run_past_the_threshold(seed_table, make_settings, connect) -> None:
    threshold = 30  # REEMBED_MIN_PENDING, from the settings through the migration resource
    resources = build_resources(make_settings(reembed_min_pending=threshold), from_environment=False)
    seed_table(rows=12)
    materialize(resources, "embeddings*")

    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            quiet = list(automation.pending_rows_sensor(context))
        with connect() as conn:
            conn.execute(
                "INSERT INTO segments (id, text) SELECT 10000 + g, 'pending row ' || g FROM generate_series(1, %s) g",
                (threshold,),
            )
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            busy = list(automation.pending_rows_sensor(context))

    assert isinstance(quiet[0], dg.SkipReason) and "0 rows pending" in quiet[0].skip_message
    assert isinstance(busy[0], dg.RunRequest) and busy[0].tags["rows_pending"] == str(threshold)


def test_schedule_runs_the_reembed_job_daily_by_default() -> None:
    schedule = DEFAULT_DEFINITIONS.resolve_schedule_def("reembed_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.job_name == "reembed"


def _run_job(job: dg.JobDefinition, resources: dict[str, Any], op: str, **config: Any) -> dg.ExecuteInProcessResult:
    return job.execute_in_process(
        resources=resources, run_config={"ops": {op: {"config": config}}}, raise_on_error=False
    )


def test_rollback_before_phase_3_needs_confirmation_then_restores_the_start(seed_table, resources, connect) -> None:
    seed_table(rows=24)
    with connect() as conn:
        start = columns(conn), indexes(conn)
    materialize(resources, "staging_embedding_column")
    materialize(resources, "embedding_batches", partition_key="2")
    materialize(resources, "embedding_batches", partition_key="6")

    refused = _run_job(jobs.rollback_staging_vectors, resources, "clear_staging_vectors")
    assert not refused.success
    message = str(refused.get_step_failure_events()[0].step_failure_data.error)
    assert "would set the" in message and "embedding_384 to NULL" in message and "confirm: true" in message
    with connect() as conn:
        assert vectors(conn, "embedding_384"), "nothing changed without confirmation"

    assert _run_job(jobs.rollback_staging_vectors, resources, "clear_staging_vectors", confirm=True).success
    with connect() as conn:
        assert not vectors(conn, "embedding_384")
    assert _run_job(jobs.rollback_staging_column, resources, "drop_staging_column", confirm=True).success
    with connect() as conn:
        assert (columns(conn), indexes(conn)) == start, "the table is as it was before Phase 1, old index included"


def test_restore_after_phase_3_puts_the_old_vectors_back(seed_table, resources, connect) -> None:
    seed_table(rows=20)
    with connect() as conn:
        old = vectors(conn)
    materialize(resources, "embeddings*")

    refused = _run_job(jobs.restore_old_embeddings_job, resources, "restore_old_embeddings", dimensions=1536)
    assert not refused.success
    restored = _run_job(
        jobs.restore_old_embeddings_job, resources, "restore_old_embeddings", dimensions=1536, confirm=True
    )
    assert restored.success

    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(1536)"
        back = vectors(conn)
        assert "segments_embedding_ivfflat_idx" in indexes(conn)
        kept = conn.execute("SELECT count(*) FROM segments_embedding_backup_384").fetchone()[0]
    assert all(np.allclose(back[i], old[i], atol=1e-6) for i in old)
    assert kept == 20, "the bge vectors replaced by the restore are kept in their own backup"


def test_model_change_runs_a_new_migration_and_back(seed_table, make_settings, model_768, connect) -> None:
    seed_table(rows=16)
    small = build_resources(make_settings(), from_environment=False)
    large = build_resources(make_settings(embedding_model=model_768, embedding_dimensions=768), from_environment=False)

    materialize(small, "embeddings*")
    to_768 = materialize(large, "embeddings*")
    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(768)" and "embedding_768" not in columns(conn)
        recorded = conn.execute(
            "SELECT model, dimensions FROM bge_pipeline_models WHERE column_name = 'embedding'"
        ).fetchone()
    assert recorded == (model_768, 768)
    assert all(check_results(to_768).values())

    back = materialize(small, "embeddings*")
    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(384)"
        assert conn.execute("SELECT count(*) FROM segments WHERE embedding IS NULL").fetchone()[0] == 0
    assert all(check_results(back).values())
    assert metadata(back, "embeddings")["rows_embedded"] == 16, "every vector was recomputed, none carried over"


def test_a_staging_column_of_another_model_is_never_written(seed_table, make_settings, minilm_path, connect) -> None:
    seed_table(rows=8)
    materialize(build_resources(make_settings(), from_environment=False), "staging_embedding_column")
    other = build_resources(make_settings(embedding_model=minilm_path + "/"), from_environment=False)

    result = materialize(other, "embeddings", raise_on_error=False)

    message = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert "staging column 'embedding_384'" in message and "rollback_staging_column" in message
    with connect() as conn:
        assert not vectors(conn, "embedding_384")
