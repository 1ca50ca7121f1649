"""The oracle: what every layer really saw, by autograd, to check inverters against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fl_attack.engine.reconstruct import layer_chain

__all__ = ["LayerTrace", "assert_all_close", "trace"]


@dataclass(frozen=True, slots=True)
class LayerTrace:
    """One layer's true input, output and the loss gradients at both (no batch axis).

    Attributes
    ----------
    input, output, grad_input, grad_output : torch.Tensor
        Values and cross-entropy gradients of one sample.
    """

    input: torch.Tensor
    output: torch.Tensor
    grad_input: torch.Tensor
    grad_output: torch.Tensor


def trace(
    model: nn.Module, x: torch.Tensor, label: int, *, dtype: torch.dtype = torch.float64
) -> dict[str, LayerTrace]:
    """Run one sample forward and backward and record every leaf layer's signals.

    Parameters
    ----------
    model : nn.Module
        A chain of layers; it is not modified (a copy runs in ``dtype``).
    x : torch.Tensor
        One sample without the batch axis.
    label : int
        Its class for the cross-entropy loss.
    dtype : torch.dtype
        Precision of the pass.

    Returns
    -------
    dict of str to LayerTrace
        Keyed by qualified layer name, in execution order.
    """
    import copy

    clone = copy.deepcopy(model).to(dtype)
    chain, _ = layer_chain(clone)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            args[0].retain_grad()
            out.retain_grad()
            seen[name] = (args[0], out)

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in chain]
    try:
        with torch.enable_grad():
            inp = x.to(dtype).unsqueeze(0).requires_grad_(True)
            loss = F.cross_entropy(clone(inp), torch.tensor([label]))
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, LayerTrace] = {}
    for name, _ in chain:
        i, o = seen[name]
        assert i.grad is not None and o.grad is not None
        out[name] = LayerTrace(i[0].detach(), o[0].detach(), i.grad[0], o.grad[0])
    return out


def assert_all_close(
    expected: Mapping[str, torch.Tensor],
    actual: Mapping[str, torch.Tensor],
    *,
    rtol: float,
    atol: float,
) -> None:
    """Compare tensors by name; raise one AssertionError listing every mismatch with norms."""
    failures: list[str] = []
    for name, want in expected.items():
        got = actual[name].to(want.dtype).reshape(want.shape)
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError:
            diff = (got - want).abs()
            failures.append(
                f"{name}: |expected|={float(want.norm()):.4g} |actual|={float(got.norm()):.4g} "
                f"max|diff|={float(diff.max()):.3g} mse={float(diff.square().mean()):.3g}"
            )
    if failures:
        raise AssertionError("mismatched tensors:\n  " + "\n  ".join(failures))
