"""Identifiability: the nearest candidate by MSE, and whether it is a true one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_attack.metrics import is_identified, nearest_image


def test_nearest_image_by_mean_squared_error() -> None:
    # Prepare
    candidates = np.stack([np.zeros((1, 4, 4)), np.full((1, 4, 4), 0.5), np.ones((1, 4, 4))])
    # Execute / Assert
    assert nearest_image(np.full((1, 4, 4), 0.6), candidates) == 1
    assert nearest_image(torch.full((1, 4, 4), 0.9), torch.from_numpy(candidates)) == 2


def test_is_identified_against_the_true_positions(seed: int) -> None:
    # Prepare
    pool = torch.rand(5, 3, 8, 8)
    leak = pool[3] + 0.01 * torch.randn(3, 8, 8)
    # Execute / Assert
    assert is_identified(leak, pool, [3])
    assert not is_identified(leak, pool, [0, 1])
    assert not is_identified(torch.full((3, 8, 8), float("nan")), pool, [3])


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"candidates must have shape \(N, 1, 4, 4\)"):
        nearest_image(np.zeros((1, 4, 4)), np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="N >= 1"):
        nearest_image(np.zeros((1, 4, 4)), np.zeros((0, 1, 4, 4)))
