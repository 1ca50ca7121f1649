"""Bad client updates: recorded as failures naming the client and why; the round goes on.

Each case sends two honest replies and one bad one through ``MaliciousServer`` wrapping
the run's ``OrderedFedAvg``: the bad reply is logged by the sink with a clear reason, the
honest ones are still inverted, and the aggregate is the weighted mean of the replies that
fit the model (a NaN never reaches the engine nor the global model).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fl_attack.data import load_dataset
from fl_attack.engine import Reconstruction
from fl_attack.metrics import psnr
from fl_attack.models import build_model
from fl_attack.simulation import train_step
from server.malicious import MaliciousServer
from server.server_app import OrderedFedAvg

LR = 0.01
SHAPE = (1, 32, 32)
GOOD = {11: 0, 12: 51}  # node id -> faces image
BAD_NODE, BAD_IMAGE = 13, 120


class RecordingSink:
    """A LeakSink that keeps every call."""

    def __init__(self) -> None:
        self.leaks: dict[int, Reconstruction] = {}
        self.failures: dict[int, str] = {}
        self.ended: list[int] = []

    def begin_round(self, server_round: int, num_replies: int) -> None:
        assert num_replies == 3

    def record_leak(self, server_round: int, node_id: int, result: Reconstruction) -> None:
        self.leaks[node_id] = result

    def record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        self.failures[node_id] = reason

    def end_round(self, server_round: int) -> None:
        self.ended.append(server_round)


class SpyAttack:
    """Wraps the server's attack and keeps every gradient handed to it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.inputs: list[dict[str, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __call__(self, model: nn.Module, gradients: list, shape: tuple, **kwargs: Any) -> Any:
        self.inputs.extend(gradients)
        return self.real(model, gradients, shape, **kwargs)


@pytest.fixture(scope="module")
def faces() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("faces")
    return data.images, data.labels


@pytest.fixture
def model() -> nn.Sequential:
    return build_model("rconv-main", activation="ReLU", in_channels=1, num_classes=10, seed=6)


def _update(model: nn.Module, image: torch.Tensor, label: int) -> dict[str, torch.Tensor]:
    local = copy.deepcopy(model)
    train_step(local, image.unsqueeze(0), torch.tensor([label]), lr=LR)
    return {k: v.detach().clone() for k, v in local.state_dict().items()}


def _reply(content: RecordDict, node_id: int) -> Message:
    message = Mock(spec=Message)
    message.content = content
    message.has_error.side_effect = lambda: False
    message.has_content.side_effect = lambda: True
    message.metadata.src_node_id = node_id
    return message


def _content(arrays: dict[str, torch.Tensor], num_examples: object = 1) -> RecordDict:
    metrics = {"loss": 0.5} if num_examples is None else {"num-examples": num_examples, "loss": 0.5}
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})


def _error_reply(node_id: int) -> Message:
    message = Mock(spec=Message)
    message.has_error.side_effect = lambda: True
    message.has_content.side_effect = lambda: False
    message.error.reason = "ClientApp raised RuntimeError: out of memory"
    message.metadata.src_node_id = node_id
    return message


def _changed(arrays: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> RecordDict:
    return _content({**arrays, name: value})


Builder = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], Message]


def _nan(update: dict[str, torch.Tensor], _: dict[str, torch.Tensor]) -> RecordDict:
    weight = update["features.2.weight"].clone()
    weight.view(-1)[7] = float("nan")
    return _changed(update, "features.2.weight", weight)


def _inf(update: dict[str, torch.Tensor], _: dict[str, torch.Tensor]) -> RecordDict:
    weight = update["classifier.weight"].clone()
    weight[0, 0] = float("inf")
    return _changed(update, "classifier.weight", weight)


def _missing(update: dict[str, torch.Tensor], _: dict[str, torch.Tensor]) -> RecordDict:
    return _content({k: v for k, v in update.items() if k != "classifier.bias"})


def _two_records(update: dict[str, torch.Tensor], _: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(update),
            "more": ArrayRecord(update),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )


