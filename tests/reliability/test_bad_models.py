"""Models R-CONV cannot invert: every offending layer named, with why and what to use."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_attack.engine import UnsupportedLayerError, validate
from server.malicious import MaliciousServer

SUPPORTED = "supported: Conv2d, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh"

# (case id, model, input shape, fragments the message must hold)
CASES: list[tuple[str, nn.Module, tuple[int, ...], tuple[str, ...]]] = [
    (
        "max-pool",
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(450, 2)),
        (1, 32, 32),
        ("1 (MaxPool2d): no inverter for this layer type", SUPPORTED),
    ),
    (
        "batch-norm",
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(1800, 2)),
        (1, 32, 32),
        ("1 (BatchNorm2d)", SUPPORTED),
    ),
    (
        "linear-without-bias",
        nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False)),
        (1, 4, 4),
        ("1 (Linear): has no bias", "use bias=True"),
    ),
    (
        "nested-dropout",
        nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout()), nn.Flatten(), nn.Linear(8, 2)
        ),
        (1, 4, 4),
        ("0.1 (Dropout)",),
    ),
    (
        "every-offender-at-once",
        nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.GELU(), nn.AvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
        ),
        (1, 4, 4),
        ("1 (GELU)", "2 (AvgPool2d)"),
    ),
    (
        "input-shape-mismatch",
        nn.Sequential(nn.Flatten(), nn.Linear(16, 2)),
        (1, 5, 5),
        ("1 (Linear): expects a flat input of 16 features", "add nn.Flatten"),
    ),
    (
        "no-final-linear",
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()),
        (1, 4, 4),
        ("the last layer must be nn.Linear with bias",),
    ),
    (
        "empty-input-shape",
        nn.Sequential(nn.Flatten(), nn.Linear(16, 2)),
        (0, 4, 4),
        ("input_shape must be positive sizes", "(0, 4, 4)"),
    ),
]


@pytest.mark.parametrize(
    ("model", "shape", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validate_names_what_it_cannot_invert(
    model: nn.Module, shape: tuple[int, ...], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(UnsupportedLayerError) as caught:
        validate(model, shape)
    message = str(caught.value)
    assert "cannot be inverted by R-CONV" in message
    assert all(f in message for f in fragments), message


def test_the_malicious_server_refuses_such_a_model_before_any_round() -> None:
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(450, 2))
    with pytest.raises(UnsupportedLayerError, match=r"1 \(MaxPool2d\)"):
        MaliciousServer(FedAvg(), model=pooled, input_shape=(1, 32, 32), lr=0.01)
