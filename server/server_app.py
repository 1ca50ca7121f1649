"""The ServerApp: FedAvg on the scenario's model, wrapped by the malicious server.

``app`` is what ``flwr run`` loads (the scenario comes from the run config);
``make_server_app(scenario)`` builds the same app around a parsed scenario for
``fl-attack run``. Both call :func:`run_server`: two doors, one code path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from rich.console import Console
from torch import nn

from fl_attack.attacks import DLGOptions
from fl_attack.config import ScenarioConfig, from_run_config
from fl_attack.engine import available_cores
from fl_attack.reporting.checkpoint import (
    Checkpoint,
    RunStateError,
    load_checkpoint,
    save_checkpoint,
    scenario_digest,
    write_scenario,
)
from fl_attack.reporting.leaks import LeakRecorder, RunSummary
from fl_attack.simulation import FederatedData, build_scenario_model, evaluate, load_federated_data
from server.malicious import LeakSink, MaliciousServer

__all__ = [
    "APP_DIR",
    "OrderedFedAvg",
    "ResumedRounds",
    "app",
    "arrays_digest",
    "build_strategy",
    "make_server_app",
    "reply_problem",
    "run_server",
]

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app's folder (the repository, or the unpacked FAB under ``flwr run``)."""


class OrderedFedAvg(FedAvg):
    """FedAvg that sums the replies in a fixed order and leaves out those that do not fit.

    Replies arrive in whatever order the clients finish; float32 sums depend on the
    order. Sorting them by a digest of their arrays makes the aggregate a function of
    the replies' contents only. A reply whose arrays do not fit the broadcast model
    (see :func:`reply_problem`) is left out with a warning naming the node: plain FedAvg
    would either stop the run (different keys or shapes) or average a NaN into the
    global model. The replies themselves are not changed.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._layouts: dict[int, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
        self._sampled: dict[int, set[int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the broadcast arrays' layout and the nodes sampled, then delegate."""
        self._layouts[server_round] = {
            name: (tuple(array.shape), np.dtype(array.dtype)) for name, array in arrays.items()
        }
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled[server_round] = {int(m.metadata.dst_node_id) for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate of the replies that fit the broadcast model, in digest order."""
        layout = self._layouts.pop(server_round, None)
        replies = list(replies)
        answered = {int(reply.metadata.src_node_id) for reply in replies}
        for node_id in sorted(self._sampled.pop(server_round, set()) - answered):
            log(
                WARNING,
                "OrderedFedAvg.aggregate_train: round %s, node %s: no reply within the round "
                "timeout ([server] round-timeout); the round goes on without it",
                server_round,
                node_id,
            )
        fitting = []
        for reply in replies:
            problem = "" if layout is None else reply_problem(reply, layout)
            if problem:
                log(
                    WARNING,
                    "OrderedFedAvg.aggregate_train: round %s, node %s: left out of the "
                    "aggregate: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    problem,
                )
                continue
            fitting.append(reply)
        return super().aggregate_train(server_round, sorted(fitting, key=_digest))


def reply_problem(reply: Message, layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    """Why a train reply cannot be averaged into the model, or ``""`` if it can.

    Parameters
    ----------
    reply : Message
        A client's train reply (error replies are fine here: FedAvg skips them itself).
    layout : dict of str to (shape, dtype)
        The broadcast arrays.

    Returns
    -------
    str
        Names the array and what is wrong (missing, extra, shape, dtype, NaN/Inf), or
        a missing/bad ``num-examples``.
    """
    if reply.has_error():
        return ""
    records = reply.content.array_records
    if len(records) != 1:
        return f"expected one ArrayRecord, found {len(records)}"
    record = next(iter(records.values()))
    missing = sorted(set(layout) - set(record))
    extra = sorted(set(record) - set(layout))
    if missing or extra:
        return f"arrays missing: {missing or 'none'}, unexpected: {extra or 'none'}"
    for name, (shape, dtype) in layout.items():
        array = record[name].numpy()
        if tuple(array.shape) != shape or array.dtype != dtype:
            return (
                f"array {name!r} is {array.dtype}{list(array.shape)}, the model's is "
                f"{dtype}{list(shape)}"
            )
        if not np.isfinite(array).all():
            return f"array {name!r} holds NaN/Inf values"
    metrics = reply.content.metric_records
    weight = next(iter(metrics.values())).get("num-examples") if len(metrics) == 1 else None
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        return f"its MetricRecord lacks a positive num-examples (got {weight!r})"
    return ""


class ResumedRounds(Strategy):
    """Numbers the rounds of a resumed run after the ones it had completed.

    ``Strategy.start`` counts rounds from 1; a run resumed after round ``done`` must
    tell the clients (through ``server-round``) and the leak log the true round.

    Parameters
    ----------
    strategy : Strategy
        The run's strategy; every call is delegated with ``server_round + done``.
    done : int
        Rounds completed before the resume.
    """

    def __init__(self, strategy: Strategy, done: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.done = int(done)

    def __repr__(self) -> str:
        """Name the offset and the wrapped strategy."""
        return f"ResumedRounds(done={self.done}, strategy={self.strategy!r})"

    def summary(self) -> None:
        """Delegate to the wrapped strategy."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the true round."""
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate with the true round."""
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the true round."""
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate with the true round."""
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)


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
        ``[server]`` sets the sampling (and, with ``dp-clip-norm``, wraps FedAvg in
        Flower's ``DifferentialPrivacyServerSideFixedClipping``), ``[attack]`` the
        malicious wrapper around it all.
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
    inner: Strategy = fedavg
    if scenario.server.dp_clip_norm is not None:
        # Central DP clips and noises inside aggregation: the wrapper around it still sees
        # every raw update, which is the point this option demonstrates.
        inner = DifferentialPrivacyServerSideFixedClipping(
            fedavg,
            noise_multiplier=scenario.server.dp_noise_multiplier,
            clipping_norm=scenario.server.dp_clip_norm,
            num_sampled_clients=max(
                scenario.server.min_clients,
                int(scenario.server.fraction_train * scenario.data.num_clients),
            ),
        )
    if not scenario.attack.enabled:
        return inner
    return MaliciousServer(
        inner,
        model=model,
        input_shape=input_shape,
        lr=scenario.client.lr,
        sink=sink,
        threat_model=scenario.attack.threat_model,
        attack=scenario.attack.method,
        dlg_options=DLGOptions(max_iterations=scenario.attack.dlg_iterations),
        workers=scenario.attack.workers or available_cores(),
    )


def run_server(
    grid: Grid, scenario: ScenarioConfig, *, console: Console | None = None, resume: bool = False
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
    resume : bool
        Continue the run in ``scenario.run.run_dir`` after its last completed round
        (``checkpoint.pt``) instead of starting afresh.

    Returns
    -------
    RunSummary
        Also written to ``<run-dir>/summary.json``.

    Raises
    ------
    RunStateError
        When resuming, if the run folder's ``scenario.toml`` or checkpoint is missing,
        unreadable or from another scenario.

    Notes
    -----
    A fresh run writes the resolved scenario to ``<run-dir>/scenario.toml`` and, after
    every completed round (leak records, picture, test accuracy), the global model to
    ``checkpoint.pt``, atomically. A resumed run drops the records of the round that was
    cut and redoes it, so every round is logged exactly once.
    """
    fed = load_federated_data(scenario.data)
    model = build_scenario_model(scenario.model, fed)
    recorder = LeakRecorder(scenario, fed, console=console)
    initial = ArrayRecord(model.state_dict())
    done = 0
    if resume:
        digest = scenario_digest(scenario.run.run_dir)
        checkpoint = load_checkpoint(scenario.run.run_dir)
        if checkpoint is not None:
            if checkpoint.scenario_digest != digest:
                raise RunStateError(
                    f"{scenario.run.run_dir}: scenario.toml changed since checkpoint.pt was "
                    "written; restore it, or start a new run"
                )
            done = checkpoint.server_round
            initial = ArrayRecord(checkpoint.arrays)
        recorder.resume(
            done,
            accuracy=checkpoint.accuracy if checkpoint else {},
            round_seconds=checkpoint.round_seconds if checkpoint else {},
        )
    else:
        recorder.start()
        digest = write_scenario(scenario.run.run_dir, scenario)
    strategy = build_strategy(scenario, model, fed.input_shape, recorder)
    if done:
        strategy = ResumedRounds(strategy, done)
    log(INFO, "server_app.run_server: %r, leak log in %s", strategy, scenario.run.run_dir)
    final = initial
    remaining = scenario.run.rounds - done
    if remaining > 0:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=remaining,
            timeout=scenario.server.round_timeout,
            train_config=ConfigRecord({"lr": scenario.client.lr}),
            evaluate_fn=_end_of_round(scenario, fed, recorder, done=done, digest=digest),
        )
        final = result.arrays
    return recorder.finish(scenario.run.rounds, model_digest=arrays_digest(final))


