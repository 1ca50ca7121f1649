"""reconstruct() and validate() on whole models: exact inputs, clear refusals."""

from __future__ import annotations

import dataclasses
import importlib
import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from fl_attack.engine import (
    ReconstructionError,
    UnsupportedLayerError,
    check,
    reconstruct,
    reconstruct_many,
    single_sample_gradients,
    validate,
    workers,
)
from fl_attack.engine.inverters import conv2d
from fl_attack.engine.shared import clear_weight_cache
from fl_attack.models import build_model

# The module (the package exports a function of the same name).
reconstruct_module = importlib.import_module("fl_attack.engine.reconstruct")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.mark.parametrize("activation", ["ReLU", "LeakyReLU", "Sigmoid", "Tanh"])
def test_rconv_main_random_image_is_exact_in_float64(activation: str) -> None:
    # Prepare
    model = build_model("rconv-main", activation=activation, num_classes=10, seed=50)
    x = torch.rand(3, 32, 32, dtype=torch.float64)
    grads = single_sample_gradients(model, x, 4, dtype=torch.float64)
    # Execute
    result = reconstruct(model, grads, (3, 32, 32))
    # Assert
    assert result.label == 4
    assert _psnr(result.image, x) > 100, result.warnings
    assert result.image.shape == (3, 32, 32)


def test_gradients_in_parameter_order_equal_gradients_by_name() -> None:
    model = build_model("rconv-main", num_classes=10, seed=1)
    x = torch.rand(3, 32, 32)
    grads = single_sample_gradients(model, x, 2)
    by_name = reconstruct(model, grads, (3, 32, 32))
    by_order = reconstruct(model, list(grads.values()), (3, 32, 32))
    assert torch.equal(by_name.image, by_order.image)


def test_validate_names_every_unsupported_layer() -> None:
    # Prepare
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 10),
    )
    # Execute
    with pytest.raises(UnsupportedLayerError) as info:
        validate(model, (3, 32, 32))
    # Assert
    text = str(info.value)
    assert "1 (MaxPool2d)" in text and "2 (BatchNorm2d)" in text
    assert "supported: Conv2d, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh" in text
    assert len(info.value.problems) == 2


def test_validate_rejects_linear_without_bias() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False))
    with pytest.raises(UnsupportedLayerError, match=r"1 \(Linear\): has no bias"):
        validate(model, (3, 2, 2))


def test_validate_rejects_too_few_constraints_with_both_numbers() -> None:
    # One 3x3 filter, stride 2, on a 3-channel 16x16 image: 27 + 64 constraints, 768 unknowns.
    model = nn.Sequential(nn.Conv2d(3, 1, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(
        UnsupportedLayerError,
        match=r"0 \(Conv2d\): at most 91 independent constraints for 768 unknowns",
    ):
        validate(model, (3, 16, 16))


def test_validate_rejects_pixels_no_kernel_sees() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 2, stride=3), nn.Flatten(), nn.Linear(8 * 3 * 3, 2))
    problems = check(model, (1, 9, 9))
    assert any("never seen by the kernel" in p for p in problems)


def test_validate_rejects_custom_container_and_non_linear_head() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    problems = check(nn.Sequential(Block(), nn.Flatten(), nn.Linear(4 * 16, 2)), (1, 4, 4))
    assert any("0 (Block): a container with its own forward()" in p for p in problems)
    problems = check(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU()), (1, 2, 2))
    assert sum("last layer must be nn.Linear" in p for p in problems) == 1  # said once


def test_validate_probe_reports_rank_loss() -> None:
    # Enough constraints by count, but a dead ReLU layer (bias -100) hides every unit:
    # only the probe's numerical rank shows it.
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        conv.bias.fill_(-100.0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))
    assert check(model, (3, 6, 6)) == []
    with pytest.raises(
        UnsupportedLayerError,
        match=r"0 \(Conv2d\): constraints of numerical rank 0 for 108 unknowns",
    ):
        validate(model, (3, 6, 6), probe=True)


def test_gradient_mismatches_are_reported() -> None:
    model = build_model("dlg-lenet", num_classes=10, seed=0)
    grads = single_sample_gradients(model, torch.rand(3, 32, 32), 1)
    wrong_shape = dict(grads, **{"classifier.bias": torch.zeros(3)})
    with pytest.raises(ReconstructionError, match=r"classifier\.bias.*shape"):
        reconstruct(model, wrong_shape, (3, 32, 32))
    missing = {k: v for k, v in grads.items() if k != "features.0.weight"}
    with pytest.raises(ReconstructionError, match=r"missing \['features\.0\.weight'\]"):
        reconstruct(model, missing, (3, 32, 32))
    nan = dict(grads, **{"features.0.weight": grads["features.0.weight"] * float("nan")})
    with pytest.raises(ReconstructionError, match="NaN or Inf"):
        reconstruct(model, nan, (3, 32, 32))
    zero = {k: torch.zeros_like(v) for k, v in grads.items()}
    with pytest.raises(ReconstructionError, match="bias gradient is all zero"):
        reconstruct(model, zero, (3, 32, 32))


