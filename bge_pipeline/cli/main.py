"""The `bge-pipeline` command: demo, verify, backup, and the query-path, benchmark and dev tools."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from bge_pipeline.cli import bench, demo, dev, evaluate, search, verify
from bge_pipeline.core.settings import Settings

COMMANDS = (demo, verify, search, evaluate, bench, dev)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bge-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register_command(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Parse, read the settings (after --help, so a bad one never hides it), run; errors are one line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, Settings.from_env()) or 0)
    except (RuntimeError, ValueError) as error:  # SettingsError, MigrationError, SearchError, ModelLoadError...
        print(f"bge-pipeline: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