def arrays_digest(arrays: ArrayRecord) -> str:
    """Hex SHA-256 of an ArrayRecord's names and bytes (equal digests: identical models)."""
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(key.encode())
        digest.update(array.data)
    return digest.hexdigest()


def _end_of_round(
    scenario: ScenarioConfig,
    fed: FederatedData,
    recorder: LeakRecorder,
    *,
    done: int,
    digest: str,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """The ``evaluate_fn``: test accuracy on the held-out images, then the round's checkpoint.

    ``Strategy.start`` calls it after each round's aggregation (and before round 1 with
    the initial model), when the round's leak records and picture are already written.
    """
    images, labels = fed.images[fed.test_indices], fed.labels[fed.test_indices]

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = local_round + done
        if local_round == 0 and done:
            return None  # the resumed model: its accuracy is in the checkpoint
        metrics = None
        if len(fed.test_indices):
            model = build_scenario_model(scenario.model, fed)
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy = evaluate(model, images, labels)
            recorder.record_accuracy(server_round, accuracy)
            metrics = MetricRecord({"accuracy": accuracy})
        if server_round > 0:
            accuracy_so_far, seconds_so_far = recorder.progress()
            save_checkpoint(
                scenario.run.run_dir,
                Checkpoint(
                    server_round=server_round,
                    arrays=arrays.to_torch_state_dict(),
                    scenario_digest=digest,
                    accuracy=accuracy_so_far,
                    round_seconds=seconds_so_far,
                ),
            )
        return metrics

    return evaluate_fn


def make_server_app(
    scenario: ScenarioConfig | None = None,
    *,
    console: Console | None = None,
    resume: bool = False,
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
    resume : bool
        Continue the scenario's run folder after its last completed round.

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
        summary = run_server(grid, parsed, console=console or Console(), resume=resume)
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
