"""The out-of-band audit record: what each client really trained on, per round.

Clients append one JSON line per round to ``<run-dir>/audit/node_<node-id>.jsonl``
(flushed and fsynced before they reply). Only the evaluator reads it, to score the
leaks; it never travels in a Message, so the attacking server never sees it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["AUDIT_DIR", "AuditRecord", "audit_path", "read_audit", "write_audit"]

AUDIT_DIR = "audit"
"""Subfolder of the run folder holding the audit files."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Ground truth of one client in one round.

    Attributes
    ----------
    server_round : int
        The round (from the train message's config).
    node_id : int
        The client's node id (``context.node_id``), as the server sees it.
    partition_id : int
        The client's partition.
    num_partitions : int
        How many partitions the data was split into.
    indices : tuple of int
        Dataset indices of the images trained on, in batch order.
    labels : tuple of int
        Their labels.
    """

    server_round: int
    node_id: int
    partition_id: int
    num_partitions: int
    indices: tuple[int, ...]
    labels: tuple[int, ...]

    def to_json(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> AuditRecord:
        """Parse a line written by :meth:`to_json`."""
        raw = json.loads(line)
        return cls(
            server_round=int(raw["server_round"]),
            node_id=int(raw["node_id"]),
            partition_id=int(raw["partition_id"]),
            num_partitions=int(raw["num_partitions"]),
            indices=tuple(int(i) for i in raw["indices"]),
            labels=tuple(int(i) for i in raw["labels"]),
        )


def audit_path(run_dir: Path, node_id: int) -> Path:
    """The audit file of one node."""
    return run_dir / AUDIT_DIR / f"node_{node_id}.jsonl"


def write_audit(run_dir: Path, record: AuditRecord) -> Path:
    """Append ``record`` to its node's audit file, then flush and fsync.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    record : AuditRecord
        What the client trained on.

    Returns
    -------
    Path
        The audit file.
    """
    path = audit_path(run_dir, record.node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(record.to_json() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_audit(run_dir: Path, server_round: int, node_id: int) -> AuditRecord | None:
    """The audit record of one node in one round, or ``None`` if it wrote none.

    A torn last line (a client killed mid-write) is skipped.
    """
    path = audit_path(run_dir, node_id)
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = AuditRecord.from_json(line)
        except (ValueError, KeyError, TypeError):
            continue
        if record.server_round == server_round:
            found = record
    return found
