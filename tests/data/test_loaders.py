"""Tests for fl_attack.data.loaders: the faces default, the npz subsets and torchvision roots."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.data import lfw_subset
from torchvision.transforms import v2

from fl_attack.data import (
    DATA_DIR_ENV,
    DATASETS,
    DataError,
    ImageSet,
    canonical_name,
    default_data_dir,
    load_dataset,
)

NPZ_FILES = {
    "MNIST": "mnist_first1000.npz",
    "CIFAR10": "cifar10_first1000.npz",
    "CIFAR100": "cifar100_train_first100.npz",
}


def _reference_transform(images: torch.Tensor) -> torch.Tensor:
    """The seed transform written with the torchvision v2 classes, as an oracle."""
    return v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32)])(images)


def _write_npz(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    split: str = "train",
) -> Path:
    """Write an npz subset in the shared/datasets format."""
    np.savez(
        path,
        images=images,
        labels=labels.astype(np.int64),
        classes=np.array(classes),
        split=np.array(split),
        source=np.array("test fixture"),
    )
    return path


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the MNIST idx format torchvision reads."""
    magic = 0x0800 + array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _random_cifar_npz(folder: Path, n: int = 4) -> tuple[Path, np.ndarray]:
    """A small valid CIFAR-10 npz with random pixels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    classes = tuple(f"class{i}" for i in range(10))
    return _write_npz(folder / NPZ_FILES["CIFAR10"], images, labels, classes), images


# ---------------------------------------------------------------- names and folders


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("faces", "faces"),
        ("FACES", "faces"),
        ("mnist", "MNIST"),
        ("MNIST", "MNIST"),
        ("cifar10", "CIFAR10"),
        ("cifar-10", "CIFAR10"),
        ("CIFAR10", "CIFAR10"),
        ("Cifar_100", "CIFAR100"),
        ("cifar-100", "CIFAR100"),
    ],
)
def test_canonical_name_accepts_aliases(alias: str, expected: str) -> None:
    # Execute
    name = canonical_name(alias)

    # Assert
    assert name == expected
    assert name in DATASETS


def test_unknown_name_lists_datasets() -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


def test_default_data_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))

    # Execute
    folder = default_data_dir()

    # Assert
    assert folder == tmp_path


def test_missing_folder_is_named(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "nowhere"

    # Execute / Assert
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("CIFAR10", root=missing)
    assert str(missing) in str(info.value)
    assert "--data-dir" in str(info.value)


def test_empty_folder_says_what_was_looked_for(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataError) as info:
        load_dataset("cifar-100", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "cifar100_train_first100.npz" in message
    assert "cifar-100-python" in message
    assert "--data-dir" in message
    assert "download=True" in message


# ---------------------------------------------------------------- faces


def test_faces_loads_offline() -> None:
    # Execute
    faces = load_dataset("faces")

    # Assert
    assert isinstance(faces, ImageSet)
    assert faces.name == "faces"
    assert tuple(faces.images.shape) == (200, 1, 32, 32)
    assert faces.images.dtype == torch.float32
    assert faces.images.min() >= 0.0
    assert faces.images.max() <= 1.0
    assert faces.classes == ("face", "non-face")
    assert faces.num_classes == 2
    assert faces.channels == 1
    assert len(faces) == 200
    assert faces.labels.dtype == torch.int64
    assert faces.labels[:100].eq(0).all()
    assert faces.labels[100:].eq(1).all()
    assert faces.source == "scikit-image lfw_subset"


def test_faces_match_reference_transform() -> None:
    # Prepare
    raw = torch.from_numpy(lfw_subset().astype(np.float32)).unsqueeze(1)
    expected = _reference_transform(raw).clamp(0.0, 1.0)

    # Execute
    faces = load_dataset("faces")

    # Assert
    torch.testing.assert_close(faces.images, expected, atol=0.0, rtol=0.0)


def test_faces_limit_keeps_first_images() -> None:
    # Prepare
    full = load_dataset("faces")

    # Execute
    head = load_dataset("faces", limit=5)

    # Assert
    assert len(head) == 5
    assert torch.equal(head.images, full.images[:5])
    assert torch.equal(head.labels, full.labels[:5])


def test_image_set_is_frozen() -> None:
    # Prepare
    faces = load_dataset("faces", limit=2)

    # Execute / Assert
    with pytest.raises(dataclasses.FrozenInstanceError):
        faces.name = "MNIST"  # type: ignore[misc]


@pytest.mark.parametrize("limit", [0, -3])
def test_bad_limit_raises(limit: int) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="limit must be an int >= 1"):
        load_dataset("faces", limit=limit)


# ---------------------------------------------------------------- npz subsets (shared folder)


@pytest.mark.parametrize(
    ("name", "first_labels", "size", "channels", "num_classes"),
    [
        ("MNIST", [5, 0, 4, 1, 9], 1000, 1, 10),
        ("CIFAR10", [6, 9, 9, 4, 1], 1000, 3, 10),
        ("CIFAR100", [19, 29, 0, 11, 1], 100, 3, 100),
    ],
)
def test_npz_subsets_load_in_canonical_order(
    shared_datasets: Path,
    name: str,
    first_labels: list[int],
    size: int,
    channels: int,
    num_classes: int,
) -> None:
    # Execute
    images = load_dataset(name, root=shared_datasets)

    # Assert
    assert images.name == name
    assert images.labels[:5].tolist() == first_labels
    assert tuple(images.images.shape) == (size, channels, 32, 32)
    assert images.images.dtype == torch.float32
    assert images.num_classes == num_classes
    assert images.source == str(shared_datasets / NPZ_FILES[name])


def test_default_root_is_used(shared_datasets: Path) -> None:
    # Execute
    images = load_dataset("cifar-10", limit=3)

    # Assert
    assert images.source == str(shared_datasets / NPZ_FILES["CIFAR10"])
    assert images.classes[images.labels[0]] == "frog"


@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR100"])
def test_cifar_is_bit_identical_to_npz(shared_datasets: Path, name: str) -> None:
    # Prepare
    with np.load(shared_datasets / NPZ_FILES[name]) as archive:
        raw = archive["images"]
    expected = torch.from_numpy(raw.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)

    # Execute
    images = load_dataset(name, root=shared_datasets)

    # Assert
    assert torch.equal(images.images, expected)


def test_mnist_is_resized_to_32(shared_datasets: Path) -> None:
    # Prepare
    with np.load(shared_datasets / NPZ_FILES["MNIST"]) as archive:
        raw = archive["images"][:10]
    expected = _reference_transform(torch.from_numpy(raw[:, None].astype(np.float32) / 255.0))

    # Execute
    images = load_dataset("mnist", root=shared_datasets, limit=10)

    # Assert
    assert tuple(images.images.shape) == (10, 1, 32, 32)
    torch.testing.assert_close(images.images, expected.clamp(0.0, 1.0), atol=0.0, rtol=0.0)
    assert images.images.min() >= 0.0
    assert images.images.max() <= 1.0


def test_limit_keeps_first_npz_images(shared_datasets: Path) -> None:
    # Prepare
    full = load_dataset("CIFAR100", root=shared_datasets)

    # Execute
    head = load_dataset("CIFAR100", root=shared_datasets, limit=7)

    # Assert
    assert len(head) == 7
    assert torch.equal(head.images, full.images[:7])
    assert torch.equal(head.labels, full.labels[:7])
    assert head.classes == full.classes


def test_limit_beyond_npz_says_how_to_get_more(shared_datasets: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="only 100 images exist") as info:
        load_dataset("CIFAR100", root=shared_datasets, limit=101)
    assert "torchvision root" in str(info.value)


# ---------------------------------------------------------------- npz files written here


def test_synthetic_npz_loads_bit_identical(tmp_path: Path) -> None:
    # Prepare
    _, raw = _random_cifar_npz(tmp_path)

    # Execute
    images = load_dataset("CIFAR10", root=tmp_path)

    # Assert
    expected = torch.from_numpy(raw.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    assert torch.equal(images.images, expected)
    assert images.classes == tuple(f"class{i}" for i in range(10))


def test_truncated_npz_is_named(tmp_path: Path) -> None:
    # Prepare
    path, _ = _random_cifar_npz(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    # Execute / Assert
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        load_dataset("CIFAR10", root=tmp_path)
    assert str(path) in str(info.value)


def test_wrong_shape_npz_is_named(tmp_path: Path) -> None:
    # Prepare
    path = _write_npz(
        tmp_path / NPZ_FILES["CIFAR10"],
        np.zeros((3, 32, 32), dtype=np.uint8),
        np.zeros(3),
        tuple(str(i) for i in range(10)),
    )

    # Execute / Assert
    with pytest.raises(DataError, match=r"images must be \(N, H, W, 3\)") as info:
        load_dataset("CIFAR10", root=tmp_path)
    assert str(path) in str(info.value)


def test_test_split_npz_is_rejected(tmp_path: Path) -> None:
    # Prepare
    _write_npz(
        tmp_path / NPZ_FILES["MNIST"],
        np.zeros((3, 28, 28), dtype=np.uint8),
        np.zeros(3),
        tuple(str(i) for i in range(10)),
        split="test",
    )

    # Execute / Assert
    with pytest.raises(DataError, match="expected 'train'"):
        load_dataset("MNIST", root=tmp_path)


def test_labels_out_of_range_npz_is_rejected(tmp_path: Path) -> None:
    # Prepare
    _write_npz(
        tmp_path / NPZ_FILES["MNIST"],
        np.zeros((2, 28, 28), dtype=np.uint8),
        np.array([0, 10]),
        tuple(str(i) for i in range(10)),
    )

    # Execute / Assert
    with pytest.raises(DataError, match="10 classes"):
        load_dataset("MNIST", root=tmp_path)


# ---------------------------------------------------------------- torchvision root


def test_torchvision_root_is_used_without_npz(tmp_path: Path) -> None:
    # Prepare: a tiny MNIST root in torchvision's raw layout
    rng = np.random.default_rng(0)
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
    expected = _reference_transform(torch.from_numpy(images[:4, None].astype(np.float32) / 255.0))

    # Execute
    loaded = load_dataset("MNIST", root=tmp_path, limit=4)

    # Assert
    assert loaded.source == str(tmp_path)
    assert loaded.labels.tolist() == [3, 1, 4, 1]
    assert loaded.num_classes == 10
    torch.testing.assert_close(loaded.images, expected.clamp(0.0, 1.0), atol=0.0, rtol=0.0)
