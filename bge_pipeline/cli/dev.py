"""`bge-pipeline dev`: `dagster dev` on one machine, with Dagster's own storage in the embedded PostgreSQL."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

from bge_pipeline.core.database import embedded_database_url, redact
from bge_pipeline.core.settings import Settings, SettingsError

GPU_POOL = "gpu"
DAGSTER_DATABASE = "dagster"
INSTANCE_FILE = "dagster.yaml"


def register_command(commands: argparse._SubParsersAction) -> None:
    """Add `dev` to the `bge-pipeline` command."""
    dev = commands.add_parser(
        "dev",
        help="run `dagster dev` with Dagster's storage in PostgreSQL (the embedded server unless DAGSTER_PG_URL is set)",
        description=(
            "Starts the embedded PostgreSQL when DATABASE_URL is unset, creates its `dagster` database, sets "
            "DAGSTER_PG_URL and DAGSTER_HOME, sets the `gpu` pool's limit, then runs `dagster dev`. "
            "Arguments after `--` go to `dagster dev`."
        ),
    )
    dev.add_argument(
        "--gpu-concurrency",
        type=int,
        default=None,
        help="how many steps may hold the encoder at once across all runs (default: GPU_CONCURRENCY, else 1)",
    )
    dev.add_argument(
        "--dry-run",
        action="store_true",
        help="prepare the storage and print the environment and command instead of running dagster dev",
    )
    dev.add_argument("dagster_args", nargs=argparse.REMAINDER, help="arguments for `dagster dev`, after `--`")
    dev.set_defaults(handler=_dev)


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    limit = args.gpu_concurrency if args.gpu_concurrency is not None else settings.gpu_concurrency
    env = {**os.environ, **storage_environment(settings)}
    set_pool_limit(env, GPU_POOL, limit)
    command = dagster_dev_command(args.dagster_args)
    if args.dry_run:
        for name in ("DAGSTER_HOME", "DAGSTER_PG_URL"):
            print(f"{name}={env[name]}")
        print(f"{GPU_POOL} pool limit: {limit}")
        print(" ".join(command))
        return 0
    print(
        f"Dagster storage: {redact(env['DAGSTER_PG_URL'])}; DAGSTER_HOME={env['DAGSTER_HOME']}; {GPU_POOL} pool: {limit}"
    )
    sys.stdout.flush()
    os.execvpe(command[0], command, env)
    return 0  # not reached: exec replaces this process


def storage_environment(settings: Settings) -> dict[str, str]:
    """DAGSTER_HOME and DAGSTER_PG_URL for the project's instance: as set, else the embedded server's `dagster`
    database and the project's dagster.yaml."""
    env = {"DAGSTER_HOME": os.environ.get("DAGSTER_HOME") or str(dagster_home(Path.cwd()))}
    if settings.dagster_pg_url:
        return {**env, "DAGSTER_PG_URL": settings.dagster_pg_url}
    if settings.database_url:
        raise SettingsError(
            "DAGSTER_PG_URL is unset while DATABASE_URL points at your server: set DAGSTER_PG_URL to a database "
            "for Dagster's runs and events, written postgresql+psycopg2://user:password@host:5432/dagster"
        )
    return {**env, "DAGSTER_PG_URL": ensure_dagster_database(embedded_database_url(settings.embedded_pgdata))}


@contextmanager
def dagster_instance(storage: Mapping[str, str]) -> Iterator[Any]:
    """The instance that `storage` (DAGSTER_HOME, DAGSTER_PG_URL) names, with those set while it is open."""
    from dagster import DagsterInstance

    saved = {name: os.environ.get(name) for name in storage}
    os.environ.update(storage)
    try:
        with DagsterInstance.from_config(storage["DAGSTER_HOME"]) as instance:
            yield instance
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dagster_home(cwd: Path) -> Path:
    """The folder whose dagster.yaml configures the instance: the working directory, else the project root."""
    for candidate in (cwd, Path(__file__).resolve().parents[2]):
        if (candidate / INSTANCE_FILE).is_file():
            return candidate.resolve()
    raise SettingsError(f"No {INSTANCE_FILE} in {cwd}: run from the project root or set DAGSTER_HOME")


def ensure_dagster_database(server_url: str, database: str = DAGSTER_DATABASE) -> str:
    """Create `database` on the server if missing; return its URL for dagster-postgres (psycopg2)."""
    head, _, query = server_url.partition("?")
    admin = head.split("://", 1)[1]
    with psycopg.connect(
        f"postgresql://{admin}?{query}" if query else f"postgresql://{admin}", autocommit=True
    ) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(database)))
    # dagster-postgres ships psycopg2; under SQLAlchemy 2.1 a bare postgresql:// would mean psycopg 3.
    return f"postgresql+psycopg2://{admin.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


def set_pool_limit(storage: Mapping[str, str], pool: str, limit: int) -> None:
    """Store the pool's limit in the instance (dagster.yaml can only give all pools one default limit)."""
    with dagster_instance({name: storage[name] for name in ("DAGSTER_HOME", "DAGSTER_PG_URL")}) as instance:
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def dagster_dev_command(extra: list[str]) -> list[str]:
    """`dagster dev` from this environment, with the user's arguments (a leading `--` dropped)."""
    if extra and extra[0] == "--":
        extra = extra[1:]
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or shutil.which("dagster")
    base = [dagster] if dagster else [sys.executable, "-m", "dagster"]
    return [*base, "dev", *extra]
