"""Reconstruction quality metrics: MSE, PSNR, SSIM, label accuracy and identifiability."""

from __future__ import annotations

from fl_attack.metrics.identify import is_identified, nearest_image
from fl_attack.metrics.image import (
    ImageLike,
    ImageMetrics,
    image_metrics,
    label_accuracy,
    mse,
    psnr,
    ssim,
)

__all__ = [
    "ImageLike",
    "ImageMetrics",
    "image_metrics",
    "is_identified",
    "label_accuracy",
    "mse",
    "nearest_image",
    "psnr",
    "ssim",
]
