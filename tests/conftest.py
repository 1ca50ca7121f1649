"""Shared fixtures: the real dataset subsets, a fixed seed, an in-process Flower Grid."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from clients.client_app import make_client_app
from fl_attack.config import ScenarioConfig
from fl_attack.data import default_data_dir


@pytest.fixture
def shared_datasets() -> Path:
    """The folder with the npz subsets; fails on CI and skips elsewhere when it is missing."""
    folder = default_data_dir()
    if folder is None or not folder.is_dir():
        reason = (
            f"shared datasets folder not found (got {folder}); set FL_ATTACK_DATA_DIR "
            "or place shared/datasets next to the repository"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


@pytest.fixture
def seed() -> int:
    """Fix torch's global RNG and return the seed used."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this process the task identity Flower's runtimes set before Messages are built."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class InlineGrid(Grid):
    """A Grid that runs the ClientApp in this process, node after node.

    ``crash_at`` raises in that round's send, as a kill between two rounds would stop the
    ServerApp: nothing of the round is written.
    """

    def __init__(self, scenario: ScenarioConfig, num_nodes: int, crash_at: int = 0) -> None:
        self._app = make_client_app(scenario)
        self._nodes = {1000 + k: k for k in range(num_nodes)}
        self._crash_at = crash_at

    def set_run(self, run: object) -> None:
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
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
            if int(message.content["config"]["server-round"]) == self._crash_at:
                raise SimulatedKill(f"killed in round {self._crash_at}")
            node_id = message.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node_id,
                node_config={
                    "partition-id": self._nodes[node_id],
                    "num-partitions": len(self._nodes),
                },
                state=RecordDict(),
                run_config={},
            )
            replies.append(self._app(message, context))
        return replies


class SimulatedKill(RuntimeError):
    """Raised by :class:`InlineGrid` in its ``crash_at`` round."""


@pytest.fixture
def inline_grid(flower_task_identity: None) -> type[InlineGrid]:
    """The in-process Grid class (Messages can be built)."""
    return InlineGrid


@pytest.fixture
def simulated_kill() -> type[SimulatedKill]:
    """The exception :class:`InlineGrid` raises in its ``crash_at`` round."""
    return SimulatedKill
