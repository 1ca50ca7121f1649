"""Update transforms a client applies before it replies: noise, clipping, sparsity, rounding.

Every transform maps an update (a mapping of parameter name to the change ``w_new - w``)
to a new one and never mutates its input. Randomness comes from an explicit generator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from scipy import optimize, stats

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

Update = dict[str, torch.Tensor]


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all entries of an update taken together."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))


def _scale(update: Mapping[str, torch.Tensor], scale: float, relative: bool) -> float:
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"noise scale must be finite and >= 0, got {scale}")
    return scale * global_norm(update) if relative else scale


def gaussian_noise(
    update: Mapping[str, torch.Tensor],
    sigma: float,
    *,
    relative: bool = False,
    generator: torch.Generator,
) -> Update:
    """Add i.i.d. N(0, s^2) noise; ``s = sigma`` or ``sigma * ||update||`` when relative."""
    std = _scale(update, sigma, relative)
    return {
        name: t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * std
        for name, t in update.items()
    }


def laplace_noise(
    update: Mapping[str, torch.Tensor],
    scale: float,
    *,
    relative: bool = False,
    generator: torch.Generator,
) -> Update:
    """Add i.i.d. Laplace(0, b) noise; ``b = scale`` or ``scale * ||update||`` when relative."""
    b = _scale(update, scale, relative)
    out: Update = {}
    for name, t in update.items():
        uniform = torch.rand(t.shape, generator=generator, dtype=torch.float64) - 0.5
        noise = -b * torch.sign(uniform) * torch.log1p(-2 * uniform.abs())
        out[name] = t + noise.to(t.dtype)
    return out


def clip_by_norm(update: Mapping[str, torch.Tensor], clip_norm: float) -> Update:
    """Scale the whole update down to global L2 norm ``clip_norm`` if it is longer."""
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    norm = global_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: t * factor for name, t in update.items()}


def top_k(update: Mapping[str, torch.Tensor], fraction: float) -> Update:
    """Keep the largest-magnitude ``fraction`` of each tensor's entries; zero the rest.

    This is the gradient pruning that DLG evaluates as a defense.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    out: Update = {}
    for name, t in update.items():
        k = max(1, math.ceil(fraction * t.numel()))
        flat = t.reshape(-1)
        keep = flat.abs().topk(k).indices
        kept = torch.zeros_like(flat)
        kept[keep] = flat[keep]
        out[name] = kept.reshape(t.shape)
    return out


def quantize(update: Mapping[str, torch.Tensor], fmt: str) -> Update:
    """Round each tensor to ``fp16`` or to symmetric per-tensor ``int8``, then back."""
    if fmt == "fp16":
        return {name: t.to(torch.float16).to(t.dtype) for name, t in update.items()}
    if fmt == "int8":
        out: Update = {}
        for name, t in update.items():
            peak = float(t.abs().max()) if t.numel() else 0.0
            step = peak / 127 if peak > 0 else 1.0
            out[name] = (torch.round(t / step).clamp(-127, 127) * step).to(t.dtype)
        return out
    raise ValueError(f"unknown quantisation {fmt!r}; choose one of fp16, int8")


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Epsilon of one release of the Gaussian mechanism (analytic calibration).

    With sensitivity ``C`` (the clip norm) and noise ``sigma = z * C``, the smallest
    epsilon for which the release is (epsilon, delta)-DP (Balle and Wang, ICML 2018,
    Theorem 8). Per client and per round; composition over rounds is not included.
    """
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    z = noise_multiplier

    def excess(eps: float) -> float:
        a = stats.norm.cdf(1 / (2 * z) - eps * z)
        b = math.exp(eps) * stats.norm.cdf(-1 / (2 * z) - eps * z) if eps < 700 else 0.0
        return a - b - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
        if high > 1e6:
            return math.inf
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-10))
