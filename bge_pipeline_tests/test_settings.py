"""The guide's `.env` settings: its defaults, its names, and a one-line error naming any bad value."""

import subprocess
import sys
from pathlib import Path

import pytest

from bge_pipeline.core.database import Database, redact
from bge_pipeline.core.settings import BGE_QUERY_PREFIX, Settings, SettingsError
from bge_pipeline.defs.resources import build_resources
from bge_pipeline_tests.faultkit import cli_environment
from bge_pipeline_tests.helpers import columns


def test_defaults_are_the_guides() -> None:
    settings = Settings.from_mapping({})
    assert settings.embedding_provider == "local"
    assert settings.embedding_model == "BAAI/bge-small-en-v1.5"
    assert settings.embedding_dimensions == 384
    assert settings.embedding_device == "auto"
    assert (settings.rerank_top_k, settings.return_top_k, settings.rerank_batch_size) == (200, 20, 64)
    assert settings.backfill_batch_rows == 1000 and settings.backfill_max_retries == 3
    assert settings.staging_column == "embedding_384"
    assert settings.query_prefix == BGE_QUERY_PREFIX


def test_the_guides_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "EMBEDDING_PROVIDER=local\nEMBEDDING_MODEL=BAAI/bge-small-en-v1.5\nEMBEDDING_DIMENSIONS=384\n"
        "EMBEDDING_DEVICE=cpu  # 'cuda' for GPU, 'cpu' for CPU\nEMBEDDING_BATCH_SIZE=256\nENABLE_RERANKER=true\n"
        "RERANK_TOP_K=200  # Retrieve this many candidates for reranking\nRETURN_TOP_K=20\nRERANK_BATCH_SIZE=64\n"
    )
    settings = Settings.from_env(env={}, dotenv_path=str(env_file))
    assert settings.embedding_device == "cpu"
    assert settings.embedding_batch_size == 256
    assert settings.enable_reranker is True
    assert settings.rerank_top_k == 200


def test_environment_overrides_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("EMBEDDING_BATCH_SIZE=256\n")
    assert Settings.from_env(env={"EMBEDDING_BATCH_SIZE": "64"}, dotenv_path=str(env_file)).embedding_batch_size == 64


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("EMBEDDING_PROVIDER", "openai", "EMBEDDING_PROVIDER"),
        ("EMBEDDING_DEVICE", "tpu", "EMBEDDING_DEVICE"),
        ("EMBEDDING_DIMENSIONS", "three hundred", "EMBEDDING_DIMENSIONS"),
        ("EMBEDDING_DIMENSIONS", "0", "EMBEDDING_DIMENSIONS"),
        ("EMBEDDING_BATCH_SIZE", "-1", "EMBEDDING_BATCH_SIZE"),
        ("ENABLE_RERANKER", "maybe", "ENABLE_RERANKER"),
        ("RETURN_TOP_K", "500", "RETURN_TOP_K"),
        ("EMBEDDING_TABLE", "x" * 64, "EMBEDDING_TABLE"),
        ("EMBEDDING_BACKEND", "tensorrt", "EMBEDDING_BACKEND"),
    ],
)
def test_bad_value_gets_one_line_error_naming_the_setting(name: str, value: str, named: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_mapping({name: value})
    message = str(raised.value)
    assert named in message and "\n" not in message


def test_password_never_shown() -> None:
    url = "postgresql://app:S3cr3t-Pa55@db.example:5432/prod"
    settings = Settings.from_mapping({"DATABASE_URL": url})
    assert "S3cr3t" not in repr(settings)
    assert "S3cr3t" not in redact(url)
    assert "S3cr3t" not in Database(database_url=url).description


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
