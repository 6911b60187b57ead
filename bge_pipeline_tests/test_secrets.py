"""The database password in DATABASE_URL appears nowhere a run leaves anything: output, event log, metadata,
exceptions, compute logs, DAGSTER_HOME."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
import psycopg
import pytest
from dagster._serdes import serialize_value

from bge_pipeline.core.corpus import create_seed_table
from bge_pipeline_tests.faultkit import (
    cli_environment,
    migrate,
    settings_for,
    start_cli,
    throwaway_server,
)
from bge_pipeline_tests.helpers import ALL_ASSETS_AND_CHECKS

pytestmark = pytest.mark.pgvector

PASSWORD = "S3cr3t-Pa55"
WRONG_PASSWORD = "Wr0ng-Pa55-99"


@pytest.fixture(scope="module")
def password_server(segments: list[Any]) -> Iterator[tuple[str, str]]:
    """A server of its own where `bge_user` must give its password: the embedded server trusts every local
    connection, so pg_hba.conf is changed to demand SCRAM for this role on the unix socket."""
    with throwaway_server() as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE bge_user LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE bge OWNER bge_user")
            hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        with psycopg.connect(server.database_url("bge"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
        hba.write_text("local all bge_user scram-sha-256\n" + hba.read_text())
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        good = f"postgresql://bge_user:{PASSWORD}@/bge?host={server.socket_dir}"
        bad = f"postgresql://bge_user:{WRONG_PASSWORD}@/bge?host={server.socket_dir}"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(bad).close()
        with psycopg.connect(good) as conn:
            create_seed_table(conn, segments[:30])
            conn.commit()
        yield good, bad


def files_containing(root: Path, secrets: tuple[str, ...]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path} holds {secret!r}" for secret in secrets if secret.encode() in data]
    return found


def event_log_text(instance: dg.DagsterInstance) -> str:
    """Every stored event of every run, serialized: messages, metadata, error info with causes and stacks."""
    parts = []
    for run in instance.get_runs():
        parts.append(serialize_value(run))
        for entry in instance.all_logs(run.run_id):
            parts.append(serialize_value(entry))
    return "\n".join(parts)


def test_password_never_leaves_the_connection(
    password_server: tuple[str, str],
    minilm_path: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good, bad = password_server
    secrets = (PASSWORD, WRONG_PASSWORD)
    home = tmp_path / "dagster_home"
    home.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    outputs: list[str] = []

    # The CLI, as the README shows it, with DAGSTER_HOME so the run, its events and compute logs are kept.
    for name, overrides in (
        ("migrate", {}),
        ("bad_table", {"EMBEDDING_TABLE": "no_such_table"}),
        ("wrong_password", {"DATABASE_URL": bad}),
    ):
        env = cli_environment(good, minilm_path, DAGSTER_HOME=str(home), **overrides)
        log = tmp_path / f"cli_{name}.log"
        child = start_cli(env, str(workdir), "--select", "embeddings*", log_path=log)
        code = child.wait(timeout=300)
        output = log.read_text(errors="replace")
        outputs.append(output)
        assert (code == 0) == (name == "migrate"), output[-3000:]
    assert "no_such_table" in outputs[1] and "password authentication failed" in outputs[2]

    # In-process, with the URL given as a plain value (from_environment=False) and as the EnvVar the definitions use.
    local = tmp_path / "instance"
    local.mkdir()
    with dg.DagsterInstance.local_temp(tempdir=str(local)) as instance:
        errors: list[str] = []
        result = migrate(settings_for(good, minilm_path), instance=instance)
        assert result.success
        metadata = [
            str(event.event_specific_data.materialization.metadata)
            for event in result.get_asset_materialization_events()
        ]
        for overrides in ({"EMBEDDING_TABLE": "no_such_table"}, {"DATABASE_URL": bad}):
            try:
                migrate(settings_for(good, minilm_path, **overrides), instance=instance)
            except Exception as error:  # noqa: BLE001 - its text is what is searched
                errors.append("".join(traceback.format_exception(error)))
            failed = migrate(settings_for(good, minilm_path, **overrides), instance=instance, raise_on_error=False)
            assert not failed.success
            errors += [str(event) for event in failed.all_events]
        monkeypatch.setenv("DATABASE_URL", good)
        from bge_pipeline.defs.resources import build_resources

        env_result = dg.materialize(
            ALL_ASSETS_AND_CHECKS,
            selection="embeddings*",
            resources=build_resources(settings_for(good, minilm_path), from_environment=True),
            instance=instance,
        )
        assert env_result.success
        metadata += [
            str(event.event_specific_data.materialization.metadata)
            for event in env_result.get_asset_materialization_events()
        ]
        stored = event_log_text(instance)
    assert len(errors) >= 4
    assert "no_such_table" in "".join(errors) and "password authentication failed" in "".join(errors)
    captured = capfd.readouterr()
    places = {
        "CLI output": "\n".join(outputs),
        "captured stdout/stderr": captured.out + captured.err,
        "event log and run records": stored,
        "materialization metadata": "\n".join(metadata),
        "exceptions": "\n".join(errors),
    }
    leaks = [f"{place} holds {secret!r}" for place, text in places.items() for secret in secrets if secret in text]
    leaks += files_containing(home, secrets) + files_containing(local, secrets) + files_containing(workdir, secrets)
    assert not leaks, leaks
    assert list(home.rglob("*.db")) or list(home.rglob("*")), "DAGSTER_HOME stayed empty: nothing was searched"
    assert "bge_user:***@" in places["CLI output"] or "***" in stored, (
        "the redacted URL never appeared: was the run logged?"
    )
    print(
        f"searched {sum(len(text) for text in places.values()):,} characters and {sum(1 for _ in home.rglob('*'))} files"
    )
