"""Bad data files: a DataError naming the file, what is wrong and the fix; never an unpickle."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fl_attack.data import DataError, load_dataset

MNIST_NPZ = "mnist_first1000.npz"
CIFAR10_NPZ = "cifar10_first1000.npz"


def _mnist_arrays(n: int = 6) -> dict[str, np.ndarray]:
    """A valid little MNIST subset (the layout of shared/datasets)."""
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        "labels": np.arange(n, dtype=np.int64) % 10,
        "classes": np.array([str(d) for d in range(10)]),
        "split": np.array("train"),
    }


def _write(folder: Path, arrays: dict[str, np.ndarray], name: str = MNIST_NPZ) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("wb") as handle:
        np.savez(handle, **arrays)
    return folder / name


def _with(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays = _mnist_arrays()
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


# (case id, arrays of the npz, fragments the message must hold)
NPZ_CASES: list[tuple[str, dict[str, np.ndarray], tuple[str, ...]]] = [
    ("missing-key", _with(split=None), ("lacks the keys ['split']", "original subset file")),
    (
        "float-images",
        _with(images=np.zeros((6, 28, 28), dtype=np.float32)),
        ("images must be uint8, got float32",),
    ),
    (
        "images-with-channels",
        _with(images=np.zeros((6, 28, 28, 3), dtype=np.uint8)),
        ("images must be (N, H, W) for MNIST", "(6, 28, 28, 3)"),
    ),
    ("no-images", _with(images=np.zeros((0, 28, 28), dtype=np.uint8)), ("images are empty",)),
    ("short-labels", _with(labels=np.zeros(5, dtype=np.int64)), ("labels must have shape (6,)",)),
    ("float-labels", _with(labels=np.zeros(6, dtype=np.float64)), ("labels must be integers",)),
    (
        "label-beyond-classes",
        _with(labels=np.full(6, 12, dtype=np.int64)),
        ("labels span 12..12", "10 classes"),
    ),
    ("test-split", _with(split=np.array("test")), ("split is 'test', expected 'train'",)),
    (
        "object-array",
        _with(classes=np.array([{"not": "a class"}], dtype=object)),
        ("corrupt or truncated", "allow_pickle=False"),
    ),
]


@pytest.mark.parametrize(
    ("arrays", "fragments"), [c[1:] for c in NPZ_CASES], ids=[c[0] for c in NPZ_CASES]
)
def test_a_malformed_npz_subset_is_named_and_explained(
    arrays: dict[str, np.ndarray], fragments: tuple[str, ...], tmp_path: Path
) -> None:
    path = _write(tmp_path, arrays)
    with pytest.raises(DataError) as caught:
        load_dataset("MNIST", root=tmp_path)
    message = str(caught.value)
    assert str(path) in message
    assert all(f in message for f in fragments), message


def test_a_truncated_npz_file(tmp_path: Path) -> None:
    # Prepare: the first half of a valid file, as an interrupted copy leaves it
    path = _write(tmp_path, _mnist_arrays())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # Execute / Assert
    with pytest.raises(DataError, match=r"corrupt or truncated.*original subset file"):
        load_dataset("MNIST", root=tmp_path)


def test_an_npz_that_is_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / MNIST_NPZ).write_bytes(b"not an npz at all\n" * 10)
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_dataset("MNIST", root=tmp_path)


def test_a_limit_beyond_the_subset(tmp_path: Path) -> None:
    _write(tmp_path, _mnist_arrays(6))
    with pytest.raises(DataError, match="limit=7 but only 6 images exist; pass a smaller limit"):
        load_dataset("MNIST", root=tmp_path, limit=7)


@pytest.mark.parametrize("name", ["MNIST", "CIFAR10", "CIFAR100"])
def test_an_empty_torchvision_root(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset(name, root=tmp_path)
    message = str(caught.value)
    assert "could not find the training data" in message and str(tmp_path) in message
    assert "--data-dir" in message


# ---------------------------------------------------------------- CIFAR python batches


def _cifar10_root(tmp_path: Path, batch: Callable[[int], object]) -> Path:
    """A torchvision CIFAR-10 root whose five batches are ``batch(i)``."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch(i)))
    meta = {"label_names": [f"class{k}" for k in range(10)]}
    (base / "batches.meta").write_bytes(pickle.dumps(meta))
    return tmp_path


def _batch(i: int) -> dict[str, object]:
    rng = np.random.default_rng(i)
    return {
        "data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8),
        "labels": [i % 10, (i + 1) % 10],
    }


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled naively."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_cifar_root_is_read_without_running_its_pickles(tmp_path: Path) -> None:
    # Prepare
    root = _cifar10_root(tmp_path, _batch)
    # Execute
    data = load_dataset("CIFAR10", root=root)
    # Assert: ten images, in batch order, their pixels as written (32x32 passes unchanged)
    assert tuple(data.images.shape) == (10, 3, 32, 32)
    assert data.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    first = np.asarray(_batch(1)["data"])[0].reshape(3, 32, 32)
    np.testing.assert_array_equal((data.images[0].numpy() * 255).round(), first)
    assert data.classes[0] == "class0"


def test_a_cifar_pickle_that_carries_code_is_refused(tmp_path: Path) -> None:
    # Prepare: the first batch would run `touch marker`
    marker = tmp_path / "pwned"
    root = _cifar10_root(tmp_path / "root", lambda i: _RunsCode(marker) if i == 1 else _batch(i))
    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("CIFAR10", root=root)
    # Assert: refused by name, and nothing ran
    message = str(caught.value)
    assert "cannot read the training batches" in message and "refused to load" in message
    assert ".system" in message and "original cifar python files" in message
    assert not marker.exists()


def test_a_cifar_batch_with_a_wrong_shape(tmp_path: Path) -> None:
    root = _cifar10_root(tmp_path, lambda i: {"data": np.zeros((2, 100), np.uint8), "labels": [0]})
    with pytest.raises(DataError, match="cannot read the training batches"):
        load_dataset("CIFAR10", root=root)


def test_npz_files_are_never_unpickled(tmp_path: Path) -> None:
    # Prepare: an object array whose element runs code when unpickled
    marker = tmp_path / "pwned"
    arrays = _with(classes=np.array([_RunsCode(marker)], dtype=object))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (tmp_path / MNIST_NPZ).write_bytes(buffer.getvalue())
    # Execute / Assert
    with pytest.raises(DataError, match="allow_pickle=False"):
        load_dataset("MNIST", root=tmp_path)
    assert not marker.exists()


def test_a_bad_data_folder_through_the_cli(tmp_path: Path, user_error: Callable[..., str]) -> None:
    # Prepare: a truncated CIFAR-10 subset
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / CIFAR10_NPZ).write_bytes(b"PK\x03\x04 truncated")
    # Execute / Assert
    user_error(
        ("reconstruct", "-d", "cifar10", "--data-dir", str(folder)),
        CIFAR10_NPZ,
        "corrupt or truncated",
        "replace it with the original subset file",
    )
