"""Helpers of the reliability suite: the command line as a user meets it, an in-process Grid."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from clients.client_app import make_client_app
from fl_attack.cli import main
from fl_attack.config import ScenarioConfig

REPO = Path(__file__).resolve().parents[2]

CliRunner = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> CliRunner:
    """Run ``fl-attack ARGV`` in-process from ``tmp_path``; returns (exit code, stdout, stderr).

    argparse's own errors end in ``SystemExit``; its code is returned like the others.
    The working directory is the test's own, so a case that wrongly runs writes nothing
    into the repository.
    """
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit code 2, no traceback, nothing on stdout, and every fragment in the message."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    assert out == ""
    flat = " ".join(err.split())  # rich may wrap a long line
    missing = [f for f in fragments if " ".join(f.split()) not in flat]
    assert not missing, f"{missing} not in: {err}"


@pytest.fixture
def user_error(cli: CliRunner) -> Callable[..., str]:
    """Run ``fl-attack ARGV`` and assert a user error naming every fragment; returns stderr."""

    def check(argv: tuple[str, ...] | list[str], *fragments: str) -> str:
        code, out, err = cli(*argv)
        assert_user_error(code, out, err, *fragments)
        return err

    return check


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
