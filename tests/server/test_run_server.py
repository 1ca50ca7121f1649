"""The ServerApp's code path in-process: the attack leaves training exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

from fl_attack.config import ScenarioConfig, load_scenario
from fl_attack.reporting.leaks import LEAKS_FILE
from server.server_app import run_server

REPO = Path(__file__).resolve().parents[2]


def _scenario(tmp_path: Path, name: str, attack: bool) -> ScenarioConfig:
    return load_scenario(
        REPO / "scenarios" / "cifar10.toml",
        {
            "run.out-dir": str(tmp_path),
            "run.name": name,
            "run.rounds": 2,
            "data.num-clients": 3,
            "attack.enabled": attack,
        },
    )


def test_cifar10_accuracy_is_the_same_with_and_without_the_attack(
    tmp_path: Path, shared_datasets: Path, inline_grid: type
) -> None:
    # Prepare
    attacked = _scenario(tmp_path, "attacked", True)
    honest = _scenario(tmp_path, "honest", False)
    # Execute
    with_attack = run_server(inline_grid(attacked, 3), attacked)
    without = run_server(inline_grid(honest, 3), honest)
    # Assert: same accuracies after every round, and the very same final model
    assert with_attack.initial_test_accuracy == without.initial_test_accuracy
    accuracies = [r.test_accuracy for r in with_attack.rounds]
    assert accuracies == [r.test_accuracy for r in without.rounds]
    assert all(a is not None for a in accuracies)
    assert with_attack.model_digest == without.model_digest != ""
    # Assert: the attacked run logged every client-round, the honest one none
    lines = (attacked.run.run_dir / LEAKS_FILE).read_text().splitlines()
    assert len(lines) == 6 and with_attack.client_rounds == 6
    assert {json.loads(x)["server_round"] for x in lines} == {1, 2}
    assert not (honest.run.run_dir / LEAKS_FILE).exists()
    written = json.loads((attacked.run.run_dir / "summary.json").read_text())
    assert written["final_test_accuracy"] == with_attack.final_test_accuracy


def test_round_pictures_match_the_leak_log(tmp_path: Path, inline_grid: type) -> None:
    # Prepare: the default scenario, shortened
    scenario = load_scenario(
        REPO / "scenarios" / "default.toml",
        {"run.out-dir": str(tmp_path), "run.rounds": 2, "data.num-clients": 3},
    )
    # Execute
    summary = run_server(inline_grid(scenario, 3), scenario)
    # Assert
    run_dir = scenario.run.run_dir
    rounds = {
        json.loads(x)["server_round"] for x in (run_dir / LEAKS_FILE).read_text().splitlines()
    }
    pictures = {int(p.stem.split("_")[1]) for p in run_dir.glob("round_*.png")}
    assert rounds == pictures == {1, 2}
    assert summary.client_rounds == 6
