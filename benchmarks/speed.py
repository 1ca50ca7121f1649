"""How fast the attack is: R-CONV one image at a time and per round, memory, scaling, DLG, FL.

On CIFAR-10 training images with float32 client gradients (``single_sample_gradients``) and
the CLI's models (U(-0.5, 0.5) at seed 50):

- ``rconv-main`` (ReLU) and ``dlg-lenet`` one image at a time: median ms/image, PSNR;
- one round of ``--clients`` clients (one ``reconstruct_many`` call, same weights,
  different images), in this process and over ``--workers`` processes: amortised
  ms/image, the round's own per-weights work included (median of ``--round-repeats``);
- peak memory (``ru_maxrss`` of a fresh subprocess per measurement);
- scaling: ``rconv-main`` at 32, 64 and 128 px (the classifier follows the input size),
  median seconds/image and the fitted exponent of time against pixel count;
- the DLG baseline on the first ``--dlg-n`` images: time, PSNR, speed-up of R-CONV (timed
  ``RCONV_REPEATS`` times on the same images: a few ms are noisy, DLG's seconds are not);
- the default federation with ``--clients`` clients and 3 rounds, with and without the
  attack, each a fresh ``fl-attack run`` subprocess: wall times and their ratio.

The JSON is rewritten after every section, so an interrupted run keeps what it measured.

Usage: ``python benchmarks/speed.py [--n 20] [--dlg-n 3] [--skip-fl] [--out PATH]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from fl_attack.attacks import ATTACKS, DLGOptions
from fl_attack.data import default_data_dir, load_dataset
from fl_attack.engine import (
    EngineError,
    Reconstruction,
    available_cores,
    check,
    single_sample_gradients,
)
from fl_attack.engine.shared import clear_weight_cache
from fl_attack.metrics import psnr
from fl_attack.models import ACTIVATIONS, build_model, init_uniform
from fl_attack.reporting.files import write_json

REPO = Path(__file__).resolve().parents[1]
SEED = 50  # the CLI's weight seed
NUM_CLASSES = 10
# (filters, stride, activation) of the scaling architecture when rconv-main cannot be inverted.
WIDE: tuple[tuple[int, int, Callable[[], nn.Module]], ...] = (
    (12, 2, ACTIVATIONS["LeakyReLU"]),
    (48, 2, ACTIVATIONS["LeakyReLU"]),
    (48, 1, nn.ReLU),
    (48, 1, nn.ReLU),
)
# Times R-CONV is timed on the DLG images (the median is taken over all of them).
RCONV_REPEATS = 5
MEMORY_CASES = ("baseline", "rconv-one", "rconv-round", "dlg-one")
# Scaling draws its images from the first count * _SCALING_POOL (skipping empty updates).
_SCALING_POOL = 4
# DLG as published (300 L-BFGS steps of up to 20 evaluations, no early stop; Zhu et al.,
# NeurIPS 2019) and with this project's plateau stop (the attack's default).
DLG_VARIANTS = {
    "published": DLGOptions(plateau_rtol=0.0, max_seconds=None),
    "plateau-stop": DLGOptions(),
}

Row = dict[str, Any]


def _images(data_dir: Path | None, count: int, side: int = 32) -> tuple[torch.Tensor, list[int]]:
    """The first ``count`` CIFAR-10 training images (resized bilinearly to ``side``)."""
    data = load_dataset("CIFAR10", root=data_dir, limit=count)
    images = data.images[:count]
    if side != images.shape[-1]:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        images = images.clamp(0.0, 1.0)
    return images, [int(y) for y in data.labels[:count]]


def _model(name: str, activation: str, side: int = 32) -> torch.nn.Module:
    """A zoo model as the CLI builds it: U(-0.5, 0.5) at seed 50."""
    return build_model(
        name,
        activation=activation,
        in_channels=3,
        num_classes=NUM_CLASSES,
        image_size=side,
        init="uniform",
        seed=SEED,
    )


def _gradients(
    model: torch.nn.Module, images: torch.Tensor, labels: list[int]
) -> list[dict[str, torch.Tensor]]:
    """Each image's float32 cross-entropy gradient, as one client would send it."""
    return [single_sample_gradients(model, x, y) for x, y in zip(images, labels, strict=True)]


