"""``fl-attack run``: simulate a federation under attack and log what leaks.

It parses the scenario once, then hands the same ServerApp and ClientApp that
``flwr run .`` loads (built around the parsed scenario) to Flower's Simulation runtime.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from rich.console import Console

from fl_attack.commands.errors import UsageError
from fl_attack.config import ScenarioConfig, ScenarioError, load_scenario
from fl_attack.data import DataError
from fl_attack.reporting.checkpoint import (
    SCENARIO_FILE,
    RunStateError,
    load_checkpoint,
    scenario_digest,
)
from fl_attack.reporting.leaks import SUMMARY_FILE

__all__ = ["register", "resume", "run", "simulate"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand."""
    p = sub.add_parser(
        "run",
        help="run a federation under attack and log every leaked image",
        description=(
            "Simulate the scenario's federation (Flower Simulation runtime): honest clients "
            "train, the malicious server inverts each update, and the leak log goes to "
            "<out-dir>/<name>/ (round_<r>.png, leaks.jsonl, summary.json). A run that was "
            "killed continues after its last completed round with --resume RUN_DIR."
        ),
    )
    p.add_argument(
        "scenario",
        type=Path,
        nargs="?",
        default=None,
        help="scenario TOML file, e.g. scenarios/default.toml (not with --resume)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue a killed run (its folder, <out-dir>/<name>) after its last completed round",
    )
    p.add_argument("--name", default=None, help="run name (overrides [run] name)")
    p.add_argument("--rounds", type=int, default=None, help="overrides [run] rounds")
    p.add_argument("--clients", type=int, default=None, help="overrides [data] num-clients")
    p.add_argument("--out-dir", type=Path, default=None, help="overrides [run] out-dir")
    p.add_argument("--data-dir", type=Path, default=None, help="overrides [data] data-dir")
    p.add_argument(
        "--no-attack", action="store_true", help="plain FedAvg, no malicious server (accuracy only)"
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's INFO logs")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``fl-attack run``; raises :class:`UsageError` on a bad scenario."""
    if args.resume is not None:
        return resume(args)
    if args.scenario is None:
        raise UsageError(
            "fl-attack run: no scenario given; pass a scenario TOML file (e.g. "
            "scenarios/default.toml), or --resume RUN_DIR to continue a killed run"
        )
    overrides: dict[str, bool | int | float | str] = {}
    for dotted, value in (
        ("run.name", args.name),
        ("run.rounds", args.rounds),
        ("data.num-clients", args.clients),
        ("run.out-dir", args.out_dir),
        ("data.data-dir", args.data_dir),
    ):
        if value is not None:
            overrides[dotted] = str(value) if isinstance(value, Path) else value
    if args.no_attack:
        overrides["attack.enabled"] = False
    try:
        scenario = load_scenario(args.scenario, overrides)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None
    _check_writable(scenario.run.run_dir)
    console = Console()
    simulate(scenario, console=console, verbose=args.verbose)
    _print_artefacts(console, scenario)
    return 0


def resume(args: argparse.Namespace) -> int:
    """Continue the run in ``args.resume`` after its last completed round.

    Raises
    ------
    UsageError
        If other options come with ``--resume``, or the folder is not a run folder, or
        its saved scenario or checkpoint is unreadable or inconsistent.
    """
    given = [
        flag
        for flag, value in (
            ("SCENARIO", args.scenario),
            ("--name", args.name),
            ("--rounds", args.rounds),
            ("--clients", args.clients),
            ("--out-dir", args.out_dir),
            ("--data-dir", args.data_dir),
        )
        if value is not None
    ] + (["--no-attack"] if args.no_attack else [])
    if given:
        raise UsageError(
            f"--resume {args.resume}: {', '.join(given)} cannot be combined with it (a run "
            f"continues with the settings in its {SCENARIO_FILE}); drop them"
        )
    run_dir = args.resume.expanduser().resolve()
    if not run_dir.is_dir():
        raise UsageError(
            f"--resume {args.resume}: no such folder; pass the folder of the run to continue, "
            "<out-dir>/<name> (e.g. runs/default)"
        )
    try:
        digest = scenario_digest(run_dir)
        checkpoint = load_checkpoint(run_dir)
    except RunStateError as exc:
        raise UsageError(f"--resume {args.resume}: {exc}") from None
    # the folder may have moved since the run started: it is the run folder now
    overrides = {"run.out-dir": str(run_dir.parent), "run.name": run_dir.name}
    try:
        scenario = load_scenario(run_dir / SCENARIO_FILE, overrides)
    except ScenarioError as exc:
        raise UsageError(f"--resume {args.resume}: {exc}") from None
    if checkpoint is not None and checkpoint.scenario_digest != digest:
        raise UsageError(
            f"--resume {args.resume}: {SCENARIO_FILE} was edited after checkpoint.pt was "
            "written; restore it, or start a new run with fl-attack run SCENARIO"
        )
    done = checkpoint.server_round if checkpoint else 0
    total = scenario.run.rounds
    console = Console()
    if done >= total and (run_dir / SUMMARY_FILE).is_file():
        console.print(
            f"run {scenario.run.name!r} already finished all {total} rounds; nothing to do "
            f"(summary: {_relative(run_dir / SUMMARY_FILE)})",
            markup=False,
        )
        return 0
    console.print(
        f"resuming run {scenario.run.name!r}: {done} of {total} rounds completed, "
        f"continuing with round {min(done + 1, total)}",
        markup=False,
    )
    simulate(scenario, console=console, verbose=args.verbose, resume=True)
    _print_artefacts(console, scenario)
    return 0


def _check_writable(run_dir: Path) -> None:
    """Fail now, not inside the runtime, when the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise UsageError(
            f"[run] out-dir: cannot write the run folder {str(run_dir)!r} "
            f"({exc.strerror or type(exc).__name__}); fix: set [run] out-dir (or --out-dir) "
            "to a folder you can write, or change [run] name (--name)"
        ) from None


def _print_artefacts(console: Console, scenario: ScenarioConfig) -> None:
    """Say where the run's files are."""
    run_dir = _relative(scenario.run.run_dir)
    if scenario.attack.enabled:
        console.print(f"leak log: {run_dir / 'leaks.jsonl'}", markup=False)
    console.print(f"summary:  {run_dir / 'summary.json'}", markup=False)
    if scenario.attack.enabled:
        console.print(f"pictures: {run_dir / 'round_*.png'}", markup=False)


def simulate(
    scenario: ScenarioConfig,
    *,
    console: Console | None,
    verbose: bool = False,
    resume: bool = False,
) -> None:
    """Run ``scenario`` on Flower's Simulation runtime, one SuperNode per client.

    Parameters
    ----------
    scenario : ScenarioConfig
        The parsed scenario.
    console : rich.console.Console or None
        Progress bars and the closing table.
    verbose : bool
        Keep Flower's INFO logs.
    resume : bool
        Continue the run folder after its last completed round (see
        :func:`server.server_app.run_server`).

    Raises
    ------
    UsageError
        If the data set cannot be loaded or split as the scenario asks.
    """
    from fl_attack.simulation import load_federated_data

    try:
        load_federated_data(scenario.data)  # fail fast, before the runtime starts
    except (DataError, ValueError) as exc:
        raise UsageError(str(exc)) from None

    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import make_server_app

    # CPU only: opt in to Ray's coming GPU-variable behaviour instead of hearing about it
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(_quiet_expected_warnings)
    run_simulation(
        server_app=make_server_app(scenario, console=console, resume=resume),
        client_app=make_client_app(scenario),
        num_supernodes=scenario.data.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": os.cpu_count() or 1,
                "num_gpus": 0,
                "log_to_driver": verbose,  # client errors still come back as error replies
            },
        },
    )


_EXPECTED_WARNINGS = (
    "DEPRECATED FEATURE: The `run_simulation` function",  # the runtime this command drives
    "fraction_evaluate is set to 0.0",  # no client-side evaluation, on purpose
)


def _quiet_expected_warnings(record: logging.LogRecord) -> bool:
    """Drop Flower's warnings about choices this command makes on purpose."""
    message = record.getMessage()
    return not any(text in message for text in _EXPECTED_WARNINGS)


def _relative(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path
