"""``fl-attack sweep``: the privacy-utility curve of one defense, from real federated runs.

The scenario's ``[sweep]`` table names an axis (``defense.scale``, ``client.batch-size``,
...), its values, and the seeds to repeat each point with (optionally a second axis).
Every grid point runs the scenario through the same :func:`~fl_attack.commands.run.simulate`
as ``fl-attack run``, quietly, and its leak log is condensed into one row. The result is
written to ``<out-dir>/<name>/sweep.json``; the table and ``sweep.png`` are drawn from that
very structure, so the picture's numbers are the file's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fl_attack.commands.errors import UsageError
from fl_attack.config import ScenarioConfig, ScenarioError, load_scenario

__all__ = [
    "CROSSING_DB",
    "SWEEP_FILE",
    "SWEEP_PLOT",
    "Crossing",
    "PointResult",
    "RunResult",
    "SweepResult",
    "crossing",
    "register",
    "sweep",
    "sweep_figure",
]

CROSSING_DB = 20.0
"""The leak PSNR whose crossing the sweep reports."""

SWEEP_FILE = "sweep.json"
SWEEP_PLOT = "sweep.png"


@dataclass(frozen=True, slots=True)
class RunResult:
    """One simulated run of the grid.

    Attributes
    ----------
    value, value2 : float
        The axis values (``value2`` is ``nan`` without a second axis).
    seed : int
        ``[run] seed``.
    run_dir : str
        Its leak log.
    estimates : int
        Inverted updates scored against the truth (clean or flagged).
    clean_leaks : int
        Of those, the ones whose verdict is ``leak``.
    flagged : int
        Those flagged ``noise-detected`` or ``not-single-sample``.
    failed : int
        Updates the engine could not invert.
    psnr_median : float or None
        Median PSNR of all estimates (flagged included: what the attacker gets).
    ssim_mean : float or None
        Mean SSIM of all estimates.
    clean_psnr_median : float or None
        Median PSNR of the clean leaks only.
    test_accuracy : float or None
        Test accuracy of the final global model.
    epsilon : float or None
        Per client and round, for ``clip-gaussian``.
    seconds : float
        Wall time of the run.
    """

    value: float
    value2: float
    seed: int
    run_dir: str
    estimates: int
    clean_leaks: int
    flagged: int
    failed: int
    psnr_median: float | None
    ssim_mean: float | None
    clean_psnr_median: float | None
    test_accuracy: float | None
    epsilon: float | None
    seconds: float


@dataclass(frozen=True, slots=True)
class PointResult:
    """One grid point over its seeds: mean and standard deviation of each run's figure.

    Attributes
    ----------
    value, value2 : float
        The axis values.
    runs : int
        Seeds run.
    psnr_mean, psnr_std : float or None
        Of the runs' median estimate PSNR.
    ssim_mean, ssim_std : float or None
        Of the runs' mean SSIM.
    accuracy_mean, accuracy_std : float or None
        Of the runs' final test accuracy.
    flagged_fraction : float or None
        Flagged estimates over all estimates of the point.
    clean_leaks : int
        Clean leaks over the point's runs.
    epsilon : float or None
        Per client and round (``clip-gaussian``).
    """

    value: float
    value2: float
    runs: int
    psnr_mean: float | None
    psnr_std: float | None
    ssim_mean: float | None
    ssim_std: float | None
    accuracy_mean: float | None
    accuracy_std: float | None
    flagged_fraction: float | None
    clean_leaks: int
    epsilon: float | None


@dataclass(frozen=True, slots=True)
class Crossing:
    """Where the mean leak PSNR first falls below :data:`CROSSING_DB` along the axis.

    Attributes
    ----------
    value : float
        The axis value, interpolated linearly between the two points around it.
    accuracy : float or None
        The mean test accuracy interpolated at that value.
    between : tuple of float
        The two grid values.
    """

    value: float
    accuracy: float | None
    between: tuple[float, float]


@dataclass(frozen=True, slots=True)
class SweepResult:
    """The whole sweep (``sweep.json``).

    Attributes
    ----------
    name, scenario : str
        The sweep's name and scenario file.
    axis, axis2 : str
        The swept keys (``axis2`` ``""`` without a second axis).
    seeds : tuple of int
        Seeds of each point.
    runs : tuple of RunResult
        Every run.
    points : tuple of PointResult
        Every grid point, in grid order.
    crossing : dict of str to Crossing or None
        Per value of the second axis (key ``""`` without one).
    seconds : float
        Wall time of the sweep.
    """

    name: str
    scenario: str
    axis: str
    axis2: str
    seeds: tuple[int, ...]
    runs: tuple[RunResult, ...]
    points: tuple[PointResult, ...]
    crossing: dict[str, Crossing | None]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return asdict(self)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    p = sub.add_parser(
        "sweep",
        help="run a grid over a defense's strength and plot the privacy-utility curve",
        description=(
            "Run the scenario once per value of its [sweep] axis and seed (real federated "
            "rounds, quietly), then write <out-dir>/<name>/sweep.json and sweep.png (leak "
            f"PSNR, SSIM and test accuracy against strength, with the {CROSSING_DB:g} dB line) "
            "and print the table."
        ),
    )
    p.add_argument("scenario", type=Path, help="scenario TOML with a [sweep] table")
    p.add_argument("--out-dir", type=Path, default=None, help="overrides [run] out-dir")
    p.add_argument("--data-dir", type=Path, default=None, help="overrides [data] data-dir")
    p.add_argument("--rounds", type=int, default=None, help="overrides [run] rounds")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``fl-attack sweep``; raises :class:`UsageError` on a bad scenario."""
    overrides: dict[str, bool | int | float | str] = {}
    for dotted, value in (
        ("run.out-dir", args.out_dir),
        ("data.data-dir", args.data_dir),
        ("run.rounds", args.rounds),
    ):
        if value is not None:
            overrides[dotted] = str(value) if isinstance(value, Path) else value
    try:
        scenario = load_scenario(args.scenario, overrides)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None
    if scenario.sweep is None:
        raise UsageError(
            f"scenario {str(args.scenario)!r}: no [sweep] table; fix: add one with axis, "
            "values and seeds, as in scenarios/defense-noise.toml"
        )
    console = Console()
    result = sweep(scenario, console=console)
    console.print(sweep_table(result))
    out = Path(result.runs[0].run_dir).parent if result.runs else scenario.run.run_dir
    console.print(f"sweep:   {out / SWEEP_FILE}", markup=False, soft_wrap=True)
    console.print(f"plot:    {out / SWEEP_PLOT}", markup=False, soft_wrap=True)
    return 0


