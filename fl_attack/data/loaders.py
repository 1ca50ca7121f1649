"""Image sets for the attack: the offline ``faces`` default, MNIST, CIFAR-10 and CIFAR-100."""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tv_datasets
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

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

DATASETS: tuple[str, ...] = ("faces", "MNIST", "CIFAR10", "CIFAR100")
"""Canonical dataset names accepted by :func:`load_dataset`."""

DATA_DIR_ENV = "FL_ATTACK_DATA_DIR"
"""Environment variable that overrides :func:`default_data_dir`."""

IMAGE_SIZE = 32
"""Side of every image produced by the seed transform."""

_FACES_SOURCE = "scikit-image lfw_subset"

_NPZ_FILES: dict[str, str] = {
    "MNIST": "mnist_first1000.npz",
    "CIFAR10": "cifar10_first1000.npz",
    "CIFAR100": "cifar100_train_first100.npz",
}
_TORCHVISION: dict[str, tuple[type[tv_datasets.VisionDataset], str]] = {
    "MNIST": (tv_datasets.MNIST, "MNIST/raw/"),
    "CIFAR10": (tv_datasets.CIFAR10, "cifar-10-batches-py/"),
    "CIFAR100": (tv_datasets.CIFAR100, "cifar-100-python/"),
}
_CHANNELS: dict[str, int] = {"faces": 1, "MNIST": 1, "CIFAR10": 3, "CIFAR100": 3}
_NPZ_KEYS = ("images", "labels", "classes", "split")
_FIX = (
    "pass --data-dir (root=...) pointing at a folder with the npz subsets "
    f"({', '.join(_NPZ_FILES.values())}) or at a torchvision root, "
    "or use download=True where internet access exists"
)