@st.composite
def conv_stacks(draw: st.DrawFn) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """Random conv stacks: kernel 3/5, stride 1/2, padding 0/1/2, non-square inputs."""
    channels = draw(st.integers(1, 3))
    height, width = draw(st.integers(6, 14)), draw(st.integers(6, 14))
    layers: list[nn.Module] = []
    shape = (channels, height, width)
    for _ in range(draw(st.integers(1, 2))):
        kernel = draw(st.sampled_from([3, 5]))
        stride = draw(st.sampled_from([1, 2]))
        padding = draw(st.sampled_from([0, 1, 2]))
        filters = draw(st.integers(2, 24))
        out_h = (shape[1] + 2 * padding - kernel) // stride + 1
        out_w = (shape[2] + 2 * padding - kernel) // stride + 1
        assume(out_h >= 2 and out_w >= 2)
        layers += [
            nn.Conv2d(shape[0], filters, kernel, stride=stride, padding=padding),
            draw(st.sampled_from([nn.LeakyReLU(0.2), nn.Tanh(), nn.Identity()])),
        ]
        shape = (filters, out_h, out_w)
    layers = [m for m in layers if not isinstance(m, nn.Identity)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(math.prod(shape), 5))
    return model.double(), (channels, height, width)


@settings(max_examples=40, deadline=20_000, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_stacks(), label=st.integers(0, 4))
def test_random_conv_stacks_exact_when_accepted(
    case: tuple[nn.Sequential, tuple[int, int, int]], label: int
) -> None:
    # Prepare
    model, shape = case
    torch.manual_seed(1)
    x = torch.rand(shape, dtype=torch.float64)
    grads = single_sample_gradients(model, x, label, dtype=torch.float64)
    problems = check(model, shape)
    # Execute / Assert: rejected models say why; accepted ones are exact or say rank loss.
    if problems:
        assert all("(" in p and ")" in p for p in problems)
        with pytest.raises(UnsupportedLayerError):
            reconstruct(model, grads, shape)
        return
    result = reconstruct(model, grads, shape)
    deficient = [d for d in result.layers if d.rank_deficient]
    if deficient:
        assert any("rank" in w for w in result.warnings)
        with pytest.raises(UnsupportedLayerError, match="numerical rank"):
            validate(model, shape, probe=True)
    else:
        torch.testing.assert_close(result.image, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])  # the first layer's tall and square systems
def test_reconstruct_many_equals_one_at_a_time_and_builds_weight_work_once(
    monkeypatch: pytest.MonkeyPatch, channels: int
) -> None:
    # Prepare: one round, three clients, one of them with a gradient that does not fit.
    model = build_model(
        "rconv-main", activation="ReLU", in_channels=channels, num_classes=10, seed=14
    )
    shape = (channels, 32, 32)
    images = torch.rand(3, *shape)
    grads = [single_sample_gradients(model, x, i) for i, x in enumerate(images)]
    bad = {name: g[..., :1] for name, g in grads[0].items()}
    singles = [reconstruct(model, g, shape) for g in grads]
    calls: list[int] = []
    real = conv2d._weight_matrix_of

    def counting(layer, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(id(layer))
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(conv2d, "_weight_matrix_of", counting)
    clear_weight_cache()  # the single runs above filled it
    # Execute
    many = reconstruct_many(model, [*grads, bad], shape)
    # Assert: same images as one at a time; the bad client gets its error, in its place.
    assert len(many) == 4
    assert isinstance(many[3], ReconstructionError)
    for one, batch in zip(singles, many[:3], strict=True):
        assert not isinstance(batch, ReconstructionError)
        torch.testing.assert_close(batch.image, one.image, rtol=1e-9, atol=1e-12)
        assert batch.label == one.label
    # Each layer solved with weight constraints had its weight matrix built once for all.
    assert calls
    assert len(calls) == len(set(calls))


def test_a_clients_first_stage_survives_the_hand_over_between_workers() -> None:
    # Prepare: a client's inversion down to the first layer, as a round's first stage.
    model = build_model("rconv-main", activation="ReLU", in_channels=1, num_classes=10, seed=14)
    x = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(8))
    grads = single_sample_gradients(model, x, 3)
    route = reconstruct_module._Route.of(model, (1, 32, 32))
    partial = reconstruct_module._upper_layers(route, grads, None, None, 0.0)
    # Execute: through a pickle, as it travels to whichever worker is free
    copy = pickle.loads(workers._dumps(partial))
    # Assert: every tensor of the signal intact (the missing ones still missing), the rest
    # equal, and the second stage gives the same image from either.
    assert partial.signal is not None and copy.signal is not None
    for field in dataclasses.fields(partial.signal):
        mine, theirs = getattr(partial.signal, field.name), getattr(copy.signal, field.name)
        if mine is None:
            assert theirs is None
        else:  # value_alt is NaN where it does not apply
            torch.testing.assert_close(theirs, mine, rtol=0, atol=0, equal_nan=True)
    assert copy.diagnostics == partial.diagnostics and copy.options == partial.options
    assert copy.named.keys() == partial.named.keys()
    for name, grad in partial.named.items():
        torch.testing.assert_close(copy.named[name], grad, rtol=0, atol=0)
    here = reconstruct_module._first_layer(route, None, partial, 0.0)
    there = reconstruct_module._first_layer(route, None, copy, 0.0)
    torch.testing.assert_close(there.image, here.image, rtol=0, atol=0)


def test_a_result_survives_the_way_back_from_a_worker() -> None:
    # Prepare: a full result, evidence included.
    model = build_model("rconv-main", activation="ReLU", in_channels=1, num_classes=10, seed=14)
    x = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(8))
    result = reconstruct(model, single_sample_gradients(model, x, 3), (1, 32, 32))
    # Execute
    copy = pickle.loads(workers._dumps(result))
    # Assert: the image bit for bit, as a tensor of its dtype; every other field equal.
    assert isinstance(copy.image, torch.Tensor)
    torch.testing.assert_close(copy.image, result.image, rtol=0, atol=0)
    for field in dataclasses.fields(result):
        if field.name != "image":
            assert getattr(copy, field.name) == getattr(result, field.name), field.name