# (case id, bad reply from (update, broadcast), failure fragments or None, aggregated)
CASES: list[tuple[str, Callable[..., object], tuple[str, ...] | None, bool]] = [
    ("nan", _nan, ("'features.2.weight' holds 1 NaN/Inf", "not inverted"), False),
    ("inf", _inf, ("'classifier.weight' holds 1 NaN/Inf",), False),
    ("missing-array", _missing, ("'classifier.bias' is missing from the reply",), False),
    (
        "extra-array",
        lambda u, _: _changed(u, "decoy.weight", torch.ones(3)),
        ("arrays the broadcast model lacks: 'decoy.weight'",),
        False,
    ),
    (
        "wrong-shape",
        lambda u, _: _changed(u, "classifier.bias", u["classifier.bias"].reshape(1, 10)),
        ("'classifier.bias' has shape (1, 10) in the reply but (10,)",),
        False,
    ),
    (
        "wrong-dtype",
        lambda u, _: _changed(u, "features.0.bias", u["features.0.bias"].to(torch.int32)),
        ("'features.0.bias' has dtype int32 in the reply; expected floating point",),
        False,
    ),
    ("two-array-records", _two_records, ("expected one ArrayRecord", "arrays, more"), False),
    (
        "no-array-record",
        lambda u, _: RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
        ("expected one ArrayRecord in the reply, found 0",),
        False,
    ),
    (
        "all-zero-bias-gradient",
        lambda _, broadcast: _content(broadcast),
        ("ReconstructionError", "bias gradient is all zero"),
        True,
    ),
    ("client-error", None, ("client error: ClientApp raised RuntimeError",), False),
    ("missing-num-examples", lambda u, _: _content(u, None), None, False),
    ("zero-num-examples", lambda u, _: _content(u, 0), None, False),
]


@pytest.mark.parametrize(
    ("build", "fragments", "aggregated"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_bad_update_is_recorded_and_the_round_goes_on(
    build: Callable[..., RecordDict] | None,
    fragments: tuple[str, ...] | None,
    aggregated: bool,
    model: nn.Sequential,
    faces: tuple[torch.Tensor, torch.Tensor],
    flower_task_identity: None,
) -> None:
    # Prepare: two honest replies and the bad one; a spy on what reaches the engine
    images, labels = faces
    broadcast = {k: v.detach().clone() for k, v in model.state_dict().items()}
    good = [
        _reply(_content(_update(model, images[i], int(labels[i]))), node)
        for node, i in GOOD.items()
    ]
    honest_bad = _update(model, images[BAD_IMAGE], int(labels[BAD_IMAGE]))
    bad = _error_reply(BAD_NODE) if build is None else _reply(build(honest_bad, broadcast), 13)
    sink = RecordingSink()
    strategy = MaliciousServer(OrderedFedAvg(), model=model, input_shape=SHAPE, lr=LR, sink=sink)
    spy = SpyAttack(strategy.attack)
    strategy.attack = spy
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [11, 12, 13]
    list(strategy.configure_train(1, ArrayRecord(broadcast), ConfigRecord({}), grid))
    # Execute
    arrays, _ = strategy.aggregate_train(1, [good[0], bad, good[1]])
    # Assert: the bad client is recorded with its reason (or leaked, when only FedAvg minds)
    assert sink.ended == [1]
    if fragments is None:
        assert BAD_NODE in sink.leaks and BAD_NODE not in sink.failures
    else:
        assert BAD_NODE not in sink.leaks
        reason = sink.failures[BAD_NODE]
        assert all(f in reason for f in fragments), reason
    # Assert: the honest clients are still attacked, and nothing non-finite reached the engine
    for node, index in GOOD.items():
        assert psnr(images[index], sink.leaks[node].image) >= 40, node
    assert all(torch.isfinite(g).all() for grads in spy.inputs for g in grads.values())
    # Assert: the aggregate is the weighted mean of the replies that fit the model
    kept = good + ([bad] if aggregated else [])
    assert arrays is not None
    for name in broadcast:
        by_hand = sum(r.content["arrays"][name].numpy().astype(np.float64) for r in kept) / len(
            kept
        )
        np.testing.assert_allclose(arrays[name].numpy(), by_hand, rtol=1e-6, atol=1e-7)
        assert np.isfinite(arrays[name].numpy()).all()
