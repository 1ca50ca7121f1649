"""The per-weights cache: what it keeps, how it sizes entries, what it forgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse
from scipy.sparse.linalg import splu

from fl_attack.engine import shared
from fl_attack.engine.solve import sparse_lu


def test_a_factorisation_is_sized_by_its_own_entries() -> None:
    # Prepare: a sparse LU, alone and inside the dataclass that carries it.
    matrix = sparse.random(60, 60, density=0.1, format="csc", random_state=3)
    matrix = (matrix + sparse.eye(60, format="csc") * 4).tocsc()
    lu = splu(matrix)
    ordered = sparse_lu(matrix)
    # Execute / Assert: 12 bytes an entry (a float64 and an int32 index), as SuperLU counts
    # them; the dataclass adds its order array.
    assert shared._nbytes(lu) == 12 * lu.nnz
    assert shared._nbytes(ordered) == 12 * ordered.lu.nnz + ordered.order.nbytes


def test_the_cache_forgets_its_oldest_entries_past_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a budget of two 8 KiB entries.
    shared.clear_weight_cache()
    monkeypatch.setattr(shared, "_MAX_BYTES", 2 * 8192)
    weights = [torch.ones(3)]
    computed: list[str] = []

    def entry(name: str) -> np.ndarray:
        def compute() -> np.ndarray:
            computed.append(name)
            return np.zeros(1024)  # 8 KiB

        return shared.for_weights(name, weights, compute)

    try:
        # Execute: three entries, then the first and the last again.
        for name in ("a", "b", "c", "a", "c"):
            entry(name)
        # Assert: "a" was forgotten for "c" and computed again; "c" was kept.
        assert computed == ["a", "b", "c", "a"]
    finally:
        shared.clear_weight_cache()
