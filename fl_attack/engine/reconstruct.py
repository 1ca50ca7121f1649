"""The R-CONV attack: walk a layer chain from the output down, one inverter per layer."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fl_attack.engine.evidence import gather_evidence
from fl_attack.engine.registry import Shape, inverter_for, registered_types
from fl_attack.engine.types import (
    EngineError,
    LayerDiagnostics,
    Reconstruction,
    ReconstructionError,
    Signal,
    SolveOptions,
    UnsupportedLayerError,
)
from fl_attack.engine.workers import Staged, attack_each

# A layer's relative residual above this many sqrt(eps) means its constraints disagree:
# exact single-sample gradients leave ~1e-5 in float32 (1e-10 in float64), updates derived
# as (global - update) / lr up to ~2e-4, while a wrong activation call leaves >= 4e-3.
_RESIDUAL_FACTOR = 3.0

__all__ = [
    "check",
    "layer_chain",
    "named_gradients",
    "reconstruct",
    "reconstruct_many",
    "single_sample_gradients",
    "validate",
]

Gradients = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def layer_chain(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Leaf layers in execution order, and the containers that make the order unknowable."""
    if not list(model.children()):
        return [("", model)], []
    leaves: list[tuple[str, nn.Module]] = []
    problems: list[str] = []
    for name, module in model.named_modules():
        children = list(module.children())
        if children and not isinstance(module, nn.Sequential):
            where = name or "<model>"
            problems.append(
                f"{where} ({type(module).__name__}): a container with its own forward(); "
                "R-CONV needs a plain chain of layers (nest them in nn.Sequential)"
            )
        elif not children:
            leaves.append((name, module))
    return leaves, problems


def _shapes(chain: list[tuple[str, nn.Module]], input_shape: Shape) -> list[Shape]:
    """Input shape of every layer, plus the final output shape."""
    shapes = [input_shape]
    for _, layer in chain:
        inverter = inverter_for(layer)
        assert inverter is not None
        shapes.append(inverter.output_shape(layer, shapes[-1]))
    return shapes


def check(model: nn.Module, input_shape: Shape) -> list[str]:
    """Every static reason ``model`` cannot be inverted for inputs of ``input_shape``.

    Parameters
    ----------
    model : nn.Module
        A chain of layers (``nn.Sequential``, possibly nested).
    input_shape : tuple of int
        One sample's shape, without the batch axis, e.g. ``(3, 32, 32)``.

    Returns
    -------
    list of str
        One line per problem, naming the layer (``features.3 (MaxPool2d)``); empty if none.
    """
    if not input_shape or any(int(s) <= 0 for s in input_shape):
        return [f"input_shape must be positive sizes without the batch axis, got {input_shape}"]
    chain, problems = layer_chain(model)
    unsupported = [(n, m) for n, m in chain if inverter_for(m) is None]
    for name, module in unsupported:
        problems.append(
            f"{name or '<model>'} ({type(module).__name__}): no inverter for this layer type; "
            f"supported: {', '.join(registered_types())}"
        )
    if problems:
        return problems
    if not chain:
        return ["<empty>: the last layer must be nn.Linear with bias"]
    # A non-linear last layer is reported once, by its own inverter (is_last below).
    shape: Shape = tuple(int(s) for s in input_shape)
    for index, (name, layer) in enumerate(chain):
        inverter = inverter_for(layer)
        assert inverter is not None
        is_last = index == len(chain) - 1
        issues = inverter.problems(
            layer, shape, is_last=is_last and not isinstance(layer, nn.Linear)
        )
        problems.extend(f"{name} ({type(layer).__name__}): {issue}" for issue in issues)
        if issues:
            break  # later shapes are meaningless
        shape = inverter.output_shape(layer, shape)
    return problems


