"""The seed architectures of R-CONV's evaluation, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "ARCHITECTURES", "Init", "ModelSpec", "build_model", "init_uniform"]

LEAKY_SLOPE = 0.2

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
}


class Init(StrEnum):
    """Weight initialisation: the seed's U(-0.5, 0.5) or PyTorch's default."""

    UNIFORM = "uniform"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One architecture: conv layers (out channels, stride) and their activations.

    Attributes
    ----------
    convs : tuple of (int, int)
        ``(out_channels, stride)`` of each 5x5, padding-2 convolution.
    activations : tuple of str
        Activation after each convolution; ``"A"`` is the user's choice.
    """

    convs: tuple[tuple[int, int], ...]
    activations: tuple[str, ...]


ARCHITECTURES: dict[str, ModelSpec] = {
    "rconv-main": ModelSpec(
        ((12, 2), (16, 2), (12, 1), (3, 1)), ("LeakyReLU", "LeakyReLU", "A", "A")
    ),
    "lenet": ModelSpec(
        ((12, 2), (16, 2), (12, 1), (12, 1)), ("LeakyReLU", "LeakyReLU", "ReLU", "ReLU")
    ),
    "lenet-o": ModelSpec(
        ((12, 2), (16, 2), (3, 1), (3, 1)), ("LeakyReLU", "LeakyReLU", "ReLU", "ReLU")
    ),
    "o-cnn6": ModelSpec(
        ((12, 2), (16, 2), (3, 1), (3, 1), (3, 1), (3, 1)),
        ("LeakyReLU", "LeakyReLU", "ReLU", "ReLU", "ReLU", "ReLU"),
    ),
    "lenet-4-relu": ModelSpec(
        ((12, 2), (22, 2), (3, 1), (3, 1)), ("LeakyReLU", "ReLU", "ReLU", "ReLU")
    ),
    "lenet-all-relu": ModelSpec(
        ((77, 2), (22, 2), (3, 1), (3, 1)), ("ReLU", "ReLU", "ReLU", "ReLU")
    ),
    "dlg-lenet": ModelSpec(((12, 2), (12, 2), (12, 1)), ("Sigmoid", "Sigmoid", "Sigmoid")),
}


def init_uniform(model: nn.Module, bound: float = 0.5) -> nn.Module:
    """Draw every weight and bias from U(-bound, bound), as the R-CONV reference does."""
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-bound, bound)
    return model


def build_model(
    name: str,
    *,
    activation: str = "ReLU",
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    init: Init | str = Init.UNIFORM,
    seed: int | None = None,
) -> nn.Sequential:
    """Build a seed architecture.

    Parameters
    ----------
    name : str
        One of :data:`ARCHITECTURES`.
    activation : str
        Fills the ``"A"`` slots of ``rconv-main``; one of :data:`ACTIVATIONS`.
    in_channels, num_classes, image_size : int
        Input channels, classes, and the side of the square input.
    init : Init or str
        ``"uniform"`` for U(-0.5, 0.5) or ``"default"`` for PyTorch's initialisation.
    seed : int, optional
        Seeds a private generator for the initial weights (the global RNG is untouched).

    Returns
    -------
    nn.Sequential
        ``features`` (conv + activation pairs), ``flatten`` and ``classifier``.

    Raises
    ------
    ValueError
        On an unknown name, activation or initialisation, or an input too small.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    try:
        init = Init(init)
    except ValueError:
        raise ValueError(
            f"unknown init {init!r}; choose one of {', '.join(i.value for i in Init)}"
        ) from None
    spec = ARCHITECTURES[name]
    fork = torch.random.fork_rng() if seed is not None else None
    with fork if fork is not None else _null():
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for (out_channels, stride), act in zip(spec.convs, spec.activations, strict=True):
            layers.append(nn.Conv2d(channels, out_channels, 5, stride=stride, padding=2))
            layers.append(ACTIVATIONS[activation if act == "A" else act]())
            channels, side = out_channels, (side - 1) // stride + 1
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {name}")
        model = nn.Sequential()
        model.add_module("features", nn.Sequential(*layers))
        model.add_module("flatten", nn.Flatten())
        model.add_module("classifier", nn.Linear(channels * side * side, num_classes))
        if init is Init.UNIFORM:
            init_uniform(model)
    return model


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
