"""``nn.Sigmoid``: ``A'(y) = y (1 - y)``; saturated units lose their pre-activation."""

from __future__ import annotations

import torch
from torch import nn

from fl_attack.engine.inverters.activation import ActivationInverter, Backward
from fl_attack.engine.registry import register_inverter
from fl_attack.engine.types import SolveOptions

__all__ = ["SigmoidInverter"]


@register_inverter(nn.Sigmoid)
class SigmoidInverter(ActivationInverter):
    """``O = logit(y)`` where ``y (1 - y)`` is above the dtype's saturation level."""

    def output_floor(self, layer: nn.Module) -> float | None:
        return 0.0

    def backward(self, layer: nn.Module, y: torch.Tensor, options: SolveOptions) -> Backward:
        derivative = y * (1 - y)
        live = derivative > options.saturation
        invertible = derivative > options.inverse_floor
        safe = y.clamp(options.saturation, 1 - options.saturation)
        return Backward(
            derivative=derivative.clamp_min(0.0),
            pre_activation=torch.log(safe) - torch.log1p(-safe),
            recoverable=invertible,
            saturated_units=int((~live).sum()),
        )
