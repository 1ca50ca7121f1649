"""Seed model zoo: the architectures of the R-CONV evaluation, by name."""

from __future__ import annotations

from fl_attack.models.zoo import (
    ACTIVATIONS,
    ARCHITECTURES,
    Init,
    ModelSpec,
    build_model,
    init_uniform,
)

__all__ = ["ACTIVATIONS", "ARCHITECTURES", "Init", "ModelSpec", "build_model", "init_uniform"]
