"""``nn.Linear``: the rank-one weight gradient gives the layer input in closed form."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from fl_attack.engine.registry import Inverter, Shape, register_inverter
from fl_attack.engine.types import LayerDiagnostics, ReconstructionError, Signal, SolveOptions

__all__ = ["LinearInverter"]


@register_inverter(nn.Linear)
class LinearInverter(Inverter):
    """``dL/dW = g x^T`` with ``g = dL/db``: ``x = g^T dL/dW / g^T g``; ``dL/dx = W^T g``.

    Notes
    -----
    Least squares over all rows, rather than one division by a possibly tiny ``g_m``,
    keeps float32 noise from being amplified.
    """

    def output_shape(self, layer: nn.Module, input_shape: Shape) -> Shape:
        assert isinstance(layer, nn.Linear)
        return (layer.out_features,)

    def problems(self, layer: nn.Module, input_shape: Shape, *, is_last: bool) -> list[str]:
        assert isinstance(layer, nn.Linear)
        out: list[str] = []
        if layer.bias is None:
            out.append("has no bias: its bias gradient is what reveals the input (use bias=True)")
        if input_shape != (layer.in_features,):
            out.append(
                f"expects a flat input of {layer.in_features} features, gets shape {input_shape}"
                " (add nn.Flatten before it)"
            )
        return out

    def counts(self, layer: nn.Module, input_shape: Shape) -> tuple[int, int]:
        assert isinstance(layer, nn.Linear)
        return layer.in_features, layer.in_features

    def invert(
        self,
        layer: nn.Module,
        name: str,
        grads: Mapping[str, torch.Tensor],
        output: Signal | None,
        input_shape: Shape,
        options: SolveOptions,
        *,
        input_floor: float | None = None,
    ) -> tuple[Signal, LayerDiagnostics]:
        assert isinstance(layer, nn.Linear)
        start = time.perf_counter()
        g = grads["bias"]
        d_weight = grads["weight"]
        gg = float(g @ g)
        if gg == 0.0 or gg < (options.eps * float(d_weight.abs().max())) ** 2:
            raise ReconstructionError(
                f"layer {name} (Linear): the bias gradient is all zero, so the update carries "
                "no information on the input (the loss is saturated or this is not a gradient)"
            )
        x = (g @ d_weight) / gg
        resid = (d_weight - torch.outer(g, x)).norm() / d_weight.norm().clamp_min(1e-300)
        weight = layer.weight.detach().to(torch.float64)
        diag = LayerDiagnostics(
            name=name,
            kind="Linear",
            equations=d_weight.numel(),
            unknowns=x.numel(),
            rank=x.numel(),
            relative_residual=float(resid),
            constraints="gradient",
            seconds=time.perf_counter() - start,
        )
        signal = Signal(value=x, known=torch.ones_like(x, dtype=torch.bool), grad=weight.T @ g)
        return signal, diag
