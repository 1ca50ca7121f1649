"""Pictures: what people would rather look at than read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
import torch

from fl_attack.reporting.files import atomic_write

__all__ = ["save_round_grid", "save_side_by_side", "to_display"]

T = TypeVar("T")


def to_display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W[, 3]) float array clipped to [0, 1] for imshow."""
    array = image.detach().to(torch.float64).clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def save_side_by_side(
    path: Path, original: torch.Tensor, estimate: torch.Tensor, *, title: str
) -> Path:
    """Write ``original | reconstruction | |error|`` as one PNG.

    The error panel is scaled to its own maximum (shown in its caption) so that
    structure in a tiny error stays visible.
    """
    error = (estimate.to(torch.float64) - original.to(torch.float64)).abs().amax(dim=0)
    peak = float(error.max())
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    gray = "gray" if original.shape[0] == 1 else None
    axes[0].imshow(to_display(original), cmap=gray, vmin=0, vmax=1)
    axes[0].set_title("original", fontsize=9)
    axes[1].imshow(to_display(estimate), cmap=gray, vmin=0, vmax=1)
    axes[1].set_title("reconstruction", fontsize=9)
    axes[2].imshow(error.numpy(), cmap="magma", vmin=0, vmax=peak if peak > 0 else 1)
    axes[2].set_title(f"|error| (max {peak:.1e})", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


# Clients per row of the round picture; more wrap into further rows.
_GRID_COLUMNS = 16


def save_round_grid(
    path: Path,
    originals: Sequence[torch.Tensor | None],
    leaks: Sequence[torch.Tensor | None],
    captions: Sequence[str],
    *,
    headers: Sequence[str],
    title: str,
) -> Path:
    """Write one round as a PNG: originals above, leaked images below, a caption under each.

    Parameters
    ----------
    path : Path
        Target file (written atomically).
    originals, leaks : sequence of (C, H, W) tensors or None
        One column per client; ``None`` draws an empty panel (no ground truth / no leak).
    captions : sequence of str
        Text under each leaked image (e.g. its PSNR).
    headers : sequence of str
        Text above each original (e.g. the client's partition).
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    count = max(len(leaks), 1)
    columns = min(count, _GRID_COLUMNS)
    bands = -(-count // columns)  # each band: a row of originals over a row of leaks
    fig, axes = plt.subplots(
        2 * bands, columns, figsize=(1.45 * columns + 0.4, 3.0 * bands + 0.6), squeeze=False
    )
    for slot in range(bands * columns):
        band, col = divmod(slot, columns)
        top, bottom = axes[2 * band][col], axes[2 * band + 1][col]
        if slot >= count:  # the last band's unused places
            top.set_axis_off()
            bottom.set_axis_off()
            continue
        for ax, image in ((top, _at(originals, slot)), (bottom, _at(leaks, slot))):
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.set_facecolor("0.85")
                continue
            gray = "gray" if image.shape[0] == 1 else None
            ax.imshow(to_display(image), cmap=gray, vmin=0, vmax=1)
        top.set_title(_at(headers, slot) or "", fontsize=7)
        bottom.set_xlabel(_at(captions, slot) or "", fontsize=7)
    for band in range(bands):
        axes[2 * band][0].set_ylabel("original", fontsize=8)
        axes[2 * band + 1][0].set_ylabel("leaked", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _at(items: Sequence[T], index: int) -> T | None:
    """``items[index]``, or None past the end."""
    return items[index] if index < len(items) else None
