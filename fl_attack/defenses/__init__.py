"""Client-side defenses: transforms of an update before it is sent."""

from __future__ import annotations

from fl_attack.defenses.transforms import (
    Update,
    clip_by_norm,
    gaussian_epsilon,
    gaussian_noise,
    global_norm,
    laplace_noise,
    quantize,
    top_k,
)

__all__ = [
    "Update",
    "clip_by_norm",
    "gaussian_epsilon",
    "gaussian_noise",
    "global_norm",
    "laplace_noise",
    "quantize",
    "top_k",
]
