"""Running `dagster dev` or `dagster-webserver` for a test, and asking it GraphQL questions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(
    base_url: str, query: str, variables: Optional[Mapping[str, Any]] = None, timeout_seconds: float = 60
) -> Any:
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
    ready: Optional[Callable[[str], bool]] = None,
) -> Iterator[str]:
    """Run `dagster dev` or `dagster-webserver` in its own process group until the block ends; yields its URL
    once `ready(url)` (default: the code location's repository is served).

    The group is killed on the way out, so the daemon, code server and runs it started go with it.
    """
    ready = ready or repository_served
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
                    if ready(base_url):
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError, RuntimeError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{command[0]} did not serve {base_url} within {timeout_seconds:.0f}s: see {log_path}"
                    )
                time.sleep(1)
            yield base_url
        finally:
            _stop_group(process)


def repository_served(base_url: str) -> bool:
    """/server_info answers before the code location has loaded: ask for the repository."""
    query = "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name } } } }"
    return bool(graphql(base_url, query, timeout_seconds=10)["repositoriesOrError"].get("nodes"))


LOCATION_ERRORS = """{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message errorChain { error { message } } } }
} } } }"""


def location_errors(base_url: str) -> Optional[dict[str, Optional[str]]]:
    """Each code location's load error with its causes, as the UI lists them (None where it loaded), once every
    location has finished loading."""
    entries = graphql(base_url, LOCATION_ERRORS, timeout_seconds=10)["workspaceOrError"]["locationEntries"]
    if not entries or any(entry["loadStatus"] != "LOADED" for entry in entries):
        return None
    errors: dict[str, Optional[str]] = {}
    for entry in entries:
        error = entry["locationOrLoadError"] or {}
        chain = [error.get("message"), *(link["error"]["message"] for link in error.get("errorChain") or [])]
        errors[entry["name"]] = "\n".join(m for m in chain if m) or None
    return errors


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
