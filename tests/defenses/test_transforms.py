"""Each defense transform checked against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from fl_attack.defenses import (
    clip_by_norm,
    gaussian_epsilon,
    gaussian_noise,
    global_norm,
    laplace_noise,
    quantize,
    top_k,
)


@pytest.fixture
def update() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(64, generator=gen)}


def test_gaussian_noise_has_the_requested_spread(update: dict[str, torch.Tensor]) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(1)
    # Execute
    noisy = gaussian_noise(update, 0.5, generator=gen)
    relative = gaussian_noise(update, 0.01, relative=True, generator=gen)
    # Assert: the added noise's standard deviation is what was asked for.
    diff = torch.cat([(noisy[k] - update[k]).reshape(-1) for k in update])
    assert abs(float(diff.std()) - 0.5) < 0.03
    rel = torch.cat([(relative[k] - update[k]).reshape(-1) for k in update])
    assert abs(float(rel.std()) - 0.01 * global_norm(update)) < 0.1 * 0.01 * global_norm(update)
    assert torch.equal(update["w"], update["w"].clone())  # input untouched


def test_laplace_noise_has_the_requested_scale(update: dict[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(2)
    noisy = laplace_noise(update, 0.2, generator=gen)
    diff = torch.cat([(noisy[k] - update[k]).reshape(-1) for k in update]).double()
    # Laplace(0, b): mean absolute deviation b, variance 2 b^2.
    assert abs(float(diff.abs().mean()) - 0.2) < 0.02
    assert abs(float(diff.var()) - 2 * 0.2**2) < 0.01


def test_clip_by_norm_scales_only_long_updates(update: dict[str, torch.Tensor]) -> None:
    norm = global_norm(update)
    clipped = clip_by_norm(update, norm / 4)
    assert math.isclose(global_norm(clipped), norm / 4, rel_tol=1e-6)
    torch.testing.assert_close(clipped["w"], update["w"] / 4)
    untouched = clip_by_norm(update, norm * 2)
    torch.testing.assert_close(untouched["b"], update["b"])
    with pytest.raises(ValueError, match="clip norm must be > 0"):
        clip_by_norm(update, 0.0)


def test_top_k_keeps_exactly_the_largest_entries(update: dict[str, torch.Tensor]) -> None:
    kept = top_k(update, 0.1)
    w = update["w"].reshape(-1)
    k = math.ceil(0.1 * w.numel())
    threshold = w.abs().sort(descending=True).values[k - 1]
    expected = torch.where(w.abs() >= threshold, w, torch.zeros_like(w))
    torch.testing.assert_close(kept["w"].reshape(-1), expected)
    assert int((kept["b"] != 0).sum()) == math.ceil(0.1 * 64)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        top_k(update, 0.0)


def test_quantize_rounds_to_the_format(update: dict[str, torch.Tensor]) -> None:
    half = quantize(update, "fp16")
    torch.testing.assert_close(half["w"], update["w"].half().float())
    int8 = quantize(update, "int8")
    step = float(update["w"].abs().max()) / 127
    levels = int8["w"] / step
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert float((int8["w"] - update["w"]).abs().max()) <= step / 2 + 1e-6
    with pytest.raises(ValueError, match="choose one of fp16, int8"):
        quantize(update, "int4")


def test_gaussian_epsilon_matches_the_analytic_mechanism() -> None:
    # For sigma = C (z = 1) and delta = 1e-5 the analytic Gaussian mechanism gives
    # epsilon ~ 4.4 (Balle & Wang 2018); the classic bound sqrt(2 ln(1.25/delta)) / z
    # (4.84) is looser.
    eps = gaussian_epsilon(1.0, 1e-5)
    assert 4.0 < eps < math.sqrt(2 * math.log(1.25 / 1e-5))
    assert gaussian_epsilon(4.0, 1e-5) < eps  # more noise, more privacy
    assert gaussian_epsilon(0.0, 1e-5) == math.inf
