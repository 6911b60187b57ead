"""Quality checks as the UI shows them: recall of the index, agreement with the old vectors, self-retrieval."""

from __future__ import annotations

from typing import Any

import dagster as dg
import numpy as np
import pytest
from pgvector.psycopg import register_vector

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import RecordedModel
from bge_pipeline.core.corpus import Segment
from bge_pipeline.defs import quality_checks as quality
from bge_pipeline_tests.helpers import ALL_ASSETS_AND_CHECKS
from bge_pipeline_tests.test_search import MigratedTable, shared_migrated_table


@pytest.fixture(scope="module")
def migrated(server_url: str, minilm_path: str, segments: list[Segment]) -> MigratedTable:
    return shared_migrated_table(server_url, minilm_path, segments)


def _evaluation(result: dg.ExecuteInJobResult, name: str) -> dg.AssetCheckEvaluation:
    return next(e for e in result.get_asset_check_evaluations() if e.check_name == name)


def _run_checks(
    table: MigratedTable, *checks: dg.AssetChecksDefinition, run_config: dict | None = None
) -> dg.ExecuteInJobResult:

    return dg.materialize(
        ALL_ASSETS_AND_CHECKS,
        selection=dg.AssetSelection.checks(*checks),
        resources=table.resources(),
        run_config=run_config,
    )


def test_the_migration_run_reports_index_recall_above_095(migrated: MigratedTable) -> None:
    recall = _evaluation(migrated.result, "index_recall")
    assert recall.passed
    assert recall.metadata["recall_at_10"].value >= 0.95
    assert recall.metadata["sampled_rows"].value == 100
    assert recall.metadata["lists"].value == 100


def test_the_migration_run_reports_that_rows_find_themselves(migrated: MigratedTable) -> None:
    found = _evaluation(migrated.result, "self_retrieval")
    assert found.passed
    assert found.metadata["self_retrieval_at_10"].value >= 0.9
    assert found.metadata["sampled_rows"].value == 20


def test_the_migration_run_reports_agreement_with_the_old_random_vectors(migrated: MigratedTable) -> None:
    agreement = _evaluation(migrated.result, "old_new_agreement")
    assert agreement.passed  # reported, never failing
    assert 0.0 <= agreement.metadata["neighbour_agreement_at_10"].value <= 0.2  # random stand-ins: about chance
    assert "random stand-ins" in agreement.description


def test_recall_check_warns_about_pgvectors_default_probes(migrated: MigratedTable) -> None:
    # probes = 1 without iterative scans: what a query gets when nobody sets ivfflat.probes.
    config = {"probes": 1, "iterative_scan": False}
    result = _run_checks(
        migrated, quality.index_recall, run_config={"ops": {"embedding_index_index_recall": {"config": config}}}
    )
    recall = _evaluation(result, "index_recall")
    assert not recall.passed
    assert recall.severity == dg.AssetCheckSeverity.WARN
    assert recall.metadata["recall_at_10"].value < 0.95
    assert recall.metadata["probes"].value == 1
    assert "below 0.95" in recall.description


def test_agreement_passes_with_a_note_when_no_old_vectors_remain(
    database_url: str, minilm_path: str, connect: Any
) -> None:
    # A table whose only vectors are the configured model's, with no backup of older ones: nothing to compare.
    from bge_pipeline.core.settings import Settings
    from bge_pipeline.defs.resources import build_resources

    settings = Settings.from_mapping(
        {"DATABASE_URL": database_url, "EMBEDDING_MODEL": minilm_path, "EMBEDDING_DEVICE": "cpu"}
    )
    resources = build_resources(settings, from_environment=False)
    resources["database"].get().ensure_pgvector()
    vectors = np.random.default_rng(0).standard_normal((30, 384)).astype(np.float32)
    with connect() as conn:
        register_vector(conn)
        conn.execute("CREATE TABLE segments (id bigint PRIMARY KEY, text text, embedding vector(384))")
        for i, vector in enumerate(vectors):
            conn.execute(
                "INSERT INTO segments VALUES (%s, %s, %s)", (i, f"segment {i}", vector / np.linalg.norm(vector))
            )
        conn.execute(sql.UPSERT_MODEL, RecordedModel(minilm_path, 384).row("public", "segments", "embedding"))

    result = dg.materialize(
        ALL_ASSETS_AND_CHECKS,
        selection=dg.AssetSelection.checks(quality.old_new_agreement),
        resources=resources,
    )
    agreement = _evaluation(result, "old_new_agreement")
    assert agreement.passed
    assert "nothing to compare" in agreement.description
