"""The one error type the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad user input: the message says what is wrong and how to fix it."""
