"""Unit tier: the `bge-pipeline` command's contract, with no database, no model and no Dagster run.

A bad setting is one stderr line and exit 2 before anything is touched; --help works whatever the settings say.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

import bge_pipeline
from bge_pipeline.cli import bench, demo, dev, evaluate, verify
from bge_pipeline.cli import search as search_command
from bge_pipeline.cli.main import main
from bge_pipeline.cli.search import SNIPPET_CHARS, format_outcome, snippet
from bge_pipeline.core import database
from bge_pipeline.core.search import Hit, SearchOutcome, SearchTarget
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.sql import Table
from bge_pipeline.core.verification import ColumnFacts, Verification

pytestmark = pytest.mark.unit

REPO_ROOT = Path(bge_pipeline.__file__).resolve().parents[1]
SETTING_NAMES = sorted(name.upper() for name in Settings.model_fields)
ERROR_PREFIX = "bge-pipeline: error:"

# Every subcommand that reads the settings, with the least arguments it parses.
COMMANDS = {
    "verify": ["verify"],
    "verify-json": ["verify", "--json"],
    "backup": ["backup"],
    "search": ["search", "x"],
    "eval": ["eval"],
    "bench": ["bench"],
    "bench-pipeline": ["bench", "--pipeline"],
    "dev": ["dev", "--dry-run"],
    "demo": ["demo"],
    "plan": ["plan", "--json"],
}


def no_database(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a unit test reached for PostgreSQL")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting from the developer's shell or `.env`, a working directory without `.env`, and no way to a database."""
    for name in [*SETTING_NAMES, "DAGSTER_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(database, "embedded_database_url", no_database)
    monkeypatch.setattr(database, "create_engine", no_database)
    monkeypatch.setattr(dev, "embedded_database_url", no_database)
    monkeypatch.setattr(dev.psycopg, "connect", no_database)
    return tmp_path


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Settings]]:
    """Replace every command's handler with a recorder: what ran, with which arguments and settings."""
    calls: list[tuple[str, Any, Settings]] = []

    def recorder(name: str) -> Any:
        def record(args: Any, settings: Settings, *rest: Any) -> int:
            calls.append((name, args, settings))
            return 0

        return record

    monkeypatch.setattr(verify, "_verify", recorder("verify"))
    monkeypatch.setattr(verify, "_backup", recorder("backup"))
    monkeypatch.setattr(search_command, "_search_command", recorder("search"))
    monkeypatch.setattr(evaluate, "_eval_command", recorder("eval"))
    monkeypatch.setattr(bench, "run_bench", recorder("bench"))
    monkeypatch.setattr(dev, "_dev", recorder("dev"))
    monkeypatch.setattr(demo, "run_demo", lambda settings, *rest: calls.append(("demo", rest, settings)) or 0)
    return calls


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(ERROR_PREFIX), stderr
    return lines[0]


# --- help ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["verify", "--help"], ["bench", "--help"]], ids=" ".join)
def test_help_works_even_with_a_bad_setting(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMBEDDING_DEVICE", "tpu")
    monkeypatch.setenv("EMBEDDING_BATCH_SIZE", "abc")
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    captured = capsys.readouterr()
    assert "usage: bge-pipeline" in captured.out
    assert captured.err == ""


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "verify", "backup", "search", "eval", "bench", "dev"):
        assert command in out


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "usage: bge-pipeline" in capsys.readouterr().err


# --- a bad setting: one line, exit 2, nothing touched --------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_bad_setting_in_one_line(
    command: str,
    handlers: list,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EMBEDDING_DEVICE", "tpu")
    assert main(COMMANDS[command]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "EMBEDDING_DEVICE" in line and "tpu" in line
    assert captured.out == ""
    assert handlers == []  # refused before the command began


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EMBEDDING_BATCH_SIZE", "abc"),
        ("EMBEDDING_DIMENSIONS", "-3"),
        ("ENABLE_RERANKER", "maybe"),
        ("RETURN_TOP_K", "500"),
        ("EMBEDDING_BACKEND", "tensorrt"),
        ("EMBEDDING_TABLE", "t" * 64),
        ("GPU_CONCURRENCY", "0"),
    ],
)
def test_verify_names_the_bad_setting(
    name: str, value: str, handlers: list, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["verify"]) == 2
    assert name in one_error_line(capsys.readouterr().err)
    assert handlers == []


