"""Flower's server-side DP wrapper sits inside the malicious server, around FedAvg."""

from __future__ import annotations

from pathlib import Path

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fl_attack.config import load_scenario
from fl_attack.simulation import build_scenario_model, load_federated_data
from server.malicious import MaliciousServer
from server.server_app import OrderedFedAvg, build_strategy

REPO = Path(__file__).resolve().parents[2]


def _strategy(tmp_path: Path, overrides: dict[str, float | bool]):
    scenario = load_scenario(
        REPO / "scenarios" / "default.toml", {"run.out-dir": str(tmp_path), **overrides}
    )
    fed = load_federated_data(scenario.data)
    model = build_scenario_model(scenario.model, fed)
    return build_strategy(scenario, model, fed.input_shape, None)


def test_dp_wrapper_is_inside_the_malicious_server(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, {"server.dp-clip-norm": 0.5, "server.dp-noise-multiplier": 0.3})
    assert isinstance(strategy, MaliciousServer)
    inner = strategy.strategy
    assert isinstance(inner, DifferentialPrivacyServerSideFixedClipping)
    assert (inner.clipping_norm, inner.noise_multiplier) == (0.5, 0.3)
    assert inner.num_sampled_clients == 8
    assert isinstance(inner.strategy, OrderedFedAvg)


def test_without_dp_keys_fedavg_is_wrapped_directly(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, {})
    assert isinstance(strategy.strategy, OrderedFedAvg)
    plain = _strategy(tmp_path, {"server.dp-clip-norm": 1.0, "attack.enabled": False})
    assert isinstance(plain, DifferentialPrivacyServerSideFixedClipping)