def _score(image: torch.Tensor, result: Reconstruction | EngineError) -> float:
    """PSNR of a result, -inf for an engine error or a non-finite image."""
    if isinstance(result, EngineError) or not bool(torch.isfinite(result.image).all()):
        return -math.inf
    return psnr(image, result.image)


def one_at_a_time(
    attack: str,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: list[int],
    options: DLGOptions | None = None,
    *,
    cold: bool = False,
    warm: bool = False,
) -> list[Row]:
    """Attack each image on its own; wall ms, PSNR, label and the result's notes per image.

    The engine keeps what depends only on the weights (a conv layer's factorisation) for
    the next image with the same weights. ``cold`` empties that cache before every image,
    so each one pays for it; ``warm`` keeps what an earlier call built, so none does;
    otherwise only the first does (its row says ``cold``).
    """
    shape = tuple(images.shape[1:])
    rows = []
    if not warm:
        clear_weight_cache()
    for index, (x, grads) in enumerate(zip(images, _gradients(model, images, labels), strict=True)):
        if cold:
            clear_weight_cache()
        start = time.perf_counter()
        result = ATTACKS[attack](model, [grads], shape, options=options)[0]
        ms = (time.perf_counter() - start) * 1e3
        rows.append(
            {
                "index": index,
                "ms": ms,
                "psnr": _score(x, result),
                "label_ok": not isinstance(result, EngineError) and result.label == labels[index],
                "cold": cold or (index == 0 and not warm),
                "error": isinstance(result, EngineError),
                "notes": [str(result)] if isinstance(result, EngineError) else list(result.notes),
            }
        )
    return rows


def _describe(options: DLGOptions) -> str:
    stop = (
        f"plateau {options.plateau_rtol:g}/{options.patience}"
        if options.plateau_rtol > 0
        else "no plateau stop"
    )
    steps = f"<= {options.max_iterations} steps of {options.inner_iterations}"
    return f"{options.optimizer}, {steps}, {stop}"


def summary(rows: list[Row]) -> Row:
    """Median/min of the per-image rows (only the warm ones when there are any).

    Times are taken over the images the attack inverted: an update that carries nothing
    (e.g. a saturated loss) is refused within milliseconds and counted under ``errors``.
    """
    warm = [r for r in rows if not r.get("cold", False)]
    rows = warm or rows
    timed = [r["ms"] for r in rows if not r.get("error", False)]
    psnrs = [r["psnr"] for r in rows]
    return {
        "n": len(rows),
        "errors": sum(bool(r.get("error", False)) for r in rows),
        # nan when every image was refused: there is no attack to time
        "median_ms": statistics.median(timed) if timed else math.nan,
        "median_psnr": statistics.median(psnrs),
        "min_psnr": min(psnrs),
        "label_accuracy": sum(r["label_ok"] for r in rows) / len(rows),
    }


def round_of_clients(
    model: torch.nn.Module, images: torch.Tensor, labels: list[int], workers: int
) -> Row:
    """One ``reconstruct_many`` call on every image (one round, shared weights)."""
    grads = _gradients(model, images, labels)
    clear_weight_cache()  # the round pays for its own per-weights work (so does each worker)
    start = time.perf_counter()
    results = ATTACKS["rconv"](model, grads, tuple(images.shape[1:]), workers=workers)
    seconds = time.perf_counter() - start
    psnrs = [_score(x, r) for x, r in zip(images, results, strict=True)]
    return {
        "clients": len(images),
        "workers": workers,
        "seconds": seconds,
        "amortised_ms": seconds * 1e3 / len(images),
        "median_psnr": statistics.median(psnrs),
        "min_psnr": min(psnrs),
        "errors": sum(isinstance(r, EngineError) for r in results),
    }


