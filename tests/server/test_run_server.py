"""The ServerApp's code path in-process: the attack leaves training exactly as it was."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from clients.client_app import make_client_app
from fl_attack.config import ScenarioConfig, load_scenario
from fl_attack.reporting.leaks import LEAKS_FILE
from server.server_app import run_server

REPO = Path(__file__).resolve().parents[2]


class InlineGrid(Grid):
    """A Grid that runs the ClientApp in this process, one node after the other."""

    def __init__(self, scenario: ScenarioConfig, num_nodes: int) -> None:
        self._app = make_client_app(scenario)
        self._nodes = {1000 + k: k for k in range(num_nodes)}
        self._num_nodes = num_nodes

    def set_run(self, run: object) -> None:  # the runtime's bookkeeping; unused here
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            node_id = message.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node_id,
                node_config={
                    "partition-id": self._nodes[node_id],
                    "num-partitions": self._num_nodes,
                },
                state=RecordDict(),
                run_config={},
            )
            replies.append(self._app(message, context))
        return replies


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
    tmp_path: Path, shared_datasets: Path, flower_task_identity: None
) -> None:
    # Prepare
    attacked = _scenario(tmp_path, "attacked", True)
    honest = _scenario(tmp_path, "honest", False)
    # Execute
    with_attack = run_server(InlineGrid(attacked, 3), attacked)
    without = run_server(InlineGrid(honest, 3), honest)
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


def test_round_pictures_match_the_leak_log(tmp_path: Path, flower_task_identity: None) -> None:
    # Prepare: the default scenario, shortened
    scenario = load_scenario(
        REPO / "scenarios" / "default.toml",
        {"run.out-dir": str(tmp_path), "run.rounds": 2, "data.num-clients": 3},
    )
    # Execute
    summary = run_server(InlineGrid(scenario, 3), scenario)
    # Assert
    run_dir = scenario.run.run_dir
    rounds = {
        json.loads(x)["server_round"] for x in (run_dir / LEAKS_FILE).read_text().splitlines()
    }
    pictures = {int(p.stem.split("_")[1]) for p in run_dir.glob("round_*.png")}
    assert rounds == pictures == {1, 2}
    assert summary.client_rounds == 6
