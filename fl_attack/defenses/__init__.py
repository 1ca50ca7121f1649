"""Client-side defenses: transforms of an update before it is sent, and their client mods."""

from __future__ import annotations

from fl_attack.defenses.mods import (
    ClipNoiseMod,
    NoiseMod,
    QuantizeMod,
    TopKMod,
    UpdateMod,
    defense_epsilon,
    make_defense_mod,
)
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
    "ClipNoiseMod",
    "NoiseMod",
    "QuantizeMod",
    "TopKMod",
    "Update",
    "UpdateMod",
    "clip_by_norm",
    "defense_epsilon",
    "gaussian_epsilon",
    "gaussian_noise",
    "global_norm",
    "laplace_noise",
    "make_defense_mod",
    "quantize",
    "top_k",
]
