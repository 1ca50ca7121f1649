"""Identifiability: is a leaked image closer to its true image than to any other candidate?"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from fl_attack.metrics.image import ImageLike, _as_float64

__all__ = ["is_identified", "nearest_image"]


def nearest_image(estimate: ImageLike, candidates: ImageLike) -> int:
    """Find the candidate nearest to an estimate, by mean squared error.

    Parameters
    ----------
    estimate : torch.Tensor or np.ndarray
        One image, any shape.
    candidates : torch.Tensor or np.ndarray
        ``(N, *estimate.shape)``: the images it could be, ``N >= 1``.

    Returns
    -------
    int
        Position in ``candidates`` of the nearest image (the first one on ties).

    Raises
    ------
    ValueError
        If there are no candidates, the shapes do not match, or the estimate is not
        finite.

    Examples
    --------
    >>> import numpy as np
    >>> nearest_image(np.full((2, 2), 0.9), np.stack([np.zeros((2, 2)), np.ones((2, 2))]))
    1
    """
    est = _as_float64(estimate)
    pool = _as_float64(candidates)
    if pool.ndim != est.ndim + 1 or pool.shape[1:] != est.shape or pool.shape[0] == 0:
        raise ValueError(
            f"candidates must have shape (N, {', '.join(map(str, est.shape))}) with N >= 1, "
            f"got {pool.shape}"
        )
    if not np.isfinite(est).all():
        raise ValueError("the estimate contains NaN/Inf; no candidate is nearest to it")
    distances = np.square(pool - est[None]).reshape(pool.shape[0], -1).mean(axis=1)
    return int(np.argmin(distances))


def is_identified(
    estimate: ImageLike, candidates: ImageLike, true_positions: Collection[int]
) -> bool:
    """Tell whether an estimate picks out its true image among the candidates.

    Parameters
    ----------
    estimate : torch.Tensor or np.ndarray
        The leaked image.
    candidates : torch.Tensor or np.ndarray
        ``(N, *estimate.shape)``: e.g. every image of the client's partition.
    true_positions : collection of int
        Positions in ``candidates`` of the image(s) the client really used.

    Returns
    -------
    bool
        True when the nearest candidate is a true one; False as well for a non-finite
        estimate.

    Notes
    -----
    This asks whether an attacker holding the candidate set could tell which record was
    used, which is a weaker demand than a high PSNR: a blurred leak can still identify.
    """
    if isinstance(estimate, torch.Tensor) and not bool(torch.isfinite(estimate).all()):
        return False
    if isinstance(estimate, np.ndarray) and not np.isfinite(estimate).all():
        return False
    return nearest_image(estimate, candidates) in set(true_positions)
