"""``fl-attack reconstruct``: attack one training image, as the R-CONV reference CLI does."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fl_attack.commands.errors import UsageError
from fl_attack.data import DATASETS, DataError, canonical_name, load_dataset
from fl_attack.engine import EngineError, reconstruct, single_sample_gradients, validate
from fl_attack.metrics import image_metrics
from fl_attack.models import ACTIVATIONS, ARCHITECTURES, Init, build_model
from fl_attack.reporting import diagnostics_table, reconstruction_record, save_side_by_side
from fl_attack.reporting.files import write_json

__all__ = ["register", "run"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``reconstruct`` subcommand."""
    p = sub.add_parser(
        "reconstruct",
        help="recover one training image from its single-sample gradient",
        description="Compute one client's gradient on a training image and invert it (R-CONV).",
    )
    p.add_argument("-d", "--dataset", default="CIFAR100", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("-i", "--index", type=int, default=0, help="training image index")
    p.add_argument("-a", "--activation", default="ReLU", help=f"one of {', '.join(ACTIVATIONS)}")
    p.add_argument("--model", default="rconv-main", help=f"one of {', '.join(ARCHITECTURES)}")
    p.add_argument("--init", default=Init.UNIFORM.value, help="uniform (U(-0.5,0.5)) or default")
    p.add_argument("--seed", type=int, default=50, help="seed of the initial weights")
    p.add_argument("--dtype", default="float32", help="precision of the client's gradient")
    p.add_argument("--data-dir", type=Path, default=None, help="npz subsets or torchvision root")
    p.add_argument("--out", type=Path, default=None, help="output folder (PNG + JSON)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``fl-attack reconstruct``; raises :class:`UsageError` on bad input."""
    console = Console()
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r} is not supported; use float32 or float64")
    try:
        name = canonical_name(args.dataset)
        data = load_dataset(name, root=args.data_dir)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    if not 0 <= args.index < len(data):
        raise UsageError(
            f"--index {args.index} is out of range: {name} from {data.source} has "
            f"{len(data)} training images (0..{len(data) - 1})"
        )
    image, label = data.images[args.index], int(data.labels[args.index])
    try:
        model = build_model(
            args.model,
            activation=args.activation,
            in_channels=data.channels,
            num_classes=data.num_classes,
            image_size=image.shape[-1],
            init=args.init,
            seed=args.seed,
        )
        validate(model, tuple(image.shape))
        grads = single_sample_gradients(model, image, label, dtype=DTYPES[args.dtype])
        result = reconstruct(model, grads, tuple(image.shape))
    except (EngineError, ValueError) as exc:
        raise UsageError(str(exc)) from None

    metrics = image_metrics(image, result.image)
    tag = f"{name}-{args.index}-{args.model}-{args.activation}-{args.dtype}"
    out = args.out or Path("runs") / "reconstruct" / tag
    png = save_side_by_side(
        out / "reconstruction.png",
        image,
        result.image,
        title=f"{tag}: PSNR {metrics.psnr:.1f} dB, SSIM {metrics.ssim:.4f}",
    )
    record = {
        "dataset": name,
        "index": args.index,
        "model": args.model,
        "activation": args.activation,
        "init": args.init,
        "seed": args.seed,
        "dtype": args.dtype,
        "label_true": label,
        "label_recovered": result.label,
        "mse": metrics.mse,
        "psnr": metrics.psnr,
        "ssim": metrics.ssim,
        **reconstruction_record(result),
    }
    js = write_json(out / "result.json", record)

    summary = Table(title=escape(f"R-CONV on {tag}"), title_justify="left")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("PSNR (dB, MAX=1)", f"{metrics.psnr:.2f}")
    summary.add_row("SSIM", f"{metrics.ssim:.5f}")
    summary.add_row("MSE", f"{metrics.mse:.3e}")
    summary.add_row("label true / recovered", f"{label} / {result.label}")
    summary.add_row("seconds", f"{result.seconds:.3f}")
    console.print(summary)
    console.print(diagnostics_table(result))
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    if result.exact:
        console.print("[green]every layer fully determined[/]")
    console.print(f"picture: {png}\nresult:  {js}", markup=False)
    return 0
