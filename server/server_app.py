"""The ServerApp: FedAvg on the scenario's model, wrapped by the malicious server.

``app`` is what ``flwr run`` loads (the scenario comes from the run config);
``make_server_app(scenario)`` builds the same app around a parsed scenario for
``fl-attack run``. Both call :func:`run_server`: two doors, one code path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from rich.console import Console
from torch import nn

from fl_attack.config import ScenarioConfig, from_run_config
from fl_attack.reporting.leaks import LeakRecorder, RunSummary
from fl_attack.simulation import FederatedData, build_scenario_model, evaluate, load_federated_data
from server.malicious import LeakSink, MaliciousServer

__all__ = [
    "APP_DIR",
    "OrderedFedAvg",
    "app",
    "arrays_digest",
    "build_strategy",
    "make_server_app",
    "run_server",
]

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app's folder (the repository, or the unpacked FAB under ``flwr run``)."""


class OrderedFedAvg(FedAvg):
    """FedAvg that sums the replies in a fixed order, so a run is bit-reproducible.

    Replies arrive in whatever order the clients finish; float32 sums depend on the
    order. Sorting them by a digest of their arrays makes the aggregate a function of
    the replies' contents only. The replies themselves are not changed.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate of the replies, taken in digest order."""
        return super().aggregate_train(server_round, sorted(replies, key=_digest))


def _digest(reply: Message) -> bytes:
    """SHA-256 of a reply's arrays (empty for error replies, which FedAvg skips)."""
    if reply.has_error():
        return b""
    records = sorted(reply.content.array_records.items())
    return b"".join(name.encode() + bytes.fromhex(arrays_digest(r)) for name, r in records)


def build_strategy(
    scenario: ScenarioConfig,
    model: nn.Module,
    input_shape: tuple[int, ...],
    sink: LeakSink | None,
) -> Strategy:
    """FedAvg with the scenario's sampling, wrapped when the attack is enabled.

    Parameters
    ----------
    scenario : ScenarioConfig
        ``[server]`` sets the sampling, ``[attack]`` the wrapper.
    model : nn.Module
        The model the clients train (the attack needs its architecture).
    input_shape : tuple of int
        One image's shape.
    sink : LeakSink or None
        Receives the leaks.

    Returns
    -------
    Strategy
        :class:`OrderedFedAvg` (no client-side evaluation), or
        ``MaliciousServer(OrderedFedAvg)``.
    """
    fedavg = OrderedFedAvg(
        fraction_train=scenario.server.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=scenario.server.min_clients,
        min_available_nodes=scenario.server.min_clients,
    )
    if not scenario.attack.enabled:
        return fedavg
    return MaliciousServer(
        fedavg,
        model=model,
        input_shape=input_shape,
        lr=scenario.client.lr,
        sink=sink,
        threat_model=scenario.attack.threat_model,
    )


def run_server(
    grid: Grid, scenario: ScenarioConfig, *, console: Console | None = None
) -> RunSummary:
    """Run the scenario's rounds on ``grid`` and write the leak log.

    Parameters
    ----------
    grid : Grid
        From the runtime (Simulation or Deployment Engine).
    scenario : ScenarioConfig
        The parsed scenario.
    console : rich.console.Console, optional
        Where progress bars and the closing table go.

    Returns
    -------
    RunSummary
        Also written to ``<run-dir>/summary.json``.
    """
    fed = load_federated_data(scenario.data)
    model = build_scenario_model(scenario.model, fed)
    recorder = LeakRecorder(scenario, fed, console=console)
    recorder.start()
    strategy = build_strategy(scenario, model, fed.input_shape, recorder)
    log(INFO, "server_app.run_server: %r, leak log in %s", strategy, scenario.run.run_dir)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=scenario.run.rounds,
        train_config=ConfigRecord({"lr": scenario.client.lr}),
        evaluate_fn=_central_evaluation(scenario, fed, recorder),
    )
    return recorder.finish(scenario.run.rounds, model_digest=arrays_digest(result.arrays))


def arrays_digest(arrays: ArrayRecord) -> str:
    """Hex SHA-256 of an ArrayRecord's names and bytes (equal digests: identical models)."""
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(key.encode())
        digest.update(array.data)
    return digest.hexdigest()


def _central_evaluation(
    scenario: ScenarioConfig, fed: FederatedData, recorder: LeakRecorder
) -> Callable[[int, ArrayRecord], MetricRecord] | None:
    """The ``evaluate_fn`` giving test accuracy on the held-out images, or None without any."""
    if len(fed.test_indices) == 0:
        return None
    images, labels = fed.images[fed.test_indices], fed.labels[fed.test_indices]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_scenario_model(scenario.model, fed)
        model.load_state_dict(arrays.to_torch_state_dict())
        accuracy = evaluate(model, images, labels)
        recorder.record_accuracy(server_round, accuracy)
        return MetricRecord({"accuracy": accuracy})

    return evaluate_fn


def make_server_app(
    scenario: ScenarioConfig | None = None, *, console: Console | None = None
) -> ServerApp:
    """Build the ServerApp.

    Parameters
    ----------
    scenario : ScenarioConfig, optional
        Used as is (``fl-attack run``); ``None`` parses ``context.run_config``
        (``flwr run``).
    console : rich.console.Console, optional
        For progress and the closing table; ``None`` under ``flwr run`` prints to the
        ServerApp's stdout (its log).

    Returns
    -------
    ServerApp
        With a ``main`` that calls :func:`run_server`.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        parsed = scenario
        if parsed is None:
            parsed = from_run_config(context.run_config, app_dir=APP_DIR)
        summary = run_server(grid, parsed, console=console or Console())
        log(
            INFO,
            "ServerApp.main: %s of %s client-rounds leaked at >= %.0f dB; pictures: %s",
            summary.leaked,
            summary.client_rounds,
            summary.good_db,
            Path(summary.run_dir) / "round_*.png",
        )

    return server_app


app = make_server_app()
