"""Attacks: reconstruction methods behind one interface, registered by name.

An *attack* takes the model at the round's weights, every client's gradients and the input
shape, and returns one :class:`~fl_attack.engine.Reconstruction` (or the
:class:`~fl_attack.engine.EngineError` that stopped it) per client. ``"rconv"`` is the
analytic R-CONV engine, ``"dlg"`` the gradient-matching baseline. Pure torch: no flwr, no
scenario config.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_attack.attacks.dlg import DLGOptions, dlg, dlg_many
from fl_attack.engine import (
    EngineError,
    Reconstruction,
    SolveOptions,
    reconstruct_many,
    validate,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "DLGAttack",
    "DLGOptions",
    "RConvAttack",
    "UnknownAttackError",
    "dlg",
    "dlg_many",
]

Gradients = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
Options = SolveOptions | DLGOptions


class UnknownAttackError(ValueError, KeyError):
    """An attack name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:
        """The plain message (a KeyError would quote it)."""
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class RConvAttack:
    """The analytic R-CONV attack (:func:`fl_attack.engine.reconstruct_many`).

    Attributes
    ----------
    name : str
        ``"rconv"``.
    analytic : bool
        True: the model must pass :func:`fl_attack.engine.validate` first.
    """

    name: str = "rconv"
    analytic: bool = True

    def validate(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Raise :class:`~fl_attack.engine.UnsupportedLayerError` if R-CONV cannot invert."""
        validate(model, input_shape)

    def __call__(
        self,
        model: nn.Module,
        gradients: Sequence[Gradients],
        input_shape: tuple[int, ...],
        *,
        options: Options | None = None,
        workers: int = 1,
    ) -> list[Reconstruction | EngineError]:
        """Invert every client's gradients over ``workers`` processes.

        ``options`` must be ``SolveOptions`` or None.
        """
        if options is not None and not isinstance(options, SolveOptions):
            raise TypeError(f"attack 'rconv' takes SolveOptions, got {type(options).__name__}")
        return reconstruct_many(model, gradients, input_shape, options=options, workers=workers)


@dataclass(frozen=True, slots=True)
class DLGAttack:
    """The gradient-matching baseline (:func:`fl_attack.attacks.dlg.dlg`).

    Attributes
    ----------
    name : str
        ``"dlg"``.
    analytic : bool
        False: any differentiable model with a final linear layer will do.
    """

    name: str = "dlg"
    analytic: bool = False

    def validate(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Nothing to check before the attack: DLG needs no invertible layers."""

    def __call__(
        self,
        model: nn.Module,
        gradients: Sequence[Gradients],
        input_shape: tuple[int, ...],
        *,
        options: Options | None = None,
        workers: int = 1,
    ) -> list[Reconstruction | EngineError]:
        """Attack every client's gradients over ``workers`` processes.

        ``options`` must be ``DLGOptions`` or None.
        """
        if options is not None and not isinstance(options, DLGOptions):
            raise TypeError(f"attack 'dlg' takes DLGOptions, got {type(options).__name__}")
        return dlg_many(model, gradients, input_shape, options=options, workers=workers)


Attack = RConvAttack | DLGAttack


class _Registry(Mapping[str, Attack]):
    """Read-only name -> attack mapping whose misses list the registered names."""

    def __init__(self, *attacks: Attack) -> None:
        self._attacks: dict[str, Attack] = {}
        for attack in attacks:
            if attack.name in self._attacks:
                raise ValueError(f"attack {attack.name!r} is registered twice")
            self._attacks[attack.name] = attack

    def __getitem__(self, name: str) -> Attack:
        try:
            return self._attacks[name]
        except KeyError:
            raise UnknownAttackError(
                f"unknown attack {name!r}; choose one of {', '.join(self._attacks)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._attacks)

    def __len__(self) -> int:
        return len(self._attacks)


ATTACKS: Mapping[str, Attack] = _Registry(RConvAttack(), DLGAttack())
"""Every attack by name; an unknown name raises :class:`UnknownAttackError` listing them."""
