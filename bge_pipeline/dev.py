"""`bge-pipeline dev`: `dagster dev` on one machine, with Dagster's own storage in the embedded PostgreSQL."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import psycopg
from dotenv import dotenv_values
from psycopg import sql as pgsql

from bge_pipeline.settings import Settings, SettingsError

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
    env = dict(os.environ)
    limit = args.gpu_concurrency if args.gpu_concurrency is not None else gpu_concurrency(env)
    prepare_environment(settings, env, Path.cwd())
    set_pool_limit(Path(env["DAGSTER_HOME"]), GPU_POOL, limit, env)
    command = dagster_dev_command(args.dagster_args)
    if args.dry_run:
        for name in ("DAGSTER_HOME", "DAGSTER_PG_URL"):
            print(f"{name}={env[name]}")
        print(f"{GPU_POOL} pool limit: {limit}")
        print(" ".join(command))
        return 0
    print(f"Dagster storage: {_redacted(env['DAGSTER_PG_URL'])}; DAGSTER_HOME={env['DAGSTER_HOME']}; {GPU_POOL} pool: {limit}")
    sys.stdout.flush()
    os.execvpe(command[0], command, env)
    return 0  # not reached: exec replaces this process


def gpu_concurrency(env: Mapping[str, str], dotenv_path: str = ".env") -> int:
    """GPU_CONCURRENCY from the environment or `.env`: how many encoder steps may run at once (default 1)."""
    raw = env.get("GPU_CONCURRENCY")
    if raw is None and Path(dotenv_path).is_file():
        raw = dotenv_values(dotenv_path).get("GPU_CONCURRENCY")
    if raw is None or not raw.strip():
        return 1
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"GPU_CONCURRENCY={raw!r} is not a whole number") from None
    if value < 1:
        raise SettingsError(f"GPU_CONCURRENCY={value} is out of range: it must be at least 1")
    return value


def prepare_environment(settings: Settings, env: MutableMapping[str, str], cwd: Path) -> None:
    """Set DAGSTER_HOME and DAGSTER_PG_URL in `env` where unset; the embedded server holds Dagster's storage."""
    env.setdefault("DAGSTER_HOME", str(dagster_home(cwd)))
    if not env.get("DAGSTER_PG_URL") and Path(".env").is_file():
        from_file = dotenv_values(".env").get("DAGSTER_PG_URL")
        if from_file:
            env["DAGSTER_PG_URL"] = from_file
    if env.get("DAGSTER_PG_URL"):
        return
    if settings.database_url:
        raise SettingsError(
            "DAGSTER_PG_URL is unset while DATABASE_URL points at your server: set DAGSTER_PG_URL to a database "
            "for Dagster's runs and events, written postgresql+psycopg2://user:password@host:5432/dagster"
        )
    from bge_pipeline.database import embedded_database_url

    env["DAGSTER_PG_URL"] = ensure_dagster_database(embedded_database_url(settings.embedded_pgdata))


def dagster_home(cwd: Path) -> Path:
    """The folder whose dagster.yaml configures the instance: the working directory, else the project root."""
    for candidate in (cwd, Path(__file__).resolve().parents[1]):
        if (candidate / INSTANCE_FILE).is_file():
            return candidate.resolve()
    raise SettingsError(f"No {INSTANCE_FILE} in {cwd}: run from the project root or set DAGSTER_HOME")


def ensure_dagster_database(server_url: str, database: str = DAGSTER_DATABASE) -> str:
    """Create `database` on the server if missing; return its URL for dagster-postgres (psycopg2)."""
    head, _, query = server_url.partition("?")
    admin = head.split("://", 1)[1]
    with psycopg.connect(f"postgresql://{admin}?{query}" if query else f"postgresql://{admin}", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(database)))
    # dagster-postgres ships psycopg2; under SQLAlchemy 2.1 a bare postgresql:// would mean psycopg 3.
    return f"postgresql+psycopg2://{admin.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


def set_pool_limit(home: Path, pool: str, limit: int, env: Optional[Mapping[str, str]] = None) -> None:
    """Store the pool's limit in the instance (dagster.yaml can only give all pools one default limit)."""
    from dagster import DagsterInstance

    saved = {name: os.environ.get(name) for name in ("DAGSTER_PG_URL", "DAGSTER_HOME")}
    try:
        for name in saved:
            if env and env.get(name):
                os.environ[name] = env[name]
        with DagsterInstance.from_config(str(home)) as instance:
            instance.event_log_storage.set_concurrency_slots(pool, limit)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dagster_dev_command(extra: list[str]) -> list[str]:
    """`dagster dev` from this environment, with the user's arguments (a leading `--` dropped)."""
    if extra and extra[0] == "--":
        extra = extra[1:]
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or shutil.which("dagster")
    base = [dagster] if dagster else [sys.executable, "-m", "dagster"]
    return [*base, "dev", *extra]


def socket_directory(url: str) -> Optional[str]:
    """The unix-socket directory of a libpq URL (`?host=/path`), if it names one."""
    hosts = parse_qs(urlsplit(url).query).get("host")
    return hosts[0] if hosts else None


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(base_url: str, query: str, variables: Optional[Mapping[str, Any]] = None, timeout_seconds: float = 60) -> Any:
    """POST one query to the webserver's /graphql and return its `data`; GraphQL errors raise."""
    body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
    request = urllib.request.Request(f"{base_url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
        payload = json.load(response)
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


@contextmanager
def running_webserver(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    port: int,
    log_path: Path,
    timeout_seconds: float = 240,
) -> Iterator[str]:
    """Run `dagster dev` or `dagster-webserver` in its own process group until the block ends; yields its URL.

    The group is killed on the way out, so the daemon, code server and runs it started go with it.
    """
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(command), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout_seconds
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited with {process.returncode}: see {log_path}")
                try:
                    # /server_info answers before the code location has loaded: ask for the repository.
                    data = graphql(base_url, "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name } } } }", timeout_seconds=10)
                    if data["repositoriesOrError"].get("nodes"):
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError, RuntimeError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command[0]} did not serve {base_url} within {timeout_seconds:.0f}s: see {log_path}")
                time.sleep(1)
            yield base_url
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait_seconds in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_seconds)
            # The leader is gone; children that ignored SIGINT still die with the group.
            os.killpg(process.pid, signal.SIGKILL)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        return
