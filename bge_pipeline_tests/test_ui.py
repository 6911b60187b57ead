"""The Dagster UI as users see it, in a real (headless) Chromium: the asset graph and the checks' results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import dagster as dg
import pytest

from bge_pipeline_tests import webserver

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.browser, pytest.mark.pgvector]


def _screenshots_module():
    spec = importlib.util.spec_from_file_location("ui_screenshots", ROOT / "scripts" / "ui_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ui():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run browser tests")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package drives Chromium")
    return _screenshots_module()


def test_asset_graph_and_checks_show_a_finished_migration(
    ui, make_settings, database_url, minilm_path, seed_table, tmp_path
):
    seed_table(rows=30)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        ui.migrate(make_settings(), instance, partitions=False)

    settings_env = {"DATABASE_URL": database_url, "EMBEDDING_MODEL": minilm_path, "EMBEDDING_DEVICE": "cpu"}
    port = webserver.free_port()
    shots = tmp_path / "screenshots"
    env = ui.webserver_env(settings_env, home)
    with webserver.running_webserver(
        ui.webserver_command(port), env, tmp_path, port, tmp_path / "webserver.log"
    ) as base_url:
        with ui.chromium(tmp_path / "chromium") as browser:
            seen = ui.capture(browser, base_url, shots)

    graph = seen["asset_graph"]
    assert all(ui.page_shows(graph, asset) for asset in ui.ASSETS), graph
    assert "Passed" in graph  # the nodes' check summaries
    for asset, checks in ui.CHECKS.items():
        page = seen[f"checks_{asset}"]
        assert all(ui.page_shows(page, check) for check in checks), page
        assert "Succeeded" in page and "Failed" not in page, page
    for name in ("asset_graph.png", "embeddings_checks.png"):
        assert (shots / name).stat().st_size > 20_000  # a rendered page, not a blank one
    print(f"\nscreenshots in {shots}")
