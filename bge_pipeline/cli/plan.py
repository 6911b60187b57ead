"""`bge-pipeline plan`: what the migration will take, in seconds and bytes, before anything changes."""

from __future__ import annotations

import argparse
import json

from bge_pipeline.cli.models import demo_settings
from bge_pipeline.core.database import Database
from bge_pipeline.core.encoder import encoder_for
from bge_pipeline.core.migration import MigrationTarget
from bge_pipeline.core.plan import plan_migration
from bge_pipeline.core.settings import Settings


def _plan(args: argparse.Namespace, settings: Settings) -> int:
    settings = demo_settings(settings)
    encoder = None if args.no_encode else encoder_for(settings)
    plan = plan_migration(Database.from_settings(settings), MigrationTarget.from_settings(settings), encoder)
    print(json.dumps(plan.as_dict()) if args.json else "\n".join(plan.lines()))
    return 0


def register_command(commands: argparse._SubParsersAction) -> None:
    """`bge-pipeline plan`."""
    parser = commands.add_parser("plan", help="rows, seconds, locks and disk the migration will take; changes nothing")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument(
        "--no-encode", action="store_true", help="skip measuring the encoder (no model load; phase 2 at the write rate)"
    )
    parser.set_defaults(handler=_plan)
