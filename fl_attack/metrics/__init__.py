"""Reconstruction quality metrics: MSE, PSNR, SSIM and label accuracy."""

from __future__ import annotations

from fl_attack.metrics.image import (
    ImageLike,
    ImageMetrics,
    image_metrics,
    label_accuracy,
    mse,
    psnr,
    ssim,
)

__all__ = ["ImageLike", "ImageMetrics", "image_metrics", "label_accuracy", "mse", "psnr", "ssim"]
