"""``nn.LeakyReLU``: invertible everywhere with the layer's own slope."""

from __future__ import annotations

import torch
from torch import nn

from fl_attack.engine.inverters.activation import ActivationInverter, Backward
from fl_attack.engine.registry import register_inverter
from fl_attack.engine.types import SolveOptions

__all__ = ["LeakyReLUInverter"]


@register_inverter(nn.LeakyReLU)
class LeakyReLUInverter(ActivationInverter):
    """``y = O`` if ``O > 0`` else ``slope * O``; the sign of ``y`` is the sign of ``O``."""

    def problems(
        self, layer: nn.Module, input_shape: tuple[int, ...], *, is_last: bool
    ) -> list[str]:
        assert isinstance(layer, nn.LeakyReLU)
        out = super().problems(layer, input_shape, is_last=is_last)
        if layer.negative_slope == 0:
            out.append("negative_slope=0 is a ReLU: use nn.ReLU so zeros are handled as such")
        return out

    def backward(self, layer: nn.Module, y: torch.Tensor, options: SolveOptions) -> Backward:
        assert isinstance(layer, nn.LeakyReLU)
        slope = float(layer.negative_slope)
        positive = y > 0
        top = float(y.abs().max()) if y.numel() else 0.0
        uncertain = y.abs() <= options.zero_rtol * top
        # Built in y's dtype: a float32 0.2 would be off by 1.5e-8, far above float64's noise.
        one, low = torch.ones_like(y), torch.full_like(y, slope)
        derivative = torch.where(positive, one, low)
        return Backward(
            derivative=derivative,
            pre_activation=torch.where(positive, y, y / slope),
            recoverable=torch.ones_like(y, dtype=torch.bool),
            uncertain=uncertain,
            alt_derivative=torch.where(positive, low, one),
            alt_pre_activation=torch.where(positive, y / slope, y),
        )
