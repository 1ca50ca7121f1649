"""R-CONV's "intense testing", done properly.

Training images 0..n-1 of MNIST, CIFAR-10 and CIFAR-100 x ``rconv-main`` with each of the
four activations x float32 and float64 client gradients x U(-0.5, 0.5) and PyTorch's
default initialisation. Per cell: median and min PSNR, median SSIM, % of images >= 40 dB,
label accuracy, median ms/image, and how honest the failures are: images below 40 dB that
carry a warning (rank loss, saturation, residual) against those that do not.

Usage: ``python benchmarks/intense.py --n 100 [--out results/intense.json]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fl_attack.data import load_dataset
from fl_attack.engine import EngineError, reconstruct, single_sample_gradients
from fl_attack.metrics import label_accuracy, psnr, ssim
from fl_attack.models import ACTIVATIONS, build_model
from fl_attack.reporting.files import write_json

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GOOD_DB = 40.0


def run_cell(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    activation: str,
    dtype: str,
    init: str,
    seed: int,
    advance,
) -> dict:
    """Attack every image with one model; return the cell's figures and per-image rows."""
    model = build_model(
        "rconv-main",
        activation=activation,
        in_channels=images.shape[1],
        num_classes=num_classes,
        init=init,
        seed=seed,
    )
    rows = []
    for index in range(len(images)):
        x, y = images[index], int(labels[index])
        grads = single_sample_gradients(model, x, y, dtype=DTYPES[dtype])
        start = time.perf_counter()
        try:
            result = reconstruct(model, grads, tuple(x.shape))
        except EngineError as exc:  # e.g. a zero gradient: nothing to attack
            rows.append(
                {
                    "index": index,
                    "psnr": float("-inf"),
                    "ssim": 0.0,
                    "label": -1,
                    "true": y,
                    "ms": 0.0,
                    "warnings": [str(exc)],
                    "error": True,
                }
            )
            advance()
            continue
        ms = (time.perf_counter() - start) * 1e3
        image = result.image
        finite = bool(torch.isfinite(image).all())
        rows.append(
            {
                "index": index,
                "psnr": psnr(x, image) if finite else float("-inf"),
                "ssim": ssim(x, image) if finite else 0.0,
                "label": result.label,
                "true": y,
                "ms": ms,
                "warnings": list(result.warnings),
                "error": False,
            }
        )
        advance()
    psnrs = [r["psnr"] for r in rows]
    bad = [r for r in rows if r["psnr"] < GOOD_DB]
    return {
        "median_psnr": statistics.median(psnrs),
        "min_psnr": min(psnrs),
        "median_ssim": statistics.median(r["ssim"] for r in rows),
        "pct_ge_40": 100.0 * sum(p >= GOOD_DB for p in psnrs) / len(psnrs),
        "label_accuracy": label_accuracy([r["true"] for r in rows], [r["label"] for r in rows]),
        "median_ms": statistics.median(r["ms"] for r in rows if not r["error"])
        if any(not r["error"] for r in rows)
        else float("nan"),
        "below_40_flagged": sum(bool(r["warnings"]) for r in bad),
        "below_40_unflagged": sum(not r["warnings"] for r in bad),
        "flagged": sum(bool(r["warnings"]) for r in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="images per dataset (0..n-1)")
    parser.add_argument("--datasets", nargs="+", default=["MNIST", "CIFAR10", "CIFAR100"])
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--inits", nargs="+", default=["uniform", "default"])
    parser.add_argument("--seed", type=int, default=50)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/intense.json"))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the engine's solves prefer 1)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"torch threads: {torch.get_num_threads()}")
    sets = {name: load_dataset(name, root=args.data_dir, limit=args.n) for name in args.datasets}
    cells = [
        (i, d, a, t)
        for i in args.inits
        for d in args.datasets
        for a in args.activations
        for t in args.dtypes
    ]
    total = sum(len(sets[d]) for _, d, _, _ in cells)
    results = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("intense", total=total)
        for init, name, activation, dtype in cells:
            progress.update(task, description=f"{init} {name} {activation} {dtype}")
            data = sets[name]
            cell = run_cell(
                data.images,
                data.labels,
                data.num_classes,
                activation,
                dtype,
                init,
                args.seed,
                lambda: progress.advance(task),
            )
            results.append(
                {
                    "init": init,
                    "dataset": name,
                    "activation": activation,
                    "dtype": dtype,
                    "n": len(data),
                    **cell,
                }
            )
            # Nothing lost on a crash: the JSON holds every finished cell.
            write_json(args.out, {"n": args.n, "seed": args.seed, "cells": results})
            if not console.is_terminal:  # a log line per cell when nobody sees the bar
                print(
                    f"{init} {name} {activation} {dtype}: median {cell['median_psnr']:.1f} dB, "
                    f"min {cell['min_psnr']:.1f} dB, >=40 dB {cell['pct_ge_40']:.0f}%",
                    flush=True,
                )
    for init in args.inits:
        table = Table(
            title=f"R-CONV intense test, rconv-main, init={init}, n={args.n}", title_justify="left"
        )
        for col in (
            "dataset",
            "act",
            "dtype",
            "med PSNR",
            "min PSNR",
            "med SSIM",
            "% >=40dB",
            "label acc",
            "med ms",
            "<40 flagged",
            "<40 unflagged",
        ):
            table.add_column(col, justify="left" if col in ("dataset", "act", "dtype") else "right")
        for r in (r for r in results if r["init"] == init):
            table.add_row(
                r["dataset"],
                r["activation"],
                r["dtype"],
                f"{r['median_psnr']:.1f}",
                f"{r['min_psnr']:.1f}",
                f"{r['median_ssim']:.4f}",
                f"{r['pct_ge_40']:.0f}",
                f"{r['label_accuracy']:.2f}",
                f"{r['median_ms']:.0f}",
                str(r["below_40_flagged"]),
                str(r["below_40_unflagged"]),
            )
        console.print(table)
    write_json(args.out, {"n": args.n, "seed": args.seed, "cells": results})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
