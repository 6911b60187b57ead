"""`bge-pipeline verify` (the guide's verification queries) and `bge-pipeline backup` (its pg_dump)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bge_pipeline.core.backup import dump_table
from bge_pipeline.core.database import Database
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.verification import verify


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    result = verify(Database.from_settings(settings), MigrationTarget.from_settings(settings))
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))
    return 0 if result.complete else 1


def _backup(args: argparse.Namespace, settings: Settings) -> int:
    database = Database.from_settings(settings)
    path = dump_table(database.url, settings.embedding_schema, settings.embedding_table, args.out)
    print(f"Dumped {settings.embedding_schema}.{settings.embedding_table} to {path} (restore: pg_restore -d DB {path})")
    return 0


def register_command(commands: argparse._SubParsersAction) -> None:
    """`verify` and `backup`."""
    parser = commands.add_parser(
        "verify", help="the guide's verification queries; exit 1 unless the migration is complete"
    )
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_verify)

    parser = commands.add_parser("backup", help="pg_dump the embeddings table, as the guide asks before migrating")
    parser.add_argument("--out", type=Path, default=None, help="the dump file (default: a timestamped name)")
    parser.set_defaults(handler=_backup)
