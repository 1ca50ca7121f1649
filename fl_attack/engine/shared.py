"""Work that depends only on a layer's weights, done once and reused for every client.

Every client of a round receives the same model, so a conv layer's weight matrix, its
factorisation and its weakest directions are the same for all of them. They are kept in
a small process-wide cache keyed by a digest of the weights: a new round (new weights)
gets new entries, and attacking image after image on one model reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import SuperLU

__all__ = ["cached", "clear_weight_cache", "for_weights", "weights_key"]

T = TypeVar("T")

# Entries kept: one round of a deep model needs a few per conv layer that uses the cache.
_MAX_ENTRIES = 16
# Memory the cached values may hold together (the newest entry is kept whatever its size).
_MAX_BYTES = 2 * 2**30

_CACHE: OrderedDict[tuple[Hashable, str], tuple[Any, int]] = OrderedDict()
_LOCK = threading.Lock()


def _nbytes(value: object) -> int:
    """Rough memory held by a cached value (tensors, arrays, sparse factors, containers)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if sparse.issparse(value):
        parts = ("data", "indices", "indptr")
        return sum(int(getattr(value, a).nbytes) for a in parts if hasattr(value, a))
    if isinstance(value, SuperLU):  # its own count: reading .L and .U would build them (4 ms)
        return 12 * int(value.nnz)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        flat = t.detach().to("cpu").contiguous()
        h.update(str((flat.dtype, tuple(flat.shape))).encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def for_weights(key: Hashable, weights: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
    """``compute()``, cached under ``key`` and the exact bytes of ``weights``.

    Parameters
    ----------
    key : hashable
        What is computed and for which geometry (e.g. the input shape).
    weights : sequence of torch.Tensor
        Every tensor the result depends on; any change to them is a new entry.
    compute : callable
        Builds the value; called at most once per key and weights while cached.

    Returns
    -------
    The cached value, shared between callers: it must not be modified.
    """
    return cached(weights_key(key, weights), compute)


def weights_key(key: Hashable, weights: Sequence[torch.Tensor]) -> tuple[Hashable, str]:
    """``key`` with a digest of the tensors' dtypes, shapes and exact bytes.

    The identity :func:`for_weights` caches under; equal in every process that holds the
    same weights, so worker processes can share work under it too.
    """
    return key, _digest(weights)


def cached(full: tuple[Hashable, str], compute: Callable[[], T]) -> T:
    """``compute()``, cached under a :func:`weights_key` (see :func:`for_weights`)."""
    with _LOCK:
        if full in _CACHE:
            _CACHE.move_to_end(full)
            return _CACHE[full][0]
    value = compute()  # outside the lock: may take a while, and two equal results are fine
    with _LOCK:
        _CACHE[full] = (value, _nbytes(value))
        _CACHE.move_to_end(full)
        # Oldest first out, past the count or the memory budget; the newest always stays.
        while len(_CACHE) > 1 and (
            len(_CACHE) > _MAX_ENTRIES or sum(size for _, size in _CACHE.values()) > _MAX_BYTES
        ):
            _CACHE.popitem(last=False)
    return value


def clear_weight_cache() -> None:
    """Forget every cached entry (e.g. to time the first client of a round)."""
    with _LOCK:
        _CACHE.clear()
