"""Tests for fl_attack.metrics.image: oracle values, skimage agreement and input checks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity

from fl_attack.metrics import ImageMetrics, image_metrics, label_accuracy, mse, psnr, ssim


def _noisy_pair(seed: int, sigma: float, shape: tuple[int, ...] = (3, 32, 32)) -> tuple:
    """A random image in [0, 1] and a copy with Gaussian noise (not clipped)."""
    rng = np.random.default_rng(seed)
    reference = rng.random(shape)
    estimate = reference + sigma * rng.standard_normal(shape)
    return reference, estimate


# ---------------------------------------------------------------- mse / psnr


def test_psnr_matches_hand_computation(seed: int) -> None:
    # Prepare
    reference = torch.rand(3, 32, 32, dtype=torch.float32)
    estimate = reference + 0.05 * torch.randn(3, 32, 32)
    ref64, est64 = reference.double().numpy(), estimate.double().numpy()
    expected_mse = float(((ref64 - est64) ** 2).sum() / ref64.size)
    expected_psnr = 10 * math.log10(1.0 / expected_mse)

    # Execute
    got_mse = mse(reference, estimate)
    got_psnr = psnr(reference, estimate)

    # Assert
    assert got_mse == pytest.approx(expected_mse, rel=1e-12)
    assert got_psnr == pytest.approx(expected_psnr, rel=1e-12)


def test_psnr_known_constant_error() -> None:
    # Prepare: every pixel off by 0.1 gives mse 0.01, so PSNR = 20 dB (MAX = 1)
    reference = np.zeros((8, 8))
    estimate = np.full((8, 8), 0.1)

    # Execute
    value = psnr(reference, estimate)

    # Assert
    assert value == pytest.approx(20.0, abs=1e-9)


def test_psnr_data_range_scales() -> None:
    # Prepare: 8-bit scale, off by 25.5 everywhere, mse = 650.25
    reference = np.zeros((4, 4))
    estimate = np.full((4, 4), 25.5)

    # Execute
    value = psnr(reference, estimate, data_range=255.0)

    # Assert
    assert value == pytest.approx(10 * math.log10(255.0**2 / 650.25), abs=1e-9)


def test_identical_images_give_infinite_psnr(seed: int) -> None:
    # Prepare
    image = torch.rand(1, 32, 32)

    # Execute
    value = psnr(image, image.clone())

    # Assert
    assert value == math.inf
    assert mse(image, image.clone()) == 0.0


def test_estimate_is_not_clipped() -> None:
    # Prepare: an estimate outside [0, 1] counts its full error
    reference = np.zeros((4, 4))
    estimate = np.full((4, 4), 2.0)

    # Execute
    value = mse(reference, estimate)

    # Assert
    assert value == pytest.approx(4.0)


@settings(deadline=2000, max_examples=30)
@given(
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    sigma=st.floats(min_value=1e-3, max_value=0.5),
    factor=st.floats(min_value=1.5, max_value=10.0),
)
def test_psnr_decreases_as_noise_grows(seed: int, sigma: float, factor: float) -> None:
    # Prepare: the same noise pattern at two amplitudes
    rng = np.random.default_rng(seed)
    reference = rng.random((1, 16, 16))
    noise = rng.standard_normal((1, 16, 16))

    # Execute
    small = psnr(reference, reference + sigma * noise)
    large = psnr(reference, reference + sigma * factor * noise)

    # Assert
    assert large < small
    assert small - large == pytest.approx(20 * math.log10(factor), abs=1e-6)


# ---------------------------------------------------------------- ssim


def test_ssim_identical_is_one(seed: int) -> None:
    # Prepare
    image = torch.rand(3, 32, 32)

    # Execute
    value = ssim(image, image.clone())

    # Assert
    assert value == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("shape", "win_size"),
    [((3, 32, 32), 7), ((32, 32), 7), ((1, 32, 32), 7), ((6, 6), 5), ((2, 5, 9), 5)],
)
def test_ssim_matches_skimage(shape: tuple[int, ...], win_size: int) -> None:
    # Prepare
    reference, estimate = _noisy_pair(0, 0.1, shape)
    channel_axis = 0 if len(shape) == 3 else None
    expected = structural_similarity(
        reference, estimate, win_size=win_size, data_range=1.0, channel_axis=channel_axis
    )

    # Execute
    value = ssim(reference, estimate)

    # Assert
    assert value == pytest.approx(float(expected), rel=1e-12)


def test_ssim_accepts_float32_tensors(seed: int) -> None:
    # Prepare
    reference = torch.rand(3, 32, 32, dtype=torch.float32)
    estimate = (reference + 0.1 * torch.randn(3, 32, 32)).to(torch.float16)
    expected = structural_similarity(
        reference.double().numpy(),
        estimate.double().numpy(),
        win_size=7,
        data_range=1.0,
        channel_axis=0,
    )

    # Execute
    value = ssim(reference, estimate)

    # Assert
    assert value == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (8,)])
def test_ssim_rejects_batches_and_vectors(shape: tuple[int, ...]) -> None:
    # Prepare
    image = np.zeros(shape)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"\(H, W\) or \(C, H, W\)"):
        ssim(image, image)


def test_ssim_rejects_tiny_images() -> None:
    # Prepare
    image = np.zeros((3, 2, 8))

    # Execute / Assert
    with pytest.raises(ValueError, match="at least 3x3"):
        ssim(image, image)


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize("metric", [mse, psnr, ssim, image_metrics])
def test_shape_mismatch_names_both_shapes(metric) -> None:
    # Prepare
    reference = np.zeros((3, 32, 32))
    estimate = np.zeros((1, 32, 32))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(1, 32, 32\)"):
        metric(reference, estimate)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("metric", [mse, psnr, ssim, image_metrics])
def test_non_finite_estimate_raises(metric, bad: float) -> None:
    # Prepare
    reference = np.zeros((1, 8, 8))
    estimate = np.zeros((1, 8, 8))
    estimate[0, 3, 4] = bad

    # Execute / Assert
    with pytest.raises(ValueError, match="estimate contains NaN/Inf"):
        metric(reference, estimate)


@pytest.mark.parametrize("data_range", [0.0, -1.0, math.nan])
def test_bad_data_range_raises(data_range: float) -> None:
    # Prepare
    image = np.zeros((8, 8))

    # Execute / Assert
    with pytest.raises(ValueError, match="data_range must be"):
        psnr(image, image, data_range=data_range)


def test_empty_images_raise() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="empty"):
        mse(np.zeros((0, 4)), np.zeros((0, 4)))


# ---------------------------------------------------------------- image_metrics


def test_image_metrics_agrees_with_single_metrics() -> None:
    # Prepare
    reference, estimate = _noisy_pair(1, 0.05)

    # Execute
    result = image_metrics(reference, estimate)

    # Assert
    assert isinstance(result, ImageMetrics)
    assert result.mse == mse(reference, estimate)
    assert result.psnr == psnr(reference, estimate)
    assert result.ssim == ssim(reference, estimate)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.mse = 0.0  # type: ignore[misc]


# ---------------------------------------------------------------- label_accuracy


@pytest.mark.parametrize(
    ("true", "guessed", "expected"),
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
        ([1, 2, 3, 4], [1, 2, 0, 4], 0.75),
        ([0, 0], [1, 1], 0.0),
        ([7], [7], 1.0),
        (torch.tensor([5, 0, 4, 1]), torch.tensor([5, 0, 9, 9]), 0.5),
        (torch.tensor([5, 0, 4]), [5, 1, 4], 2 / 3),
    ],
)
def test_label_accuracy_simple_cases(true, guessed, expected: float) -> None:
    # Execute
    value = label_accuracy(true, guessed)

    # Assert
    assert value == pytest.approx(expected)


def test_label_accuracy_empty_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="empty"):
        label_accuracy([], [])


def test_label_accuracy_length_mismatch_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        label_accuracy([1, 2, 3], [1, 2])
