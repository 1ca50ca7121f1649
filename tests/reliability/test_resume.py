"""Resume in-process: a run stopped after round k and resumed equals the uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_attack.config import ScenarioConfig, load_scenario
from fl_attack.reporting.checkpoint import (
    CHECKPOINT_FILE,
    SCENARIO_FILE,
    Checkpoint,
    RunStateError,
    load_checkpoint,
    save_checkpoint,
    scenario_toml,
)
from fl_attack.reporting.leaks import LEAKS_FILE, DiagnosticsSummary, LeakRecord
from server.server_app import run_server

REPO = Path(__file__).resolve().parents[2]
CLIENTS, ROUNDS = 3, 3


def _scenario(out_dir: Path, name: str) -> ScenarioConfig:
    return load_scenario(
        REPO / "scenarios" / "default.toml",
        {
            "run.out-dir": str(out_dir),
            "run.name": name,
            "run.rounds": ROUNDS,
            "data.num-clients": CLIENTS,
        },
    )


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / LEAKS_FILE).read_text().splitlines()]


def _without_timing(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "seconds"}


@pytest.mark.parametrize("crash_at", [1, 3])
def test_a_resumed_run_equals_the_uninterrupted_one(
    crash_at: int,
    tmp_path: Path,
    inline_grid: type,
    simulated_kill: type[Exception],
) -> None:
    # Prepare: the uninterrupted run
    full = _scenario(tmp_path, "full")
    expected = run_server(inline_grid(full, CLIENTS), full)
    # Prepare: the same run stopped in round `crash_at`, with the torn records a kill
    # mid-round leaves (a whole line of the cut round, then half a line)
    cut = _scenario(tmp_path, "cut")
    with pytest.raises(simulated_kill):
        run_server(inline_grid(cut, CLIENTS, crash_at=crash_at), cut)
    done = crash_at - 1
    before = (cut.run.run_dir / LEAKS_FILE).read_text() if done else ""
    partial = dict(_lines(full.run.run_dir)[0], server_round=crash_at)
    with (cut.run.run_dir / LEAKS_FILE).open("a") as handle:
        handle.write(json.dumps(partial) + "\n" + '{"server_round": ' + str(crash_at) + ', "no')
    # ... and the temporary file of a picture whose rename the kill prevented
    (cut.run.run_dir / f".round_{crash_at}.png.k1ll3d.png").write_bytes(b"\x89PNG\r\n")
    # Execute: resume from the run folder's own scenario.toml
    saved = load_scenario(cut.run.run_dir / SCENARIO_FILE)
    resumed = run_server(inline_grid(saved, CLIENTS), saved, resume=True)
    # Assert: the same final model and the same per-round figures
    assert resumed.model_digest == expected.model_digest != ""
    assert resumed.final_test_accuracy == expected.final_test_accuracy
    assert [r.leaked for r in resumed.rounds] == [r.leaked for r in expected.rounds]
    assert [r.test_accuracy for r in resumed.rounds] == [r.test_accuracy for r in expected.rounds]
    # Assert: every client-round logged exactly once, as in the uninterrupted run
    got = _lines(cut.run.run_dir)
    keys = [(r["server_round"], r["partition_id"]) for r in got]
    assert len(keys) == len(set(keys)) == CLIENTS * ROUNDS
    assert [_without_timing(r) for r in got] == [
        _without_timing(r) for r in _lines(full.run.run_dir)
    ]
    # Assert: the completed rounds' lines were kept byte for byte
    assert (cut.run.run_dir / LEAKS_FILE).read_text().startswith(before)
    assert load_checkpoint(cut.run.run_dir).server_round == ROUNDS  # type: ignore[union-attr]
    assert sorted(p.name for p in cut.run.run_dir.iterdir() if p.suffix == ".png") == [
        f"round_{r}.png" for r in range(1, ROUNDS + 1)
    ]


def test_leak_records_read_back_as_written() -> None:
    # Prepare: a record with an infinite PSNR (written as the string "inf") and diagnostics
    diagnostics = DiagnosticsSummary(True, ("w",), (), ("features.0",), 1e-9, 3, 0, 1, 0)
    record = LeakRecord(
        server_round=2,
        node_id=7,
        status="leaked",
        partition_id=1,
        indices=(4, 9),
        label_true=1,
        label_guessed=1,
        psnr=math.inf,
        ssim=1.0,
        identified=True,
        seconds=0.25,
        diagnostics=diagnostics,
    )
    # Execute
    line = json.dumps({k: ("inf" if v == math.inf else v) for k, v in record.to_json().items()})
    back = LeakRecord.from_json(json.loads(line))
    # Assert
    assert back == record


def _checkpoint() -> Checkpoint:
    arrays = {"classifier.weight": torch.arange(6.0).reshape(2, 3)}
    return Checkpoint(2, arrays, "ab" * 32, {0: 0.5, 1: 0.6}, {1: 0.1, 2: 0.2})


def test_a_checkpoint_reads_back_as_written(tmp_path: Path) -> None:
    written = _checkpoint()
    save_checkpoint(tmp_path, written)
    read = load_checkpoint(tmp_path)
    assert read is not None
    assert read.server_round == 2 and read.scenario_digest == written.scenario_digest
    assert read.accuracy == written.accuracy and read.round_seconds == written.round_seconds
    assert torch.equal(read.arrays["classifier.weight"], written.arrays["classifier.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


class _RunsCode:
    """Creates a file when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_carries_code_is_refused(tmp_path: Path) -> None:
    # Prepare: a checkpoint file whose payload would run `touch marker`
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "server_round": _RunsCode(marker)}, tmp_path / CHECKPOINT_FILE)
    # Execute / Assert
    with pytest.raises(RunStateError, match="cannot be read"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ([1, 2, 3], "not a format-1 fl-attack checkpoint"),
        ({"format": 1, "server_round": 0}, "server_round = 0"),
        ({"format": 1, "server_round": 1, "arrays": {"w": 1.0}}, "arrays must map"),
    ],
    ids=["not-a-dict", "round-zero", "arrays-not-tensors"],
)
def test_a_foreign_checkpoint_is_refused(payload: object, fragment: str, tmp_path: Path) -> None:
    torch.save(payload, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(RunStateError, match=fragment):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("path", sorted((REPO / "scenarios").glob("*.toml")), ids=lambda p: p.name)
def test_the_saved_scenario_reads_back_as_the_same_scenario(
    path: Path, tmp_path: Path, shared_datasets: Path
) -> None:
    scenario = load_scenario(path)
    saved = tmp_path / SCENARIO_FILE
    saved.write_text(scenario_toml(scenario))
    back = load_scenario(saved)
    assert dataclasses.replace(back, source=None) == dataclasses.replace(scenario, source=None)
