"""The evaluator: leaks joined with audit records, scored, logged, drawn and summarised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fl_attack.config import ScenarioConfig, load_scenario
from fl_attack.engine import Reconstruction
from fl_attack.reporting.leaks import LEAKS_FILE, SUMMARY_FILE, LeakRecorder, summary_table
from fl_attack.simulation import AuditRecord, client_partition, load_federated_data, write_audit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def scenario(tmp_path: Path) -> ScenarioConfig:
    return load_scenario(
        REPO / "scenarios" / "default.toml", {"run.out-dir": str(tmp_path), "run.name": "r"}
    )


def _leak(image: torch.Tensor, label: int) -> Reconstruction:
    """A reconstruction result carrying ``image``."""
    return Reconstruction(image=image.to(torch.float64), label=label, layers=(), seconds=0.25)


def test_leaks_are_scored_logged_drawn_and_summarised(scenario: ScenarioConfig) -> None:
    # Prepare: three clients of round 1 with their audit records
    fed = load_federated_data(scenario.data)
    run_dir = scenario.run.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "round_9.png").write_bytes(b"stale")
    recorder = LeakRecorder(scenario, fed, console=Console(file=None, quiet=True))
    recorder.start()
    parts = [
        client_partition(fed, scenario.data, seed=0, partition_id=p, num_partitions=8)
        for p in range(3)
    ]
    used = [int(p[0]) for p in parts]
    for node, (p, index) in enumerate(zip(range(3), used, strict=True), start=100):
        write_audit(run_dir, AuditRecord(1, node, p, 8, (index,), (int(fed.labels[index]),)))
    exact = fed.images[used[0]].double() + 1e-4
    other = fed.images[int(parts[1][1])]  # another image of client 1's own partition
    # Execute
    recorder.record_accuracy(0, 0.5)
    recorder.begin_round(1, 3)
    recorder.record_leak(1, 100, _leak(exact, int(fed.labels[used[0]])))
    recorder.record_leak(1, 101, _leak(other, 1 - int(fed.labels[used[1]])))
    recorder.record_failure(1, 102, "ReconstructionError: no signal")
    recorder.end_round(1)
    recorder.record_accuracy(1, 0.75)
    summary = recorder.finish(1)
    # Assert: one JSON line per client
    lines = [json.loads(x) for x in (run_dir / LEAKS_FILE).read_text().splitlines()]
    assert [(x["node_id"], x["status"]) for x in lines] == [
        (100, "leaked"),
        (101, "leaked"),
        (102, "failed"),
    ]
    first, second, failed = lines
    assert first["psnr"] == pytest.approx(80.0) and first["identified"] is True
    assert first["label_guessed"] == first["label_true"] and first["indices"] == [used[0]]
    assert second["identified"] is False and second["label_guessed"] != second["label_true"]
    assert failed["error"] == "ReconstructionError: no signal" and failed["partition_id"] == 2
    assert first["diagnostics"]["exact"] is True and first["seconds"] == 0.25
    # Assert: the picture of the round, and no stale one
    assert (run_dir / "round_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "round_9.png").exists()
    # Assert: the summary
    written = json.loads((run_dir / SUMMARY_FILE).read_text())
    (round_1,) = written["rounds"]
    assert (round_1["clients"], round_1["leaked"], round_1["failed"]) == (3, 1, 1)
    assert (round_1["scored"], round_1["labels_recovered"], round_1["identified"]) == (2, 1, 1)
    assert round_1["label_accuracy"] == 0.5 and round_1["identifiability"] == 0.5
    assert written["initial_test_accuracy"] == 0.5 and written["final_test_accuracy"] == 0.75
    assert summary.leaked == 1 and summary.client_rounds == 3


def test_a_leak_without_audit_record_is_logged_unaudited(scenario: ScenarioConfig) -> None:
    # Prepare
    fed = load_federated_data(scenario.data)
    recorder = LeakRecorder(scenario, fed)
    recorder.start()
    # Execute
    recorder.begin_round(1, 1)
    recorder.record_leak(1, 7, _leak(fed.images[0], 0))
    recorder.end_round(1)
    summary = recorder.finish(1)
    # Assert
    (line,) = (scenario.run.run_dir / LEAKS_FILE).read_text().splitlines()
    assert json.loads(line)["status"] == "unaudited"
    assert summary.rounds[0].scored == 0 and summary.psnr_min is None


def test_summary_table_lists_every_round(scenario: ScenarioConfig) -> None:
    fed = load_federated_data(scenario.data)
    recorder = LeakRecorder(scenario, fed)
    recorder.start()
    recorder.record_accuracy(0, 0.25)
    summary = recorder.finish(2)
    console = Console(record=True, width=120)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "25.0%" in text and "all" in text and "round" in text
