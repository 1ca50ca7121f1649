"""Shared fixtures: the real dataset subsets and a fixed seed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fl_attack.data import default_data_dir


@pytest.fixture
def shared_datasets() -> Path:
    """The folder with the npz subsets; fails on CI and skips elsewhere when it is missing."""
    folder = default_data_dir()
    if folder is None or not folder.is_dir():
        reason = (
            f"shared datasets folder not found (got {folder}); set FL_ATTACK_DATA_DIR "
            "or place shared/datasets next to the repository"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


@pytest.fixture
def seed() -> int:
    """Fix torch's global RNG and return the seed used."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this process the task identity Flower's runtimes set before Messages are built."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