class DataError(ValueError):
    """A dataset could not be found, read or indexed; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class ImageSet:
    """Images and labels of one dataset after the seed transform.

    Attributes
    ----------
    name : str
        Canonical name, one of :data:`DATASETS`.
    images : torch.Tensor
        ``(N, C, 32, 32)`` float32 in ``[0, 1]``; ``C`` is 1 for MNIST and faces, 3 for CIFAR.
    labels : torch.Tensor
        ``(N,)`` int64 class indices into ``classes``.
    classes : tuple of str
        Class names, indexed by label.
    source : str
        Where the images came from: an npz path, a torchvision root or
        ``"scikit-image lfw_subset"``.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        """Check shapes and dtypes so a malformed set fails where it is built."""
        where = f"ImageSet({self.name!r})"
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise DataError(
                f"{where}: images must be (N, C, H, W) float32, got "
                f"{tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise DataError(
                f"{where}: labels must be ({self.images.shape[0]},) int64, got "
                f"{tuple(self.labels.shape)} {self.labels.dtype}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Number of image channels, ``images.shape[1]``."""
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def canonical_name(name: str) -> str:
    """Map a dataset name to its canonical spelling.

    Parameters
    ----------
    name : str
        Case-insensitive; ``-``, ``_`` and spaces are ignored, so ``"cifar-10"``,
        ``"cifar10"`` and ``"CIFAR10"`` are all ``"CIFAR10"``.

    Returns
    -------
    str
        One of :data:`DATASETS`.

    Raises
    ------
    DataError
        If the name matches no dataset; the message lists :data:`DATASETS`.

    Examples
    --------
    >>> canonical_name("cifar-100")
    'CIFAR100'
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    for canonical in DATASETS:
        if key == canonical.lower():
            return canonical
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def default_data_dir() -> Path | None:
    """Return the folder searched for datasets when no root is given.

    Returns
    -------
    Path or None
        ``$FL_ATTACK_DATA_DIR`` when that variable is set (even if the folder is
        missing, so that a typo is reported rather than ignored); otherwise
        ``shared/datasets`` next to the repository root (the parent of the
        ``fl_attack`` package folder) if it exists; otherwise ``None``.
    """
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    candidate = repo_root.parent / "shared" / "datasets"
    return candidate if candidate.is_dir() else None


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    limit: int | None = None,
    download: bool = False,
) -> ImageSet:
    """Load the training split of a dataset and apply the seed transform.

    Parameters
    ----------
    name : str
        Dataset name, see :func:`canonical_name`.
    root : str or Path, optional
        Folder holding the npz subsets or a torchvision root. Defaults to
        :func:`default_data_dir`. Ignored for ``faces``.
    limit : int, optional
        Keep only the first ``limit`` images in canonical order.
    download : bool
        Let torchvision download the dataset into ``root`` when it is absent.

    Returns
    -------
    ImageSet
        ``(N, C, 32, 32)`` float32 images in ``[0, 1]`` with int64 labels.

    Raises
    ------
    DataError
        On an unknown name, a missing folder, an unreadable or malformed npz
        file, absent torchvision data, or a ``limit`` outside ``1..N``.

    Notes
    -----
    ``faces`` is embedded in scikit-image and needs no files: the 200 images of
    ``skimage.data.lfw_subset()``, labelled ``0 = "face"`` (first 100) and
    ``1 = "non-face"`` (last 100). For MNIST, CIFAR10 and CIFAR100 the npz subset
    in ``root`` is used when present (``split`` must be ``'train'``); otherwise
    torchvision's dataset class is asked for the training split.

    The seed transform is ``Resize(32)`` then ``CenterCrop(32)`` (bilinear,
    antialiased), without normalisation; 32x32 images come out bit-identical to
    ``uint8 / 255``.

    Examples
    --------
    >>> faces = load_dataset("faces", limit=4)
    >>> tuple(faces.images.shape), faces.classes
    ((4, 1, 32, 32), ('face', 'non-face'))
    """
    canonical = canonical_name(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"load_dataset({canonical!r}): limit must be an int >= 1, got {limit!r}")
    if canonical == "faces":
        return _load_faces(limit)
    folder = _resolve_root(canonical, root)
    npz_path = folder / _NPZ_FILES[canonical]
    if npz_path.is_file():
        return _load_npz(canonical, npz_path, limit)
    return _load_torchvision(canonical, folder, limit, download)


def _seed_transform(images: torch.Tensor) -> torch.Tensor:
    """Resize(32) + CenterCrop(32), bilinear and antialiased, on (N, C, H, W) floats in [0, 1]."""
    out = tvf.resize(images, [IMAGE_SIZE], interpolation=InterpolationMode.BILINEAR, antialias=True)
    out = tvf.center_crop(out, [IMAGE_SIZE, IMAGE_SIZE])
    return out.clamp_(0.0, 1.0).contiguous()


def _uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 (N, H, W) or (N, H, W, C) pixels into float32 (N, C, H, W) in [0, 1]."""
    tensor = torch.as_tensor(images)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return tensor.to(torch.float32) / 255


def _check_limit(where: str, limit: int | None, available: int, fix: str) -> int:
    """Return how many images to keep, or raise when ``limit`` exceeds what exists."""
    if limit is None:
        return available
    if limit > available:
        raise DataError(f"{where}: limit={limit} but only {available} images exist; {fix}")
    return limit


def _load_faces(limit: int | None) -> ImageSet:
    """The 200 LFW-subset images shipped with scikit-image, faces first."""
    from skimage.data import lfw_subset

    raw = np.asarray(lfw_subset(), dtype=np.float32)
    keep = _check_limit(
        f"faces ({_FACES_SOURCE})", limit, raw.shape[0], "pass a limit of at most that"
    )
    half = raw.shape[0] // 2
    labels = torch.cat([torch.zeros(half, dtype=torch.int64), torch.ones(half, dtype=torch.int64)])
    images = torch.from_numpy(raw[:keep]).unsqueeze(1).clamp_(0.0, 1.0)
    return ImageSet(
        name="faces",
        images=_seed_transform(images),
        labels=labels[:keep].clone(),
        classes=("face", "non-face"),
        source=_FACES_SOURCE,
    )


def _resolve_root(canonical: str, root: str | Path | None) -> Path:
    """The folder to read ``canonical`` from, checked to exist."""
    if root is None:
        folder = default_data_dir()
        if folder is None:
            raise DataError(
                f"load_dataset({canonical!r}): no data folder given, ${DATA_DIR_ENV} is unset "
                f"and no shared/datasets folder sits next to the repository; {_FIX}"
            )
        origin = f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV, "").strip() else "default"
    else:
        folder = Path(root).expanduser()
        origin = "root"
    if not folder.is_dir():
        raise DataError(
            f"load_dataset({canonical!r}): data folder {str(folder)!r} ({origin}) does not "
            f"exist or is not a directory; {_FIX}"
        )
    return folder


def _load_npz(canonical: str, path: Path, limit: int | None) -> ImageSet:
    """Read and validate one npz subset (see shared/datasets/README.md)."""
    where = f"npz file {str(path)!r}"
    try:
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            if missing:
                raise DataError(
                    f"{where} lacks the keys {missing} (has {sorted(archive.files)}); "
                    "replace it with the original subset file"
                )
            images = archive["images"]
            labels = archive["labels"]
            classes = archive["classes"]
            split = archive["split"]
    except DataError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"{where} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "replace it with the original subset file"
        ) from None

    problem = _npz_problem(canonical, images, labels, classes, split)
    if problem:
        raise DataError(f"{where}: {problem}; replace it with the original subset file")
    keep = _check_limit(
        where,
        limit,
        images.shape[0],
        "pass a smaller limit, or point --data-dir at a torchvision root for the full set",
    )
    return ImageSet(
        name=canonical,
        images=_seed_transform(_uint8_to_float(images[:keep])),
        labels=torch.from_numpy(labels[:keep].astype(np.int64)),
        classes=tuple(str(c) for c in classes.tolist()),
        source=str(path),
    )


