"""``nn.Tanh``: ``A'(y) = 1 - y^2``; saturated units lose their pre-activation."""

from __future__ import annotations

import torch
from torch import nn

from fl_attack.engine.inverters.activation import ActivationInverter, Backward
from fl_attack.engine.registry import register_inverter
from fl_attack.engine.types import SolveOptions

__all__ = ["TanhInverter"]


@register_inverter(nn.Tanh)
class TanhInverter(ActivationInverter):
    """``O = atanh(y)`` where ``1 - y^2`` is above the dtype's saturation level."""

    def output_floor(self, layer: nn.Module) -> float | None:
        return -1.0

    def backward(self, layer: nn.Module, y: torch.Tensor, options: SolveOptions) -> Backward:
        derivative = 1 - y * y
        live = derivative > options.saturation
        invertible = derivative > options.inverse_floor
        bound = 1 - options.saturation
        return Backward(
            derivative=derivative.clamp_min(0.0),
            pre_activation=torch.atanh(y.clamp(-bound, bound)),
            recoverable=invertible,
            saturated_units=int((~live).sum()),
        )