def test_bad_setting_in_dotenv_is_refused(isolated: Path, handlers: list, capsys: pytest.CaptureFixture[str]) -> None:
    (isolated / ".env").write_text("EMBEDDING_BATCH_SIZE=abc\n")
    assert main(["verify"]) == 2
    assert "EMBEDDING_BATCH_SIZE" in one_error_line(capsys.readouterr().err)
    assert handlers == []


def test_password_in_database_url_is_not_printed_with_an_error(
    monkeypatch: pytest.MonkeyPatch, handlers: list, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret-pw@db.example/prod")
    monkeypatch.setenv("EMBEDDING_DEVICE", "tpu")
    assert main(["verify"]) == 2
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.err + captured.out


# --- good settings reach the command -------------------------------------------------------------------------


def test_settings_come_from_the_shell_over_dotenv(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, handlers: list
) -> None:
    (isolated / ".env").write_text("EMBEDDING_DEVICE=cpu\nEMBEDDING_BATCH_SIZE=256\n")
    monkeypatch.setenv("EMBEDDING_BATCH_SIZE", "8")
    assert main(["search", "state of the union", "--top-k", "3", "--no-rerank"]) == 0
    [(name, args, settings)] = handlers
    assert name == "search"
    assert (args.query, args.top_k, args.rerank) == ("state of the union", 3, False)
    assert (settings.embedding_device, settings.embedding_batch_size) == ("cpu", 8)


def test_command_errors_are_one_line_exit_two(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(args: Any, settings: Settings) -> int:
        raise RuntimeError("pg_dump of public.segments failed: connection refused")

    monkeypatch.setattr(verify, "_backup", fails)
    assert main(["backup"]) == 2
    assert (
        one_error_line(capsys.readouterr().err)
        == f"{ERROR_PREFIX} pg_dump of public.segments failed: connection refused"
    )


@pytest.mark.parametrize("query", ["", "   "], ids=["empty", "blank"])
def test_empty_search_is_refused_before_the_database(query: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The real handler: the query is checked before the table is read or a model loads.
    assert main(["search", query]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # a line before it may say which model would run
    assert last.startswith(ERROR_PREFIX) and "empty" in last


@pytest.mark.parametrize("argv", [["bench", "--texts", "0"], ["bench", "--pipeline", "--rows", "0"]], ids=" ".join)
def test_bench_refuses_nonsense_counts_before_loading_anything(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert "--texts and --rows" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("sizes", ["0,16", "abc", ","])
def test_bench_batch_sizes_are_parsed_strictly(sizes: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--batch-sizes", sizes])
    assert exited.value.code == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_bench_batch_sizes_list(handlers: list) -> None:
    assert main(["bench", "--batch-sizes", "8, 32,128"]) == 0
    [(_, args, _)] = handlers
    assert args.batch_sizes == (8, 32, 128)


# --- verify's exit code ---------------------------------------------------------------------------------------


def verification(phase: str = "phase 3 done: swapped", **live_changes: Any) -> Verification:
    live: dict = dict(
        column="embedding",
        declared_type="vector(384)",
        recorded_model="BAAI/bge-small-en-v1.5",
        rows_with_text=1000,
        populated=1000,
        missing=0,
        index="segments_embedding_ivfflat_idx",
        index_method="ivfflat",
        index_operator_class="vector_cosine_ops",
        index_lists=100,
    )
    live.update(live_changes)
    return Verification(phase, "BAAI/bge-small-en-v1.5", ColumnFacts(**live), None)


@pytest.mark.parametrize(
    ("phase", "changes", "code"),
    [
        ("phase 3 done: swapped", {}, 0),
        ("phase 3 done: swapped", {"missing": 1, "populated": 999}, 1),
        ("phase 2 done: ready to swap", {}, 1),
        ("phase 3 done: swapped", {"index_operator_class": "vector_l2_ops"}, 1),
        (
            "phase 3 done: swapped",
            {"index": None, "index_method": None, "index_operator_class": None, "index_lists": None},
            1,
        ),
    ],
    ids=["complete", "rows-missing", "not-swapped", "l2-index", "no-index"],
)
def test_verify_exits_one_unless_the_migration_is_complete(
    phase: str, changes: dict, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = verification(phase, **changes)
    monkeypatch.setattr(verify, "verify", lambda db, target: result)
    assert main(["verify", "--json"]) == code
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] is (code == 0)
    assert printed["phase"] == phase and printed["live"]["missing"] == result.live.missing


# --- the search table -------------------------------------------------------------------------------------------


def test_snippet_keeps_short_text_and_flattens_whitespace() -> None:
    assert snippet("  two\nlines\tand   spaces ") == "two lines and spaces"
    exact = "x" * SNIPPET_CHARS
    assert snippet(exact) == exact


def test_snippet_cuts_long_text_to_its_width() -> None:
    cut = snippet("word " * 100)
    assert len(cut) <= SNIPPET_CHARS
    assert cut.endswith("...") and not cut.endswith(" ...")
    assert snippet("y" * (SNIPPET_CHARS + 1)) == "y" * (SNIPPET_CHARS - 3) + "..."
    assert len(snippet("z" * 50, width=20)) == 20


def outcome(
    hits: list[Hit], index: Optional[str] = "segments_embedding_ivfflat_idx", reranked: bool = False
) -> SearchOutcome:
    table = Table("public", "segments", "id", "text", "embedding", "embedding_384")
    target = SearchTarget(table, "embedding", index, 100 if index else None, 1000, True)
    return SearchOutcome("q", hits, target, len(hits), 12 if index else None, reranked, 0.0421)


def test_format_outcome_describes_how_hits_were_found() -> None:
    lines = format_outcome(outcome([Hit(7, "first\nhit", 0.12345), Hit(42, "second", 0.5)]))
    assert lines[0].startswith("segments.embedding: 2 candidates via segments_embedding_ivfflat_idx")
    assert "probes 12 of 100 lists" in lines[0] and "not reranked" in lines[0] and "42 ms" in lines[0]
    assert len(lines) == 4  # header, column names, one line per hit
    assert lines[2].split() == ["1", "7", "0.1235", "-", "first", "hit"]
    assert lines[3].split()[:4] == ["2", "42", "0.5000", "-"]


def test_format_outcome_of_a_sequential_scan_with_reranking() -> None:
    lines = format_outcome(outcome([Hit(3, "t", 0.2, 0.875)], index=None, reranked=True))
    assert "a sequential scan" in lines[0] and "reranked by the cross-encoder" in lines[0]
    assert lines[2].split()[:4] == ["1", "3", "0.2000", "0.8750"]


def test_format_outcome_without_hits_says_so() -> None:
    assert format_outcome(outcome([]))[-1] == "(no rows with vectors to search)"


# --- the installed command ------------------------------------------------------------------------------------


def command_environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTING_NAMES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_the_real_command_refuses_a_bad_setting_in_one_line(how: str, isolated: Path) -> None:
    if how == "console-script":
        script = Path(sys.executable).parent / "bge-pipeline"
        if not script.is_file():
            pytest.skip("the bge-pipeline console script is not installed in this environment")
        argv = [str(script), "verify"]
    else:
        argv = [sys.executable, "-m", "bge_pipeline.cli", "verify"]
    done = subprocess.run(
        argv, cwd=isolated, env=command_environment(EMBEDDING_DEVICE="tpu"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "EMBEDDING_DEVICE" in one_error_line(done.stderr)
    assert done.stdout == ""
