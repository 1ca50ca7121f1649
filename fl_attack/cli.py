"""``fl-attack``: the command line. Each subcommand lives in ``fl_attack/commands/``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from fl_attack.commands import COMMANDS, UsageError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="fl-attack",
        description="Federated-learning attack simulator (R-CONV analytic reconstruction).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and return exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
