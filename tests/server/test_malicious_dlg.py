"""MaliciousServer with ``attack="dlg"``: models R-CONV rejects are still attacked."""

from __future__ import annotations

import copy
from unittest.mock import Mock

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_attack.attacks import DLGOptions, UnknownAttackError
from fl_attack.engine import Reconstruction, UnsupportedLayerError
from fl_attack.metrics import psnr
from fl_attack.simulation import train_step
from server.malicious import MaliciousServer

LR = 0.05
SHAPE = (1, 8, 8)
LABEL = 1


class Sink:
    """Keeps every leak and failure."""

    def __init__(self) -> None:
        self.leaks: list[tuple[int, int, Reconstruction]] = []
        self.failures: list[tuple[int, int, str]] = []

    def begin_round(self, server_round: int, num_replies: int) -> None:
        """Nothing to do."""

    def record_leak(self, server_round: int, node_id: int, result: Reconstruction) -> None:
        self.leaks.append((server_round, node_id, result))

    def record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        self.failures.append((server_round, node_id, reason))

    def end_round(self, server_round: int) -> None:
        """Nothing to do."""


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    """Messages can be built (FedAvg.configure_train builds them)."""


@pytest.fixture
def pooled(seed: int) -> nn.Sequential:
    """A conv + Sigmoid + 2x2 average pooling + linear model: no R-CONV inverter for pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 4),
    )


def _reply(model: nn.Module, image: torch.Tensor, node_id: int) -> Message:
    """A mock reply holding the arrays after one honest SGD step on ``image``."""
    local = copy.deepcopy(model)
    train_step(local, image.unsqueeze(0), torch.tensor([LABEL]), lr=LR)
    message = Mock(spec=Message)
    message.content = RecordDict(
        {
            "arrays": ArrayRecord(local.state_dict()),
            "metrics": MetricRecord({"num-examples": 1, "loss": 0.5}),
        }
    )
    message.has_error.side_effect = lambda: False
    message.has_content.side_effect = lambda: True
    message.metadata.src_node_id = node_id
    return message


def test_dlg_attacks_a_model_rconv_rejects(pooled: nn.Sequential) -> None:
    # Prepare
    image = torch.rand(SHAPE, generator=torch.Generator().manual_seed(7))
    sink = Sink()
    with pytest.raises(UnsupportedLayerError, match="AvgPool2d"):
        MaliciousServer(FedAvg(), model=pooled, input_shape=SHAPE, lr=LR)
    strategy = MaliciousServer(
        FedAvg(),
        model=pooled,
        input_shape=SHAPE,
        lr=LR,
        sink=sink,
        attack="dlg",
        dlg_options=DLGOptions(max_iterations=50),
    )
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [11, 12, 13]  # FedAvg waits for at least two
    sent = strategy.configure_train(1, ArrayRecord(pooled.state_dict()), ConfigRecord({}), grid)
    asked = {int(m.metadata.dst_node_id) for m in sent}  # FedAvg samples the nodes
    # Execute
    arrays, _ = strategy.aggregate_train(1, [_reply(pooled, image, 11)])
    # Assert
    assert arrays is not None
    # Sampled nodes other than 11 never replied: recorded as such, nothing else failed.
    assert {n for _, n, _ in sink.failures} == asked - {11}
    assert all(r.startswith("no reply this round") for _, _, r in sink.failures)
    ((server_round, node_id, result),) = sink.leaks
    assert (server_round, node_id, result.label) == (1, 11, LABEL)
    assert psnr(image, result.image) >= 30.0, result.notes
    assert any("lbfgs steps" in note for note in result.notes)


def test_unknown_attack_is_refused(pooled: nn.Sequential) -> None:
    with pytest.raises(UnknownAttackError, match="rconv, dlg"):
        MaliciousServer(FedAvg(), model=pooled, input_shape=SHAPE, lr=LR, attack="nope")