def validate(model: nn.Module, input_shape: Shape, *, probe: bool = False) -> None:
    """Raise if R-CONV cannot invert ``model``, naming every reason at once.

    Parameters
    ----------
    model : nn.Module
        The model the clients train.
    input_shape : tuple of int
        One sample's shape, without the batch axis.
    probe : bool, optional
        Also attack a random input in float64 with the model's own weights and report
        any layer whose constraints have numerical rank below its unknowns.

    Raises
    ------
    UnsupportedLayerError
        With one line per problem: the layer's qualified name, its type, why, and the fix.
    """
    problems = check(model, input_shape)
    if not problems and probe:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(input_shape, generator=gen, dtype=torch.float64)
        grads = single_sample_gradients(model, x, 0, dtype=torch.float64)
        result = reconstruct(model, grads, input_shape)
        problems = [
            f"{d.name} ({d.kind}): constraints of numerical rank {d.rank} for {d.unknowns} "
            "unknowns on a random input: the layer input is not determined"
            for d in result.layers
            if d.rank_deficient
        ]
    if problems:
        raise UnsupportedLayerError(problems)


def single_sample_gradients(
    model: nn.Module, x: torch.Tensor, label: int, *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Cross-entropy gradients of one sample, as a client computes them (the oracle).

    Parameters
    ----------
    model : nn.Module
        Model whose parameters the gradients are taken of (left unchanged).
    x : torch.Tensor
        One sample without the batch axis.
    label : int
        Its class.
    dtype : torch.dtype
        Precision of the forward/backward pass (float32, as a client runs it, by default).

    Returns
    -------
    dict of str to torch.Tensor
        Gradients keyed by ``model.named_parameters()`` names, in ``dtype``.
    """
    params = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
    with torch.enable_grad():
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        logits = torch.func.functional_call(model, leaves, (x.to(dtype).unsqueeze(0),))
        loss = F.cross_entropy(logits, torch.tensor([label]))
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def named_gradients(model: nn.Module, gradients: Gradients) -> dict[str, torch.Tensor]:
    """Check names, shapes and values of the gradients; return them keyed by name.

    Raises
    ------
    ReconstructionError
        Naming the parameter that is missing, extra, mis-shaped, not floating or not finite.
    """
    params = dict(model.named_parameters())
    if isinstance(gradients, Mapping):
        missing = sorted(set(params) - set(gradients))
        extra = sorted(set(gradients) - set(params))
        if missing or extra:
            raise ReconstructionError(
                f"gradients do not match the model's parameters: missing {missing}, "
                f"unexpected {extra}; pass one tensor per model.named_parameters() entry"
            )
        named = {n: gradients[n] for n in params}
    else:
        if len(gradients) != len(params):
            raise ReconstructionError(
                f"got {len(gradients)} gradient tensors for {len(params)} parameters; "
                "pass them in model.parameters() order"
            )
        named = dict(zip(params, gradients, strict=True))
    for name, grad in named.items():
        if not isinstance(grad, torch.Tensor):
            raise ReconstructionError(f"gradient {name!r} is a {type(grad).__name__}, not a tensor")
        if tuple(grad.shape) != tuple(params[name].shape):
            raise ReconstructionError(
                f"gradient {name!r} has shape {tuple(grad.shape)}, the parameter has "
                f"{tuple(params[name].shape)}"
            )
        if not grad.is_floating_point():
            raise ReconstructionError(f"gradient {name!r} has dtype {grad.dtype}, not floating")
        if not bool(torch.isfinite(grad).all()):
            raise ReconstructionError(f"gradient {name!r} contains NaN or Inf")
    return named


def reconstruct(
    model: nn.Module,
    gradients: Gradients,
    input_shape: Shape,
    *,
    options: SolveOptions | None = None,
    input_floor: float | None = None,
) -> Reconstruction:
    """Recover one client's input from its single-sample gradients (R-CONV).

    Parameters
    ----------
    model : nn.Module
        The model with the weights the gradients were taken at: a chain of registered
        layers ending in ``nn.Linear`` with bias.
    gradients : Mapping[str, torch.Tensor] or Sequence[torch.Tensor]
        One gradient per parameter, keyed by ``named_parameters()`` name or in
        ``parameters()`` order, in any floating dtype (float32 as clients send them).
    input_shape : tuple of int
        One sample's shape without the batch axis, e.g. ``(3, 32, 32)``.
    options : SolveOptions, optional
        Tolerances; by default derived from the gradients' dtype.
    input_floor : float, optional
        A known lower bound of the input (0 for images in [0, 1]); used only where the
        first layer's equations leave directions undetermined.

    Returns
    -------
    Reconstruction
        Image (float64), label, per-layer diagnostics and warnings.

    Raises
    ------
    UnsupportedLayerError
        If :func:`check` finds a problem with the model.
    ReconstructionError
        If the gradients do not fit the model or carry no information.

    References
    ----------
    .. [1] T. Eltaras et al., "R-CONV: An Analytical Approach for Efficient Data
       Reconstruction via Convolutional Gradients", WISE 2024, arXiv:2406.04227.
    """
    start = time.perf_counter()
    shape: Shape = tuple(int(s) for s in input_shape)
    problems = check(model, shape)
    if problems:
        raise UnsupportedLayerError(problems)
    route = _Route.of(model, shape)
    partial = _upper_layers(route, gradients, options, input_floor, start)
    return _first_layer(route, input_floor, partial, time.perf_counter())


@dataclass(frozen=True, slots=True)
class _Route:
    """A checked model's layers in order and each one's input shape: worked out once a round."""

    model: nn.Module
    chain: list[tuple[str, nn.Module]]
    shapes: list[Shape]  # every layer's input shape, then the output's

    @classmethod
    def of(cls, model: nn.Module, shape: Shape) -> _Route:
        chain, _ = layer_chain(model)
        return cls(model, chain, _shapes(chain, shape))


@dataclass(frozen=True, slots=True)
class _Partial:
    """One client's inversion down to the first layer's output: stage one of a round.

    The first layer left (in rconv-main, the big shared factorisation) costs about the same
    for every client; the layers above are where some clients cost far more (rank-deficient
    layers): a round runs every client's upper layers before any first layer (``Staged``).
    """

    signal: Signal | None  # None if the first layer is the only one
    diagnostics: tuple[LayerDiagnostics, ...]
    named: dict[str, torch.Tensor]  # the client's gradients by name, checked
    options: SolveOptions
    seconds: float


def _upper_layers(
    route: _Route,
    gradients: Gradients,
    options: SolveOptions | None,
    input_floor: float | None,
    start: float,
) -> _Partial:
    """Every layer but the first, from the output down (the model has passed :func:`check`)."""
    named = named_gradients(route.model, gradients)
    if options is None:
        dtypes = {g.dtype for g in named.values()}
        worst = min(dtypes, key=lambda d: torch.finfo(d).bits)
        options = SolveOptions.for_dtype(worst)
    signal, diagnostics = _invert(route, named, options, input_floor, None, [], 1)
    seconds = time.perf_counter() - start
    return _Partial(signal, tuple(diagnostics), dict(named), options, seconds)


def _first_layer(
    route: _Route, input_floor: float | None, partial: _Partial, start: float
) -> Reconstruction:
    """The first layer below :func:`_upper_layers`' result, then the label and evidence."""
    signal, diagnostics = _invert(
        route,
        partial.named,
        partial.options,
        input_floor,
        partial.signal,
        list(partial.diagnostics),
        0,
    )
    assert signal is not None
    return _finished(route, partial, signal, diagnostics, time.perf_counter() - start)


def _first_layers(
    route: _Route, input_floor: float | None, partials: Sequence[_Partial]
) -> list[Reconstruction | EngineError]:
    """:func:`_first_layer` of several clients at once: the layer's inverter may share work
    among them (:meth:`~fl_attack.engine.registry.Inverter.invert_many`)."""
    name, layer = route.chain[0]
    inverter = inverter_for(layer)
    assert inverter is not None
    with torch.no_grad():
        inverted = inverter.invert_many(
            layer,
            name,
            [_own_gradients(partial.named, name, layer) for partial in partials],
            [partial.signal for partial in partials],
            route.shapes[0],
            [partial.options for partial in partials],
            input_floor=input_floor,
        )
    out: list[Reconstruction | EngineError] = []
    for partial, outcome in zip(partials, inverted, strict=True):
        if isinstance(outcome, EngineError):
            out.append(outcome)
            continue
        start = time.perf_counter()
        signal, diag = outcome
        diagnostics = [*partial.diagnostics, diag]
        try:
            # The layer's time is its diagnostics' (with its share of the batch's work).
            seconds = diag.seconds + time.perf_counter() - start
            out.append(_finished(route, partial, signal, diagnostics, seconds))
        except EngineError as exc:
            out.append(exc.with_traceback(None))
    return out


def _finished(
    route: _Route,
    partial: _Partial,
    signal: Signal,
    diagnostics: list[LayerDiagnostics],
    seconds: float,
) -> Reconstruction:
    """A client's result from its first layer's input: label, findings and evidence.

    ``diagnostics`` are every layer's, the first one's last; ``seconds`` is the time spent
    below the upper layers so far (the evidence adds its own).
    """
    start = time.perf_counter()
    named, options = partial.named, partial.options
    last_bias = named[_prefix(route.chain[-1][0]) + "bias"]
    label = int(last_bias.argmin())
    warnings, notes = _findings(diagnostics, last_bias, options)
    image = signal.value.reshape(route.shapes[0])
    # Was this one sample's gradient at all? (noise, a batch, several steps: estimate only)
    evidence = gather_evidence(route.model, named, image, label, tuple(diagnostics), options)
    return Reconstruction(
        image=image,
        label=label,
        layers=tuple(diagnostics),
        seconds=partial.seconds + seconds + time.perf_counter() - start,
        warnings=tuple(warnings),
        notes=tuple(notes),
        evidence=evidence,
    )


def _own_gradients(
    named: Mapping[str, torch.Tensor], name: str, layer: nn.Module
) -> dict[str, torch.Tensor]:
    """The layer's own parameter gradients, by local name, in float64."""
    return {
        local: named[_prefix(name) + local].to(torch.float64)
        for local, _ in layer.named_parameters(recurse=False)
    }


def _prefix(name: str) -> str:
    return name + "." if name else ""


def _invert(
    route: _Route,
    named: Mapping[str, torch.Tensor],
    options: SolveOptions,
    input_floor: float | None,
    signal: Signal | None,
    diagnostics: list[LayerDiagnostics],
    lowest: int,
) -> tuple[Signal | None, list[LayerDiagnostics]]:
    """Invert the chain's layers from the one above ``signal`` down to index ``lowest``."""
    chain, shapes = route.chain, route.shapes
    top = len(chain) - 1 - len(diagnostics)
    with torch.no_grad():
        for index in range(top, lowest - 1, -1):
            name, layer = chain[index]
            inverter = inverter_for(layer)
            assert inverter is not None
            own = _own_gradients(named, name, layer)
            below = inverter_for(chain[index - 1][1]) if index > 0 else None
            floor = below.output_floor(chain[index - 1][1]) if below is not None else input_floor
            signal, diag = inverter.invert(
                layer, name, own, signal, shapes[index], options, input_floor=floor
            )
            diagnostics.append(diag)
    return signal, diagnostics


def reconstruct_many(
    model: nn.Module,
    gradients: Sequence[Gradients],
    input_shape: Shape,
    *,
    options: SolveOptions | None = None,
    input_floor: float | None = None,
    workers: int = 1,
) -> list[Reconstruction | EngineError]:
    """Attack many clients that share one model (one round): the per-weight work is shared.

    Parameters
    ----------
    model, input_shape, options, input_floor
        As for :func:`reconstruct`.
    gradients : sequence of gradients
        One entry per client, each as :func:`reconstruct` takes it.
    workers : int, optional
        Processes to spread the clients over, e.g. one per core
        (:func:`fl_attack.engine.available_cores`); 1, the default, attacks them one after
        another in this process. Each worker builds the per-weights work it needs and runs
        one thread, so results agree with a run in this process to rounding.

    Returns
    -------
    list of Reconstruction or EngineError
        In the order of ``gradients``; a client whose gradients cannot be inverted gets its
        error in place of a result, so one bad update does not stop the round.
    """
    shape: Shape = tuple(int(s) for s in input_shape)
    # Once for the round: every client has the same model.
    problems = check(model, shape)
    if problems:
        return attack_each(functools.partial(_refused, problems), gradients, 1)
    route = _Route.of(model, shape)
    # Module-level stages: a round pickles, so the workers can stand from round to round.
    # Per-weight work (e.g. a conv layer's factorisation) is cached by the weights' digest
    # (fl_attack.engine.shared), so the first client of a process pays for it.
    stages = Staged(
        functools.partial(_upper_stage, route, options, input_floor),
        # Several clients' first layers at once: one pass over a shared factorisation.
        second_many=functools.partial(_first_stages, route, input_floor),
    )
    return attack_each(stages, gradients, workers)


def _refused(problems: list[str], grads: Gradients) -> Reconstruction:
    """A round on a model that :func:`check` rejects: the same error for every client."""
    del grads
    raise UnsupportedLayerError(problems)


def _upper_stage(
    route: _Route, options: SolveOptions | None, input_floor: float | None, grads: Gradients
) -> _Partial:
    return _upper_layers(route, grads, options, input_floor, time.perf_counter())


def _first_stages(
    route: _Route, input_floor: float | None, grads: list[Gradients], partials: list[_Partial]
) -> list[Reconstruction | EngineError]:
    del grads  # checked and carried in the partials
    return _first_layers(route, input_floor, partials)


def _findings(
    diagnostics: list[LayerDiagnostics], bias_grad: torch.Tensor, options: SolveOptions
) -> tuple[list[str], list[str]]:
    """Warnings (the image may be wrong) and notes (information lost, input still fixed)."""
    residual_limit = _RESIDUAL_FACTOR * options.eps**0.5
    warnings: list[str] = []
    notes: list[str] = []
    # One cross-entropy sample: only the true class has p - 1 <= 0 (0 once float32 rounds
    # p = 1); every other entry is p > 0 or, rounded, 0 too.
    non_positive = int((bias_grad <= 0).sum())
    negative = int((bias_grad < 0).sum())
    if negative != 1 and not (negative == 0 and non_positive == 1):
        warnings.append(
            f"label: {negative} negative bias-gradient entries (a single cross-entropy sample "
            "has exactly one): the label guess is unreliable"
        )
    for d in diagnostics:
        if d.rank_deficient:
            warnings.append(
                f"{d.name} ({d.kind}): rank {d.rank} < {d.unknowns} unknowns: "
                f"{d.unknowns - d.rank} directions of its input are lost"
            )
        if d.relative_residual > residual_limit and d.unknowns:
            warnings.append(
                f"{d.name} ({d.kind}): relative residual {d.relative_residual:.2g}: the "
                "constraints disagree (noise, or not a single-sample gradient)"
            )
        if d.unresolved_units:
            notes.append(
                f"{d.name} ({d.kind}): {d.unresolved_units} close-call activations above it "
                "were too many to settle by its bias gradient and kept their threshold call"
            )
        if d.saturated_units:
            notes.append(
                f"{d.name} ({d.kind}): {d.saturated_units} saturated units (derivative and "
                "pre-activation lost at this precision)"
            )
        if "bound" in d.constraints:
            notes.append(
                f"{d.name} ({d.kind}): equations alone left directions open; the zeros of "
                "the activation below pinned them (bounded least squares)"
            )
    return warnings, notes
