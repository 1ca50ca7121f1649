"""MaliciousServer with mock replies: exact gradients, untouched replies, FedAvg's aggregate."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_attack.config import ThreatModel
from fl_attack.data import load_dataset
from fl_attack.engine import Reconstruction, SolveOptions, UnsupportedLayerError
from fl_attack.metrics import psnr
from fl_attack.models import build_model
from fl_attack.simulation import train_step
from server.malicious import MaliciousServer, derive_gradients

LR = 0.01
SHAPE = (1, 32, 32)
IMAGES = (0, 51, 120)  # faces images (two faces, one non-face)


class RecordingSink:
    """A LeakSink that keeps every call."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, int]] = []
        self.leaks: list[tuple[int, int, Reconstruction]] = []
        self.failures: list[tuple[int, int, str]] = []
        self.ended: list[int] = []

    def begin_round(self, server_round: int, num_replies: int) -> None:
        self.rounds.append((server_round, num_replies))

    def record_leak(self, server_round: int, node_id: int, result: Reconstruction) -> None:
        self.leaks.append((server_round, node_id, result))

    def record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        self.failures.append((server_round, node_id, reason))

    def end_round(self, server_round: int) -> None:
        self.ended.append(server_round)


class SpyFedAvg(FedAvg):
    """FedAvg that remembers the replies it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Message] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.seen = list(replies)
        return super().aggregate_train(server_round, self.seen)


@pytest.fixture(scope="module")
def faces() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("faces")
    return data.images, data.labels


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    """Messages can be built (FedAvg.configure_train builds them)."""


@pytest.fixture
def model() -> nn.Sequential:
    return build_model("rconv-main", activation="ReLU", in_channels=1, num_classes=10, seed=6)


def _client_update(
    model: nn.Module, image: torch.Tensor, label: int, lr: float = LR
) -> ArrayRecord:
    """What an honest client sends back after one SGD step on one image."""
    local = copy.deepcopy(model)
    train_step(local, image.unsqueeze(0), torch.tensor([label]), lr=lr)
    return ArrayRecord(local.state_dict())


def _make_reply(arrays: ArrayRecord, num_examples: int, node_id: int) -> Message:
    """A mock reply Message with real ArrayRecord/MetricRecord content."""
    message = Mock(spec=Message)
    message.content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, "loss": 0.5})}
    )
    message.has_error.side_effect = lambda: False
    message.has_content.side_effect = lambda: True
    message.metadata.src_node_id = node_id
    return message


def _make_error_reply(node_id: int) -> Message:
    """A mock reply carrying a client error."""
    message = Mock(spec=Message)
    message.has_error.side_effect = lambda: True
    message.has_content.side_effect = lambda: False
    message.error.reason = "ClientApp raised"
    message.metadata.src_node_id = node_id
    return message


def _grid(node_ids: list[int]) -> Grid:
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = node_ids
    return grid


def _configured(
    strategy: MaliciousServer,
    arrays: ArrayRecord,
    server_round: int = 1,
    nodes: tuple[int, ...] = (11, 12, 13),
) -> None:
    """Run configure_train so the wrapper knows the broadcast arrays (and whom it asked)."""
    strategy.configure_train(server_round, arrays, ConfigRecord({}), _grid(list(nodes)))


def _snapshot(message: Message) -> dict[str, np.ndarray]:
    """Copies of a reply's arrays and metrics, to check nothing was modified."""
    out = {k: v.numpy().copy() for k, v in message.content["arrays"].items()}
    out.update({f"metric:{k}": np.asarray(v) for k, v in message.content["metrics"].items()})
    return out


def test_derive_gradients_is_the_exact_float64_difference() -> None:
    # Prepare: values whose float32 step is exact, so the gradient is known by hand
    before = {"w": np.array([1.0, 0.5, -0.25], dtype=np.float32)}
    after = {"w": np.array([0.875, 0.5, -0.5], dtype=np.float32)}
    # Execute
    grads = derive_gradients(before, after, 0.5, ["w"])
    # Assert
    assert grads["w"].dtype == torch.float64
    assert torch.equal(grads["w"], torch.tensor([0.25, 0.0, 0.5], dtype=torch.float64))


