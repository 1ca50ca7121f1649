"""Gradient matching (DLG / iDLG): the optimisation baseline R-CONV is measured against.

A dummy image is optimised with L-BFGS until the gradients it produces match the client's,
with the label recovered analytically first (iDLG). Any differentiable model whose last
linear layer has a bias can be attacked, including ones R-CONV's ``validate`` rejects
(pooling, for instance). Pure torch: no flwr, no scenario config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fl_attack.engine.reconstruct import named_gradients
from fl_attack.engine.types import EngineError, Reconstruction, ReconstructionError
from fl_attack.engine.workers import attack_each

__all__ = ["OPTIMIZERS", "DLGOptions", "dlg", "dlg_many"]

Gradients = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

# A matching loss this far below the gradients' own squared norm is as good as it gets in
# the gradients' precision; stop there rather than chase rounding noise.
_CONVERGED_FACTOR = {torch.float64: 1e-20, torch.float32: 1e-12}
# Final relative loss above which the image is reported as unreliable.
_WARN_RELATIVE_LOSS = 1e-4

OPTIMIZERS: dict[str, float] = {"lbfgs": 1.0, "adam": 0.01}
"""The optimizers :class:`DLGOptions` accepts, with their default step length."""


@dataclass(frozen=True, slots=True)
class DLGOptions:
    """Budget and stopping rules of the gradient-matching optimisation.

    Attributes
    ----------
    optimizer : str
        ``"lbfgs"`` (DLG's choice; strong-Wolfe line search, its memory restarted when a
        step makes no progress) or ``"adam"`` (projected onto [0, 1] after every update).
    max_iterations : int
        Outer steps; each runs up to ``inner_iterations`` loss evaluations.
    inner_iterations : int
        ``max_iter`` of ``torch.optim.LBFGS`` per outer step (DLG uses 20), or Adam updates
        per outer step.
    max_seconds : float or None
        Wall-time budget per client; ``None`` for no limit.
    plateau_rtol : float
        Stop when the loss improved by less than this fraction over ``patience`` steps.
    patience : int
        Outer steps the plateau test looks back.
    lr : float or None
        Step length; ``None`` means 1 for L-BFGS (as DLG) and 0.01 for Adam.
    seed : int
        Seeds the dummy image (uniform in [0, 1]), so a run is reproducible.
    """

    optimizer: str = "lbfgs"
    max_iterations: int = 300
    inner_iterations: int = 20
    max_seconds: float | None = 120.0
    plateau_rtol: float = 1e-4
    patience: int = 10
    lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject budgets that could never run or never stop."""
        if self.max_iterations < 1 or self.inner_iterations < 1 or self.patience < 1:
            raise ValueError(
                "DLGOptions: max_iterations, inner_iterations and patience must be >= 1, got "
                f"{self.max_iterations}, {self.inner_iterations}, {self.patience}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"DLGOptions: max_seconds must be > 0 or None, got {self.max_seconds}")
        if not (math.isfinite(self.plateau_rtol) and self.plateau_rtol >= 0):
            raise ValueError(f"DLGOptions: plateau_rtol must be >= 0, got {self.plateau_rtol}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"DLGOptions: lr must be > 0 or None, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"DLGOptions: unknown optimizer {self.optimizer!r}; choose one of "
                f"{', '.join(OPTIMIZERS)}"
            )

    @property
    def step_length(self) -> float:
        """The learning rate in use: ``lr``, or the optimizer's default."""
        return self.lr if self.lr is not None else OPTIMIZERS[self.optimizer]


def dlg(
    model: nn.Module,
    gradients: Gradients,
    input_shape: tuple[int, ...],
    *,
    options: DLGOptions | None = None,
) -> Reconstruction:
    """Recover one client's input by gradient matching (iDLG: analytic label, L-BFGS image).

    Parameters
    ----------
    model : nn.Module
        The model at the weights the gradients were taken at; any differentiable model
        whose last ``nn.Linear`` (in ``modules()`` order) is the output layer, with bias.
    gradients : Mapping[str, torch.Tensor] or Sequence[torch.Tensor]
        One cross-entropy gradient per parameter, keyed by ``named_parameters()`` name or in
        ``parameters()`` order. The attack runs in their dtype (float32 or float64).
    input_shape : tuple of int
        One sample's shape without the batch axis, e.g. ``(3, 32, 32)``.
    options : DLGOptions, optional
        Budget and stopping rules; the defaults follow DLG (L-BFGS, up to 300 steps).

    Returns
    -------
    Reconstruction
        The image clamped to [0, 1] (float64), the label, no per-layer diagnostics
        (``layers`` is empty), the wall time; ``notes`` give the final matching loss,
        the iterations and why it stopped; ``warnings`` flag a loss that stayed high.

    Raises
    ------
    ReconstructionError
        If the gradients do not fit the model, are not finite, or are all zero, or the model
        has no final linear layer with bias.

    References
    ----------
    .. [1] L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019.
    .. [2] B. Zhao, K. R. Mopuri, H. Bilen, "iDLG: Improved Deep Leakage from Gradients",
       arXiv:2001.02610, 2020.
    """
    opts = options or DLGOptions()
    start = time.perf_counter()
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ReconstructionError(f"input_shape must be positive sizes, got {input_shape}")
    named = named_gradients(model, gradients)
    dtype = min((g.dtype for g in named.values()), key=lambda d: torch.finfo(d).bits)
    label = _label(model, named)
    target = [g.detach().to(dtype) for g in named.values()]
    scale = float(sum(float((t.double() ** 2).sum()) for t in target))
    if scale == 0.0:
        raise ReconstructionError(
            "every gradient is zero (a saturated loss): there is nothing to match"
        )
    params = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
    labels = torch.tensor([label])
    gen = torch.Generator().manual_seed(opts.seed)
    dummy = torch.rand((1, *shape), generator=gen, dtype=dtype).requires_grad_(True)

    def make_optimizer() -> torch.optim.Optimizer:
        if opts.optimizer == "adam":
            return torch.optim.Adam([dummy], lr=opts.step_length)
        # Tolerances at 0: stopping is decided below, relative to the gradients' own scale.
        return torch.optim.LBFGS(
            [dummy],
            lr=opts.step_length,
            max_iter=opts.inner_iterations,
            history_size=100,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

    optimizer = make_optimizer()

    def matching() -> torch.Tensor:
        # Sum of squared differences over every parameter's gradient (DLG's loss).
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        logits = torch.func.functional_call(model, leaves, (dummy,))
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        return sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = matching()
        loss.backward()
        return loss

    def step() -> float:
        if opts.optimizer == "lbfgs":
            return float(optimizer.step(closure).detach())
        for _ in range(opts.inner_iterations):
            loss = float(optimizer.step(closure).detach())
            with torch.no_grad():
                dummy.clamp_(0.0, 1.0)
        return loss

    converged = _CONVERGED_FACTOR.get(dtype, 1e-12) * scale
    best: list[float] = []  # best loss so far, after each outer step
    reason = f"budget of {opts.max_iterations} steps"
    steps = restarts = 0
    with torch.enable_grad():
        while steps < opts.max_iterations:
            steps += 1
            loss = step()
            if not math.isfinite(loss):
                reason = "loss became non-finite"
                break
            if opts.optimizer == "lbfgs" and best and loss >= best[-1]:
                # A failed line search leaves L-BFGS stuck on its curvature memory.
                optimizer = make_optimizer()
                restarts += 1
            best.append(min(loss, best[-1]) if best else loss)
            if loss <= converged:
                reason = "converged"
                break
            if len(best) > opts.patience:
                before = best[-1 - opts.patience]
                if before - best[-1] <= opts.plateau_rtol * before:
                    reason = "plateau"
                    break
            if opts.max_seconds is not None and time.perf_counter() - start > opts.max_seconds:
                reason = f"time budget of {opts.max_seconds:g} s"
                break
        # step() returns the loss before the last update: evaluate the final image.
        final = float(matching().detach())
    image = dummy.detach().reshape(shape).to(torch.float64).clamp(0.0, 1.0)
    if not bool(torch.isfinite(image).all()):
        image = torch.nan_to_num(image, nan=0.5).clamp(0.0, 1.0)
    relative = final / scale if math.isfinite(final) else math.inf
    warnings = []
    if not relative <= _WARN_RELATIVE_LOSS:
        warnings.append(
            f"dlg: the gradients were matched only to a relative loss of {relative:.2g} "
            f"({reason}): the image may be far from the client's"
        )
    notes = (
        f"dlg: matching loss {final:.3g} (relative {relative:.2g}) after {steps} {opts.optimizer} "
        f"steps of {opts.inner_iterations} ({restarts} restarts), stopped by {reason}",
    )
    return Reconstruction(
        image=image,
        label=label,
        layers=(),
        seconds=time.perf_counter() - start,
        warnings=tuple(warnings),
        notes=notes,
    )


def dlg_many(
    model: nn.Module,
    gradients: Sequence[Gradients],
    input_shape: tuple[int, ...],
    *,
    options: DLGOptions | None = None,
    workers: int = 1,
) -> list[Reconstruction | EngineError]:
    """Run :func:`dlg` on every client of a round; a failing client gets its error in place.

    Parameters
    ----------
    model, input_shape, options
        As for :func:`dlg`.
    gradients : sequence of gradients
        One entry per client.
    workers : int, optional
        Processes to spread the clients over (1: one after another in this process).

    Returns
    -------
    list of Reconstruction or EngineError
        In the order of ``gradients``.
    """
    return attack_each(
        lambda grads: dlg(model, grads, input_shape, options=options), gradients, workers
    )


def _label(model: nn.Module, named: dict[str, torch.Tensor]) -> int:
    """The label from the output layer's bias gradient: the one negative entry (iDLG)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1][1].bias is None:
        raise ReconstructionError(
            "dlg needs the model's last nn.Linear to be its output layer, with bias, to "
            "recover the label; add a bias to the classifier"
        )
    name = linears[-1][0]
    return int(named[f"{name}.bias" if name else "bias"].argmin())
