"""What a killed run needs to resume: its resolved scenario and a per-round checkpoint.

A run folder holds ``scenario.toml`` (the scenario as resolved at the start, overrides
applied, written once) and ``checkpoint.pt`` (the global model after the last completed
round, the round number, the scenario's digest and the per-round figures the summary
needs), rewritten atomically at the end of every round. ``fl-attack run --resume`` reads
both; the checkpoint is loaded with ``torch.load(..., weights_only=True)``, so a tampered
file cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from fl_attack.config import ScenarioConfig
from fl_attack.reporting.files import atomic_write

__all__ = [
    "CHECKPOINT_FILE",
    "SCENARIO_FILE",
    "Checkpoint",
    "RunStateError",
    "load_checkpoint",
    "save_checkpoint",
    "scenario_digest",
    "scenario_toml",
    "write_scenario",
]

CHECKPOINT_FILE = "checkpoint.pt"
SCENARIO_FILE = "scenario.toml"
_FORMAT = 1


class RunStateError(ValueError):
    """A run folder's saved state is missing, unreadable or inconsistent."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The state of a run after its last completed round.

    Attributes
    ----------
    server_round : int
        Rounds completed (leak records, picture and test accuracy all written).
    arrays : dict of str to torch.Tensor
        The global model after that round (its ``state_dict``).
    scenario_digest : str
        SHA-256 of the run's ``scenario.toml``; a resumed run must match it.
    accuracy : dict of int to float
        Test accuracy after each round so far (0 = the initial model).
    round_seconds : dict of int to float
        Attack wall time of each round so far.
    """

    server_round: int
    arrays: dict[str, torch.Tensor]
    scenario_digest: str
    accuracy: dict[int, float] = field(default_factory=dict)
    round_seconds: dict[int, float] = field(default_factory=dict)


def scenario_toml(scenario: ScenarioConfig) -> str:
    """The resolved scenario as TOML text that :func:`fl_attack.config.load_scenario` reads back.

    Parameters
    ----------
    scenario : ScenarioConfig
        Each sub-config becomes a table of the same name, each field a kebab-case key;
        ``None`` and empty lists (optional keys left out) are omitted.

    Returns
    -------
    str
        TOML with absolute paths, so the file means the same from any working directory.
    """
    lines = [f"# resolved scenario of run {scenario.run.name!r}; read by fl-attack run --resume"]
    for table in dataclasses.fields(scenario):
        section = getattr(scenario, table.name)
        if not dataclasses.is_dataclass(section):
            continue  # `source`: where the scenario came from, not a setting
        lines += ["", f"[{table.name}]"]
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if value is not None and not (isinstance(value, tuple | list) and not value):
                lines.append(f"{item.name.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """One TOML value (JSON's spelling of strings, numbers and arrays is valid TOML)."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_scenario(run_dir: Path, scenario: ScenarioConfig) -> str:
    """Write ``<run-dir>/scenario.toml`` atomically and return its digest."""
    text = scenario_toml(scenario)
    atomic_write(run_dir / SCENARIO_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return hashlib.sha256(text.encode()).hexdigest()


def scenario_digest(run_dir: Path) -> str:
    """SHA-256 of ``<run-dir>/scenario.toml``.

    Raises
    ------
    RunStateError
        If the file does not exist.
    """
    path = run_dir / SCENARIO_FILE
    if not path.is_file():
        raise RunStateError(
            f"{str(run_dir)!r} is not a run folder: it has no {SCENARIO_FILE}; pass the folder "
            "`fl-attack run` wrote, <out-dir>/<name>"
        )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``<run-dir>/checkpoint.pt`` atomically (tmp file, fsync, rename)."""
    payload = {
        "format": _FORMAT,
        "server_round": checkpoint.server_round,
        "arrays": {k: v.detach().cpu().contiguous() for k, v in checkpoint.arrays.items()},
        "scenario_digest": checkpoint.scenario_digest,
        "accuracy": dict(checkpoint.accuracy),
        "round_seconds": dict(checkpoint.round_seconds),
    }
    return atomic_write(run_dir / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Read ``<run-dir>/checkpoint.pt``; ``None`` when no round was completed.

    Raises
    ------
    RunStateError
        If the file cannot be read as a checkpoint (truncated, foreign or tampered with);
        it is never unpickled beyond tensors and plain containers.
    """
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    where = f"checkpoint {str(path)!r}"
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise RunStateError(
            f"{where} cannot be read ({type(exc).__name__}: {exc}); delete it to redo the run "
            "from round 1 with --resume, or start the run again"
        ) from None
    problem = _checkpoint_problem(raw)
    if problem:
        raise RunStateError(f"{where}: {problem}; delete it to redo the run from round 1")
    return Checkpoint(
        server_round=raw["server_round"],
        arrays=dict(raw["arrays"]),
        scenario_digest=raw["scenario_digest"],
        accuracy={int(k): float(v) for k, v in raw["accuracy"].items()},
        round_seconds={int(k): float(v) for k, v in raw["round_seconds"].items()},
    )


def _checkpoint_problem(raw: Any) -> str:
    """What is wrong with a loaded checkpoint payload, or ``""``."""
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        return f"not a format-{_FORMAT} fl-attack checkpoint"
    server_round = raw.get("server_round")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        return f"server_round = {server_round!r}, expected an int >= 1"
    arrays = raw.get("arrays")
    if not isinstance(arrays, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in arrays.items()
    ):
        return "arrays must map parameter names to tensors"
    if not isinstance(raw.get("scenario_digest"), str):
        return "scenario_digest is missing"
    for key in ("accuracy", "round_seconds"):
        if not isinstance(raw.get(key), dict):
            return f"{key} is missing"
    return ""
