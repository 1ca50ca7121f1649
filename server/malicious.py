"""The malicious server: a strategy wrapper that inverts every client's update.

``MaliciousServer`` takes a Flower strategy and delegates everything to it. It only
remembers the global arrays it broadcasts (``configure_train``) and, in
``aggregate_train``, turns each reply into the client's gradient, runs the R-CONV engine
on it and hands the leak to a :class:`LeakSink`, before passing the very same replies,
untouched, to the wrapped strategy. The aggregate is therefore the plain strategy's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fl_attack.attacks import ATTACKS, Attack, DLGOptions
from fl_attack.config import ThreatModel
from fl_attack.engine import EngineError, Reconstruction, SolveOptions

__all__ = ["GradientError", "LeakSink", "MaliciousServer", "derive_gradients"]


class GradientError(ValueError):
    """A reply's arrays do not fit the broadcast model, so no gradient can be derived."""


class LeakSink(Protocol):
    """Where the attack hands what it recovered; the evaluator implements it."""

    def begin_round(self, server_round: int, num_replies: int) -> None:
        """A round's replies are about to be attacked."""

    def record_leak(self, server_round: int, node_id: int, result: Reconstruction) -> None:
        """One client's update was inverted."""

    def record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        """One client's update could not be inverted (or the client failed)."""

    def end_round(self, server_round: int) -> None:
        """Every reply of the round has been handled."""


def derive_gradients(
    global_arrays: Mapping[str, np.ndarray],
    update_arrays: Mapping[str, np.ndarray],
    lr: float,
    names: Iterable[str],
) -> dict[str, torch.Tensor]:
    """The gradient a single-step SGD client took: ``(global - update) / lr``.

    Parameters
    ----------
    global_arrays : Mapping[str, np.ndarray]
        The arrays broadcast to the client.
    update_arrays : Mapping[str, np.ndarray]
        The arrays the client sent back.
    lr : float
        The learning rate the client used (> 0).
    names : Iterable[str]
        The parameters to derive (the model's ``named_parameters()`` names).

    Returns
    -------
    dict of str to torch.Tensor
        float64 gradients. The difference is taken in float64 from the clients' float32
        values, so it is exact: the only error left is the client's own rounding of
        ``w - lr * g`` to float32, ``ulp(w) / (2 lr)`` per entry.

    Raises
    ------
    GradientError
        If a parameter is missing from either side, the shapes differ, or the reply's
        values are not floating point or not finite.
    """
    grads: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in global_arrays or name not in update_arrays:
            side = "the broadcast arrays" if name not in global_arrays else "the reply"
            raise GradientError(f"parameter {name!r} is missing from {side}")
        before = np.asarray(global_arrays[name])
        after = np.asarray(update_arrays[name])
        if before.shape != after.shape:
            raise GradientError(
                f"parameter {name!r} has shape {after.shape} in the reply but {before.shape} "
                "in the broadcast model"
            )
        if after.dtype.kind != "f":
            raise GradientError(
                f"parameter {name!r} has dtype {after.dtype} in the reply; expected floating "
                f"point like the broadcast model ({before.dtype})"
            )
        bad = int(np.size(after) - np.count_nonzero(np.isfinite(after)))
        if bad:
            # a NaN/Inf would pass through the difference into the engine's solves
            raise GradientError(
                f"parameter {name!r} holds {bad} NaN/Inf value(s) in the reply; the client's "
                "training diverged or the update was tampered with, so it is not inverted"
            )
        diff = before.astype(np.float64) - after.astype(np.float64)
        grads[name] = torch.from_numpy(diff / lr)
    return grads


