"""Faults in a round: a client that raises or misses the deadline; the round goes on."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Message

from fl_attack.config import ScenarioConfig, load_scenario
from fl_attack.reporting.leaks import LEAKS_FILE, LeakRecorder
from fl_attack.simulation import load_federated_data
from server.server_app import run_server

REPO = Path(__file__).resolve().parents[2]

# What Flower's Simulation runtime reports for a ClientApp that raised (flwr 1.41 on Ray),
# colour codes included; shortened in the middle.
RAY_REASON = (
    "client error: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::"
    "ClientAppActor.run()\x1b[39m (pid=5681, ip=192.0.2.2, actor_id=aeaa)\n"
    '  File "/app/client_app.py", line 16, in train\n'
    '    raise RuntimeError("disk full on client 1")\n'
    "RuntimeError: disk full on client 1\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=5681)\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: disk full on client 1'>"
)


def _scenario(tmp_path: Path, **overrides: object) -> ScenarioConfig:
    return load_scenario(
        REPO / "scenarios" / "default.toml",
        {"run.out-dir": str(tmp_path), "data.num-clients": 3, **overrides},
    )


def test_a_remote_traceback_is_logged_as_one_line(tmp_path: Path) -> None:
    # Prepare
    scenario = _scenario(tmp_path)
    recorder = LeakRecorder(scenario, load_federated_data(scenario.data))
    recorder.start()
    # Execute
    recorder.begin_round(1, 1)
    recorder.record_failure(1, 77, RAY_REASON)
    recorder.end_round(1)
    # Assert: the cause, without the runtime's traceback or colour codes
    (line,) = (scenario.run.run_dir / LEAKS_FILE).read_text().splitlines()
    record = json.loads(line)
    assert record["status"] == "failed" and record["node_id"] == 77
    assert record["error"] == "client error: RuntimeError: disk full on client 1"


@contextmanager
def _flwr_warnings() -> Iterator[list[str]]:
    """Collect what Flower's logger says at WARNING and above."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_a_client_that_misses_the_deadline_is_left_out_and_named(
    tmp_path: Path, inline_grid: type
) -> None:
    # Prepare: node 1001 misses round 1's deadline (the runtime returns without its reply)
    scenario = _scenario(tmp_path, **{"run.rounds": 2, "server.round-timeout": 7.5})
    timeouts: list[float | None] = []

    class LateNodeGrid(inline_grid):  # type: ignore[misc, valid-type]
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            timeouts.append(timeout)
            replies = list(super().send_and_receive(messages, timeout=timeout))
            late = len(timeouts) == 1
            return [r for r in replies if not (late and r.metadata.src_node_id == 1001)]

    # Execute
    with _flwr_warnings() as warnings:
        summary = run_server(LateNodeGrid(scenario, 3), scenario)
    # Assert: Flower was given the scenario's deadline; the late node is named
    assert timeouts and set(timeouts) == {7.5}
    assert any("round 1, node 1001: no reply within the round timeout" in w for w in warnings)
    # Assert: the silent node is recorded; the other two leaked; the next round had all three
    assert [r.clients for r in summary.rounds] == [3, 3]
    assert summary.rounds[0].leaked == 2 and summary.rounds[0].failed == 1
    leaks = [json.loads(line) for line in (scenario.run.run_dir / "leaks.jsonl").open()]
    (silent,) = [r for r in leaks if r["server_round"] == 1 and r["status"] == "failed"]
    assert silent["node_id"] == 1001 and silent["error"].startswith("no reply this round")
    assert summary.final_test_accuracy is not None and summary.model_digest
