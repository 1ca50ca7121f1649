"""Reconstruction quality: MSE, PSNR, SSIM between images, and label accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
from skimage.metrics import structural_similarity

__all__ = ["ImageLike", "ImageMetrics", "image_metrics", "label_accuracy", "mse", "psnr", "ssim"]

ImageLike: TypeAlias = torch.Tensor | np.ndarray
"""An image as a torch tensor or a NumPy array, any real dtype."""

_MAX_WIN_SIZE = 7
_MIN_SSIM_SIDE = 3


@dataclass(frozen=True, slots=True)
class ImageMetrics:
    """Quality of one reconstructed image against its original.

    Attributes
    ----------
    mse : float
        Mean squared error.
    psnr : float
        Peak signal-to-noise ratio in dB; ``inf`` for identical images.
    ssim : float
        Mean structural similarity, at most 1.
    """

    mse: float
    psnr: float
    ssim: float


def _as_float64(image: ImageLike) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array (detached, on the CPU)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().to(torch.float64).numpy()
    return np.asarray(image, dtype=np.float64)


def _check_images(reference: ImageLike, estimate: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    """Convert both images to float64 and check equal, non-empty shapes and finite values."""
    ref, est = _as_float64(reference), _as_float64(estimate)
    if ref.shape != est.shape:
        raise ValueError(
            f"reference and estimate must have the same shape, got reference {ref.shape} "
            f"and estimate {est.shape}"
        )
    if ref.size == 0:
        raise ValueError(f"images are empty (shape {ref.shape}); pass at least one pixel")
    for label, array in (("reference", ref), ("estimate", est)):
        if not np.isfinite(array).all():
            raise ValueError(
                f"the {label} contains NaN/Inf ({int((~np.isfinite(array)).sum())} of "
                f"{array.size} values); metrics are only defined for finite images"
            )
    return ref, est


def _check_data_range(data_range: float) -> float:
    """Return ``data_range`` as a float after checking it is finite and positive."""
    value = float(data_range)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"data_range must be a finite number > 0 (1.0 for images in [0, 1]), got {data_range!r}"
        )
    return value


def _mse(ref: np.ndarray, est: np.ndarray) -> float:
    """Mean squared error of two checked float64 arrays."""
    return float(np.mean(np.square(ref - est)))


def _psnr(err: float, data_range: float) -> float:
    """PSNR in dB from a mean squared error."""
    if err == 0:
        return math.inf
    return float(10 * np.log10(data_range**2 / err))


def _ssim(ref: np.ndarray, est: np.ndarray, data_range: float) -> float:
    """SSIM of two checked float64 (H, W) or (C, H, W) arrays."""
    if ref.ndim not in (2, 3):
        raise ValueError(
            f"ssim takes one image of shape (H, W) or (C, H, W), got shape {ref.shape}; "
            "call it once per image of a batch"
        )
    side = min(ref.shape[-2:])
    if side < _MIN_SSIM_SIDE:
        raise ValueError(
            f"ssim needs images of at least {_MIN_SSIM_SIDE}x{_MIN_SSIM_SIDE} pixels, "
            f"got shape {ref.shape}"
        )
    win_size = min(_MAX_WIN_SIZE, side if side % 2 == 1 else side - 1)
    value = structural_similarity(
        ref,
        est,
        win_size=win_size,
        data_range=data_range,
        channel_axis=0 if ref.ndim == 3 else None,
    )
    return float(value)


def mse(reference: ImageLike, estimate: ImageLike) -> float:
    """Compute the mean squared error between two images.

    Parameters
    ----------
    reference : torch.Tensor or np.ndarray
        Ground-truth image, any shape and real dtype.
    estimate : torch.Tensor or np.ndarray
        Reconstructed image, same shape as ``reference``.

    Returns
    -------
    float
        ``mean((reference - estimate) ** 2)``, computed in float64.

    Raises
    ------
    ValueError
        If the shapes differ, the images are empty, or either contains NaN/Inf.

    Examples
    --------
    >>> import numpy as np
    >>> mse(np.zeros((2, 2)), np.full((2, 2), 0.5))
    0.25
    """
    ref, est = _check_images(reference, estimate)
    return _mse(ref, est)


def psnr(reference: ImageLike, estimate: ImageLike, *, data_range: float = 1.0) -> float:
    """Compute the peak signal-to-noise ratio between two images.

    Parameters
    ----------
    reference : torch.Tensor or np.ndarray
        Ground-truth image, any shape and real dtype.
    estimate : torch.Tensor or np.ndarray
        Reconstructed image, same shape as ``reference``. It is not clipped.
    data_range : float
        Peak-to-peak range of the pixels (the MAX of the PSNR formula); 1.0 for
        images in ``[0, 1]``.

    Returns
    -------
    float
        ``10 * log10(data_range ** 2 / mse)`` in dB; ``inf`` for identical images.

    Raises
    ------
    ValueError
        If the shapes differ, the images are empty, either contains NaN/Inf, or
        ``data_range`` is not a positive finite number.

    References
    ----------
    .. [1] https://en.wikipedia.org/wiki/Peak_signal-to-noise_ratio

    Examples
    --------
    >>> import numpy as np
    >>> round(psnr(np.zeros((2, 2)), np.full((2, 2), 0.1)), 6)
    20.0
    """
    value_range = _check_data_range(data_range)
    ref, est = _check_images(reference, estimate)
    return _psnr(_mse(ref, est), value_range)


def ssim(reference: ImageLike, estimate: ImageLike, *, data_range: float = 1.0) -> float:
    """Compute the mean structural similarity between two images.

    Parameters
    ----------
    reference : torch.Tensor or np.ndarray
        Ground-truth image, ``(H, W)`` or channels-first ``(C, H, W)``.
    estimate : torch.Tensor or np.ndarray
        Reconstructed image, same shape as ``reference``. It is not clipped.
    data_range : float
        Peak-to-peak range of the pixels; 1.0 for images in ``[0, 1]``.

    Returns
    -------
    float
        Mean SSIM, at most 1 (exactly 1 for identical images).

    Raises
    ------
    ValueError
        If the shapes differ, the images are not 2-D or 3-D or smaller than 3x3,
        either contains NaN/Inf, or ``data_range`` is not a positive finite number.

    Notes
    -----
    Wraps :func:`skimage.metrics.structural_similarity` with ``channel_axis=0``
    for 3-D input and a uniform window of side ``min(7, s)``, where ``s`` is the
    largest odd number not above the smallest spatial side.

    References
    ----------
    .. [1] Wang, Z., Bovik, A. C., Sheikh, H. R., & Simoncelli, E. P. (2004).
       Image quality assessment: From error visibility to structural similarity.
       IEEE Transactions on Image Processing, 13, 600-612.
       :DOI:`10.1109/TIP.2003.819861`

    Examples
    --------
    >>> import numpy as np
    >>> ssim(np.eye(8), np.eye(8))
    1.0
    """
    value_range = _check_data_range(data_range)
    ref, est = _check_images(reference, estimate)
    return _ssim(ref, est, value_range)


def label_accuracy(
    true: Sequence[int] | torch.Tensor | np.ndarray,
    guessed: Sequence[int] | torch.Tensor | np.ndarray,
) -> float:
    """Compute the fraction of positions where the guessed label equals the true one.

    Parameters
    ----------
    true : sequence of int, torch.Tensor or np.ndarray
        True labels, 1-D.
    guessed : sequence of int, torch.Tensor or np.ndarray
        Recovered labels, same length as ``true``, compared position by position.

    Returns
    -------
    float
        ``mean(true == guessed)`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        If either is not 1-D, the lengths differ, or both are empty.

    Examples
    --------
    >>> label_accuracy([1, 2, 3, 4], [1, 2, 0, 4])
    0.75
    """
    truth = _as_labels("true", true)
    guess = _as_labels("guessed", guessed)
    if truth.shape != guess.shape:
        raise ValueError(
            f"true and guessed must have the same length, got {truth.shape[0]} and {guess.shape[0]}"
        )
    if truth.size == 0:
        raise ValueError(
            "label_accuracy of empty label lists is undefined; pass at least one label"
        )
    return float(np.mean(truth == guess))


def _as_labels(label: str, values: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """A 1-D NumPy copy of a label sequence or tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{label} labels must be 1-D, got shape {array.shape}")
    return array


def image_metrics(
    reference: ImageLike, estimate: ImageLike, *, data_range: float = 1.0
) -> ImageMetrics:
    """Compute MSE, PSNR and SSIM of one image in a single call.

    Parameters
    ----------
    reference : torch.Tensor or np.ndarray
        Ground-truth image, ``(H, W)`` or ``(C, H, W)``.
    estimate : torch.Tensor or np.ndarray
        Reconstructed image, same shape as ``reference``. It is not clipped.
    data_range : float
        Peak-to-peak range of the pixels; 1.0 for images in ``[0, 1]``.

    Returns
    -------
    ImageMetrics
        The three metrics, as :func:`mse`, :func:`psnr` and :func:`ssim` give them.

    Raises
    ------
    ValueError
        Under the same conditions as :func:`ssim`.

    Examples
    --------
    >>> import numpy as np
    >>> image_metrics(np.eye(8), np.eye(8))
    ImageMetrics(mse=0.0, psnr=inf, ssim=1.0)
    """
    value_range = _check_data_range(data_range)
    ref, est = _check_images(reference, estimate)
    err = _mse(ref, est)
    return ImageMetrics(mse=err, psnr=_psnr(err, value_range), ssim=_ssim(ref, est, value_range))
