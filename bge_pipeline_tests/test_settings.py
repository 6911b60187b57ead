"""The guide's `.env` settings: its defaults, its names, and a one-line error naming any bad value."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bge_pipeline.core.database import Database, redact
from bge_pipeline.core.settings import BGE_QUERY_PREFIX, Settings
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests import webserver
from bge_pipeline_tests.faultkit import cli_environment
from bge_pipeline_tests.helpers import columns


@pytest.mark.unit
def test_the_guides_env_file_is_read_as_written(tmp_path: Path) -> None:
    """The guide's `.env` block verbatim, inline comments included (the unit tier covers every rule)."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "EMBEDDING_PROVIDER=local\nEMBEDDING_MODEL=BAAI/bge-small-en-v1.5\nEMBEDDING_DIMENSIONS=384\n"
        "EMBEDDING_DEVICE=cpu  # 'cuda' for GPU, 'cpu' for CPU\nEMBEDDING_BATCH_SIZE=256\nENABLE_RERANKER=true\n"
        "RERANK_TOP_K=200  # Retrieve this many candidates for reranking\nRETURN_TOP_K=20\nRERANK_BATCH_SIZE=64\n"
    )
    settings = Settings.from_env(env={}, dotenv_path=str(env_file))
    assert (settings.embedding_device, settings.embedding_batch_size, settings.enable_reranker) == ("cpu", 256, True)
    assert (settings.rerank_top_k, settings.return_top_k, settings.query_prefix) == (200, 20, BGE_QUERY_PREFIX)


@pytest.mark.unit
def test_password_never_shown() -> None:
    url = "postgresql://app:S3cr3t-Pa55@db.example:5432/prod"
    settings = Settings.from_mapping({"DATABASE_URL": url})
    assert "S3cr3t" not in repr(settings)
    assert "S3cr3t" not in redact(url)
    assert "S3cr3t" not in Database(database_url=url).description


@pytest.mark.unit
def test_resources_take_the_database_url_from_the_environment_by_name() -> None:
    """The UI shows resource config; an EnvVar shows the variable's name, never the password."""
    resources = build_resources(Settings.from_mapping({"DATABASE_URL": "postgresql://a:S3cr3t@h/db"}))
    assert "S3cr3t" not in repr(resources["database"].database_url)


@pytest.mark.pgvector
def test_the_shell_wins_over_dotenv_through_the_dagster_cli(database_url, minilm_path, seed_table, tmp_path, connect):
    """Dagster's CLI writes `.env` into the environment over the shell's values; the settings take the shell's back,
    as `bge-pipeline` does: `EMBEDDING_TABLE=notes dagster asset materialize` works on `notes`."""
    seed_table(rows=5, table="notes")
    (tmp_path / ".env").write_text("EMBEDDING_TABLE=articles\nBACKFILL_MAX_RETRIES=2\n")  # no table `articles`
    env = cli_environment(database_url, minilm_path, EMBEDDING_TABLE="notes")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "bge_pipeline",
            "--select",
            "staging_embedding_column",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with connect() as conn:
        assert "embedding_384" in columns(conn, "notes")


def test_dagster_ui_shows_a_bad_setting_as_the_code_locations_load_error(tmp_path) -> None:
    """`dagster dev` with EMBEDDING_DEVICE=tpu: the UI's code location page carries the setting's one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env.update(EMBEDDING_DEVICE="tpu", DAGSTER_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = webserver.free_port()
    command = [sys.executable, "-m", "dagster_webserver", "-m", "bge_pipeline", "-h", "127.0.0.1", "-p", str(port)]
    loaded = lambda url: webserver.location_errors(url) is not None  # noqa: E731
    with webserver.running_webserver(command, env, tmp_path, port, tmp_path / "ui.log", ready=loaded) as base_url:
        errors = webserver.location_errors(base_url)
    [message] = errors.values()
    assert "SettingsError: EMBEDDING_DEVICE='tpu' is not one of auto, cpu, cuda, cuda:N" in message