def _npz_problem(
    canonical: str, images: np.ndarray, labels: np.ndarray, classes: np.ndarray, split: np.ndarray
) -> str:
    """Describe what is wrong with the arrays of an npz subset, or return ``""``."""
    channels = _CHANNELS[canonical]
    if images.dtype != np.uint8:
        return f"images must be uint8, got {images.dtype}"
    expected = "(N, H, W)" if channels == 1 else f"(N, H, W, {channels})"
    if channels == 1 and images.ndim != 3:
        return f"images must be {expected} for {canonical}, got shape {images.shape}"
    if channels != 1 and (images.ndim != 4 or images.shape[-1] != channels):
        return f"images must be {expected} for {canonical}, got shape {images.shape}"
    if images.shape[0] == 0 or min(images.shape[1:3]) == 0:
        return f"images are empty, shape {images.shape}"
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        return f"labels must have shape ({images.shape[0]},), got {labels.shape}"
    if not np.issubdtype(labels.dtype, np.integer):
        return f"labels must be integers, got {labels.dtype}"
    if classes.ndim != 1 or classes.dtype.kind != "U" or classes.shape[0] == 0:
        return f"classes must be a non-empty 1-D str array, got {classes.dtype} {classes.shape}"
    if labels.min() < 0 or labels.max() >= classes.shape[0]:
        return (
            f"labels span {labels.min()}..{labels.max()} but there are {classes.shape[0]} classes"
        )
    if split.shape != () or str(split) != "train":
        return f"split is {split.tolist()!r}, expected 'train'"
    return ""


_CIFAR_PYTHON: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    # batches, meta file, label key, class-name key (torchvision's cifar.py layout)
    "CIFAR10": (
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "CIFAR100": (("train",), "meta", "fine_labels", "fine_label_names"),
}

# What a CIFAR python batch may contain besides plain containers: numpy arrays, no code.
_SAFE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays, never calls code."""

    def find_class(self, module: str, name: str) -> object:
        """Refuse every global outside :data:`_SAFE_GLOBALS`."""
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR batch holds only arrays"
            )
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, object]:
    """One CIFAR python file, read without running any code it may carry."""
    with path.open("rb") as handle:
        entry = _SafeUnpickler(handle, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise pickle.UnpicklingError(f"expected a dict, found {type(entry).__name__}")
    return entry


def _load_cifar_python(canonical: str, folder: Path, limit: int | None) -> ImageSet:
    """The training split from torchvision's CIFAR python folder, unpickled safely."""
    batches, meta_name, label_key, names_key = _CIFAR_PYTHON[canonical]
    base = folder / _TORCHVISION[canonical][1]
    where = f"torchvision {canonical} in {str(base)!r}"
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        for name in batches:
            if limit is not None and sum(len(x) for x in labels) >= limit:
                break  # the first `limit` images are all that is asked for
            entry = _read_cifar_pickle(base / name)
            data = np.asarray(entry["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
            labels.append(np.asarray(entry[label_key], dtype=np.int64).reshape(-1))
            if images[-1].shape[0] != labels[-1].shape[0]:
                count = f"{images[-1].shape[0]} images, {labels[-1].shape[0]} labels"
                raise ValueError(f"{name} holds {count}")
        classes = tuple(str(c) for c in _read_cifar_pickle(base / meta_name)[names_key])
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(
            f"{where}: cannot read the training batches ({type(exc).__name__}: {exc}); "
            f"replace the folder with the original cifar python files, or {_FIX}"
        ) from None
    all_images = np.concatenate(images)
    all_labels = np.concatenate(labels)
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= len(classes)):
        raise DataError(f"{where}: labels exceed the {len(classes)} classes; {_FIX}")
    keep = _check_limit(where, limit, all_images.shape[0], "pass a smaller limit")
    return ImageSet(
        name=canonical,
        images=_seed_transform(_uint8_to_float(all_images[:keep])),
        labels=torch.from_numpy(all_labels[:keep].copy()),
        classes=classes,
        source=str(folder),
    )


def _load_torchvision(canonical: str, folder: Path, limit: int | None, download: bool) -> ImageSet:
    """Ask torchvision for the training split, then slice only the first ``limit`` images.

    CIFAR's python batches are pickles: once present they are read by
    :func:`_load_cifar_python`, which builds nothing but arrays, instead of by
    torchvision's ``pickle.load``.
    """
    dataset_cls, subfolder = _TORCHVISION[canonical]
    if canonical in _CIFAR_PYTHON and (folder / subfolder).is_dir():
        return _load_cifar_python(canonical, folder, limit)
    try:
        dataset = dataset_cls(str(folder), train=True, download=download)
    except (RuntimeError, OSError) as exc:
        action = "download into" if download else "find"
        raise DataError(
            f"load_dataset({canonical!r}): could not {action} the training data in "
            f"{str(folder)!r}: looked for the npz subset {_NPZ_FILES[canonical]!r} and the "
            f"torchvision folder {subfolder!r} ({type(exc).__name__}: {exc}); {_FIX}"
        ) from None
    where = f"torchvision {canonical} in {str(folder)!r}"
    keep = _check_limit(where, limit, len(dataset), "pass a smaller limit")
    data = dataset.data[:keep]
    targets = dataset.targets[:keep]
    return ImageSet(
        name=canonical,
        images=_seed_transform(_uint8_to_float(data)),
        labels=torch.as_tensor(targets, dtype=torch.int64).clone(),
        classes=tuple(str(c) for c in dataset.classes),
        source=str(folder),
    )
