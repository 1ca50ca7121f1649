"""Is this update a single-sample gradient? Evidence for or against, from the tensors alone.

A defense (noise, sparsification, a larger batch, several local steps) turns a client's
update into something R-CONV can still "invert", but whose inverse is an estimate at best.
:func:`gather_evidence` checks the update against what every single-sample cross-entropy
gradient satisfies, and :class:`Evidence` carries the numbers and a :class:`Verdict`, so a
report can say "not a single-sample gradient" or "noise detected, estimate only" instead of
presenting garbage as a leak.

The checks (all thresholds come from the gradients' dtype, through
:class:`~fl_attack.engine.types.SolveOptions`):

- the last linear layer's weight gradient of one sample is ``g x^T`` with ``g`` its bias
  gradient: rank one, its left singular vector along ``g``;
- a residual from that rank-one form is either isotropic (i.i.d. noise: its singular values
  fill the Marchenko-Pastur bulk of its shape) or structured (several samples, several
  steps, sparsification: a few directions carry it);
- the recovered input, fed through the model with the recovered label, reproduces the
  gradients it came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from fl_attack.engine.types import LayerDiagnostics, SolveOptions

__all__ = ["Evidence", "Verdict", "gather_evidence", "isotropic_spread"]


class Verdict(StrEnum):
    """What the update is, as far as the evidence tells.

    ``leak``: consistent with one sample's gradient at the dtype's precision; the
    reconstruction is the client's input (up to the engine's own warnings).
    ``noise-detected``: a single-sample gradient plus isotropic noise; the image is an
    estimate only. ``not-single-sample``: the update is not one sample's gradient (a batch,
    several local steps, sparsified); the image is no client's input.
    """

    LEAK = "leak"
    NOISE_DETECTED = "noise-detected"
    NOT_SINGLE_SAMPLE = "not-single-sample"


@dataclass(frozen=True, slots=True)
class Evidence:
    """The checks behind a verdict.

    Attributes
    ----------
    verdict : Verdict
        The conclusion.
    tolerance : float
        Relative error a single-sample gradient may show at the dtype's precision
        (``sqrt(eps)``: 3.5e-4 for float32, 1.5e-8 for float64).
    rank_one_residual : float
        ``sqrt(sum_{i>=2} s_i^2) / ||dW||`` of the last linear layer's weight gradient
        (``s_i`` its singular values): 0 for one sample.
    bias_misalignment : float
        Sine of the angle between that gradient's leading left singular vector and the
        bias gradient: 0 for one sample (``dW = g x^T``).
    residual_spread : float
        Smallest over largest singular value of the rank-one residual (``s_m / s_2``);
        ``nan`` when it has fewer than two.
    isotropic_spread : float
        Half the ratio i.i.d. noise of that shape gives (Marchenko-Pastur edges); a
        residual spread at or above it counts as noise.
    gradient_scale : float
        ``c`` of the best fit ``g = c (softmax(W x + b) - onehot(y))`` with
        ``x = dW^T g / ||g||^2`` read off the linear layer's gradient and ``W, b`` its
        weights: 1 for one sample's gradient, below 1 once clipped (or for a batch mean
        dominated by one sample), about ``k`` for ``k`` local steps on one sample.
    softmax_residual : float
        ``||c (softmax(W x + b) - onehot(y)) - g|| / ||g||``: one sample's input reproduces
        its own bias gradient (up to the scale); a sum over samples or steps does not.
    reproduction_residual : float
        ``||grad(x_hat, y_hat) - grad|| / ||grad||`` over all parameters, with the
        engine's recovered input and label (reported, not used for the verdict: an input
        with directions the engine could not determine need not reproduce it).
    layer_residual : float
        Largest relative residual of the engine's per-layer solves.
    negative_bias_entries : int
        Negative entries of the last bias gradient (one sample has exactly one, or none
        with a single zero when float32 rounds its probability to 1).
    reasons : tuple of str
        One line per failed check, with its numbers.
    """

    verdict: Verdict
    tolerance: float
    rank_one_residual: float
    bias_misalignment: float
    residual_spread: float
    isotropic_spread: float
    gradient_scale: float
    softmax_residual: float
    reproduction_residual: float
    layer_residual: float
    negative_bias_entries: int
    reasons: tuple[str, ...] = ()

    @property
    def is_leak(self) -> bool:
        """True when the verdict is :attr:`Verdict.LEAK`."""
        return self.verdict is Verdict.LEAK


def isotropic_spread(rows: int, cols: int) -> float:
    """Half the smallest-to-largest singular value ratio of an i.i.d. ``rows x cols`` matrix.

    Parameters
    ----------
    rows, cols : int
        Shape of the residual (``rows`` of its singular values can be nonzero).

    Returns
    -------
    float
        ``(1 - sqrt(q)) / (1 + sqrt(q)) / 2`` with ``q = min / max`` (Marchenko-Pastur);
        the factor 1/2 leaves room for the finite-size spread of the edges.
        0 when ``q >= 1`` would make it meaningless.

    References
    ----------
    .. [1] V. A. Marchenko, L. A. Pastur, "Distribution of eigenvalues for some sets of
       random matrices", Math. USSR-Sbornik 1(4), 1967.
    """
    small, large = min(rows, cols), max(rows, cols)
    if small < 1 or large < 1:
        return 0.0
    root = math.sqrt(small / large)
    return max(0.0, (1.0 - root) / (1.0 + root) / 2.0)


def gather_evidence(
    model: nn.Module,
    gradients: Mapping[str, torch.Tensor],
    image: torch.Tensor,
    label: int,
    layers: tuple[LayerDiagnostics, ...],
    options: SolveOptions,
) -> Evidence:
    """Check an update against what one sample's gradient must satisfy.

    Parameters
    ----------
    model : nn.Module
        The model the gradients were taken of (a chain ending in ``nn.Linear`` with bias),
        with the weights the client received.
    gradients : Mapping[str, torch.Tensor]
        The update's gradients keyed by ``model.named_parameters()`` names.
    image : torch.Tensor
        The recovered input, without the batch axis.
    label : int
        The recovered label.
    layers : tuple of LayerDiagnostics
        The engine's per-layer diagnostics.
    options : SolveOptions
        Tolerances of the gradients' dtype.

    Returns
    -------
    Evidence
        The numbers and the verdict: ``leak`` when the linear layer's gradient is rank one
        along its bias gradient, the input read off it reproduces that bias gradient and
        exactly one class has a negative bias gradient; otherwise ``noise-detected`` when
        the rank-one residual is isotropic and either too large or joined by more than one
        negative bias entry, and ``not-single-sample`` when it is structured or the linear
        layer is rank one but inconsistent (e.g. several steps on one sample:
        ``dW = k g x^T`` but the bias gradient is ``k`` times too long).

    Notes
    -----
    The tolerance is ``sqrt(eps)`` of the dtype: a client computing in float32 and the
    server reading ``(global - update) / lr`` lose about half the digits, no more. A
    last layer with two outputs has a rank-one weight gradient for any batch (the rows of
    ``dW`` sum to zero), so there only the reproduction check can tell.
    """
    tolerance = math.sqrt(options.eps)
    params = dict(model.named_parameters())
    linear_name = _last_linear(model)
    weight = gradients[f"{linear_name}weight"].to(torch.float64)
    bias = gradients[f"{linear_name}bias"].to(torch.float64)
    # Rows whose gradient rounded to exact zeros carry neither signal nor noise.
    active = (weight != 0).any(dim=1) | (bias != 0)
    rows, cols = int(active.sum()), weight.shape[1]
    # One SVD serves both checks: inactive rows are zero in the weight gradient and
    # (by definition) in the bias gradient, so they change neither.
    left_vectors, singular, _ = torch.linalg.svd(weight[active], full_matrices=False)
    total = float(singular.norm())
    rest = float(singular[1:].norm()) if singular.numel() > 1 else 0.0
    rank_one = rest / total if total > 0 else math.inf
    bias_norm = float(bias.norm())
    cosine = 0.0
    if bias_norm > 0 and total > 0:
        cosine = abs(float(left_vectors[:, 0] @ bias[active])) / bias_norm
    misalignment = math.sqrt(max(0.0, 1.0 - min(1.0, cosine) ** 2))
    tail = singular[1:]
    spread = float(tail[-1] / tail[0]) if tail.numel() >= 2 and float(tail[0]) > 0 else math.nan
    isotropic = isotropic_spread(min(rows, cols) - 1, max(rows, cols) - 1)
    scale, softmax = _softmax_residual(model, linear_name, weight, bias)
    reproduction = _reproduction_residual(model, params, gradients, image, label)
    solved = [d.relative_residual for d in layers if d.unknowns]
    layer_residual = max(solved, default=0.0)
    negative = int((bias < 0).sum())
    one_label = negative == 1 or (negative == 0 and int((bias <= 0).sum()) == 1)

    where = linear_name.rstrip(".") or "<model>"
    reasons: list[str] = []
    if rank_one > tolerance:
        reasons.append(
            f"{where}: weight gradient {rank_one:.2g} away from rank one (one sample gives 0; "
            f"tolerance {tolerance:.2g})"
        )
    if misalignment > tolerance:
        reasons.append(
            f"{where}: weight gradient not along the bias gradient (sine {misalignment:.2g}; "
            f"tolerance {tolerance:.2g})"
        )
    if softmax > tolerance:
        reasons.append(
            f"{where}: the input read off the weight gradient does not reproduce the bias "
            f"gradient, softmax(W x + b) - onehot (off by {softmax:.2g}; tolerance "
            f"{tolerance:.2g})"
        )
    elif not abs(scale - 1.0) <= tolerance:
        cause = (
            "a sum of several gradients of one sample (local steps)"
            if scale > 1
            else "clipped, or a batch mean whose other samples' gradients vanish (the image "
            "may still be one sample's)"
        )
        reasons.append(
            f"{where}: the bias gradient is {scale:.4g} times the one its own input gives: {cause}"
        )
    if not one_label:
        reasons.append(
            f"{where}: {negative} negative bias-gradient entries (one sample has exactly one)"
        )
    linear_consistent = rank_one <= tolerance and misalignment <= tolerance
    if not reasons:
        verdict = Verdict.LEAK
    elif (not math.isnan(spread) and spread >= isotropic) and (
        not linear_consistent or not one_label
    ):
        # Isotropic residual, and noise's footprint: off rank one, or several classes
        # pushed below zero (sums of one sample's steps keep exactly one negative class).
        verdict = Verdict.NOISE_DETECTED
        reasons.append(
            f"the residual is isotropic (singular-value spread {spread:.2f} >= "
            f"{isotropic:.2f}, as for i.i.d. noise): a noised gradient, the image is an "
            "estimate only"
        )
    else:
        verdict = Verdict.NOT_SINGLE_SAMPLE
        if not linear_consistent and not math.isnan(spread):
            reasons.append(
                f"the residual is structured (singular-value spread {spread:.2g} < "
                f"{isotropic:.2f} of i.i.d. noise): several samples or steps, or a sparsified "
                "update"
            )
    return Evidence(
        verdict=verdict,
        tolerance=tolerance,
        rank_one_residual=rank_one,
        bias_misalignment=misalignment,
        residual_spread=spread,
        isotropic_spread=isotropic,
        gradient_scale=scale,
        softmax_residual=softmax,
        reproduction_residual=reproduction,
        layer_residual=layer_residual,
        negative_bias_entries=negative,
        reasons=tuple(reasons),
    )


def _last_linear(model: nn.Module) -> str:
    """Name prefix (``"classifier."``) of the model's last ``nn.Linear``."""
    name = ""
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = f"{qualified}." if qualified else ""
    return name


