"""Placeholder being written in this session (issue 3/5)."""

import argparse


def register_command(commands: argparse._SubParsersAction) -> None:
    pass
