"""Image sets for the attack: the offline ``faces`` default, MNIST, CIFAR-10 and CIFAR-100."""

from __future__ import annotations

from fl_attack.data.loaders import (
    DATA_DIR_ENV,
    DATASETS,
    IMAGE_SIZE,
    DataError,
    ImageSet,
    canonical_name,
    default_data_dir,
    load_dataset,
)

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "IMAGE_SIZE",
    "DataError",
    "ImageSet",
    "canonical_name",
    "default_data_dir",
    "load_dataset",
]
