"""What an honest client does, without Flower: data, partitions, one SGD step, accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_attack.config import DataConfig, ModelConfig, Partitioning
from fl_attack.data import load_dataset
from fl_attack.models import build_model

__all__ = [
    "FederatedData",
    "build_scenario_model",
    "client_partition",
    "evaluate",
    "load_federated_data",
    "partition_indices",
    "pick_batch",
    "split_train_test",
    "train_step",
]

_DIRICHLET_ATTEMPTS = 100


@dataclass(frozen=True, slots=True)
class FederatedData:
    """A dataset split into the clients' pool and a held-out test set.

    Attributes
    ----------
    name : str
        Canonical dataset name.
    images : torch.Tensor
        All loaded images, ``(N, C, 32, 32)`` float32 in [0, 1].
    labels : torch.Tensor
        ``(N,)`` int64.
    num_classes : int
        Number of classes of the dataset.
    train_indices : np.ndarray
        Dataset indices the clients share out.
    test_indices : np.ndarray
        Dataset indices held out for the server's test accuracy (the last images of
        each class).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    train_indices: np.ndarray
    test_indices: np.ndarray

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's shape, ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


def split_train_test(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(n * test_fraction)`` images, taken from the end of each class in turn.

    Parameters
    ----------
    labels : np.ndarray
        Label of every image, in dataset order.
    test_fraction : float
        In ``[0, 1)``.

    Returns
    -------
    tuple of np.ndarray
        ``(train, test)`` sorted int64 index arrays.

    Raises
    ------
    ValueError
        If ``test_fraction`` is out of range or nothing is left for training.

    Notes
    -----
    The held-out images are the last image of every class, then the second-to-last of
    every class, and so on, until the count is reached: a data set sorted by class
    (``faces``) still gets every class in its test set, and the split needs no seed.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    count = round(len(labels) * test_fraction)
    if len(labels) - count < 1:
        raise ValueError(
            f"holding out {count} of {len(labels)} images leaves none for training; "
            "lower [data] test-fraction or raise [data] limit"
        )
    tails = [np.flatnonzero(labels == label)[::-1] for label in np.unique(labels)]
    order = [
        tail[k] for k in range(max(map(len, tails), default=0)) for tail in tails if k < len(tail)
    ]
    held = np.sort(np.asarray(order[:count], dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held)
    return train, held


@lru_cache(maxsize=4)
def load_federated_data(data: DataConfig) -> FederatedData:
    """Load a scenario's images once per process and split off the test set.

    Parameters
    ----------
    data : DataConfig
        The ``[data]`` table.

    Returns
    -------
    FederatedData
        Cached per ``data``; treat the tensors as read-only.

    Raises
    ------
    fl_attack.data.DataError
        If the dataset cannot be read.
    ValueError
        If the held-out fraction leaves no training image.
    """
    images = load_dataset(data.dataset, root=data.data_dir, limit=data.limit)
    train, test = split_train_test(images.labels.numpy(), data.test_fraction)
    return FederatedData(
        name=images.name,
        images=images.images,
        labels=images.labels,
        num_classes=images.num_classes,
        train_indices=train,
        test_indices=test,
    )


def partition_indices(
    indices: np.ndarray,
    labels: np.ndarray,
    num_partitions: int,
    *,
    scheme: Partitioning,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> tuple[np.ndarray, ...]:
    """Split dataset indices between clients, deterministically.

    Parameters
    ----------
    indices : np.ndarray
        The dataset indices to share out.
    labels : np.ndarray
        Label of each entry of ``indices`` (same length).
    num_partitions : int
        Number of clients.
    scheme : Partitioning
        ``iid``: a seeded shuffle cut into near-equal parts. ``dirichlet``: for each
        class, proportions drawn from Dir(alpha) decide how its images are spread.
    alpha : float
        Dirichlet concentration (ignored for ``iid``).
    seed : int
        Seed of the shuffle and of the Dirichlet draws.
    min_size : int
        Every partition gets at least this many images (a client's batch size).

    Returns
    -------
    tuple of np.ndarray
        One sorted int64 array per partition; together they cover ``indices`` once.

    Raises
    ------
    ValueError
        If there are too few images, or no Dirichlet draw in 100 gives every client
        ``min_size`` images.

    References
    ----------
    .. [1] T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the Effects of Non-Identical Data
       Distribution for Federated Visual Classification", arXiv:1909.06335, 2019.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if len(indices) < num_partitions * min_size:
        raise ValueError(
            f"{len(indices)} training images cannot give {num_partitions} clients "
            f"{min_size} image(s) each; use fewer clients, a smaller batch, or more images"
        )
    rng = np.random.default_rng(seed)
    if scheme is Partitioning.IID:
        parts = np.array_split(rng.permutation(indices), num_partitions)
        return tuple(np.sort(p) for p in parts)
    for _ in range(_DIRICHLET_ATTEMPTS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for label in np.unique(labels):
            members = rng.permutation(indices[labels == label])
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, chunk in enumerate(np.split(members, cuts)):
                buckets[part].append(chunk)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return tuple(p.astype(np.int64) for p in parts)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split in {_DIRICHLET_ATTEMPTS} draws gives each of "
        f"{num_partitions} clients {min_size} image(s); raise [data] dirichlet-alpha or "
        "use fewer clients"
    )


def client_partition(
    fed: FederatedData,
    data: DataConfig,
    *,
    seed: int,
    partition_id: int,
    num_partitions: int,
    min_size: int = 1,
) -> np.ndarray:
    """The dataset indices one client holds.

    Parameters
    ----------
    fed : FederatedData
        The loaded data.
    data : DataConfig
        Partitioning scheme and alpha.
    seed : int
        The run's seed.
    partition_id, num_partitions : int
        This client's partition and how many there are (from the node config).
    min_size : int
        Minimum images per partition.

    Returns
    -------
    np.ndarray
        Sorted int64 dataset indices.

    Raises
    ------
    ValueError
        If ``partition_id`` is not in ``0..num_partitions-1`` or the split fails.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; "
            "fix the node config (partition-id, num-partitions)"
        )
    parts = _partitions(fed, data, seed, num_partitions, min_size)
    return parts[partition_id]


def _partitions(
    fed: FederatedData, data: DataConfig, seed: int, num_partitions: int, min_size: int
) -> tuple[np.ndarray, ...]:
    """All partitions of the training pool (cheap; recomputed on demand)."""
    train = fed.train_indices
    return partition_indices(
        train,
        fed.labels.numpy()[train],
        num_partitions,
        scheme=data.partitioning,
        alpha=data.dirichlet_alpha,
        seed=seed,
        min_size=min_size,
    )


def pick_batch(
    partition: np.ndarray, *, seed: int, server_round: int, partition_id: int, batch_size: int
) -> np.ndarray:
    """The images a client trains on in one round, fixed by (seed, round, partition).

    Parameters
    ----------
    partition : np.ndarray
        The client's dataset indices.
    seed, server_round, partition_id : int
        Together they seed the draw, so runs are reproducible.
    batch_size : int
        Number of distinct images.

    Returns
    -------
    np.ndarray
        ``batch_size`` dataset indices drawn without replacement.

    Raises
    ------
    ValueError
        If the partition holds fewer than ``batch_size`` images.
    """
    if batch_size > len(partition):
        raise ValueError(
            f"partition {partition_id} holds {len(partition)} images, fewer than the batch "
            f"size {batch_size}; lower [client] batch-size or use fewer clients"
        )
    rng = np.random.default_rng([seed, server_round, partition_id])
    return np.asarray(rng.choice(partition, size=batch_size, replace=False), dtype=np.int64)


def build_scenario_model(model: ModelConfig, fed: FederatedData) -> nn.Sequential:
    """The scenario's model for the data set's channels and classes, float32, seeded.

    Parameters
    ----------
    model : ModelConfig
        The ``[model]`` table.
    fed : FederatedData
        The data set (channels, image side, class count).

    Returns
    -------
    nn.Sequential
        Freshly initialised from ``model.seed``.

    Raises
    ------
    ValueError
        If ``[model] num-classes`` is below the data set's class count.
    """
    num_classes = fed.num_classes if model.num_classes is None else model.num_classes
    if num_classes < fed.num_classes:
        raise ValueError(
            f"[model] num-classes = {num_classes} is below the {fed.num_classes} classes of "
            f"{fed.name}; raise it or omit the key"
        )
    channels, side, _ = fed.input_shape
    return build_model(
        model.name,
        activation=model.activation,
        in_channels=channels,
        num_classes=num_classes,
        image_size=side,
        init=model.init,
        seed=model.seed,
    )


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    local_steps: int = 1,
) -> float:
    """Plain SGD on one batch, in float32, as an honest client does it.

    Parameters
    ----------
    model : nn.Module
        Trained in place.
    images : torch.Tensor
        ``(B, C, H, W)`` float32.
    labels : torch.Tensor
        ``(B,)`` int64.
    lr : float
        Learning rate (> 0).
    local_steps : int
        Number of steps, each on the same batch.

    Returns
    -------
    float
        The mean cross-entropy loss before the first step.

    Raises
    ------
    ValueError
        If ``lr`` is not a positive finite number or ``local_steps`` < 1.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    first = math.nan
    with torch.enable_grad():
        for step in range(local_steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images.to(torch.float32)), labels)
            loss.backward()
            optimizer.step()
            if step == 0:
                first = float(loss.detach())
    return first


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` on a labelled set.

    Parameters
    ----------
    model : nn.Module
        Left unchanged (evaluated in ``eval`` mode without gradients).
    images : torch.Tensor
        ``(N, C, H, W)`` float32, ``N >= 1``.
    labels : torch.Tensor
        ``(N,)`` int64.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    float
        Fraction of correct predictions in [0, 1].

    Raises
    ------
    ValueError
        If the set is empty.
    """
    if len(images) == 0:
        raise ValueError("evaluate needs at least one image; raise [data] test-fraction")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    return correct / len(images)
