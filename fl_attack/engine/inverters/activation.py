"""Shared shape of the element-wise activation inverters."""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fl_attack.engine.registry import Inverter, Shape
from fl_attack.engine.types import LayerDiagnostics, Signal, SolveOptions

__all__ = ["ActivationInverter", "Backward"]


@dataclass(frozen=True, slots=True)
class Backward:
    """What an activation inverter derives from its output ``y``.

    Attributes
    ----------
    derivative : torch.Tensor
        ``A'(y)``, so that ``dL/dO = dL/dy * A'(y)``.
    pre_activation : torch.Tensor
        ``O = A^{-1}(y)`` where recoverable (anything elsewhere).
    recoverable : torch.Tensor
        Where ``pre_activation`` is exact enough to serve as a weight constraint.
    uncertain : torch.Tensor or None
        Units whose derivative is a close call; ``alt_derivative`` is the other choice.
    alt_pre_activation : torch.Tensor or None
        The pre-activation under the other choice, where it is defined (LeakyReLU: the
        other branch); None when the other choice leaves it unknown (ReLU's zeros).
    zero_units, saturated_units : int
        Counts for the diagnostics.
    """

    derivative: torch.Tensor
    pre_activation: torch.Tensor
    recoverable: torch.Tensor
    uncertain: torch.Tensor | None = None
    alt_derivative: torch.Tensor | None = None
    alt_pre_activation: torch.Tensor | None = None
    zero_units: int = 0
    saturated_units: int = 0


class ActivationInverter(Inverter):
    """Element-wise activation: derivative and inverse from the reconstructed output."""

    def output_shape(self, layer: nn.Module, input_shape: Shape) -> Shape:
        return input_shape

    def problems(self, layer: nn.Module, input_shape: Shape, *, is_last: bool) -> list[str]:
        if is_last:
            return ["the last layer must be nn.Linear with bias (label and first gradient)"]
        return []

    @abstractmethod
    def backward(self, layer: nn.Module, y: torch.Tensor, options: SolveOptions) -> Backward:
        """Derivative and inverse of the activation at the reconstructed output ``y``."""

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
        back = self.backward(layer, output.value, options)
        known = back.recoverable & output.known
        alt, uncertain, value_alt = None, back.uncertain, None
        if uncertain is not None and back.alt_derivative is not None:
            # Outputs the layer above left undetermined are close calls too.
            uncertain = uncertain | ~output.known
            branch_only = known & uncertain & ~_value_settled(output.value, back, options)
            known = known & ~branch_only
            alt = output.grad * back.alt_derivative
            if back.alt_pre_activation is not None and bool(branch_only.any()):
                # Known once the layer below settles the call (LeakyReLU: either branch).
                nan = torch.full_like(back.pre_activation, float("nan"))
                value_alt = torch.where(branch_only, back.alt_pre_activation, nan)
        signal = Signal(
            value=back.pre_activation,
            known=known,
            grad=output.grad * back.derivative,
            uncertain=uncertain,
            grad_alt=alt,
            value_alt=value_alt,
        )
        diag = LayerDiagnostics(
            name=name,
            kind=type(layer).__name__,
            constraints="inverse",
            seconds=time.perf_counter() - start,
            zero_units=back.zero_units,
            saturated_units=back.saturated_units,
            ambiguous_units=int(uncertain.sum()) if uncertain is not None else 0,
        )
        return signal, diag


def _value_settled(y: torch.Tensor, back: Backward, options: SolveOptions) -> torch.Tensor:
    """Close calls whose pre-activation is still fit to be a weight constraint.

    A close call's gradient stays open (the layer below settles it), but its value is
    sound when the call is clear of the noise (``|y|`` above ``sqrt(eps)`` of the largest
    output) or when both calls give the same pre-activation to within that noise level.
    """
    if back.alt_pre_activation is None:
        return torch.zeros_like(y, dtype=torch.bool)
    noise = options.eps**0.5
    clear = y.abs() > noise * float(y.abs().max())
    spread = (back.pre_activation - back.alt_pre_activation).abs()
    same = spread <= noise * float(back.pre_activation.abs().max())
    return clear | same
