"""``nn.ReLU``: a unit is active where its reconstructed output is clearly above noise."""

from __future__ import annotations

import torch
from torch import nn

from fl_attack.engine.inverters.activation import ActivationInverter, Backward
from fl_attack.engine.registry import register_inverter
from fl_attack.engine.types import SolveOptions

__all__ = ["ReLUInverter", "zero_threshold"]

# A ReLU zero reconstructed from float32 gradients sits at noise level; real activations
# sit decades above it. A gap this wide in log-magnitude separates the two groups.
_MIN_GAP_DECADES = 1.5
_SEARCH_CEILING = 1e-2
# Outputs within this factor of the threshold are close calls, settled by the layer below.
_BAND = 10.0


def zero_threshold(y: torch.Tensor, options: SolveOptions) -> float:
    """Magnitude under which a reconstructed ReLU output is an exact zero.

    The widest gap (in decades) among the small magnitudes separates noise from real
    activations; without a clear gap, fall back to ``zero_rtol * max|y|``.
    """
    mags = y.abs().reshape(-1)
    top = float(mags.max()) if mags.numel() else 0.0
    if top == 0.0:
        return 0.0
    fallback = options.zero_rtol * top
    # Anything below eps * max|y| is zero at this precision: exact zeros and the tiniest
    # noise form one cluster instead of opening a gap of their own (in float64 a gap from
    # exact zeros up to 1e-12 noise was once wider than the one from noise up to signal).
    logs = torch.log10((mags / top).clamp_min(options.eps)).sort().values
    logs = logs[logs <= torch.log10(torch.tensor(_SEARCH_CEILING, dtype=logs.dtype))]
    if logs.numel() < 2:
        return fallback
    # Include the step from the largest small value up to the search ceiling.
    ceiling = torch.tensor([float(torch.log10(torch.tensor(_SEARCH_CEILING)))], dtype=logs.dtype)
    edges = torch.cat([logs, ceiling])
    gaps = edges[1:] - edges[:-1]
    k = int(gaps.argmax())
    if float(gaps[k]) < _MIN_GAP_DECADES:
        return fallback
    return float(10 ** ((edges[k] + edges[k + 1]) / 2)) * top


@register_inverter(nn.ReLU)
class ReLUInverter(ActivationInverter):
    """``y = max(O, 0)``: derivative ``[y > tau]``; ``O = y`` only where active."""

    def output_floor(self, layer: nn.Module) -> float | None:
        return 0.0

    def backward(self, layer: nn.Module, y: torch.Tensor, options: SolveOptions) -> Backward:
        tau = zero_threshold(y, options)
        active = y > tau
        uncertain = (y.abs() > tau / _BAND) & (y.abs() < tau * _BAND)
        derivative = active.to(y.dtype)
        return Backward(
            derivative=derivative,
            pre_activation=torch.where(active, y, torch.zeros_like(y)),
            recoverable=active,
            uncertain=uncertain,
            alt_derivative=1 - derivative,
            zero_units=int((~active).sum()),
        )
