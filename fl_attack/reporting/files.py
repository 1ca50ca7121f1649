"""Crash-safe writes: a file appears whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "atomic_write", "write_json"]


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the result private to its writer
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (non-finite floats become strings)."""

    def dump(tmp: Path) -> None:
        tmp.write_text(json.dumps(_finite(payload), indent=2) + "\n", encoding="utf-8")

    return atomic_write(path, dump)


def append_jsonl(path: Path, payload: Any) -> Path:
    """Append ``payload`` as one JSON line, flushed and fsynced (non-finite floats as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_finite(payload), separators=(",", ":"))
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def _finite(value: Any) -> Any:
    """Replace inf/nan (not valid JSON) by their string names."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
