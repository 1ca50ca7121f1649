"""Subcommands of ``fl-attack``: each module exposes ``register(subparsers)``."""

from __future__ import annotations

from types import ModuleType

from fl_attack.commands import reconstruct as _reconstruct
from fl_attack.commands import run as _run
from fl_attack.commands import sweep as _sweep
from fl_attack.commands.errors import UsageError

__all__ = ["COMMANDS", "UsageError"]

COMMANDS: tuple[ModuleType, ...] = (_reconstruct, _run, _sweep)
