"""Work that depends only on the weights, done once for all the clients of a round."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["per_round", "shared_round"]

T = TypeVar("T")

_ROUND: ContextVar[dict[Hashable, Any] | None] = ContextVar("fl_attack_round", default=None)


@contextmanager
def shared_round() -> Iterator[None]:
    """Within the block, :func:`per_round` computes each key once and then reuses it.

    The model must not change inside the block: keys name layers, not their weights.
    """
    token = _ROUND.set({})
    try:
        yield
    finally:
        _ROUND.reset(token)


def per_round(key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, cached under ``key`` for the current :func:`shared_round` (if any).

    The cached value is shared between clients and must not be modified.
    """
    cache = _ROUND.get()
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]