def _softmax_residual(
    model: nn.Module, linear_name: str, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[float, float]:
    """Scale and relative misfit of the bias gradient against ``softmax(W x + b) - e_y``."""
    bias_norm = float(bias.norm())
    if bias_norm == 0:
        return math.nan, math.inf
    layer = model.get_submodule(linear_name.rstrip(".")) if linear_name else model
    x = weight.T @ bias / bias_norm**2  # exact for dW = c g x^T, db = c g, any scale c
    logits = layer.weight.detach().to(torch.float64) @ x + layer.bias.detach().to(torch.float64)
    own = torch.softmax(logits, dim=0)
    own[int(bias.argmin())] -= 1.0
    own_norm = float(own.norm())
    if own_norm == 0:
        return math.nan, math.inf
    scale = float(own @ bias) / own_norm**2
    return scale, float((scale * own - bias).norm()) / bias_norm


def _reproduction_residual(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    gradients: Mapping[str, torch.Tensor],
    image: torch.Tensor,
    label: int,
) -> float:
    """Relative distance between the gradients of (image, label) and the given ones."""
    if not bool(torch.isfinite(image).all()):
        return math.inf
    leaves = {
        n: p.detach().to(torch.float64).clone().requires_grad_(True) for n, p in params.items()
    }
    with torch.enable_grad():
        logits = torch.func.functional_call(model, leaves, (image.to(torch.float64).unsqueeze(0),))
        loss = F.cross_entropy(logits, torch.tensor([label]))
        own = torch.autograd.grad(loss, list(leaves.values()))
    diff = 0.0
    norm = 0.0
    for name, mine in zip(leaves, own, strict=True):
        given = gradients[name].to(torch.float64)
        diff += float((mine - given).square().sum())
        norm += float(given.square().sum())
    return math.sqrt(diff / norm) if norm > 0 else math.inf