def sweep(scenario: ScenarioConfig, *, console: Console | None = None) -> SweepResult:
    """Run the grid of ``scenario.sweep`` and write ``sweep.json`` and ``sweep.png``.

    Parameters
    ----------
    scenario : ScenarioConfig
        With a ``[sweep]`` table; each run is this scenario with the axis values and the
        seed set, writing to ``<out-dir>/<name>/<axis>=<value>[,...]-seed<seed>/``.
    console : rich.console.Console, optional
        Shows the progress bar.

    Returns
    -------
    SweepResult
        As written to ``sweep.json``.

    Raises
    ------
    UsageError
        If a grid point is not a valid scenario (e.g. a value out of range).
    """
    from fl_attack.commands.run import simulate

    grid = scenario.sweep
    if grid is None:
        raise UsageError("the scenario has no [sweep] table")
    source = scenario.source or Path("scenario.toml")
    folder = scenario.run.run_dir
    folder.mkdir(parents=True, exist_ok=True)
    second = grid.values2 if grid.axis2 is not None else (math.nan,)
    cells = list(itertools.product(grid.values, second, grid.seeds))
    start = time.perf_counter()
    runs: list[RunResult] = []
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_errors_only)  # failed inversions are the point here, not news
    progress = Progress(
        TextColumn("[bold]sweep[/] {task.fields[cell]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )
    try:
        with progress:
            task = progress.add_task("sweep", total=len(cells), cell="")
            for value, value2, seed in cells:
                label = _cell_name(grid.axis, value, grid.axis2, value2, seed)
                progress.update(task, cell=escape(label))
                overrides: dict[str, bool | int | float | str] = {
                    grid.axis: value,
                    "run.seed": seed,
                    "run.name": label,
                    "run.out-dir": str(folder),
                }
                if grid.axis2 is not None:
                    overrides[grid.axis2] = value2
                try:
                    cell = load_scenario(source, _overrides(scenario, overrides))
                except ScenarioError as exc:
                    raise UsageError(f"[sweep] point {label}: {exc}") from None
                began = time.perf_counter()
                simulate(cell, console=Console(quiet=True))
                runs.append(_run_result(cell, value, value2, seed, time.perf_counter() - began))
                progress.advance(task)
    finally:
        flwr_logger.removeFilter(_errors_only)
    points = tuple(
        _point(value, value2, [r for r in runs if _same(r, value, value2)])
        for value, value2 in itertools.product(grid.values, second)
    )
    crossings: dict[str, Crossing | None] = {}
    for value2 in second:
        along = [p for p in points if _same_value(p.value2, value2)]
        crossings["" if math.isnan(value2) else f"{value2:g}"] = crossing(along)
    result = SweepResult(
        name=scenario.run.name,
        scenario=str(source),
        axis=grid.axis,
        axis2=grid.axis2 or "",
        seeds=grid.seeds,
        runs=tuple(runs),
        points=points,
        crossing=crossings,
        seconds=time.perf_counter() - start,
    )
    from fl_attack.reporting.files import write_json

    write_json(folder / SWEEP_FILE, result.to_json())
    figure = sweep_figure(result)
    figure.savefig(folder / SWEEP_PLOT, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return result


def crossing(points: list[PointResult]) -> Crossing | None:
    """Where the mean PSNR first drops below :data:`CROSSING_DB`, interpolated linearly.

    Parameters
    ----------
    points : list of PointResult
        Along the axis, in order.

    Returns
    -------
    Crossing or None
        ``None`` if the PSNR never crosses (or no two neighbours have a PSNR).
    """
    for a, b in itertools.pairwise(points):
        if a.psnr_mean is None or b.psnr_mean is None:
            continue
        if a.psnr_mean >= CROSSING_DB > b.psnr_mean:
            t = (a.psnr_mean - CROSSING_DB) / (a.psnr_mean - b.psnr_mean)
            value = a.value + t * (b.value - a.value)
            accuracy = None
            if a.accuracy_mean is not None and b.accuracy_mean is not None:
                accuracy = a.accuracy_mean + t * (b.accuracy_mean - a.accuracy_mean)
            return Crossing(value=value, accuracy=accuracy, between=(a.value, b.value))
    return None


def sweep_figure(result: SweepResult) -> Any:
    """The privacy-utility figure, drawn from ``result.points`` only.

    Parameters
    ----------
    result : SweepResult
        What :func:`sweep` wrote to ``sweep.json``.

    Returns
    -------
    matplotlib.figure.Figure
        Three panels (leak PSNR with the 20 dB line, SSIM, test accuracy) against the
        axis; one line per value of the second axis, error bars one standard deviation
        over the seeds. A zero on the axis is drawn on a symmetric-log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    panels = (
        ("psnr", "leak PSNR of all estimates (dB)"),
        ("ssim", "leak SSIM"),
        ("accuracy", "test accuracy"),
    )
    seconds = sorted({p.value2 for p in result.points}, key=lambda v: (math.isnan(v), v))
    values = [p.value for p in result.points]
    positive = [abs(v) for v in values if v != 0]
    for ax, (field, title) in zip(axes, panels, strict=True):
        for value2 in seconds:
            along = [p for p in result.points if _same_value(p.value2, value2)]
            kept = [p for p in along if getattr(p, f"{field}_mean") is not None]
            xs = [p.value for p in kept]
            ys = [getattr(p, f"{field}_mean") for p in kept]
            errs = [getattr(p, f"{field}_std") or 0.0 for p in kept]
            name = None if math.isnan(value2) else f"{result.axis2} = {value2:g}"
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
        if field == "psnr":
            ax.axhline(CROSSING_DB, color="grey", linestyle="--", linewidth=1)
        if positive and 0 in values and max(positive) / min(positive) > 50:
            ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xlim(left=min(values) - 0.3 * min(positive))  # no empty negative side
        elif positive and min(values) > 0 and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(result.axis)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if any(not math.isnan(v) for v in seconds):
            ax.legend(fontsize=8)
    figure.suptitle(
        f"{result.name}: {len(result.seeds)} seeds per point, mean ± std "
        "(PSNR: median over each run's client-rounds)"
    )
    return figure


def sweep_table(result: SweepResult) -> Table:
    """One row per grid point, then the 20 dB crossing in the caption."""
    table = Table(
        title=escape(f"{result.name}: {result.axis}, seeds {list(result.seeds)}"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
    )
    table.add_column(result.axis, justify="right")
    if result.axis2:
        table.add_column(result.axis2, justify="right")
    for column in ("PSNR dB", "SSIM", "test acc", "flagged", "clean", "eps"):
        table.add_column(column, justify="right")
    for p in result.points:
        cells = [f"{p.value:g}"]
        if result.axis2:
            cells.append(f"{p.value2:g}")
        cells += [
            _pm(p.psnr_mean, p.psnr_std, "{:.1f}"),
            _pm(p.ssim_mean, p.ssim_std, "{:.3f}"),
            _pm(
                None if p.accuracy_mean is None else 100 * p.accuracy_mean,
                None if p.accuracy_std is None else 100 * p.accuracy_std,
                "{:.1f}%",
            ),
            "-" if p.flagged_fraction is None else f"{100 * p.flagged_fraction:.0f}%",
            str(p.clean_leaks),
            "-" if p.epsilon is None else f"{p.epsilon:.3g}",
        ]
        table.add_row(*cells)
    notes = []
    for key, found in result.crossing.items():
        where = f" ({result.axis2} = {key})" if key else ""
        if found is None:
            notes.append(f"PSNR does not cross {CROSSING_DB:g} dB{where}")
        else:
            acc = "-" if found.accuracy is None else f"{100 * found.accuracy:.1f}%"
            notes.append(
                f"PSNR crosses {CROSSING_DB:g} dB{where} at {result.axis} = {found.value:.3g} "
                f"(between {found.between[0]:g} and {found.between[1]:g}); test accuracy "
                f"there {acc}"
            )
    notes.append(f"{len(result.runs)} runs in {result.seconds:.0f} s")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


# ---------------------------------------------------------------- helpers


def _errors_only(record: logging.LogRecord) -> bool:
    """Keep only Flower's errors while the sweep runs."""
    return record.levelno >= logging.ERROR


def _overrides(
    scenario: ScenarioConfig, overrides: dict[str, bool | int | float | str]
) -> dict[str, bool | int | float | str]:
    """The point's overrides plus those the command line already applied."""
    base: dict[str, bool | int | float | str] = {
        "run.rounds": scenario.run.rounds,
    }
    if scenario.data.data_dir is not None:
        base["data.data-dir"] = str(scenario.data.data_dir)
    return {**base, **overrides}


def _cell_name(axis: str, value: float, axis2: str | None, value2: float, seed: int) -> str:
    """A folder name for one run: ``scale=0.001-seed0`` (no '/')."""
    name = f"{axis.split('.')[-1]}={value:g}"
    if axis2 is not None:
        name += f",{axis2.split('.')[-1]}={value2:g}"
    return f"{name}-seed{seed}"


def _run_result(
    cell: ScenarioConfig, value: float, value2: float, seed: int, seconds: float
) -> RunResult:
    """Condense one run's ``leaks.jsonl`` and ``summary.json``."""
    run_dir = cell.run.run_dir
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    records = []
    leaks = run_dir / "leaks.jsonl"
    if leaks.is_file():
        records = [json.loads(line) for line in leaks.read_text(encoding="utf-8").splitlines()]
    scored = [r for r in records if isinstance(r.get("psnr"), int | float)]
    flagged = [r for r in scored if r.get("verdict") not in ("", "leak", None)]
    clean = [r for r in scored if r.get("verdict") in ("", "leak", None)]
    ssims = [r["ssim"] for r in scored if isinstance(r.get("ssim"), int | float)]
    return RunResult(
        value=float(value),
        value2=float(value2),
        seed=seed,
        run_dir=str(run_dir),
        estimates=len(scored),
        clean_leaks=len(clean),
        flagged=len(flagged),
        failed=sum(1 for r in records if r.get("status") == "failed"),
        psnr_median=statistics.median(r["psnr"] for r in scored) if scored else None,
        ssim_mean=statistics.fmean(ssims) if ssims else None,
        clean_psnr_median=statistics.median(r["psnr"] for r in clean) if clean else None,
        test_accuracy=summary.get("final_test_accuracy"),
        epsilon=summary.get("epsilon"),
        seconds=seconds,
    )


def _point(value: float, value2: float, runs: list[RunResult]) -> PointResult:
    """Mean and standard deviation over the seeds of one grid point."""
    estimates = sum(r.estimates for r in runs)
    return PointResult(
        value=float(value),
        value2=float(value2),
        runs=len(runs),
        psnr_mean=_mean([r.psnr_median for r in runs]),
        psnr_std=_std([r.psnr_median for r in runs]),
        ssim_mean=_mean([r.ssim_mean for r in runs]),
        ssim_std=_std([r.ssim_mean for r in runs]),
        accuracy_mean=_mean([r.test_accuracy for r in runs]),
        accuracy_std=_std([r.test_accuracy for r in runs]),
        flagged_fraction=sum(r.flagged for r in runs) / estimates if estimates else None,
        clean_leaks=sum(r.clean_leaks for r in runs),
        epsilon=runs[0].epsilon if runs else None,
    )


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: list[float | None]) -> float | None:
    kept = _finite(values)
    return statistics.fmean(kept) if kept else None


def _std(values: list[float | None]) -> float | None:
    kept = _finite(values)
    return statistics.pstdev(kept) if kept else None


def _same_value(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _same(run: RunResult, value: float, value2: float) -> bool:
    return run.value == float(value) and _same_value(run.value2, float(value2))


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    """``mean ± std`` for the table."""
    if mean is None:
        return "-"
    text = fmt.format(mean)
    return text if not std else f"{text} ± {fmt.format(std)}"
