"""``fl-attack run``: simulate a federation under attack and log what leaks.

It parses the scenario once, then hands the same ServerApp and ClientApp that
``flwr run .`` loads (built around the parsed scenario) to Flower's Simulation runtime.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from rich.console import Console

from fl_attack.commands.errors import UsageError
from fl_attack.config import ScenarioConfig, ScenarioError, load_scenario
from fl_attack.data import DataError

__all__ = ["register", "run", "simulate"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand."""
    p = sub.add_parser(
        "run",
        help="run a federation under attack and log every leaked image",
        description=(
            "Simulate the scenario's federation (Flower Simulation runtime): honest clients "
            "train, the malicious server inverts each update, and the leak log goes to "
            "<out-dir>/<name>/ (round_<r>.png, leaks.jsonl, summary.json)."
        ),
    )
    p.add_argument("scenario", type=Path, help="scenario TOML file, e.g. scenarios/default.toml")
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
    console = Console()
    simulate(scenario, console=console, verbose=args.verbose)
    run_dir = _relative(scenario.run.run_dir)
    if scenario.attack.enabled:
        console.print(f"leak log: {run_dir / 'leaks.jsonl'}", markup=False)
    console.print(f"summary:  {run_dir / 'summary.json'}", markup=False)
    if scenario.attack.enabled:
        console.print(f"pictures: {run_dir / 'round_*.png'}", markup=False)
    return 0


def simulate(scenario: ScenarioConfig, *, console: Console | None, verbose: bool = False) -> None:
    """Run ``scenario`` on Flower's Simulation runtime, one SuperNode per client.

    Parameters
    ----------
    scenario : ScenarioConfig
        The parsed scenario.
    console : rich.console.Console or None
        Progress bars and the closing table.
    verbose : bool
        Keep Flower's INFO logs.

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
        server_app=make_server_app(scenario, console=console),
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
