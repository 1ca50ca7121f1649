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


# Clients per row of the round picture; more wrap into further rows. Pixels between panels.
_GRID_COLUMNS = 16
_GAP = 3


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
    bands = -(-count // columns)  # each band: a strip of originals over a strip of leaks
    shape = next((tuple(im.shape) for im in (*originals, *leaks) if im is not None), (1, 32, 32))
    fig, axes = plt.subplots(
        2 * bands, 1, figsize=(max(1.2 * columns + 0.6, 6.5), 2.6 * bands + 0.6), squeeze=False
    )
    # One picture per strip (a mosaic of the clients' panels): a figure of a few axes draws
    # in a fraction of the time of one axes per panel.
    for band in range(bands):
        slots = range(band * columns, min((band + 1) * columns, count))
        for row, (items, label) in enumerate(((originals, "original"), (leaks, "leaked"))):
            ax = axes[2 * band + row][0]
            ax.imshow(_strip([_at(items, k) for k in slots], shape, columns), vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            ax.set_ylabel(label, fontsize=8)
            width = shape[2]
            for place, k in enumerate(slots):
                x = place * (width + _GAP) + width / 2
                if row == 0:
                    text, y, va = _at(headers, k) or "", -1.0, "bottom"
                else:
                    text, y, va = _at(captions, k) or "", shape[1] + 1.0, "top"
                ax.text(x, y, text, ha="center", va=va, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _strip(
    images: Sequence[torch.Tensor | None], shape: tuple[int, ...], columns: int
) -> np.ndarray:
    """Panels side by side as one RGB array (white gaps; grey where there is no image)."""
    _, h, w = shape
    out = np.ones((h, columns * (w + _GAP) - _GAP, 3))
    for place in range(columns):
        x = place * (w + _GAP)
        if place >= len(images):
            continue  # past the last client: left white
        image = images[place]
        if image is None:
            out[:, x : x + w] = 0.85
            continue
        panel = to_display(image)
        out[:, x : x + w] = panel[..., None] if panel.ndim == 2 else panel
    return out


def _at(items: Sequence[T], index: int) -> T | None:
    """``items[index]``, or None past the end."""
    return items[index] if index < len(items) else None