def _wide_model(side: int) -> nn.Sequential:
    """``rconv-wide``: rconv-main's stack with 12, 48, 48, 48 filters, invertible at 128 px."""
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    channels, size = 3, side
    for filters, stride, activation in WIDE:
        layers += [nn.Conv2d(channels, filters, 5, stride=stride, padding=2), activation()]
        channels, size = filters, (size - 1) // stride + 1
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*layers))
    model.add_module("flatten", nn.Flatten())
    model.add_module("classifier", nn.Linear(channels * size * size, NUM_CLASSES))
    init_uniform(model)
    torch.random.set_rng_state(state)
    return model


def _scaling_builder(sides: list[int]) -> tuple[str, dict[str, list[str]]]:
    """``rconv-main`` if R-CONV can invert it at every side, else ``rconv-wide``; and why."""
    rejected = {
        str(side): problems
        for side in sides
        if (problems := check(_model("rconv-main", "ReLU", side), (3, side, side)))
    }
    return ("rconv-wide" if rejected else "rconv-main"), rejected


def scaling_probe(architecture: str, side: int, count: int, data_dir: Path | None) -> list[Row]:
    """Attack ``count`` images at one side, one at a time (runs in a child process).

    The first image builds the per-weights factorisation; the others reuse it. Images whose
    update carries nothing (a saturated loss: every gradient entry exactly 0, refused in
    milliseconds) would time the refusal, not the attack: the first ``count`` images with a
    non-zero gradient are used instead.
    """
    pool, pool_labels = _images(data_dir, count * _SCALING_POOL, side)
    model = (
        _wide_model(side) if architecture == "rconv-wide" else _model("rconv-main", "ReLU", side)
    )
    chosen = [
        i
        for i, grads in enumerate(_gradients(model, pool, pool_labels))
        if any(bool(g.any()) for g in grads.values())
    ][:count]
    rows = one_at_a_time("rconv", model, pool[chosen], [pool_labels[i] for i in chosen])
    for row, index in zip(rows, chosen, strict=True):
        row["index"] = index
    return rows


def _memory_cap(gib: float) -> Callable[[], None]:
    """A child-process hook capping its data segment, so that a probe fails, not the host."""

    def cap() -> None:
        limit = int(gib * 1024**3)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    return cap


