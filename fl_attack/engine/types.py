"""Typed values that cross the engine's boundary: signals, diagnostics, results, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fl_attack.engine.evidence import Evidence

__all__ = [
    "EngineError",
    "LayerDiagnostics",
    "Reconstruction",
    "ReconstructionError",
    "Signal",
    "SolveOptions",
    "UnsupportedLayerError",
]


class EngineError(ValueError):
    """Base class of every error the engine raises on bad input."""


class UnsupportedLayerError(EngineError):
    """A model cannot be inverted; the message lists every offending layer and why."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the model cannot be inverted by R-CONV:\n{lines}")

    def __reduce__(self) -> tuple[type[UnsupportedLayerError], tuple[list[str]]]:
        """Pickle by its problems (the default would pass the message as ``problems``)."""
        return (type(self), (list(self.problems),))


class ReconstructionError(EngineError):
    """The gradients handed in cannot be inverted (wrong names/shapes, no signal, NaN)."""


@dataclass(frozen=True, slots=True)
class SolveOptions:
    """Numerical tolerances, derived once from the dtype of the gradients.

    Attributes
    ----------
    eps : float
        Unit round-off of the gradients' dtype (what the client computed in).
    rank_rtol : float
        Singular values below ``rank_rtol * sigma_max`` count as lost information.
    zero_rtol : float
        Fallback relative threshold under which a ReLU output counts as an exact zero.
    saturation : float
        A Sigmoid/Tanh unit whose derivative is below this is saturated: the client's
        own gradient through it is lost to rounding.
    inverse_floor : float
        Sigmoid/Tanh pre-activations are used as weight constraints only where the
        derivative exceeds this: inverting a flat curve amplifies the output's error.
    """

    eps: float
    rank_rtol: float
    zero_rtol: float
    saturation: float
    inverse_floor: float

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> SolveOptions:
        """Tolerances suited to gradients computed in ``dtype``."""
        eps = float(torch.finfo(dtype).eps)
        if dtype == torch.float64:
            return cls(
                eps=eps, rank_rtol=1e-7, zero_rtol=1e-8, saturation=1e-12, inverse_floor=1e-5
            )
        # float32/bfloat16/float16: information below ~sqrt(eps) is noise.
        return cls(eps=eps, rank_rtol=3e-5, zero_rtol=1e-3, saturation=1e-6, inverse_floor=1e-2)


@dataclass(frozen=True, slots=True)
class Signal:
    """What the attacker knows about one tensor flowing between two layers.

    Attributes
    ----------
    value : torch.Tensor
        Reconstructed values (float64); entries where ``known`` is False are estimates only.
    known : torch.Tensor
        Boolean mask: entries whose value can serve as an exact constraint.
    grad : torch.Tensor
        Gradient of the loss with respect to this tensor (float64).
    uncertain : torch.Tensor or None
        Entries whose gradient depends on a decision taken near its threshold (a ReLU
        output at noise level); the layer below settles them against its bias gradient.
    grad_alt : torch.Tensor or None
        The gradient those entries would have had under the other decision.
    value_alt : torch.Tensor or None
        The value under the other decision where that decision is the only doubt about an
        entry's value (``known`` is False there; NaN elsewhere): once the layer below has
        settled the decision (see ``settle_by_bias``), that entry is known again.
    """

    value: torch.Tensor
    known: torch.Tensor
    grad: torch.Tensor
    uncertain: torch.Tensor | None = None
    grad_alt: torch.Tensor | None = None
    value_alt: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class LayerDiagnostics:
    """How one layer was inverted.

    Attributes
    ----------
    name : str
        Qualified module name (``features.3``).
    kind : str
        Module type name.
    equations : int
        Constraint rows used (after dropping empty ones).
    unknowns : int
        Entries of the layer input solved for (0 for layers that only map values).
    rank : int
        Numerical rank of the system at the dtype's tolerance; ``rank < unknowns`` means
        information is lost and the input is only partly determined.
    relative_residual : float
        ``||A z - b|| / ||b||`` of the row-normalised system.
    constraints : str
        Which constraints were used: ``"gradient"``, ``"gradient+weight"``, ``"inverse"``, ...
    seconds : float
        Wall time spent on the layer.
    zero_units : int
        Activation outputs taken as exact zeros (ReLU), whose pre-activation is unknown.
    saturated_units : int
        Sigmoid/Tanh outputs pushed to their bounds: derivative and pre-activation lost.
    ambiguous_units : int
        Units whose classification (zero/positive, sign) lies within a decade of the threshold.
    resolved_units : int
        Ambiguous units of the layer above settled by matching this layer's bias gradient.
    unresolved_units : int
        Ambiguous units that the bias gradient could not settle (too many, or no match).
    pinned_units : int
        Settled units of the layer above whose value, unknown until their decision was
        settled, then served as a weight constraint (the match stood clear of the others).
    """

    name: str
    kind: str
    equations: int = 0
    unknowns: int = 0
    rank: int = 0
    relative_residual: float = 0.0
    constraints: str = "inverse"
    seconds: float = 0.0
    zero_units: int = 0
    saturated_units: int = 0
    ambiguous_units: int = 0
    resolved_units: int = 0
    unresolved_units: int = 0
    pinned_units: int = 0

    @property
    def rank_deficient(self) -> bool:
        """True when the layer's constraints do not determine its input."""
        return self.unknowns > 0 and self.rank < self.unknowns


@dataclass(frozen=True, slots=True)
class Reconstruction:
    """Result of one analytic attack.

    Attributes
    ----------
    image : torch.Tensor
        The recovered input, float64, shape ``input_shape`` (no batch axis, not clipped).
    label : int
        Label recovered from the sign of the last linear layer's bias gradient.
    layers : tuple[LayerDiagnostics, ...]
        Per-layer diagnostics, from the output layer down to the input.
    seconds : float
        Total wall time.
    warnings : tuple[str, ...]
        Reasons the image may be wrong: rank loss, residuals, close calls left unsettled,
        an unreliable label. Empty when every layer was fully determined.
    notes : tuple[str, ...]
        Information lost without leaving the input open (saturated units, directions
        pinned by activation zeros).
    evidence : Evidence or None
        Whether the gradients were one sample's at all (``leak``), or noised, or a sum
        of several samples or steps; see :mod:`fl_attack.engine.evidence`.
    """

    image: torch.Tensor
    label: int
    layers: tuple[LayerDiagnostics, ...]
    seconds: float
    warnings: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())
    evidence: Evidence | None = field(default=None)

    @property
    def exact(self) -> bool:
        """True when no layer lost information (no warnings)."""
        return not self.warnings
