"""Scenario parsing: good files, and errors that name the table, key, value and fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fl_attack.config import (
    Partitioning,
    ScenarioConfig,
    ScenarioError,
    ThreatModel,
    from_run_config,
    load_scenario,
)
from fl_attack.models import Init

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "scenarios"

GOOD = """
[run]
name = "tiny"
rounds = 2
seed = 3
out-dir = "out"

[data]
dataset = "faces"
num-clients = 3
partitioning = "iid"
test-fraction = 0.2

[model]
name = "rconv-main"
activation = "ReLU"
init = "uniform"
seed = 6

[client]
batch-size = 1
local-steps = 1
lr = 0.01

[server]
min-clients = 2
fraction-train = 1.0

[attack]
enabled = true
threat-model = "honest-but-curious"
"""


def _write(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    """Write a scenario file and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str, overrides: dict | None = None) -> str:
    """Parse ``text`` and return the ScenarioError message."""
    with pytest.raises(ScenarioError) as info:
        load_scenario(_write(tmp_path, text), overrides)
    return str(info.value)


def test_good_file_parses_into_frozen_dataclasses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, GOOD)
    # Execute
    cfg = load_scenario(path)
    # Assert
    assert isinstance(cfg, ScenarioConfig)
    assert cfg.run.name == "tiny" and cfg.run.rounds == 2 and cfg.run.seed == 3
    assert cfg.run.out_dir == tmp_path / "out"
    assert cfg.run.run_dir == tmp_path / "out" / "tiny"
    assert cfg.data.dataset == "faces" and cfg.data.data_dir is None
    assert cfg.data.partitioning is Partitioning.IID
    assert cfg.data.dirichlet_alpha == 0.5 and cfg.data.limit is None
    assert cfg.model.init is Init.UNIFORM and cfg.model.num_classes is None
    assert cfg.client.lr == 0.01
    assert cfg.attack.threat_model is ThreatModel.HONEST_BUT_CURIOUS
    assert cfg.source == path.resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.rounds = 5  # type: ignore[misc]


@pytest.mark.parametrize("name", ["default", "mnist", "cifar10", "cifar100"])
def test_shipped_scenarios_parse(name: str, shared_datasets: Path) -> None:
    cfg = load_scenario(SCENARIOS / f"{name}.toml")
    assert cfg.run.name == name
    assert cfg.model.name == "rconv-main" and cfg.model.activation == "ReLU"
    assert cfg.model.init is Init.UNIFORM


def test_default_scenario_is_the_offline_one() -> None:
    cfg = load_scenario(SCENARIOS / "default.toml")
    assert cfg.data.dataset == "faces" and cfg.data.data_dir is None
    assert cfg.data.num_clients == 8 and cfg.run.rounds == 3
    assert cfg.client.batch_size == 1 and cfg.client.local_steps == 1
    assert cfg.attack.enabled


def test_unknown_key_names_table_key_and_allowed_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("rounds = 2", "rounds = 2\nround = 3"))
    assert "unknown key [run] round" in message
    assert "allowed keys in [run]: name, rounds, seed, out-dir" in message
    assert "fix: remove it or correct its spelling" in message


def test_unknown_table_is_an_error(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "\n[privacy]\nclip = 1.0\n")
    assert "unknown table [privacy]" in message and "[attack]" in message


def test_wrong_type_names_value_and_expected(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("rounds = 2", 'rounds = "two"'))
    assert "[run] rounds = 'two' is invalid: expected an int >= 1" in message


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("rounds = 2", "rounds = true"))
    assert "[run] rounds = True is invalid" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("num-clients = 3", "num-clients = 0", "[data] num-clients = 0 is invalid"),
        ("lr = 0.01", "lr = -1.0", "[client] lr = -1.0 is invalid: expected a float > 0"),
        ("test-fraction = 0.2", "test-fraction = 1.0", "[data] test-fraction = 1.0"),
        ('activation = "ReLU"', 'activation = "GELU"', "one of ReLU, LeakyReLU, Sigmoid, Tanh"),
        ('threat-model = "honest-but-curious"', 'threat-model = "evil"', "honest-but-curious"),
        ('partitioning = "iid"', 'partitioning = "skewed"', "one of iid, dirichlet"),
        ('dataset = "faces"', 'dataset = "imagenet"', "[data] dataset = 'imagenet'"),
    ],
)
def test_out_of_range_values_are_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    message = _error(tmp_path, GOOD.replace(old, new))
    assert expected in message


def test_missing_key_says_how_to_add_it(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("seed = 3\n", ""))
    assert "missing key [run] seed" in message and "add `seed = ...` to [run]" in message


def test_min_clients_above_num_clients_would_wait_forever(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("min-clients = 2", "min-clients = 4"))
    assert "[server] min-clients = 4" in message and "wait forever" in message


def test_missing_data_folder_is_reported(tmp_path: Path) -> None:
    # Prepare
    text = GOOD.replace('dataset = "faces"', 'dataset = "MNIST"\ndata-dir = "no/such/folder"')
    # Execute
    message = _error(tmp_path, text)
    # Assert
    assert "[data] data-dir = 'no/such/folder' is invalid" in message
    assert "--data-dir" in message


def test_unset_data_folder_without_default_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FL_ATTACK_DATA_DIR", str(tmp_path / "missing"))
    message = _error(tmp_path, GOOD.replace('dataset = "faces"', 'dataset = "CIFAR10"'))
    assert "[data] data-dir is unset" in message and "FL_ATTACK_DATA_DIR" in message


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "nope.toml")
    assert "not valid TOML" in _error(tmp_path, "[run\nname=")


def test_overrides_apply_and_are_checked(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, GOOD)
    # Execute
    cfg = load_scenario(path, {"run.rounds": 5, "attack.enabled": False, "run.name": "x"})
    # Assert
    assert cfg.run.rounds == 5 and not cfg.attack.enabled and cfg.run.name == "x"
    with pytest.raises(ScenarioError, match=r"override run.rounds.*\[run\] rounds = 0"):
        load_scenario(path, {"run.rounds": 0})
    with pytest.raises(ScenarioError, match=r"unknown override 'run\.rnds'"):
        load_scenario(path, {"run.rnds": 2})


def test_run_config_maps_flat_keys_onto_the_scenario(tmp_path: Path) -> None:
    # Prepare
    _write(tmp_path, GOOD, "s.toml")
    run_config = {"scenario": "s.toml", "num-server-rounds": 4, "run-name": "", "out-dir": ""}
    # Execute
    cfg = from_run_config(run_config, app_dir=tmp_path)
    keep = from_run_config({**run_config, "num-server-rounds": 0}, app_dir=tmp_path)
    # Assert
    assert cfg.run.rounds == 4 and cfg.run.name == "tiny"
    assert keep.run.rounds == 2


def test_run_config_errors(tmp_path: Path) -> None:
    _write(tmp_path, GOOD, "s.toml")
    with pytest.raises(ScenarioError, match="missing key 'scenario'"):
        from_run_config({}, app_dir=tmp_path)
    with pytest.raises(ScenarioError, match="unknown key 'rounds'"):
        from_run_config({"scenario": "s.toml", "rounds": 2}, app_dir=tmp_path)


def test_pyproject_run_config_matches_the_parser() -> None:
    # Prepare
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    # Execute
    cfg = from_run_config(run_config, app_dir=REPO)
    # Assert
    assert cfg == load_scenario(SCENARIOS / "default.toml")