class MaliciousServer(Strategy):
    """A server that runs ``strategy`` faithfully and inverts every update on the side.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap (e.g. ``FedAvg``); it does all the aggregation.
    model : nn.Module
        The architecture the clients train; its weights are replaced by the broadcast
        arrays each round (a private copy is kept).
    input_shape : tuple of int
        One client image's shape, ``(C, H, W)``.
    lr : float
        Learning rate sent to the clients (written into each train config as ``lr``).
    sink : LeakSink, optional
        Receives every leak and failure; ``None`` only logs them.
    threat_model : ThreatModel
        What the server may do; only ``honest-but-curious`` (read the updates, change
        nothing) exists so far.
    attack : str
        The reconstruction method, a key of :data:`fl_attack.attacks.ATTACKS`: ``"rconv"``
        (analytic, the model must pass its ``validate``) or ``"dlg"`` (gradient matching).
    dlg_options : DLGOptions, optional
        Budget of the ``"dlg"`` attack (``[attack] dlg-iterations``); ignored by ``"rconv"``,
        whose tolerances follow each client's precision.
    workers : int
        Processes a round's updates are attacked in (1: in the server process, one after
        another; see :func:`fl_attack.engine.available_cores`).

    Raises
    ------
    TypeError
        If ``strategy`` is not a Flower ``Strategy`` or ``model`` not an ``nn.Module``.
    ValueError
        If ``lr`` is not a positive finite number, ``input_shape`` is not positive or
        ``workers`` is below 1.
    fl_attack.attacks.UnknownAttackError
        If ``attack`` is not registered.
    fl_attack.engine.UnsupportedLayerError
        If R-CONV is the attack and cannot invert ``model`` (every offending layer is named).

    Notes
    -----
    A client whose update cannot be inverted (saturated loss, rank loss, a client error)
    is recorded as a failure and the round goes on. The replies handed to ``strategy``
    are the same objects, in the same order, unmodified.

    References
    ----------
    .. [1] T. Eltaras et al., "R-CONV: An Analytical Approach for Efficient Data
       Reconstruction via Convolutional Gradients", WISE 2024, arXiv:2406.04227.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        model: nn.Module,
        input_shape: tuple[int, ...],
        lr: float,
        sink: LeakSink | None = None,
        threat_model: ThreatModel = ThreatModel.HONEST_BUT_CURIOUS,
        attack: str = "rconv",
        dlg_options: DLGOptions | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"MaliciousServer: strategy must be a flwr Strategy, got "
                f"{type(strategy).__name__}; wrap e.g. FedAvg()"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"MaliciousServer: model must be an nn.Module, got {type(model)}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
            raise ValueError(f"MaliciousServer: lr must be a finite number > 0, got {lr!r}")
        if lr <= 0:
            raise ValueError(f"MaliciousServer: lr must be > 0, got {lr!r}; set [client] lr")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"MaliciousServer: workers must be an int >= 1, got {workers!r}")
        shape = tuple(int(s) for s in input_shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"MaliciousServer: input_shape must be positive, got {input_shape}")
        try:
            threat = ThreatModel(threat_model)
        except ValueError:
            allowed = ", ".join(t.value for t in ThreatModel)
            raise ValueError(
                f"MaliciousServer: unknown threat_model {threat_model!r}; choose one of {allowed}"
            ) from None
        self.attack: Attack = ATTACKS[attack]  # an unknown name lists the registered ones
        self.attack.validate(model, shape)  # R-CONV's check; nothing to check for "dlg"
        self.dlg_options = dlg_options
        self.workers = workers
        self.strategy = strategy
        self.threat_model = threat
        self.lr = float(lr)
        self.input_shape = shape
        self.sink = sink
        self._model = copy.deepcopy(model).to(torch.float32)
        self._names = tuple(name for name, _ in self._model.named_parameters())
        self._broadcast: dict[int, dict[str, np.ndarray]] = {}
        self._asked: dict[int, list[int]] = {}

    def __repr__(self) -> str:
        """Name the wrapper, its threat model and the wrapped strategy."""
        return (
            f"MaliciousServer(threat_model={self.threat_model.value!r}, lr={self.lr}, "
            f"strategy={type(self.strategy).__name__})"
        )

    def summary(self) -> None:
        """Log the attack settings, then the wrapped strategy's summary."""
        log(INFO, "\t├──> Malicious server (attack %s):", self.attack.name)
        log(INFO, "\t│\t├── Threat model: %s", self.threat_model.value)
        log(INFO, "\t│\t└── Client learning rate: %s", self.lr)
        self.strategy.summary()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the broadcast arrays, put ``lr`` in the config, then delegate."""
        sent = config.get("lr")
        if sent is not None and sent != self.lr:
            log(
                WARNING,
                "MaliciousServer.configure_train: round %s: config lr %s replaced by %s",
                server_round,
                sent,
                self.lr,
            )
        config["lr"] = self.lr
        self._broadcast[server_round] = {
            name: np.array(arrays[name].numpy(), copy=True)
            for name in arrays
            if name in self._names
        }
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        # Who was asked: a node that never replies (time-out, lost) is recorded too.
        self._asked[server_round] = [int(m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Invert every reply, record the leaks, then aggregate the untouched replies."""
        replies = list(replies)
        broadcast = self._broadcast.pop(server_round, None)
        if broadcast is None:
            log(
                WARNING,
                "MaliciousServer.aggregate_train: round %s was not configured through this "
                "wrapper; no broadcast arrays to compare with, the round is not attacked",
                server_round,
            )
        else:
            with _torch_threads(1):
                self._attack_round(server_round, replies, broadcast)
        return self.strategy.aggregate_train(server_round, replies)

    def _attack_round(
        self, server_round: int, replies: list[Message], broadcast: dict[str, np.ndarray]
    ) -> None:
        """Derive every reply's gradient, attack the round in one call, feed the sink."""
        start = time.perf_counter()
        with torch.no_grad():
            for name, param in self._model.named_parameters():
                if name in broadcast:
                    param.copy_(torch.from_numpy(broadcast[name]))
        replied = {int(reply.metadata.src_node_id) for reply in replies}
        silent = [n for n in self._asked.pop(server_round, []) if n not in replied]
        if self.sink is not None:
            self.sink.begin_round(server_round, len(replies) + len(silent))
        for node_id in silent:
            self._failed(
                server_round,
                node_id,
                "no reply this round (timed out or lost): its update was never seen",
            )
        # One attack call per client precision: the clients of a round share the weights, so
        # whatever depends on them alone is worked out once for all of them.
        batches: dict[torch.dtype, list[tuple[int, dict[str, torch.Tensor]]]] = {}
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            if reply.has_error():
                self._failed(server_round, node_id, f"client error: {reply.error.reason}")
                continue
            try:
                grads, dtype = self._gradients(reply, broadcast)
            except GradientError as exc:
                self._failed(server_round, node_id, f"{type(exc).__name__}: {exc}")
                continue
            batches.setdefault(dtype, []).append((node_id, grads))
        leaked = 0
        for dtype, batch in batches.items():
            options = SolveOptions.for_dtype(dtype) if self.attack.analytic else self.dlg_options
            results = self.attack(
                self._model,
                [grads for _, grads in batch],
                self.input_shape,
                options=options,
                workers=self.workers,
            )
            for (node_id, _), result in zip(batch, results, strict=True):
                if isinstance(result, EngineError):
                    self._failed(server_round, node_id, f"{type(result).__name__}: {result}")
                    continue
                leaked += 1
                if self.sink is not None:
                    self.sink.record_leak(server_round, node_id, result)
        if self.sink is not None:
            self.sink.end_round(server_round)
        log(
            INFO,
            "MaliciousServer.aggregate_train: round %s: inverted %s of %s updates in %.1fs",
            server_round,
            leaked,
            len(replies),
            time.perf_counter() - start,
        )

    def _failed(self, server_round: int, node_id: int, reason: str) -> None:
        """Log and record one client whose update was not inverted."""
        log(
            WARNING,
            "MaliciousServer.aggregate_train: round %s, node %s: %s",
            server_round,
            node_id,
            reason,
        )
        if self.sink is not None:
            self.sink.record_failure(server_round, node_id, reason)

    def _gradients(
        self, reply: Message, broadcast: dict[str, np.ndarray]
    ) -> tuple[dict[str, torch.Tensor], torch.dtype]:
        """One reply's gradient and the precision the client computed it in."""
        records = reply.content.array_records
        if len(records) != 1:
            raise GradientError(
                f"expected one ArrayRecord in the reply, found {len(records)} "
                f"({', '.join(records) or 'none'})"
            )
        record = next(iter(records.values()))
        extra = sorted(set(record) - set(self._model.state_dict()))
        if extra:
            raise GradientError(
                f"the reply has arrays the broadcast model lacks: {', '.join(map(repr, extra))}; "
                "the client trains another model"
            )
        update = {name: record[name].numpy() for name in record if name in self._names}
        grads = derive_gradients(broadcast, update, self.lr, self._names)
        client_dtype = min((np.dtype(a.dtype) for a in update.values()), key=lambda d: d.itemsize)
        return grads, getattr(torch, client_dtype.name)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` torch threads (the engine's small solves prefer one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
