"""``nn.Flatten``: a reshape, undone by a reshape."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import nn

from fl_attack.engine.registry import Inverter, Shape, register_inverter
from fl_attack.engine.types import LayerDiagnostics, Signal, SolveOptions

__all__ = ["FlattenInverter"]


@register_inverter(nn.Flatten)
class FlattenInverter(Inverter):
    """Reshape values, mask and gradient back to the layer's input shape."""

    def output_shape(self, layer: nn.Module, input_shape: Shape) -> Shape:
        return (math.prod(input_shape),)

    def problems(self, layer: nn.Module, input_shape: Shape, *, is_last: bool) -> list[str]:
        assert isinstance(layer, nn.Flatten)
        out = []
        if (layer.start_dim, layer.end_dim) != (1, -1):
            out.append("only nn.Flatten(start_dim=1, end_dim=-1) is supported")
        if is_last:
            out.append("the last layer must be nn.Linear with bias (label and first gradient)")
        return out

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
        assert output is not None
        start = time.perf_counter()
        signal = Signal(
            value=output.value.reshape(input_shape),
            known=output.known.reshape(input_shape),
            grad=output.grad.reshape(input_shape),
        )
        return signal, LayerDiagnostics(
            name=name, kind="Flatten", constraints="reshape", seconds=time.perf_counter() - start
        )
