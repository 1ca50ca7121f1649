"""Task code: partitions, the held-out split, batch choice, the SGD step, the audit file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fl_attack.config import Partitioning
from fl_attack.simulation import (
    AuditRecord,
    audit_path,
    evaluate,
    partition_indices,
    pick_batch,
    read_audit,
    split_train_test,
    train_step,
    write_audit,
)

LABELS = np.repeat(np.arange(4), 25)  # 100 images, 4 classes of 25, sorted by class
INDICES = np.arange(100, dtype=np.int64)


def _assert_disjoint_cover(parts: tuple[np.ndarray, ...], indices: np.ndarray) -> None:
    """Every index in exactly one part."""
    joined = np.concatenate(parts)
    assert len(joined) == len(indices)
    assert np.array_equal(np.sort(joined), np.sort(indices))


def test_iid_partitions_cover_disjointly_with_near_equal_sizes() -> None:
    # Execute
    parts = partition_indices(INDICES, LABELS, 7, scheme=Partitioning.IID, seed=1)
    # Assert
    _assert_disjoint_cover(parts, INDICES)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partitions_are_deterministic_per_seed() -> None:
    a = partition_indices(INDICES, LABELS, 5, scheme=Partitioning.IID, seed=1)
    b = partition_indices(INDICES, LABELS, 5, scheme=Partitioning.IID, seed=1)
    c = partition_indices(INDICES, LABELS, 5, scheme=Partitioning.IID, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_partitions_are_deterministic_covering_and_skewed() -> None:
    # Execute
    a = partition_indices(
        INDICES, LABELS, 4, scheme=Partitioning.DIRICHLET, alpha=0.1, seed=3, min_size=2
    )
    b = partition_indices(
        INDICES, LABELS, 4, scheme=Partitioning.DIRICHLET, alpha=0.1, seed=3, min_size=2
    )
    iid = partition_indices(INDICES, LABELS, 4, scheme=Partitioning.IID, seed=3)
    # Assert
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    _assert_disjoint_cover(a, INDICES)
    assert min(len(p) for p in a) >= 2

    def dominant_share(parts: tuple[np.ndarray, ...]) -> float:
        return float(np.mean([np.bincount(LABELS[p]).max() / len(p) for p in parts]))

    assert dominant_share(a) > dominant_share(iid)


def test_impossible_partitions_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match="use fewer clients"):
        partition_indices(INDICES[:5], LABELS[:5], 6, scheme=Partitioning.IID)
    with pytest.raises(ValueError, match="raise \\[data\\] dirichlet-alpha"):
        partition_indices(
            INDICES, LABELS, 20, scheme=Partitioning.DIRICHLET, alpha=0.01, min_size=5
        )


def test_held_out_split_takes_the_tail_of_every_class() -> None:
    # Execute
    train, test = split_train_test(LABELS, 0.2)
    # Assert
    assert len(test) == 20 and len(train) == 80
    assert np.array_equal(np.bincount(LABELS[test]), [5, 5, 5, 5])
    assert set(test) == {i for c in range(4) for i in range(25 * c + 20, 25 * c + 25)}
    assert np.intersect1d(train, test).size == 0
    assert len(split_train_test(LABELS, 0.0)[1]) == 0


def test_batch_choice_depends_only_on_seed_round_and_partition() -> None:
    # Prepare
    partition = np.arange(10, 60, dtype=np.int64)
    # Execute
    a = pick_batch(partition, seed=0, server_round=1, partition_id=2, batch_size=3)
    b = pick_batch(partition, seed=0, server_round=1, partition_id=2, batch_size=3)
    rounds = {
        int(pick_batch(partition, seed=0, server_round=r, partition_id=2, batch_size=1)[0])
        for r in range(1, 9)
    }
    # Assert
    assert np.array_equal(a, b) and len(set(a)) == 3 and set(a) <= set(partition)
    assert len(rounds) > 1
    with pytest.raises(ValueError, match="lower \\[client\\] batch-size"):
        pick_batch(partition[:2], seed=0, server_round=1, partition_id=0, batch_size=3)


def test_train_step_is_one_plain_float32_sgd_step(seed: int) -> None:
    # Prepare
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.rand(2, 3, 2, 2)
    labels = torch.tensor([0, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(images), labels)
    grads = dict(zip(before, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    # Execute
    got = train_step(model, images, labels, lr=0.5, local_steps=1)
    # Assert
    assert got == pytest.approx(float(loss.detach()))
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(param.detach(), before[name].add(grads[name], alpha=-0.5))


def test_train_step_rejects_bad_settings() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.rand(1, 1, 2, 2), torch.tensor([1])
    with pytest.raises(ValueError, match="lr must be"):
        train_step(model, x, y, lr=0.0)
    with pytest.raises(ValueError, match="local_steps"):
        train_step(model, x, y, lr=0.1, local_steps=0)


def test_evaluate_counts_correct_predictions() -> None:
    # Prepare: a linear model that predicts the index of the largest input
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
    images = torch.eye(3).reshape(3, 1, 1, 3)
    # Execute / Assert
    assert evaluate(model, images, torch.tensor([0, 1, 2])) == 1.0
    assert evaluate(model, images, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)


def test_audit_appends_one_line_per_round_and_reads_back(tmp_path: Path) -> None:
    # Prepare
    first = AuditRecord(1, 42, 3, 8, (17,), (1,))
    second = AuditRecord(2, 42, 3, 8, (5,), (0,))
    # Execute
    path = write_audit(tmp_path, first)
    write_audit(tmp_path, second)
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"server_round": 3, "node_')  # a torn last line
    # Assert
    assert path == audit_path(tmp_path, 42)
    assert [json.loads(line)["server_round"] for line in path.read_text().splitlines()[:2]] == [
        1,
        2,
    ]
    assert read_audit(tmp_path, 2, 42) == second
    assert read_audit(tmp_path, 3, 42) is None
    assert read_audit(tmp_path, 1, 7) is None
