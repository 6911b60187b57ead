"""Unit tier: the settings' rules, with no database, no model and no Dagster (`pytest -m unit`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bge_pipeline.core.settings import BGE_QUERY_PREFIX, DEFAULT_MODEL, Settings, SettingsError

pytestmark = pytest.mark.unit

SETTING_NAMES = sorted(name.upper() for name in Settings.model_fields)


@pytest.fixture(autouse=True)
def no_settings_in_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The developer's shell and `.env` must not leak into these tests."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


# --- defaults ---------------------------------------------------------------------------------------------


def test_empty_mapping_gives_the_guides_defaults() -> None:
    settings = Settings.from_mapping({})
    assert settings.embedding_provider == "local"
    assert settings.embedding_model == DEFAULT_MODEL == "BAAI/bge-small-en-v1.5"
    assert settings.embedding_dimensions == 384
    assert settings.embedding_device == "auto"
    assert settings.embedding_batch_size is None  # chosen per device by the encoder
    assert settings.enable_reranker is False
    assert (settings.rerank_top_k, settings.return_top_k) == (200, 20)
    assert settings.staging_column == "embedding_384"
    assert (settings.embedding_schema, settings.embedding_table) == ("public", "segments")
    assert (settings.embedding_id_column, settings.embedding_text_column) == ("id", "text")
    assert settings.database_url is None


def test_bge_model_gets_the_bge_query_instruction() -> None:
    settings = Settings.from_mapping({})
    assert settings.query_prefix == BGE_QUERY_PREFIX
    assert BGE_QUERY_PREFIX == "Represent this sentence for searching relevant passages: "


@pytest.mark.parametrize(
    ("model", "prefix"),
    [
        ("BAAI/bge-base-en-v1.5", BGE_QUERY_PREFIX),
        ("/models/BGE-Small-EN", BGE_QUERY_PREFIX),  # the rule is case-insensitive and reads local paths too
        ("sentence-transformers/all-MiniLM-L6-v2", ""),
        ("intfloat/e5-small-v2", ""),
    ],
)
def test_query_prefix_follows_the_model(model: str, prefix: str) -> None:
    assert Settings.from_mapping({"EMBEDDING_MODEL": model}).query_prefix == prefix


def test_explicit_empty_query_prefix_is_kept_as_no_instruction() -> None:
    settings = Settings.from_mapping({"EMBEDDING_QUERY_PREFIX": ""})
    assert settings.embedding_query_prefix == ""
    assert settings.query_prefix == ""  # not the BGE instruction, although the model is a bge one


def test_query_prefix_keeps_its_whitespace() -> None:
    # Every other value is stripped; the instruction's trailing space is part of what the model was trained on.
    assert Settings.from_mapping({"EMBEDDING_QUERY_PREFIX": "query: "}).query_prefix == "query: "


def test_staging_column_follows_column_and_dimensions() -> None:
    settings = Settings.from_mapping({"EMBEDDING_COLUMN": "vec", "EMBEDDING_DIMENSIONS": "768"})
    assert settings.staging_column == "vec_768"


# --- reading: the shell over .env -------------------------------------------------------------------------


def test_from_env_reads_a_dotenv_file(tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text(
        "EMBEDDING_DEVICE=cpu  # 'cuda' for GPU\nEMBEDDING_BATCH_SIZE=32\nENABLE_RERANKER=true\n"
        'EMBEDDING_QUERY_PREFIX="query: "\n'
    )
    settings = Settings.from_env(env={}, dotenv_path=str(env_file))
    assert settings.embedding_device == "cpu"
    assert settings.embedding_batch_size == 32
    assert settings.enable_reranker is True
    assert settings.query_prefix == "query: "


def test_given_environment_wins_over_the_dotenv_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("EMBEDDING_BATCH_SIZE=256\nEMBEDDING_DEVICE=cpu\n")
    settings = Settings.from_env(env={"EMBEDDING_BATCH_SIZE": "64"}, dotenv_path=str(env_file))
    assert settings.embedding_batch_size == 64  # the shell's value
    assert settings.embedding_device == "cpu"  # .env still fills what the shell leaves unset


def test_process_environment_wins_over_dotenv_in_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("EMBEDDING_BATCH_SIZE=256\nRETURN_TOP_K=5\n")
    monkeypatch.setenv("EMBEDDING_BATCH_SIZE", "8")
    settings = Settings.from_env()  # the default: os.environ over ./.env
    assert settings.embedding_batch_size == 8
    assert settings.return_top_k == 5


def test_missing_dotenv_file_is_not_an_error(tmp_path: Path) -> None:
    settings = Settings.from_env(env={"EMBEDDING_DEVICE": "cpu"}, dotenv_path=str(tmp_path / "absent.env"))
    assert settings.embedding_device == "cpu"


def test_bad_value_in_dotenv_is_refused_naming_it(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("EMBEDDING_DEVICE=tpu\n")
    with pytest.raises(SettingsError, match="EMBEDDING_DEVICE"):
        Settings.from_env(env={}, dotenv_path=str(env_file))


def test_empty_strings_count_as_unset() -> None:
    settings = Settings.from_mapping({"EMBEDDING_BATCH_SIZE": "", "EMBEDDING_DEVICE": "   ", "EMBEDDING_MODEL": ""})
    assert settings.embedding_batch_size is None
    assert settings.embedding_device == "auto"
    assert settings.embedding_model == DEFAULT_MODEL


def test_values_are_stripped() -> None:
    settings = Settings.from_mapping({"EMBEDDING_DEVICE": " cpu\n", "EMBEDDING_BATCH_SIZE": " 64 "})
    assert (settings.embedding_device, settings.embedding_batch_size) == ("cpu", 64)


def test_unknown_and_lower_case_names_are_ignored() -> None:
    settings = Settings.from_mapping({"PATH": "/usr/bin", "NOT_A_SETTING": "x", "embedding_device": "tpu"})
    assert settings == Settings.from_mapping({})


# ids of their own: conftest skips any test whose keywords include "cuda", and a bare parameter id is a keyword.
@pytest.mark.parametrize(
    "device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12"], ids=lambda device: f"device={device}"
)
def test_devices_accepted(device: str) -> None:
    assert Settings.from_mapping({"EMBEDDING_DEVICE": device}).embedding_device == device


# --- refusals: one line naming the setting ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EMBEDDING_DEVICE", "tpu"),
        ("EMBEDDING_DEVICE", "cuda:"),
        ("EMBEDDING_DEVICE", "cuda:one"),
        ("EMBEDDING_BATCH_SIZE", "abc"),
        ("EMBEDDING_BATCH_SIZE", "0"),
        ("EMBEDDING_DIMENSIONS", "-3"),
        ("EMBEDDING_DIMENSIONS", "16001"),
        ("ENABLE_RERANKER", "maybe"),
        ("KEEP_OLD_EMBEDDINGS", "perhaps"),
        ("RETURN_TOP_K", "500"),  # more than RERANK_TOP_K=200
        ("RERANK_TOP_K", "5"),  # fewer than RETURN_TOP_K=20
        ("EMBEDDING_TABLE", "t" * 64),
        ("EMBEDDING_TABLE", "é" * 32),  # 32 characters, 64 bytes: PostgreSQL counts bytes
        ("EMBEDDING_SCHEMA", "a\x00b"),
        ("EMBEDDING_BACKEND", "tensorrt"),
        ("EMBEDDING_PROVIDER", "openai"),
        ("BACKFILL_PARTITIONS", "0"),
        ("BACKFILL_MAX_RETRIES", "-1"),
        ("GPU_CONCURRENCY", "0"),
        ("IVFFLAT_LISTS", "0"),
        ("REEMBED_MIN_PENDING", "0"),
        ("EMBEDDING_ID_COLUMN", "text"),  # the same column as EMBEDDING_TEXT_COLUMN
        ("EMBEDDING_COLUMN", "c" * 60),  # fits, but its staging column c..._384 does not
        ("INDEX_TYPE", "diskann"),
        ("VECTOR_TYPE", "bit"),
        ("HNSW_M", "1"),
        ("HNSW_M", "101"),
        ("HNSW_EF_CONSTRUCTION", "3"),
        ("HNSW_EF_CONSTRUCTION", "20"),  # under twice pgvector's default m of 16
        ("EMBEDDING_DIMENSIONS", "3072"),  # more than pgvector indexes as `vector`
    ],
)
def test_bad_value_is_refused_in_one_line_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_mapping({name: value})
    message = str(raised.value)
    assert name in message
    assert "\n" not in message
    assert "pydantic" not in message.lower() and "validation error" not in message.lower()


def test_index_and_vector_type_settings() -> None:
    assert (Settings().index_type, Settings().vector_type, Settings().hnsw_m) == ("ivfflat", "vector", None)
    chosen = Settings.from_mapping(
        {"INDEX_TYPE": "hnsw", "VECTOR_TYPE": "halfvec", "HNSW_M": "8", "HNSW_EF_CONSTRUCTION": "16"}
    )
    assert (chosen.index_type, chosen.vector_type, chosen.hnsw_m, chosen.hnsw_ef_construction) == (
        "hnsw",
        "halfvec",
        8,
        16,
    )
    # text-embedding-3-large's 3,072 dimensions: too many to index as vector, not as halfvec; the refusal says so.
    assert (
        Settings.from_mapping({"EMBEDDING_DIMENSIONS": "3072", "VECTOR_TYPE": "halfvec"}).embedding_dimensions == 3072
    )
    with pytest.raises(SettingsError, match="set VECTOR_TYPE=halfvec"):
        Settings.from_mapping({"EMBEDDING_DIMENSIONS": "3072"})


def test_settings_error_is_a_value_error() -> None:
    # The CLI turns ValueError into its one-line exit 2.
    assert issubclass(SettingsError, ValueError)


def test_the_first_bad_value_is_reported_not_every_one() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_mapping({"EMBEDDING_DEVICE": "tpu", "EMBEDDING_BATCH_SIZE": "abc"})
    message = str(raised.value)
    assert "\n" not in message
    assert ("EMBEDDING_DEVICE" in message) != ("EMBEDDING_BATCH_SIZE" in message)


def test_longest_identifier_postgres_keeps_whole_is_accepted() -> None:
    assert Settings.from_mapping({"EMBEDDING_TABLE": "t" * 63}).embedding_table == "t" * 63


# --- replace, immutability, secrets -----------------------------------------------------------------------


def test_replace_returns_a_validated_copy() -> None:
    settings = Settings.from_mapping({})
    changed = settings.replace(embedding_device="cpu", embedding_batch_size=32)
    assert (changed.embedding_device, changed.embedding_batch_size) == ("cpu", 32)
    assert settings.embedding_device == "auto"  # the original is untouched


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"embedding_device": "tpu"}, "EMBEDDING_DEVICE"),
        ({"embedding_batch_size": "abc"}, "EMBEDDING_BATCH_SIZE"),
        ({"return_top_k": 1000}, "RETURN_TOP_K"),
        ({"embedding_text_column": "id"}, "EMBEDDING_TEXT_COLUMN"),
    ],
)
def test_replace_refuses_bad_values(changes: dict, named: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_mapping({}).replace(**changes)
    assert named in str(raised.value)
    assert "\n" not in str(raised.value)


def test_settings_are_frozen() -> None:
    settings = Settings.from_mapping({})
    with pytest.raises(ValidationError):
        settings.embedding_device = "cpu"  # type: ignore[misc]


def test_repr_and_str_never_show_database_passwords() -> None:
    settings = Settings.from_mapping(
        {
            "DATABASE_URL": "postgresql://app:s3cret-pw@db.example:5432/prod",
            "DAGSTER_PG_URL": "postgresql+psycopg2://dagster:other-pw@db.example/dagster",
        }
    )
    assert settings.database_url == "postgresql://app:s3cret-pw@db.example:5432/prod"
    for text in (repr(settings), str(settings)):
        assert "s3cret-pw" not in text
        assert "other-pw" not in text
