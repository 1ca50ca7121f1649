"""The attack registry and the DLG gradient-matching baseline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_attack.attacks import ATTACKS, DLGOptions, UnknownAttackError, dlg
from fl_attack.engine import (
    Reconstruction,
    ReconstructionError,
    UnsupportedLayerError,
    reconstruct,
    single_sample_gradients,
    validate,
)
from fl_attack.metrics import psnr
from fl_attack.models import build_model

SHAPE = (1, 8, 8)
LABEL = 2


def _tiny(pool: type[nn.Module] | None = None, channels: int = 4) -> nn.Sequential:
    """One conv (Sigmoid) and a linear layer; optionally a 2x2 pooling between them."""
    layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.Sigmoid()]
    side = 8
    if pool is not None:
        layers.append(pool(2))
        side = 4
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * side * side, 4))


@pytest.fixture
def image(seed: int) -> torch.Tensor:
    # Not the global RNG's first draw: DLG's seed-0 dummy image must not be the answer.
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed + 1))


def test_dlg_recovers_a_tiny_image(image: torch.Tensor) -> None:
    # Prepare
    model = _tiny()
    grads = single_sample_gradients(model, image, LABEL)
    # Execute
    result = ATTACKS["dlg"](model, [grads], SHAPE)[0]
    # Assert
    assert isinstance(result, Reconstruction)
    assert result.label == LABEL
    assert result.layers == ()
    assert result.image.dtype == torch.float64 and tuple(result.image.shape) == SHAPE
    assert psnr(image, result.image) >= 40.0, result.notes
    assert not result.warnings
    assert any("matching loss" in note for note in result.notes)


@pytest.mark.parametrize("pool", [nn.AvgPool2d, nn.MaxPool2d])
def test_dlg_attacks_models_rconv_rejects(pool: type[nn.Module], image: torch.Tensor) -> None:
    # Prepare
    model = _tiny(pool, channels=8)
    grads = single_sample_gradients(model, image, LABEL)
    start = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with pytest.raises(UnsupportedLayerError, match=pool.__name__):
        validate(model, SHAPE)
    # Execute
    result = ATTACKS["dlg"](model, [grads], SHAPE, options=DLGOptions(seed=0))[0]
    # Assert
    assert isinstance(result, Reconstruction)
    assert result.label == LABEL
    assert float(result.image.min()) >= 0.0 and float(result.image.max()) <= 1.0
    if pool is nn.AvgPool2d:
        assert psnr(image, result.image) >= 40.0, result.notes
    else:  # max pooling leaves local minima; the attack must still move towards the image
        assert psnr(image, result.image) > psnr(image, start) + 1.0, result.notes


def test_dlg_runs_in_the_gradients_dtype(image: torch.Tensor) -> None:
    # Prepare
    model = _tiny()
    grads = single_sample_gradients(model, image, LABEL, dtype=torch.float64)
    # Execute
    result = dlg(model, grads, SHAPE, options=DLGOptions(optimizer="adam", max_iterations=3))
    # Assert
    assert result.label == LABEL
    assert torch.get_default_dtype() == torch.float32
    assert any("3 adam steps" in note for note in result.notes)


def test_dlg_errors_are_per_client(image: torch.Tensor) -> None:
    # Prepare
    model = _tiny()
    good = single_sample_gradients(model, image, LABEL)
    zero = {name: torch.zeros_like(g) for name, g in good.items()}
    short = list(good.values())[:-1]
    # Execute
    results = ATTACKS["dlg"](model, [zero, good, short], SHAPE, options=DLGOptions(seed=1))
    # Assert
    assert isinstance(results[0], ReconstructionError) and "zero" in str(results[0])
    assert isinstance(results[1], Reconstruction)
    assert isinstance(results[2], ReconstructionError) and "parameters" in str(results[2])


def test_dlg_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="lbfgs, adam"):
        DLGOptions(optimizer="sgd")
    with pytest.raises(ValueError, match="max_iterations"):
        DLGOptions(max_iterations=0)


def test_unknown_attack_lists_the_registry() -> None:
    with pytest.raises(UnknownAttackError) as info:
        ATTACKS["gradinversion"]
    # Assert: the message names the key and every registered attack; it is also a KeyError.
    assert "gradinversion" in str(info.value)
    assert all(name in str(info.value) for name in ATTACKS)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert set(ATTACKS) == {"rconv", "dlg"}


def test_rconv_through_the_registry_equals_reconstruct(seed: int) -> None:
    # Prepare
    model = build_model("rconv-main", activation="ReLU", in_channels=1, image_size=16, seed=50)
    images = torch.rand(2, 1, 16, 16)
    grads = [
        single_sample_gradients(model, x, label) for x, label in zip(images, (3, 7), strict=True)
    ]
    # Execute
    via_registry = ATTACKS["rconv"](model, grads, (1, 16, 16))
    direct = [reconstruct(model, g, (1, 16, 16)) for g in grads]
    # Assert
    for got, want in zip(via_registry, direct, strict=True):
        assert isinstance(got, Reconstruction)
        torch.testing.assert_close(got.image, want.image, rtol=0.0, atol=0.0)
        assert got.label == want.label and got.warnings == want.warnings


def test_attacks_reject_the_other_options_type() -> None:
    model = _tiny()
    with pytest.raises(TypeError, match="SolveOptions"):
        ATTACKS["rconv"](model, [], SHAPE, options=DLGOptions())
    with pytest.raises(TypeError, match="DLGOptions"):
        ATTACKS["dlg"](model, [], SHAPE, options=object())  # type: ignore[arg-type]
