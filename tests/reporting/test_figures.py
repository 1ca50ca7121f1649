"""The round picture: one panel pair per client, wrapped into rows."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import torch

from fl_attack.reporting.figures import save_round_grid


def _grid(path: Path, clients: int) -> tuple[int, int]:
    images = [torch.rand(1, 8, 8) for _ in range(clients)]
    captions = [f"node {i}\n99.0 dB" for i in range(clients)]
    save_round_grid(path, images, images, captions, headers=["p0"] * clients, title="t")
    height, width = mpimg.imread(path).shape[:2]
    return height, width


def test_many_clients_wrap_into_rows_of_sixteen(tmp_path: Path) -> None:
    # Execute: one row's worth, and four rows' worth of clients.
    one = _grid(tmp_path / "16.png", 16)
    four = _grid(tmp_path / "64.png", 64)
    # Assert: as wide as one row of 16, three to four times as tall (shared title band).
    assert four[1] == one[1]
    assert 3 * one[0] < four[0] < 4.5 * one[0]