def scaling(args: argparse.Namespace, log: Callable[[str], None]) -> Row:
    """Median seconds/image at each input side and the exponent of time vs pixel count.

    The zoo's ``rconv-main`` is used when R-CONV can invert it at every side; otherwise
    (its strided layers have too few filters beyond ~40 px) the widened stack of
    :func:`_wide_model` is used at every side, so that one architecture is compared. Each
    side runs in a child process stopped after ``--scale-budget`` seconds.
    """
    architecture, rejected = _scaling_builder(args.sizes)
    log(f"scaling on {architecture}" + (" (rconv-main rejected beyond 40 px)" if rejected else ""))
    points: list[Row] = []
    timed_out: list[int] = []
    failed: dict[str, str] = {}
    for side in args.sizes:
        if timed_out:
            timed_out.append(side)  # a smaller side already ran out of time
            continue
        command = [sys.executable, __file__, "--scale-probe", architecture, str(side)]
        command += ["--scale-n", str(args.scale_n), "--threads", str(args.threads)]
        if args.data_dir is not None:
            command += ["--data-dir", str(args.data_dir)]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=args.scale_budget,
                check=False,
                preexec_fn=_memory_cap(args.probe_gib),
            )
        except subprocess.TimeoutExpired:
            timed_out.append(side)
            log(f"scaling {side} px: over the budget of {args.scale_budget:g} s")
            continue
        if done.returncode != 0:  # e.g. the memory cap: record it, keep the other sides
            last = (done.stderr.strip().splitlines() or [""])[-1]
            failed[str(side)] = f"exit {done.returncode}: {last[:300]}"
            timed_out.append(side)
            log(f"scaling {side} px: failed ({failed[str(side)][:120]})")
            continue
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        point = {"side": side, "pixels": side * side, **summary(rows)}
        point["median_s"] = point.pop("median_ms") / 1e3
        # The first image builds the weights' factorisation (nan if it was refused).
        point["first_image_s"] = math.nan if rows[0].get("error") else rows[0]["ms"] / 1e3
        points.append(point)
        log(
            f"scaling {side} px: {point['median_s']:.3f} s/image, first image "
            f"{point['first_image_s']:.3f} s, {point['median_psnr']:.1f} dB"
        )

    def fit(key: str) -> float:  # log-log slope over the sides where an image was inverted
        usable = [p for p in points if math.isfinite(p[key])]
        if len(usable) < 2:
            return math.nan
        x = np.log([p["pixels"] for p in usable])
        return float(np.polyfit(x, np.log([p[key] for p in usable]), 1)[0])

    exponent, exponent_first = fit("median_s"), fit("first_image_s")
    return {
        "architecture": architecture,
        "rconv_main_rejected": rejected,
        "budget_s": args.scale_budget,
        "points": points,
        "timed_out_sides": timed_out,
        "failed": failed,
        "memory_cap_gib": args.probe_gib,
        "exponent_vs_pixels": exponent,
        "exponent_first_image_vs_pixels": exponent_first,
    }


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` size in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(case: str, data_dir: Path | None, clients: int) -> Row:
    """Run one case in this (fresh) process; its peak RSS, whole and during the attack (KiB).

    Importing torch dominates ``ru_maxrss``, so the attack's own peak is taken as well: the
    kernel's high-water mark is reset (``/proc/self/clear_refs``) just before the attack.
    """
    count = clients if case == "rconv-round" else 1
    images, labels = _images(data_dir, count)
    model = _model("rconv-main", "ReLU")
    grads = _gradients(model, images, labels)
    shape = tuple(images.shape[1:])
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # reset VmHWM to VmRSS
    before = _status_kib("VmRSS")
    if case in ("rconv-one", "rconv-round"):
        ATTACKS["rconv"](model, grads, shape)
    elif case == "dlg-one":
        ATTACKS["dlg"](model, grads, shape)
    return {
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
        "rss_before_kib": before,
        "attack_peak_kib": _status_kib("VmHWM"),
    }


def memory(args: argparse.Namespace, log: Callable[[str], None]) -> Row:
    """Peak RSS of each case, each in a fresh subprocess, and what the attack added."""
    cases: dict[str, Row] = {}
    for case in MEMORY_CASES:
        command = [sys.executable, __file__, "--memory-probe", case, "--threads", str(args.threads)]
        command += ["--clients", str(args.clients)]
        if args.data_dir is not None:
            command += ["--data-dir", str(args.data_dir)]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=_memory_cap(args.probe_gib),
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            cases[case] = {"error": f"exit {done.returncode}: {last[:300]}"}
            log(f"memory {case}: failed ({cases[case]['error'][:120]})")
            continue
        kib = json.loads(done.stdout.strip().splitlines()[-1])
        cases[case] = {
            "process_peak_mib": kib["maxrss_kib"] / 1024,
            "attack_added_mib": (kib["attack_peak_kib"] - kib["rss_before_kib"]) / 1024,
        }
        log(
            f"memory {case}: process peak {cases[case]['process_peak_mib']:.0f} MiB, "
            f"attack +{cases[case]['attack_added_mib']:.1f} MiB"
        )
    return {
        "method": "a fresh subprocess per case: process peak = ru_maxrss (getrusage); attack "
        "added = VmHWM after a reset through /proc/self/clear_refs just before the attack, "
        "minus VmRSS at that moment (psutil is not installed)",
        "cases": cases,
    }


def federation(args: argparse.Namespace, log: Callable[[str], None]) -> Row:
    """Wall time of the default scenario with ``--clients`` clients, with and without attack.

    Each arm runs ``--fl-repeats`` times, alternating, and its median is kept: a Flower
    simulation's wall time moves by a second or two from run to run (Ray's start-up, the
    clients' scheduling), as much as the attack itself costs.
    """
    times: dict[str, list[float]] = {"without_attack": [], "with_attack": []}
    last: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="fl-attack-speed-") as tmp:
        env = {
            **os.environ,
            "FLWR_HOME": str(Path(tmp) / "flwr"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": str(args.threads),
        }
        for repeat in range(args.fl_repeats):
            for label, extra in (("without_attack", ["--no-attack"]), ("with_attack", [])):
                name = f"{label}-{repeat}"
                command = [
                    sys.executable,
                    "-m",
                    "fl_attack",
                    "run",
                    str(REPO / "scenarios" / "default.toml"),
                    "--clients",
                    str(args.clients),
                    "--rounds",
                    str(args.rounds),
                    "--name",
                    name,
                    "--out-dir",
                    str(Path(tmp) / "runs"),
                    *extra,
                ]
                start = time.perf_counter()
                done = subprocess.run(
                    command, capture_output=True, text=True, env=env, cwd=REPO, check=False
                )
                seconds = time.perf_counter() - start
                run: Row = {"seconds": seconds, "returncode": done.returncode}
                if done.returncode != 0:
                    run["stderr_tail"] = done.stderr.strip()[-1000:]
                summary_file = Path(tmp) / "runs" / name / "summary.json"
                if summary_file.is_file():
                    run["summary"] = json.loads(summary_file.read_text(encoding="utf-8"))
                times[label].append(seconds)
                last[label] = run
                log(f"federation {name}: {seconds:.1f} s (exit {done.returncode})")
    runs = {
        label: {**last[label], "seconds": statistics.median(times[label]), "runs_s": times[label]}
        for label in times
    }
    ratio = runs["with_attack"]["seconds"] / runs["without_attack"]["seconds"]
    return {"clients": args.clients, "rounds": args.rounds, **runs, "ratio": ratio}


def _refused(row: Row) -> str:
    errors = int(row.get("errors", 0))
    return f" ({errors} refused by the engine, not timed)" if errors else ""


def table(results: Row) -> Table:
    """The figures as one rich table."""
    out = Table(
        title=f"speed, CIFAR-10, float32 gradients, {results['torch_threads']} torch threads",
        title_justify="left",
    )
    out.add_column("measurement")
    out.add_column("time", justify="right")
    out.add_column("PSNR median / min (dB)", justify="right")
    out.add_column("note")

    def db(row: Row) -> str:
        return f"{row['median_psnr']:.1f} / {row['min_psnr']:.1f}"

    for key, name in (("rconv_main", "rconv-main ReLU"), ("dlg_lenet", "dlg-lenet Sigmoid")):
        if key in results:
            row = results[key]["summary"]
            out.add_row(
                f"R-CONV {name}, one at a time",
                f"{row['median_ms']:.1f} ms/img",
                db(row),
                f"median of {row['n']}{_refused(row)}, weights' factorisation already built",
            )
            row = results[key]["cold_summary"]
            out.add_row(
                f"R-CONV {name}, first image of a model",
                f"{row['median_ms']:.1f} ms/img",
                db(row),
                f"median of {row['n']}{_refused(row)}, builds the weights' factorisation",
            )
    for row in results.get("rounds", []):
        where = "in one process" if row["workers"] == 1 else f"over {row['workers']} workers"
        out.add_row(
            f"R-CONV rconv-main, round of {row['clients']} {where}",
            f"{row['amortised_ms']:.1f} ms/img",
            db(row),
            f"median of {len(row['runs_ms'])} calls ({min(row['runs_ms']):.1f}–"
            f"{max(row['runs_ms']):.1f}), {row['errors']} errors",
        )
    if "memory" in results:
        for case, mib in results["memory"]["cases"].items():
            if "error" in mib:
                out.add_row(f"peak RSS, {case}", "failed", "", mib["error"][:60])
                continue
            out.add_row(
                f"peak RSS, {case}",
                f"+{mib['attack_added_mib']:.1f} MiB",
                "",
                f"added by the attack; process peak {mib['process_peak_mib']:.0f} MiB",
            )
    if "scaling" in results:
        scale = results["scaling"]
        for point in scale["points"]:
            out.add_row(
                f"R-CONV {scale['architecture']} at {point['side']} px",
                f"{point['median_s']:.3f} s/img",
                db(point),
                f"median of {point['n']}{_refused(point)}; first image "
                f"{point['first_image_s']:.3f} s",
            )
        for side in scale["timed_out_sides"]:
            if str(side) in scale["failed"]:
                out.add_row(f"R-CONV at {side} px", "failed", "", scale["failed"][str(side)][-60:])
            else:
                out.add_row(
                    f"R-CONV at {side} px",
                    "not measured",
                    "",
                    f"over {scale['budget_s']:g} s, or a smaller side failed",
                )
        out.add_row(
            "scaling exponent (time ~ pixels^k)",
            f"k = {float(scale['exponent_vs_pixels']):.2f}",
            "",
            f"log-log least squares; first image k = {scale['exponent_first_image_vs_pixels']:.2f}",
        )
    for name, entry in results.get("dlg", {}).items():
        rconv = entry["rconv_summary"]
        out.add_row(
            f"R-CONV {name}, DLG's images",
            f"{rconv['median_ms']:.1f} ms/img",
            db(rconv),
            f"median of {rconv['n']} timings, {RCONV_REPEATS} runs of every image",
        )
        for variant in DLG_VARIANTS:
            if variant not in entry:
                continue
            dlg = entry[variant]
            out.add_row(
                f"DLG ({variant}) {name}, same images",
                f"{dlg['summary']['median_ms']:.0f} ms/img",
                db(dlg["summary"]),
                dlg["options"],
            )
            out.add_row(
                f"speed-up R-CONV vs DLG ({variant}), {name}",
                f"{dlg['speedup']:.0f}x",
                "",
                f"{dlg['speedup_cold']:.0f}x against R-CONV's first image of a model",
            )
    if "federation" in results:
        fl = results["federation"]
        for label in ("without_attack", "with_attack"):
            out.add_row(
                f"FL default, {fl['clients']} clients, {fl['rounds']} rounds, "
                + label.replace("_", " "),
                f"{fl[label]['seconds']:.1f} s",
                "",
                "median of " + ", ".join(f"{t:.1f}" for t in fl[label]["runs_s"]) + " s; last exit "
                f"{fl[label]['returncode']}",
            )
        out.add_row("FL time ratio with / without attack", f"{fl['ratio']:.2f}", "", "")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="images timed one at a time")
    parser.add_argument("--clients", type=int, default=64, help="clients per round")
    parser.add_argument("--dlg-n", type=int, default=3, help="images attacked by DLG")
    parser.add_argument(
        "--cold-n", type=int, default=3, help="images timed with an empty per-weights cache"
    )
    parser.add_argument("--scale-n", type=int, default=3, help="images per input size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument(
        "--scale-budget", type=float, default=600.0, help="seconds per input size, at most"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=available_cores(),
        help="processes for the round of clients (default: one per core)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the FL runs")
    parser.add_argument(
        "--fl-repeats", type=int, default=3, help="runs of each FL arm (the median is kept)"
    )
    parser.add_argument(
        "--round-repeats",
        type=int,
        default=5,
        help="runs of the round of clients per setting (the median is kept)",
    )
    parser.add_argument("--skip-fl", action="store_true", help="leave out the FL runs")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory probes")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1, as the server attacks with)"
    )
    parser.add_argument(
        "--probe-gib", type=float, default=12.0, help="memory cap of each probe subprocess (GiB)"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="npz subsets folder")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed.json")
    parser.add_argument("--memory-probe", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    parser.add_argument("--scale-probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.data_dir is None:
        args.data_dir = default_data_dir()
    if args.memory_probe:  # child process of memory(): one case, one JSON line
        print(json.dumps(memory_probe(args.memory_probe, args.data_dir, args.clients)))
        return 0
    if args.scale_probe:  # child process of scaling(): one side, the rows as one JSON line
        architecture, side = args.scale_probe
        rows = scaling_probe(architecture, int(side), args.scale_n, args.data_dir)
        print(json.dumps(rows))
        return 0

    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"torch threads: {torch.get_num_threads()} (set by --threads)")

    def log(line: str) -> None:
        console.print(line, markup=False)

    results: Row = {
        "dataset": "CIFAR10",
        "gradients": "float32",
        "init": "uniform",
        "seed": SEED,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load_average_at_start": list(os.getloadavg()),
    }

    def save() -> None:  # after every section: an interrupted run keeps what it measured
        write_json(args.out, results)

    count = max(args.n, args.clients, args.dlg_n, args.cold_n)
    images, labels = _images(args.data_dir, count)
    for key, name, activation in (
        ("rconv_main", "rconv-main", "ReLU"),
        ("dlg_lenet", "dlg-lenet", "Sigmoid"),
    ):
        model = _model(name, activation)
        rows = one_at_a_time("rconv", model, images[: args.n], labels[: args.n])
        first = images[: args.cold_n], labels[: args.cold_n]
        cold = one_at_a_time("rconv", model, *first, cold=True)
        results[key] = {
            "model": name,
            "activation": activation,
            "summary": summary(rows),
            "cold_summary": summary(cold),
            "rows": rows,
            "cold_rows": cold,
        }
        save()
        log(
            f"{name}: {results[key]['summary']['median_ms']:.1f} ms/image (weights seen before), "
            f"{results[key]['cold_summary']['median_ms']:.1f} ms/image (first image of a model)"
        )

    # Each setting --round-repeats times, alternating (a round lasts about a second, and a
    # second on this machine moves by 10 % from run to run): the median run is kept.
    runs: dict[int, list[Row]] = {w: [] for w in sorted({1, args.workers})}
    for _ in range(args.round_repeats):
        for workers, done in runs.items():
            done.append(
                round_of_clients(
                    _model("rconv-main", "ReLU"),
                    images[: args.clients],
                    labels[: args.clients],
                    workers,
                )
            )
    results["rounds"] = []
    for workers, done in runs.items():
        row = dict(sorted(done, key=lambda r: r["seconds"])[len(done) // 2])
        row["runs_ms"] = [r["amortised_ms"] for r in done]
        results["rounds"].append(row)
        log(
            f"round of {args.clients}, {workers} worker(s): {row['amortised_ms']:.1f} ms/image "
            f"amortised (median of {len(done)})"
        )
    save()

    if not args.skip_memory:
        results["memory"] = memory(args, log)
        save()

    results["scaling"] = scaling(args, log)
    save()

    results["dlg"] = {}
    for name, activation in (("rconv-main", "ReLU"), ("dlg-lenet", "Sigmoid")):
        model = _model(name, activation)
        # Built once (the first image of a model is timed below): every repeat is warm.
        one_at_a_time("rconv", model, images[:1], labels[:1])
        rconv_rows = [
            row
            for _ in range(RCONV_REPEATS)
            for row in one_at_a_time(
                "rconv", model, images[: args.dlg_n], labels[: args.dlg_n], warm=True
            )
        ]
        rconv_cold = one_at_a_time(
            "rconv", model, images[: args.dlg_n], labels[: args.dlg_n], cold=True
        )
        entry: Row = {
            "model": name,
            "activation": activation,
            "rconv_summary": summary(rconv_rows),
            "rconv_cold_summary": summary(rconv_cold),
        }
        for variant, options in DLG_VARIANTS.items():
            # warm: DLG keeps nothing between images, so every image counts.
            dlg_rows = one_at_a_time(
                "dlg", model, images[: args.dlg_n], labels[: args.dlg_n], options, warm=True
            )
            dlg_summary = summary(dlg_rows)
            entry[variant] = {
                "options": _describe(options),
                "summary": dlg_summary,
                "rows": dlg_rows,
                "speedup": dlg_summary["median_ms"] / entry["rconv_summary"]["median_ms"],
                "speedup_cold": dlg_summary["median_ms"] / entry["rconv_cold_summary"]["median_ms"],
            }
            log(
                f"DLG ({variant}) on {name}: {dlg_summary['median_ms']:.0f} ms/image, "
                f"{dlg_summary['median_psnr']:.1f} dB"
            )
        results["dlg"][name] = entry
        save()

    if not args.skip_fl:
        results["federation"] = federation(args, log)
        save()

    results["load_average_at_end"] = list(os.getloadavg())
    save()
    console.print(table(results))
    console.print(
        f"load average (1/5/15 min) at start {results['load_average_at_start']}, "
        f"at end {results['load_average_at_end']}"
    )
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