def test_wrapper_hands_the_engine_the_hand_computed_gradient(
    model: nn.Sequential, faces: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    images, labels = faces
    global_arrays = ArrayRecord(model.state_dict())
    update = _client_update(model, images[0], int(labels[0]))
    captured: dict = {}

    class Spy:
        analytic = True

        def __call__(
            self,
            model_: nn.Module,
            gradients: list[dict[str, torch.Tensor]],
            input_shape: tuple[int, ...],
            *,
            options: SolveOptions | None = None,
            workers: int = 1,
        ) -> list[Reconstruction]:
            (only,) = gradients  # one reply: one client in the round's batch
            captured.update(gradients=only, options=options, shape=input_shape, workers=workers)
            return [Reconstruction(torch.zeros(SHAPE, dtype=torch.float64), 0, (), 0.0)]

    strategy = MaliciousServer(FedAvg(), model=model, input_shape=SHAPE, lr=LR, workers=3)
    monkeypatch.setattr(strategy, "attack", Spy())
    _configured(strategy, global_arrays)
    # Execute
    strategy.aggregate_train(1, [_make_reply(update, 1, 11)])
    # Assert
    assert captured["shape"] == SHAPE
    assert captured["workers"] == 3
    assert captured["options"].eps == pytest.approx(torch.finfo(torch.float32).eps)
    for name, grad in captured["gradients"].items():
        by_hand = (
            global_arrays[name].numpy().astype(np.float64) - update[name].numpy().astype(np.float64)
        ) / LR
        assert grad.dtype == torch.float64
        assert np.array_equal(grad.numpy(), by_hand), name


def test_derived_gradient_is_the_clients_gradient_up_to_its_rounding(
    model: nn.Sequential, faces: tuple
) -> None:
    # Prepare
    images, labels = faces
    x, y = images[51].unsqueeze(0), torch.tensor([int(labels[51])])
    loss = nn.functional.cross_entropy(model(x), y)
    true = dict(
        zip(
            (n for n, _ in model.named_parameters()),
            torch.autograd.grad(loss, list(model.parameters())),
            strict=True,
        )
    )
    before = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    after = {k: v.numpy() for k, v in _client_update(model, images[51], int(labels[51])).items()}
    # Execute
    grads = derive_gradients(before, after, LR, list(true))
    # Assert: the only error is the client's float32 rounding of lr * g and of w - lr * g
    for name, grad in grads.items():
        step = np.abs(LR * true[name].detach().numpy())
        weight = np.maximum(np.abs(before[name]), np.abs(after[name]))
        bound = (np.spacing(weight) + np.spacing(step)) / LR
        error = np.abs(grad.numpy() - true[name].double().numpy())
        assert (error <= bound).all(), (name, float(error.max()), float(bound.max()))


def test_wrapper_leaks_every_update_and_aggregates_like_fedavg(
    model: nn.Sequential, faces: tuple
) -> None:
    # Prepare
    images, labels = faces
    global_arrays = ArrayRecord(model.state_dict())
    replies = [
        _make_reply(_client_update(model, images[i], int(labels[i])), n, node)
        for i, n, node in zip(IMAGES, (1, 2, 3), (11, 12, 13), strict=True)
    ]
    sink = RecordingSink()
    strategy = MaliciousServer(FedAvg(), model=model, input_shape=SHAPE, lr=LR, sink=sink)
    _configured(strategy, global_arrays)
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    plain_arrays, plain_metrics = FedAvg().aggregate_train(1, replies)
    # Assert: every image leaks, with its label
    assert sink.rounds == [(1, 3)] and sink.ended == [1] and not sink.failures
    for (server_round, node, result), index in zip(sink.leaks, IMAGES, strict=True):
        assert server_round == 1 and node in (11, 12, 13)
        assert psnr(images[index], result.image) >= 40
        assert result.label == int(labels[index])
    # Assert: the aggregate is FedAvg's, bit for bit, and the hand-computed weighted mean
    assert arrays is not None and plain_arrays is not None
    for name in plain_arrays:
        assert arrays[name].numpy().tobytes() == plain_arrays[name].numpy().tobytes()
        by_hand = sum(
            w * r.content["arrays"][name].numpy().astype(np.float64)
            for w, r in zip((1 / 6, 2 / 6, 3 / 6), replies, strict=True)
        )
        np.testing.assert_allclose(arrays[name].numpy(), by_hand, rtol=1e-6, atol=1e-6)
    assert dict(metrics) == dict(plain_metrics)


def test_replies_reach_the_inner_strategy_unchanged(model: nn.Sequential, faces: tuple) -> None:
    # Prepare
    images, labels = faces
    replies = [
        _make_reply(_client_update(model, images[i], int(labels[i])), 1, 20 + k)
        for k, i in enumerate(IMAGES[:2])
    ]
    before = [_snapshot(r) for r in replies]
    inner = SpyFedAvg()
    strategy = MaliciousServer(inner, model=model, input_shape=SHAPE, lr=LR)
    _configured(strategy, ArrayRecord(model.state_dict()))
    # Execute
    strategy.aggregate_train(1, iter(replies))
    # Assert
    assert len(inner.seen) == len(replies)
    assert all(seen is sent for seen, sent in zip(inner.seen, replies, strict=True))
    for reply, snapshot in zip(replies, before, strict=True):
        after = _snapshot(reply)
        assert after.keys() == snapshot.keys()
        assert all(np.array_equal(after[k], snapshot[k]) for k in snapshot)


def test_a_failing_client_is_recorded_and_the_round_goes_on(
    model: nn.Sequential, faces: tuple
) -> None:
    # Prepare: a good update, an update equal to the broadcast (zero gradient), a client error
    images, labels = faces
    global_arrays = ArrayRecord(model.state_dict())
    good = _make_reply(_client_update(model, images[0], int(labels[0])), 1, 31)
    frozen = _make_reply(ArrayRecord(copy.deepcopy(model).state_dict()), 1, 32)
    broken = _make_error_reply(33)
    replies = [good, frozen, broken]
    sink = RecordingSink()
    strategy = MaliciousServer(
        FedAvg(min_available_nodes=4), model=model, input_shape=SHAPE, lr=LR, sink=sink
    )
    _configured(strategy, global_arrays, nodes=(31, 32, 33, 34))  # 34 never replies
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    assert [node for _, node, _ in sink.leaks] == [31]
    assert {node: reason for _, node, reason in sink.failures}.keys() == {32, 33, 34}
    reasons = {node: reason for _, node, reason in sink.failures}
    assert "ReconstructionError" in reasons[32] and "bias gradient is all zero" in reasons[32]
    assert reasons[33] == "client error: ClientApp raised"
    assert reasons[34].startswith("no reply this round")
    plain, _ = FedAvg().aggregate_train(1, replies)
    assert arrays is not None and plain is not None
    assert all(arrays[k].numpy().tobytes() == plain[k].numpy().tobytes() for k in plain)


def test_configure_train_sends_the_lr_and_remembers_the_broadcast(model: nn.Sequential) -> None:
    # Prepare
    strategy = MaliciousServer(FedAvg(), model=model, input_shape=SHAPE, lr=LR)
    arrays = ArrayRecord(model.state_dict())
    # Execute
    messages = list(
        strategy.configure_train(2, arrays, ConfigRecord({"lr": 0.5}), _grid([1, 2, 3]))
    )
    # Assert
    assert len(messages) == 3
    for message in messages:
        assert message.content["config"]["lr"] == LR
        assert message.content["config"]["server-round"] == 2
    assert strategy.threat_model is ThreatModel.HONEST_BUT_CURIOUS
    assert "honest-but-curious" in repr(strategy) and "FedAvg" in repr(strategy)


def test_an_unconfigured_round_is_aggregated_but_not_attacked(model: nn.Sequential) -> None:
    sink = RecordingSink()
    strategy = MaliciousServer(FedAvg(), model=model, input_shape=SHAPE, lr=LR, sink=sink)
    reply = _make_reply(ArrayRecord(model.state_dict()), 1, 5)
    arrays, _ = strategy.aggregate_train(4, [reply])
    assert arrays is not None and not sink.rounds and not sink.leaks


@pytest.mark.parametrize("lr", [0.0, -1.0, math.nan, math.inf])
def test_init_rejects_a_bad_lr(model: nn.Sequential, lr: float) -> None:
    with pytest.raises(ValueError, match="lr"):
        MaliciousServer(FedAvg(), model=model, input_shape=SHAPE, lr=lr)


def test_init_rejects_what_it_cannot_wrap_or_invert(model: nn.Sequential) -> None:
    with pytest.raises(TypeError, match="must be a flwr Strategy"):
        MaliciousServer(object(), model=model, input_shape=SHAPE, lr=LR)  # type: ignore[arg-type]
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(450, 2))
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d"):
        MaliciousServer(FedAvg(), model=pooled, input_shape=SHAPE, lr=LR)
    with pytest.raises(ValueError, match="threat_model"):
        MaliciousServer(FedAvg(), model=model, input_shape=SHAPE, lr=LR, threat_model="evil")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        MaliciousServer(FedAvg(), model=model, input_shape=SHAPE, lr=LR, workers=0)
