"""End to end on real training images from ../shared/datasets, float32 as clients send."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from fl_attack.data import load_dataset
from fl_attack.engine import ReconstructionError, reconstruct, single_sample_gradients
from fl_attack.engine.inverters import conv2d
from fl_attack.metrics import psnr
from fl_attack.models import ARCHITECTURES, build_model

reconstruct_module = importlib.import_module("fl_attack.engine.reconstruct")


@pytest.mark.parametrize("dataset", ["MNIST", "CIFAR10", "CIFAR100"])
@pytest.mark.parametrize("activation", ["ReLU", "Tanh"])
def test_rconv_main_float32_leaks_real_images(
    shared_datasets: Path, dataset: str, activation: str
) -> None:
    # Prepare
    data = load_dataset(dataset, root=shared_datasets, limit=3)
    model = build_model(
        "rconv-main",
        activation=activation,
        in_channels=data.channels,
        num_classes=data.num_classes,
        seed=50,
    )
    for index in range(len(data)):
        x, y = data.images[index], int(data.labels[index])
        # Execute
        result = reconstruct(model, single_sample_gradients(model, x, y), tuple(x.shape))
        # Assert
        assert result.label == y
        assert psnr(x, result.image) >= 40.0, (dataset, index, result.warnings)
        assert not [w for w in result.warnings if "rank" in w or "residual" in w]


@pytest.mark.parametrize(
    ("dataset", "index"),
    # Images whose float32 reconstruction fails (a wrong close activation call deep down):
    # the failure must be flagged, never printed as a confident leak.
    [("CIFAR10", 62), ("MNIST", 70)],
)
def test_float32_failures_are_flagged(shared_datasets: Path, dataset: str, index: int) -> None:
    # Prepare
    data = load_dataset(dataset, root=shared_datasets, limit=index + 1)
    x, y = data.images[index], int(data.labels[index])
    model = build_model(
        "rconv-main", in_channels=data.channels, num_classes=data.num_classes, seed=50
    )
    # Execute
    result = reconstruct(model, single_sample_gradients(model, x, y), tuple(x.shape))
    # Assert: a leak, or a warning naming the disagreeing layer.
    assert psnr(x, result.image) >= 40.0 or any("residual" in w for w in result.warnings)


def test_float64_default_init_cifar100_image_92_is_exact(shared_datasets: Path) -> None:
    # Its exact ReLU zeros once opened a wider log-gap than the one between noise and
    # signal, so noise-level zeros were taken for activations (-29 dB).
    data = load_dataset("CIFAR100", root=shared_datasets, limit=93)
    x, y = data.images[92], int(data.labels[92])
    model = build_model("rconv-main", num_classes=100, init="default", seed=50)
    grads = single_sample_gradients(model, x, y, dtype=torch.float64)
    result = reconstruct(model, grads, tuple(x.shape))
    assert psnr(x, result.image) >= 100.0, result.warnings


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_seed_architectures_on_cifar10_image_0(shared_datasets: Path, name: str) -> None:
    # Prepare
    data = load_dataset("CIFAR10", root=shared_datasets, limit=1)
    x, y = data.images[0], int(data.labels[0])
    model = build_model(name, num_classes=10, seed=50)
    grads = single_sample_gradients(model, x, y)
    # Execute / Assert: a leak of at least 40 dB, or a typed refusal that says why.
    if all(float(g.abs().max()) == 0.0 for g in grads.values()):
        with pytest.raises(ReconstructionError, match="bias gradient is all zero"):
            reconstruct(model, grads, (3, 32, 32))
        return
    result = reconstruct(model, grads, (3, 32, 32))
    assert psnr(x, result.image) >= 40.0, result.warnings


def test_default_faces_scenario_model_leaks_in_float32() -> None:
    # The default scenario: embedded faces, rconv-main with ReLU, U(-0.5, 0.5) at seed 50.
    data = load_dataset("faces", limit=8)
    model = build_model("rconv-main", activation="ReLU", in_channels=1, num_classes=2, seed=50)
    for index in range(len(data)):
        x, y = data.images[index], int(data.labels[index])
        result = reconstruct(model, single_sample_gradients(model, x, y), tuple(x.shape))
        assert psnr(x, result.image) >= 40.0, (index, result.warnings)
        assert torch.isfinite(result.image).all()


def test_clearly_settled_leaky_relu_close_calls_pin_their_true_values(
    shared_datasets: Path,
) -> None:
    # Prepare: CIFAR-10 training images whose first LeakyReLU has close calls that leave the
    # first conv layer's outputs open (rconv-main, U(-0.5, 0.5), seed 50, float32).
    data = load_dataset("CIFAR10", root=shared_datasets, limit=8)
    model = build_model(
        "rconv-main", activation="ReLU", in_channels=3, num_classes=10, init="uniform", seed=50
    )
    first_conv = model.get_submodule("features.0")
    route = reconstruct_module._Route.of(model, (3, 32, 32))
    pinned_total = 0
    for index in range(len(data)):
        x, y = data.images[index], int(data.labels[index])
        grads = single_sample_gradients(model, x, y)
        # Execute: the signal at the first layer's output, its close calls settled
        partial = reconstruct_module._upper_layers(route, grads, None, None, 0.0)
        signal = partial.signal
        assert signal is not None
        result = reconstruct(model, grads, (3, 32, 32))
        pinned = result.layers[-1].pinned_units
        pinned_total += pinned
        if signal.value_alt is None:
            assert pinned == 0
            continue
        settled = conv2d.settle_by_bias(
            signal.grad,
            signal.grad_alt,
            signal.uncertain,
            partial.named["features.0.bias"],
            eps=partial.options.eps,
        )
        pin = settled.clear & ~signal.known & signal.value_alt.isfinite()
        chosen = torch.where(settled.took_alt, signal.value_alt, signal.value)[pin]
        other = torch.where(settled.took_alt, signal.value, signal.value_alt)[pin]
        with torch.no_grad():
            truth = first_conv(x.unsqueeze(0)).double()[0][pin]
        # Assert: each pinned value is the true pre-activation's branch, far closer to it
        # than the other; the result counts them and still leaks the image.
        assert int(pin.sum()) == pinned
        assert bool(((chosen - truth).abs() * 10 < (other - truth).abs()).all()), index
        assert psnr(x, result.image) >= 60.0, (index, result.warnings)
    assert pinned_total > 0
