"""The typed settings: the guide's `.env` names plus ours, read and validated in one place, when asked for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BGE_QUERY_PREFIX = "Represent this sentence for searching relevant passages: "
DEFAULT_MODEL = "BAAI/bge-small-en-v1.5"
DEFAULT_RERANKER = "BAAI/bge-reranker-base"
MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated
DOTENV_FILE = ".env"
# An empty value means "unset" for every setting but this one, where it means "no query instruction".
EMPTY_IS_A_VALUE = frozenset({"EMBEDDING_QUERY_PREFIX"})

Backend = Literal["auto", "torch", "torch-bf16", "onnx", "onnx-int8", "openvino"]
IndexType = Literal["ivfflat", "hnsw"]
VectorType = Literal["vector", "halfvec"]
# pgvector indexes vectors of at most this many dimensions (halfvec stores 2 bytes a component, so twice as many).
INDEXABLE_DIMENSIONS = {"vector": 2000, "halfvec": 4000}
Count = Annotated[int, Field(ge=1, le=10**9)]


class SettingsError(ValueError):
    """A setting has a value the pipeline cannot use; the message names the setting."""


def validate_identifier(setting: str, name: str) -> str:
    """Refuse names PostgreSQL would mangle; everything else is quoted, never interpolated."""
    if not name or not name.strip():
        raise ValueError(f"{setting} is empty: name a table or column")
    if "\x00" in name:
        raise ValueError(f"{setting}={name!r} contains a NUL byte")
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(f"{setting}={name!r} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte limit")
    return name


class Settings(BaseModel):
    """Everything the pipeline can be told, with the guide's defaults; each field is read from its upper-case name."""

    model_config = ConfigDict(frozen=True, alias_generator=str.upper, populate_by_name=True, extra="ignore")

    embedding_provider: Literal["local"] = "local"
    embedding_model: str = DEFAULT_MODEL
    embedding_dimensions: int = Field(384, ge=1, le=16000)
    embedding_device: str = "auto"
    embedding_batch_size: Optional[int] = Field(None, ge=1, le=65536)
    embedding_backend: Backend = "auto"
    int8_min_agreement: float = Field(0.95, ge=0.0, le=1.0)  # onnx-int8's gate: neighbours shared with float
    embedding_query_prefix: Optional[str] = None
    enable_reranker: bool = False
    reranker_model: str = DEFAULT_RERANKER
    rerank_top_k: int = Field(200, ge=1, le=100000)
    return_top_k: int = Field(20, ge=1, le=100000)
    rerank_batch_size: int = Field(64, ge=1, le=65536)
    database_url: Optional[str] = Field(None, repr=False)
    dagster_pg_url: Optional[str] = Field(None, repr=False)
    embedded_pgdata: str = ".bge_pipeline/pgdata"
    embedding_schema: str = "public"
    embedding_table: str = "segments"
    embedding_id_column: str = "id"
    embedding_text_column: str = "text"
    embedding_column: str = "embedding"
    ivfflat_lists: Optional[int] = Field(None, ge=1, le=32768)
    index_type: IndexType = "ivfflat"
    hnsw_m: Optional[int] = Field(None, ge=2, le=100)  # pgvector's limits; None: its default (16)
    hnsw_ef_construction: Optional[int] = Field(None, ge=4, le=1000)  # None: pgvector's default (64)
    vector_type: VectorType = "vector"
    backfill_batch_rows: int = Field(1000, ge=1, le=1000000)
    backfill_partitions: int = Field(8, ge=1, le=1024)
    backfill_max_retries: int = Field(3, ge=0, le=100)
    keep_old_embeddings: bool = True
    disk_check: bool = True
    reembed_cron: str = "0 3 * * *"
    reembed_min_pending: Count = 1000
    gpu_concurrency: int = Field(1, ge=1, le=1024)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, dotenv_path: Optional[str] = DOTENV_FILE) -> Settings:
        """The process environment over a `.env` file in the working directory: the shell wins, as everywhere."""
        from_file: dict[str, str] = {}
        if dotenv_path and Path(dotenv_path).is_file():
            from_file = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
        shell = dict(os.environ) if env is None else dict(env)
        if env is None:
            shell.update(_overwritten_by_dotenv(shell, from_file))
        return cls.from_mapping({**from_file, **shell})

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        """Build settings from upper-case names; unknown names are ignored, a bad value refused in one line."""
        known = {field.upper() for field in cls.model_fields}
        given = {
            name: raw.strip() if name not in EMPTY_IS_A_VALUE else raw
            for name, raw in values.items()
            if name in known and (raw.strip() or name in EMPTY_IS_A_VALUE)
        }
        try:
            return cls.model_validate(given)
        except ValidationError as error:
            raise SettingsError(_one_line(error, given)) from None

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (field names), validated like the original."""
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise SettingsError(f"no such setting: {', '.join(unknown)}")
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as error:
            raise SettingsError(_one_line(error, changes)) from None

    @field_validator("embedding_device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
            return device
        raise ValueError(f"EMBEDDING_DEVICE={device!r} is not one of auto, cpu, cuda, cuda:N")

    @field_validator(
        "embedding_schema", "embedding_table", "embedding_id_column", "embedding_text_column", "embedding_column"
    )
    @classmethod
    def _identifier(cls, name: str, info: Any) -> str:
        return validate_identifier(info.field_name.upper(), name)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        validate_identifier("EMBEDDING_COLUMN", self.staging_column)
        if self.return_top_k > self.rerank_top_k:
            raise ValueError(
                f"RETURN_TOP_K={self.return_top_k} is larger than RERANK_TOP_K={self.rerank_top_k}: "
                "reranking cannot return more candidates than it retrieved"
            )
        if self.embedding_id_column == self.embedding_text_column:
            raise ValueError("EMBEDDING_ID_COLUMN and EMBEDDING_TEXT_COLUMN name the same column")
        limit = INDEXABLE_DIMENSIONS[self.vector_type]
        if self.embedding_dimensions > limit:
            hint = ": set VECTOR_TYPE=halfvec" if self.embedding_dimensions <= INDEXABLE_DIMENSIONS["halfvec"] else ""
            raise ValueError(
                f"EMBEDDING_DIMENSIONS={self.embedding_dimensions} is more than pgvector can index as "
                f"VECTOR_TYPE={self.vector_type} ({limit:,}){hint}"
            )
        m, ef_construction = self.hnsw_m or 16, self.hnsw_ef_construction or 64
        if ef_construction < 2 * m:
            raise ValueError(
                f"HNSW_EF_CONSTRUCTION={ef_construction} must be at least twice HNSW_M={m} (pgvector's rule)"
            )
        return self

    @property
    def staging_column(self) -> str:
        """The guide's `embedding_384`: where the new model's vectors wait for the swap."""
        return f"{self.embedding_column}_{self.embedding_dimensions}"

    @property
    def query_prefix(self) -> str:
        """The BGE retrieval instruction for bge models, nothing for others, unless set explicitly."""
        if self.embedding_query_prefix is not None:
            return self.embedding_query_prefix
        return BGE_QUERY_PREFIX if "bge-" in self.embedding_model.lower() else ""


def _overwritten_by_dotenv(current: Mapping[str, str], from_file: Mapping[str, str]) -> dict[str, str]:
    """The shell's values that Dagster's CLI replaced with `.env`'s before loading our code.

    `dagster asset materialize` writes `.env` into os.environ over the shell; the environment this process was
    started with (Linux: /proc/self/environ) still has the shell's value. Only a variable that now holds exactly
    the file's value, and started with another, is taken back.
    """
    try:
        started_raw = Path("/proc/self/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    started = dict(item.split("=", 1) for item in started_raw.split("\0") if "=" in item)
    return {
        name: started[name]
        for name, value in from_file.items()
        if current.get(name) == value and name in started and started[name] != value
    }


def _one_line(error: ValidationError, given: Mapping[str, Any]) -> str:
    """pydantic's report, cut to its first problem and the setting's own name."""
    problem = error.errors()[0]
    message = str(problem.get("ctx", {}).get("error") or problem["msg"])
    if problem["type"] == "value_error":  # our own validators already name the setting
        return message.removeprefix("Value error, ")
    name = str(problem["loc"][0]).upper() if problem["loc"] else "settings"
    value = given.get(name, given.get(name.lower(), problem.get("input")))
    return f"{name}={value!r} is not valid: {message[0].lower()}{message[1:]}"
