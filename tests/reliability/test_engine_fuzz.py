"""Fuzz the engine: any model/gradient pair gives a Reconstruction or a typed error."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from fl_attack.engine import EngineError, Reconstruction, reconstruct, single_sample_gradients

ACTIVATIONS = [nn.ReLU, lambda: nn.LeakyReLU(0.1), nn.Sigmoid, nn.Tanh, nn.Identity]


@st.composite
def cases(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...], list[torch.Tensor]]:
    """A random small chain (possibly invalid) and random gradients (possibly wrong)."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    channels, height, width = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 8)),
        draw(st.integers(1, 8)),
    )
    layers: list[nn.Module] = []
    shape = (channels, height, width)
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):  # anything at all
            kernel, stride = draw(st.integers(1, 4)), draw(st.integers(1, 3))
            padding, filters = draw(st.integers(0, 2)), draw(st.integers(1, 8))
        else:  # geometry R-CONV can usually invert, to exercise the solvers
            kernel, stride = draw(st.sampled_from([3, 5])), draw(st.integers(1, 2))
            padding, filters = kernel // 2, draw(st.integers(8, 12))
        layers.append(nn.Conv2d(shape[0], filters, kernel, stride=stride, padding=padding))
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        out_h = (shape[1] + 2 * padding - kernel) // stride + 1
        out_w = (shape[2] + 2 * padding - kernel) // stride + 1
        shape = (filters, max(out_h, 0), max(out_w, 0))
    layers = [m for m in layers if not isinstance(m, nn.Identity)]
    features = max(math.prod(shape), 1)
    layers += [
        nn.Flatten(),
        nn.Linear(
            features, draw(st.integers(1, 5)), bias=draw(st.sampled_from([True] * 9 + [False]))
        ),
    ]
    model = nn.Sequential(*layers)
    scale = draw(st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30]))
    source = draw(st.sampled_from(["autograd", "random", "corrupt"]))
    if source == "autograd" and shape[1] > 0 and shape[2] > 0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(draw(st.sampled_from([1e-3, 1.0, 30.0])))
        x = torch.rand(channels, height, width) * scale
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        try:
            grads = list(single_sample_gradients(model, x, 0, dtype=dtype).values())
        except RuntimeError:  # the drawn chain does not even run forward
            grads = [torch.randn_like(p) for p in model.parameters()]
        return model, (channels, height, width), grads
    grads = []
    for p in model.parameters():
        kinds = ["random", "zeros", "scaled"] + (
            ["nan", "wrong-shape"] if source == "corrupt" else []
        )
        kind = draw(st.sampled_from(kinds))
        if kind == "zeros":
            grads.append(torch.zeros_like(p))
        elif kind == "nan":
            grads.append(torch.full_like(p, float("nan")))
        elif kind == "wrong-shape":
            grads.append(torch.randn(p.numel() + 1))
        elif kind == "scaled":
            grads.append(torch.randn_like(p) * scale)
        else:
            grads.append(torch.randn_like(p))
    input_shape = draw(
        st.sampled_from([(channels, height, width)] * 8 + [(channels, height), (0, 2, 2)])
    )
    return model, input_shape, grads


@settings(
    max_examples=1000,
    deadline=60_000,  # a hang, not a slow example: the machine may be shared
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_engine_never_crashes(case: tuple[nn.Module, tuple[int, ...], list[torch.Tensor]]) -> None:
    model, input_shape, grads = case
    try:
        result = reconstruct(model, grads, input_shape)
    except EngineError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("reconstructed")
    assert isinstance(result, Reconstruction)
    assert result.image.shape == input_shape
