"""The `bge-pipeline` command: demo, verify, backup, and the query-path, benchmark and dev tools."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional

from bge_pipeline.cli import bench, demo, dev, evaluate, plan, search, verify
from bge_pipeline.core.settings import Settings

COMMANDS = (demo, plan, verify, search, evaluate, bench, dev)
# Our commands print their own lines: other libraries' notices about their APIs are not the user's business.
QUIET = (
    r".*is currently in beta",  # Dagster's BetaWarning for backfill_policy, raised when the definitions are built
    r".*is superseded",  # Dagster's SupersessionWarning
    r"XDG_RUNTIME_DIR is not set",  # platformdirs, under the embedded server, in containers without a session
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bge-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register_command(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Parse, read the settings (after --help, so a bad one never hides it), run; errors are one line, exit 2."""
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar, on every load
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, Settings.from_env()) or 0)
    except (RuntimeError, ValueError) as error:  # SettingsError, MigrationError, SearchError, ModelLoadError...
        print(f"bge-pipeline: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
