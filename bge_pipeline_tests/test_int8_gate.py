"""EMBEDDING_BACKEND=onnx-int8 as an informed choice: Phase 1 measures what int8 does to retrieval on the table's
own texts, refuses below INT8_MIN_AGREEMENT naming both figures, records the runtime, and no later run mixes
float vectors into an int8 column."""

from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest

from bge_pipeline.core import sql
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import encoder_for
from bge_pipeline.core.int8_gate import measure_int8
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.plan import plan_migration
from bge_pipeline.core.settings import Settings
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.helpers import check_results, columns, materialize, metadata, step_error

pytestmark = pytest.mark.pgvector
ROWS = 300


def test_int8_is_measured_refused_below_its_floor_recorded_above_it_and_never_mixed(
    seed_table: Callable[..., Any], make_settings: Callable[..., Settings], connect: Callable[[], psycopg.Connection]
) -> None:
    pytest.importorskip("onnxruntime")
    seed_table(ROWS)
    int8_settings = make_settings(embedding_backend="onnx-int8")
    encoder = encoder_for(int8_settings)
    assert encoder.backend == "onnx-int8"
    with connect() as conn:
        texts = [
            row[0] for row in conn.execute("SELECT text FROM segments WHERE text IS NOT NULL ORDER BY md5(id::text)")
        ]
    measured = measure_int8(encoder, texts)
    assert 0.0 < measured.neighbour_agreement < 1.0  # real weights: int8 moves some neighbours, not all
    assert measured.ndcg_float > 0.5 and measured.ndcg_int8 > 0.5

    # A floor above what int8 achieves: Phase 1 refuses, naming both figures, with nothing created.
    strict = make_settings(
        embedding_backend="onnx-int8", int8_min_agreement=min(1.0, measured.neighbour_agreement + 0.02)
    )
    result = materialize(
        build_resources(strict, from_environment=False), "staging_embedding_column", raise_on_error=False
    )
    assert not result.success
    message = step_error(result)
    assert "EMBEDDING_BACKEND=onnx-int8 refused" in message and "INT8_MIN_AGREEMENT" in message
    assert f"{measured.neighbour_agreement:.3f}" in message
    assert f"{measured.ndcg_int8:.3f} int8 against {measured.ndcg_float:.3f} float" in message
    with connect() as conn:
        assert "embedding_384" not in columns(conn)

    # The plan shows the same figures before anything runs.
    lenient = make_settings(
        embedding_backend="onnx-int8", int8_min_agreement=max(0.0, measured.neighbour_agreement - 0.02)
    )
    planned = plan_migration(Database.from_settings(lenient), MigrationTarget.from_settings(lenient), encoder)
    assert planned.int8 is not None and planned.int8["passed"]
    assert planned.int8["neighbour_agreement"] == pytest.approx(measured.neighbour_agreement)

    # A floor it meets: the migration runs on int8, every check passes, and the record says which runtime.
    result = materialize(build_resources(lenient, from_environment=False), "embeddings*")
    assert all(check_results(result).values()), check_results(result)
    embedded = metadata(result, "embeddings")  # Phase 1 ran inside it: the gate's figures are there
    assert embedded["int8_neighbour_agreement_at_10"] == pytest.approx(measured.neighbour_agreement, abs=1e-4)
    assert embedded["int8_ndcg_at_10"] == pytest.approx(measured.ndcg_int8, abs=1e-4)
    assert embedded["backend"] == "onnx-int8"
    with connect() as conn:
        assert (
            conn.execute(f"SELECT runtime FROM {sql.STATE_TABLE} WHERE column_name = 'embedding'").fetchone()[0]
            == "onnx-int8"
        )
        conn.execute("UPDATE segments SET text = text || ' (amended)' WHERE id IN (SELECT id FROM segments LIMIT 5)")

    # A later re-embed with the float runtime would put float vectors beside int8 ones: refused, nothing written.
    floating = make_settings(embedding_backend="onnx")
    result = materialize(build_resources(floating, from_environment=False), "embeddings", raise_on_error=False)
    assert not result.success
    assert "would write float vectors into segments.embedding, which holds int8 ones" in step_error(result)
    with connect() as conn:
        assert conn.execute("SELECT count(*) FROM segments WHERE embedding IS NULL").fetchone()[0] == 5
