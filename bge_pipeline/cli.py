"""The `bge-pipeline` command: demo, verify, and the query-path and benchmark tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

from bge_pipeline.settings import Settings, SettingsError

Command = Callable[[argparse.Namespace, Settings], int]


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from bge_pipeline.demo import run_demo

    return run_demo(settings, rows=args.rows, force=args.force)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from bge_pipeline.resources import build_resources
    from bge_pipeline.verification import verify

    resources = build_resources(settings, from_environment=False)
    result = verify(resources["database"], resources["migration"])
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print("\n".join(result.lines()))
    return 0 if result.complete else 1


def _backup(args: argparse.Namespace, settings: Settings) -> int:
    from bge_pipeline.backup import dump_table
    from bge_pipeline.resources import build_resources

    database = build_resources(settings, from_environment=False)["database"]
    path = dump_table(database.url, settings.embedding_schema, settings.embedding_table, args.out)
    print(f"Dumped {settings.embedding_schema}.{settings.embedding_table} to {path} (restore: pg_restore -d DB {path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bge-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="seed a `segments` table from the bundled sample and migrate it through Dagster")
    demo.add_argument("--rows", type=int, default=1000, help="how many of the bundled 1,000 segments to load")
    demo.add_argument("--force", action="store_true", help="replace an existing table on a DATABASE_URL server")
    demo.set_defaults(handler=_demo)

    verify = commands.add_parser("verify", help="the guide's verification queries; exit 1 unless the migration is complete")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_verify)

    backup = commands.add_parser("backup", help="pg_dump the embeddings table, as the guide asks before migrating")
    backup.add_argument("--out", type=Path, default=None, help="the dump file (default: a timestamped name)")
    backup.set_defaults(handler=_backup)

    for register in _optional_commands():
        register(commands)
    return parser


def _optional_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands whose modules own their arguments: search, bench, eval."""
    from bge_pipeline import bench, dev, evaluation, search

    return [search.register_command, bench.register_command, evaluation.register_command, dev.register_command]


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.handler(args, settings) or 0)
    except (SettingsError, RuntimeError, ValueError) as error:
        print(f"bge-pipeline: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
