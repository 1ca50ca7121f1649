"""One registry, keyed by layer type, of the inverters the engine knows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

from fl_attack.engine.types import EngineError, LayerDiagnostics, Signal, SolveOptions

__all__ = ["INVERTERS", "Inverter", "inverter_for", "register_inverter", "registered_types"]

Shape = tuple[int, ...]


class Inverter(ABC):
    """Inverts one layer type: from what is known at its output to what is known at its input.

    Subclasses are registered with :func:`register_inverter` and must be stateless.
    """

    @abstractmethod
    def output_shape(self, layer: nn.Module, input_shape: Shape) -> Shape:
        """Shape of the layer's output (no batch axis) for an input of ``input_shape``."""

    def problems(self, layer: nn.Module, input_shape: Shape, *, is_last: bool) -> list[str]:
        """Static reasons this layer cannot be inverted (empty when it can)."""
        return []

    def counts(self, layer: nn.Module, input_shape: Shape) -> tuple[int, int]:
        """Upper bound on independent constraints, and the unknowns, for the layer input."""
        return (0, 0)

    @abstractmethod
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
        """Recover the layer's input signal.

        Parameters
        ----------
        layer : nn.Module
            The layer, with the weights the client started from.
        name : str
            Qualified name, used in diagnostics and errors.
        grads : Mapping[str, torch.Tensor]
            The layer's own parameter gradients (float64), keyed ``weight``/``bias``.
        output : Signal or None
            What is known at the layer's output; None for the model's last layer.
        input_shape : tuple of int
            Shape of the layer's input, without the batch axis.
        options : SolveOptions
            Tolerances for the gradients' dtype.
        input_floor : float, optional
            A known lower bound of the layer input (0 after a ReLU), usable when the
            layer's equations alone leave directions undetermined.
        """

    def invert_many(
        self,
        layer: nn.Module,
        name: str,
        grads: Sequence[Mapping[str, torch.Tensor]],
        outputs: Sequence[Signal | None],
        input_shape: Shape,
        options: Sequence[SolveOptions],
        *,
        input_floor: float | None = None,
    ) -> list[tuple[Signal, LayerDiagnostics] | EngineError]:
        """:meth:`invert` for several clients of one round (the same layer and weights).

        An inverter whose clients share work when they come together (one pass over a
        factorisation for all of them) overrides this; by default each client is inverted
        on its own. The arguments are :meth:`invert`'s, one entry per client where they
        differ.

        Returns
        -------
        list
            Per client, :meth:`invert`'s result or the
            :class:`~fl_attack.engine.EngineError` it raised (one client's bad update does
            not stop the others).
        """
        out: list[tuple[Signal, LayerDiagnostics] | EngineError] = []
        for own, output, opts in zip(grads, outputs, options, strict=True):
            try:
                inverted = self.invert(
                    layer, name, own, output, input_shape, opts, input_floor=input_floor
                )
            except EngineError as exc:
                out.append(exc.with_traceback(None))  # a result now: its frames need not live on
                continue
            out.append(inverted)
        return out

    def output_floor(self, layer: nn.Module) -> float | None:
        """A lower bound every output of this layer satisfies (None if unbounded)."""
        return None


INVERTERS: dict[type[nn.Module], Inverter] = {}

InverterClass = TypeVar("InverterClass", bound=type[Inverter])


def register_inverter(*layer_types: type[nn.Module]) -> Callable[[InverterClass], InverterClass]:
    """Class decorator registering an :class:`Inverter` for one or more layer types.

    Raises
    ------
    ValueError
        If a layer type already has an inverter, or no type is given.
    """
    if not layer_types:
        raise ValueError("register_inverter needs at least one nn.Module subclass")

    def decorate(cls: InverterClass) -> InverterClass:
        for layer_type in layer_types:
            if layer_type in INVERTERS:
                raise ValueError(
                    f"{layer_type.__name__} already has an inverter "
                    f"({type(INVERTERS[layer_type]).__name__}); refusing {cls.__name__}"
                )
            INVERTERS[layer_type] = cls()
        return cls

    return decorate


def inverter_for(layer: nn.Module) -> Inverter | None:
    """The inverter registered for exactly this layer's type, if any."""
    return INVERTERS.get(type(layer))


def registered_types() -> list[str]:
    """Names of the registered layer types, sorted."""
    return sorted(t.__name__ for t in INVERTERS)
