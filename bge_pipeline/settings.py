"""The typed settings: the guide's `.env` names plus ours, read and validated in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Optional

from dotenv import dotenv_values

BGE_QUERY_PREFIX = "Represent this sentence for searching relevant passages: "
DEFAULT_MODEL = "BAAI/bge-small-en-v1.5"
DEFAULT_RERANKER = "BAAI/bge-reranker-base"
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "onnx", "onnx-int8", "openvino")
MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated


class SettingsError(ValueError):
    """A setting has a value the pipeline cannot use; the message names the setting."""


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean: use true or false")


def _parse_int(name: str, raw: str, minimum: int, maximum: int = 10**9) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name}={value} is out of range: it must be between {minimum} and {maximum}")
    return value


def validate_identifier(setting: str, name: str) -> str:
    """Refuse names PostgreSQL would mangle; everything else is quoted, never interpolated."""
    if not name or not name.strip():
        raise SettingsError(f"{setting} is empty: name a table or column")
    if "\x00" in name:
        raise SettingsError(f"{setting}={name!r} contains a NUL byte")
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise SettingsError(f"{setting}={name!r} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte limit")
    return name


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline can be told, with the guide's defaults."""

    embedding_provider: str = "local"
    embedding_model: str = DEFAULT_MODEL
    embedding_dimensions: int = 384
    embedding_device: str = "auto"
    embedding_batch_size: Optional[int] = None
    embedding_backend: str = "auto"
    embedding_query_prefix: Optional[str] = None
    enable_reranker: bool = False
    reranker_model: str = DEFAULT_RERANKER
    rerank_top_k: int = 200
    return_top_k: int = 20
    rerank_batch_size: int = 64
    database_url: Optional[str] = field(default=None, repr=False)
    embedded_pgdata: str = ".bge_pipeline/pgdata"
    embedding_schema: str = "public"
    embedding_table: str = "segments"
    embedding_id_column: str = "id"
    embedding_text_column: str = "text"
    embedding_column: str = "embedding"
    ivfflat_lists: Optional[int] = None
    backfill_batch_rows: int = 1000
    backfill_partitions: int = 8
    backfill_max_retries: int = 3
    keep_old_embeddings: bool = True
    reembed_cron: str = "0 3 * * *"
    reembed_min_pending: int = 1000

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, dotenv_path: Optional[str] = ".env") -> "Settings":
        """Read the process environment, falling back to a `.env` file in the working directory."""
        values: dict[str, str] = {}
        if dotenv_path and Path(dotenv_path).is_file():
            values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        values.update(os.environ if env is None else env)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> "Settings":
        """Build settings from upper-case names; unknown names are ignored, bad values refused."""
        parsed: dict[str, object] = {}
        for spec in fields(cls):
            name = spec.name.upper()
            raw = values.get(name)
            if raw is None or (raw.strip() == "" and spec.name != "embedding_query_prefix"):
                continue
            parsed[spec.name] = _parse_field(spec.name, name, raw)
        settings = cls(**parsed)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.embedding_provider != "local":
            raise SettingsError(
                f"EMBEDDING_PROVIDER={self.embedding_provider!r} is not supported: only 'local' "
                "(sentence-transformers on this machine) is"
            )
        device = self.embedding_device
        if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise SettingsError(f"EMBEDDING_DEVICE={device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.embedding_backend not in BACKENDS:
            raise SettingsError(f"EMBEDDING_BACKEND={self.embedding_backend!r} is not one of {', '.join(BACKENDS)}")
        for setting in (
            "embedding_schema",
            "embedding_table",
            "embedding_id_column",
            "embedding_text_column",
            "embedding_column",
        ):
            validate_identifier(setting.upper(), getattr(self, setting))
        validate_identifier("EMBEDDING_COLUMN", self.staging_column)
        if self.return_top_k > self.rerank_top_k:
            raise SettingsError(
                f"RETURN_TOP_K={self.return_top_k} is larger than RERANK_TOP_K={self.rerank_top_k}: "
                "reranking cannot return more candidates than it retrieved"
            )
        if self.embedding_id_column == self.embedding_text_column:
            raise SettingsError("EMBEDDING_ID_COLUMN and EMBEDDING_TEXT_COLUMN name the same column")

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


_INT_RANGES = {
    "embedding_dimensions": (1, 16000),
    "embedding_batch_size": (1, 65536),
    "rerank_top_k": (1, 100000),
    "return_top_k": (1, 100000),
    "rerank_batch_size": (1, 65536),
    "ivfflat_lists": (1, 32768),
    "backfill_batch_rows": (1, 1000000),
    "backfill_partitions": (1, 1024),
    "backfill_max_retries": (0, 100),
    "reembed_min_pending": (1, 10**12),
}
_BOOL_FIELDS = {"enable_reranker", "keep_old_embeddings"}


def _parse_field(attribute: str, name: str, raw: str) -> object:
    if attribute in _INT_RANGES:
        return _parse_int(name, raw, *_INT_RANGES[attribute])
    if attribute in _BOOL_FIELDS:
        return _parse_bool(name, raw)
    if attribute == "embedding_query_prefix":
        return raw
    return raw.strip()


@lru_cache(maxsize=1)
def current_settings() -> Settings:
    """The settings this process loaded its definitions with (read once: partitions are fixed at load)."""
    return Settings.from_env()
