"""Scenario configuration: one TOML file, parsed once into frozen dataclasses.

A scenario file has six tables, ``[run]``, ``[data]``, ``[model]``, ``[client]``,
``[server]`` and ``[attack]``, with kebab-case keys; each key becomes the snake_case
field of the matching dataclass. Unknown tables or keys, missing keys, wrong types and
out-of-range values raise :class:`ScenarioError`, naming the table, the key, the value
received, the values allowed and the fix. The engine never imports this module.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fl_attack.attacks import ATTACKS
from fl_attack.data import DATA_DIR_ENV, DATASETS, DataError, canonical_name, default_data_dir
from fl_attack.models import ACTIVATIONS, ARCHITECTURES, Init

__all__ = [
    "OVERRIDE_KEYS",
    "RUN_CONFIG_KEYS",
    "AttackConfig",
    "ClientConfig",
    "DataConfig",
    "DefenseConfig",
    "DefenseKind",
    "ModelConfig",
    "Partitioning",
    "RunConfig",
    "ScenarioConfig",
    "ScenarioError",
    "ServerConfig",
    "SweepConfig",
    "ThreatModel",
    "from_run_config",
    "load_scenario",
]

Scalar = bool | int | float | str


class ScenarioError(ValueError):
    """A scenario file, an override or a run config is invalid.

    Attributes
    ----------
    table : str
        The TOML table (``"data"``), or ``""`` when the problem is the file itself.
    key : str
        The key within the table, or ``""``.
    """

    def __init__(self, message: str, *, table: str = "", key: str = "") -> None:
        super().__init__(message)
        self.table = table
        self.key = key


class ThreatModel(StrEnum):
    """What the malicious server may do.

    ``honest-but-curious`` runs the protocol faithfully and only reads the updates.
    A model-tampering server (planting weights before broadcasting) would be a new member.
    """

    HONEST_BUT_CURIOUS = "honest-but-curious"


class Partitioning(StrEnum):
    """How the training images are split between clients."""

    IID = "iid"
    DIRICHLET = "dirichlet"


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Run-wide settings (``[run]``).

    Attributes
    ----------
    name : str
        Name of the run; the leak log goes to ``out_dir / name``.
    rounds : int
        Number of federated rounds.
    seed : int
        Seeds the partitioning and the images each client draws per round.
    out_dir : Path
        Absolute folder holding one subfolder per run.
    """

    name: str
    rounds: int
    seed: int
    out_dir: Path

    @property
    def run_dir(self) -> Path:
        """The folder of this run's artefacts, ``out_dir / name``."""
        return self.out_dir / self.name


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Which images the clients hold (``[data]``).

    Attributes
    ----------
    dataset : str
        Canonical dataset name (see :data:`fl_attack.data.DATASETS`).
    data_dir : Path or None
        Absolute folder with the npz subsets or a torchvision root; ``None`` for ``faces``.
    num_clients : int
        Number of clients (SuperNodes) ``fl-attack run`` starts, one partition each.
    partitioning : Partitioning
        ``iid`` (shuffled, equal shares) or ``dirichlet`` (label skew).
    dirichlet_alpha : float
        Concentration of the Dirichlet label skew; smaller is more skewed.
    test_fraction : float
        Fraction of the images, taken from the end, held out for the test accuracy.
    limit : int or None
        Load only the first ``limit`` images; ``None`` loads them all.
    """

    dataset: str
    data_dir: Path | None
    num_clients: int
    partitioning: Partitioning
    dirichlet_alpha: float
    test_fraction: float
    limit: int | None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The model every client trains (``[model]``).

    Attributes
    ----------
    name : str
        Architecture, one of :data:`fl_attack.models.ARCHITECTURES`.
    activation : str
        Activation filling the free slots, one of :data:`fl_attack.models.ACTIVATIONS`.
    init : Init
        ``uniform`` (the seed's U(-0.5, 0.5)) or ``default`` (PyTorch's).
    seed : int
        Seed of the initial weights.
    num_classes : int or None
        Outputs of the classifier; ``None`` uses the data set's class count. More outputs
        than classes is allowed (the unused ones are never a label).
    """

    name: str
    activation: str
    init: Init
    seed: int
    num_classes: int | None = None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Local training of an honest client (``[client]``).

    Attributes
    ----------
    batch_size : int
        Images per local step (the same batch for every step of a round).
    local_steps : int
        SGD steps per round.
    lr : float
        Learning rate the server sends with each train message.
    """

    batch_size: int
    local_steps: int
    lr: float


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Sampling of the FedAvg server (``[server]``).

    Attributes
    ----------
    min_clients : int
        Clients FedAvg waits for before a round (and samples at least); must not exceed
        the SuperNodes of the federation or the server waits forever.
    fraction_train : float
        Fraction of the connected clients sampled for training each round.
    round_timeout : float
        Seconds the server waits for a round's replies; a client that has not replied
        by then is left out of the round (Flower's ``Strategy.start(timeout=...)``).
    dp_clip_norm : float or None
        Set: FedAvg is wrapped by Flower's ``DifferentialPrivacyServerSideFixedClipping``
        (each update clipped to this norm, Gaussian noise on the aggregate). It sits
        inside the malicious wrapper, which still reads every raw update.
    dp_noise_multiplier : float
        That wrapper's noise multiplier (noise std = multiplier x clip norm / clients).
    """

    min_clients: int
    fraction_train: float
    round_timeout: float = 3600.0
    dp_clip_norm: float | None = None
    dp_noise_multiplier: float = 0.0


@dataclass(frozen=True, slots=True)
class AttackConfig:
    """The malicious server (``[attack]``).

    Attributes
    ----------
    enabled : bool
        Wrap FedAvg in :class:`server.malicious.MaliciousServer`.
    threat_model : ThreatModel
        What the server may do.
    method : str
        The reconstruction method, one of :data:`fl_attack.attacks.ATTACKS` (``rconv``, the
        analytic engine; ``dlg``, the gradient-matching baseline).
    dlg_iterations : int
        Most outer L-BFGS steps the ``dlg`` method takes per client.
    workers : int
        Processes a round's clients are spread over; 0 (the default) means one per core
        the server may use, 1 attacks them one after another in the server process.
    """

    enabled: bool
    threat_model: ThreatModel
    method: str = "rconv"
    dlg_iterations: int = 300
    workers: int = 0


class DefenseKind(StrEnum):
    """What a client does to its update before replying (``[defense] kind``)."""

    NONE = "none"
    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"
    CLIP_GAUSSIAN = "clip-gaussian"
    TOP_K = "top-k"
    QUANTIZE = "quantize"


@dataclass(frozen=True, slots=True)
class DefenseConfig:
    """The clients' defense (``[defense]``, optional; every key has a default).

    Attributes
    ----------
    kind : DefenseKind
        ``none``, ``gaussian`` / ``laplace`` (noise of ``scale``), ``clip-gaussian`` (clip
        to ``clip-norm``, then Gaussian noise of ``noise-multiplier x clip-norm``),
        ``top-k`` (keep ``fraction`` of each tensor) or ``quantize`` (``format``).
    scale : float
        Noise standard deviation (Gaussian) or scale ``b`` (Laplace), in weight units.
    relative : bool
        ``scale`` is relative to the update's L2 norm.
    clip_norm : float or None
        L2 bound of the update (``clip-gaussian``).
    noise_multiplier : float
        Noise std over ``clip_norm`` (``clip-gaussian``).
    delta : float
        The delta of the (epsilon, delta) reported for ``clip-gaussian``.
    fraction : float
        Share of entries ``top-k`` keeps.
    format : str
        ``fp16`` or ``int8`` (``quantize``).
    """

    kind: DefenseKind = DefenseKind.NONE
    scale: float = 0.0
    relative: bool = False
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    fraction: float = 1.0
    format: str = "fp16"


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """A grid of runs for ``fl-attack sweep`` (``[sweep]``, optional).

    Attributes
    ----------
    axis : str
        The ``table.key`` the grid varies (``defense.scale``, ``client.batch-size``).
    values : tuple of float or int
        Its values, weakest defense first.
    seeds : tuple of int
        ``[run] seed`` of the repetitions of each point.
    axis2 : str or None
        An optional second ``table.key``.
    values2 : tuple of float or int
        Its values.
    """

    axis: str
    values: tuple[float | int, ...]
    seeds: tuple[int, ...]
    axis2: str | None = None
    values2: tuple[float | int, ...] = ()


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    """A whole scenario, parsed once.

    Attributes
    ----------
    run, data, model, client, server, attack
        One sub-config per TOML table.
    source : Path or None
        The scenario file it was read from.
    defense : DefenseConfig
        ``[defense]`` (no defense when the table is absent).
    sweep : SweepConfig or None
        ``[sweep]``, read by ``fl-attack sweep`` only.
    """

    run: RunConfig
    data: DataConfig
    model: ModelConfig
    client: ClientConfig
    server: ServerConfig
    attack: AttackConfig
    source: Path | None = None
    defense: DefenseConfig = DefenseConfig()
    sweep: SweepConfig | None = None


# ---------------------------------------------------------------- schema

_MISSING = object()


@dataclass(frozen=True, slots=True)
class _Key:
    """One key of the schema: its type, the allowed values and the fix for a bad value."""

    kind: type
    allowed: str
    check: Callable[[Any], bool] = lambda _: True
    default: Any = _MISSING
    fix: str = ""


def _positive_int(value: int) -> bool:
    return value >= 1


def _fraction(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value < 1.0


def _probability(value: float) -> bool:
    return math.isfinite(value) and 0.0 < value <= 1.0


def _positive_float(value: float) -> bool:
    return math.isfinite(value) and value > 0.0


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0.0


def _numbers(value: list[Any]) -> bool:
    return bool(value) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )


def _seeds(value: list[Any]) -> bool:
    return bool(value) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _name(value: str) -> bool:
    return bool(value) and value not in (".", "..") and "/" not in value and "\\" not in value


def _choice(options: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda value: value in options


def _dataset(value: str) -> bool:
    try:
        canonical_name(value)
    except DataError:
        return False
    return True


_SCHEMA: dict[str, dict[str, _Key]] = {
    "run": {
        "name": _Key(str, "a non-empty folder name without '/'", _name),
        "rounds": _Key(int, "an int >= 1", _positive_int),
        "seed": _Key(int, "an int >= 0", lambda v: v >= 0),
        "out-dir": _Key(str, "a folder path (relative paths start at the working directory)"),
    },
    "data": {
        "dataset": _Key(str, f"one of {', '.join(DATASETS)} (case-insensitive)", _dataset),
        "data-dir": _Key(
            str,
            "a folder path (relative paths start at the working directory)",
            default=None,
        ),
        "num-clients": _Key(int, "an int >= 1", _positive_int),
        "partitioning": _Key(
            str, f"one of {', '.join(p.value for p in Partitioning)}", _choice(tuple(Partitioning))
        ),
        "dirichlet-alpha": _Key(float, "a float > 0", _positive_float, default=0.5),
        "test-fraction": _Key(float, "a float in [0, 1)", _fraction),
        "limit": _Key(int, "an int >= 1 (omit the key to load every image)", _positive_int, None),
    },
    "model": {
        "name": _Key(str, f"one of {', '.join(ARCHITECTURES)}", _choice(tuple(ARCHITECTURES))),
        "activation": _Key(str, f"one of {', '.join(ACTIVATIONS)}", _choice(tuple(ACTIVATIONS))),
        "init": _Key(str, f"one of {', '.join(i.value for i in Init)}", _choice(tuple(Init))),
        "seed": _Key(int, "an int >= 0", lambda v: v >= 0),
        "num-classes": _Key(
            int, "an int >= 2 (omit the key to use the data set's classes)", lambda v: v >= 2, None
        ),
    },
    "client": {
        "batch-size": _Key(int, "an int >= 1", _positive_int),
        "local-steps": _Key(int, "an int >= 1", _positive_int),
        "lr": _Key(float, "a float > 0", _positive_float),
    },
    "server": {
        "min-clients": _Key(
            int,
            "an int >= 1",
            _positive_int,
            fix="keep it at most the number of SuperNodes, or the server waits forever",
        ),
        "fraction-train": _Key(float, "a float in (0, 1]", _probability),
        "round-timeout": _Key(
            float,
            "a number of seconds > 0 (default 3600)",
            _positive_float,
            default=3600.0,
            fix="a client that has not replied by then is left out of the round",
        ),
        "dp-clip-norm": _Key(
            float,
            "a float > 0 (omit the key for no server-side DP)",
            _positive_float,
            default=None,
        ),
        "dp-noise-multiplier": _Key(float, "a float >= 0", _non_negative, default=0.0),
    },
    "attack": {
        "enabled": _Key(bool, "true or false"),
        "threat-model": _Key(
            str, f"one of {', '.join(t.value for t in ThreatModel)}", _choice(tuple(ThreatModel))
        ),
        "method": _Key(
            str, f"one of {', '.join(ATTACKS)}", _choice(tuple(ATTACKS)), default="rconv"
        ),
        "dlg-iterations": _Key(
            int, "an int >= 1 (L-BFGS steps of the dlg method)", _positive_int, default=300
        ),
        "workers": _Key(
            int,
            "an int >= 0 (processes the attack uses; 0: one per core)",
            _non_negative,
            default=0,
        ),
    },
    "defense": {
        "kind": _Key(
            str,
            f"one of {', '.join(k.value for k in DefenseKind)}",
            _choice(tuple(DefenseKind)),
            default="none",
        ),
        "scale": _Key(float, "a float >= 0", _non_negative, default=0.0),
        "relative": _Key(bool, "true or false", default=False),
        "clip-norm": _Key(float, "a float > 0", _positive_float, default=None),
        "noise-multiplier": _Key(float, "a float >= 0", _non_negative, default=0.0),
        "delta": _Key(float, "a float in (0, 1)", lambda v: 0.0 < v < 1.0, default=1e-5),
        "fraction": _Key(float, "a float in (0, 1]", _probability, default=1.0),
        "format": _Key(str, "one of fp16, int8", _choice(("fp16", "int8")), default="fp16"),
    },
    "sweep": {
        "axis": _Key(str, "a numeric scenario key as table.key, e.g. defense.scale"),
        "values": _Key(list, "a non-empty list of numbers", _numbers),
        "seeds": _Key(list, "a non-empty list of ints >= 0 ([run] seed of each repeat)", _seeds),
        "axis2": _Key(str, "a numeric scenario key as table.key", default=None),
        "values2": _Key(list, "a non-empty list of numbers", _numbers, default=None),
    },
}

_OPTIONAL_TABLES = ("defense", "sweep")
"""Tables a scenario may leave out (every key has a default, or the command needs none)."""

OVERRIDE_KEYS: tuple[str, ...] = tuple(
    f"{t}.{k}" for t, keys in _SCHEMA.items() if t != "sweep" for k in keys
)
"""Every key an override may set, as ``table.key``."""

RUN_CONFIG_KEYS: dict[str, str] = {
    "num-server-rounds": "run.rounds",
    "run-name": "run.name",
    "out-dir": "run.out-dir",
    "data-dir": "data.data-dir",
}
"""Flat Flower run-config keys and the scenario key each overrides (``0``/``""`` = unset)."""


# ---------------------------------------------------------------- parsing


def load_scenario(
    path: str | Path, overrides: Mapping[str, Scalar] | None = None
) -> ScenarioConfig:
    """Read a scenario TOML file and apply overrides.

    Parameters
    ----------
    path : str or Path
        The scenario file.
    overrides : Mapping[str, bool | int | float | str], optional
        Values replacing the file's, keyed ``"table.key"`` (e.g. ``{"run.rounds": 2}``);
        they are checked like the file's own values.

    Returns
    -------
    ScenarioConfig
        The parsed scenario; relative paths are made absolute against the working
        directory, and an unset ``[data] data-dir`` becomes the default data folder.

    Raises
    ------
    ScenarioError
        If the file is missing or not TOML, a table or key is unknown or missing, a
        value has the wrong type or is out of range, or the data folder does not exist.

    Examples
    --------
    >>> cfg = load_scenario("scenarios/default.toml", {"run.rounds": 1})  # doctest: +SKIP
    >>> cfg.run.rounds  # doctest: +SKIP
    1
    """
    source = Path(path).expanduser()
    where = f"scenario {str(source)!r}"
    if not source.is_file():
        raise ScenarioError(
            f"{where}: no such file; pass the path of a scenario TOML file, e.g. "
            "scenarios/default.toml"
        )
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{where}: not valid TOML ({exc}); fix the syntax") from None
    return _parse(raw, where, dict(overrides or {}), source.resolve())


def from_run_config(run_config: Mapping[str, Scalar], *, app_dir: Path) -> ScenarioConfig:
    """Build the scenario from a Flower run config (``flwr run . --run-config ...``).

    Parameters
    ----------
    run_config : Mapping[str, bool | int | float | str]
        ``context.run_config``: ``scenario`` (a path relative to ``app_dir``), the flat
        overrides of :data:`RUN_CONFIG_KEYS` (``num-server-rounds = 0`` and ``""`` leave
        the scenario's value), and any ``table.key`` override declared in
        ``[tool.flwr.app.config]``.
    app_dir : Path
        The Flower app's folder (where ``pyproject.toml`` or the unpacked FAB lives).

    Returns
    -------
    ScenarioConfig
        The same object :func:`load_scenario` gives for the file and the overrides.

    Raises
    ------
    ScenarioError
        If ``scenario`` is missing, a key is unknown, or the scenario is invalid.
    """
    where = "run config ([tool.flwr.app.config] / --run-config)"
    if "scenario" not in run_config:
        raise ScenarioError(
            f"{where}: missing key 'scenario'; fix: set scenario = \"scenarios/default.toml\" "
            "in [tool.flwr.app.config]",
            key="scenario",
        )
    scenario = run_config["scenario"]
    if not isinstance(scenario, str) or not scenario:
        raise ScenarioError(
            f"{where}: scenario = {scenario!r} is invalid: expected the path of a scenario "
            "TOML file relative to the app folder",
            key="scenario",
        )
    overrides: dict[str, Scalar] = {}
    for key, value in run_config.items():
        if key == "scenario":
            continue
        if key in RUN_CONFIG_KEYS:
            if value in (0, "") and not isinstance(value, bool):
                continue  # unset: keep the scenario's value
            overrides[RUN_CONFIG_KEYS[key]] = value
        elif key in OVERRIDE_KEYS:
            overrides[key] = value
        else:
            allowed = ", ".join(["scenario", *RUN_CONFIG_KEYS, "<table>.<key>"])
            raise ScenarioError(
                f"{where}: unknown key {key!r} (value {value!r}); allowed: {allowed}; "
                "fix: remove it or correct its spelling",
                key=key,
            )
    path = Path(scenario)
    if not path.is_absolute():
        path = app_dir / path
    return load_scenario(path, overrides)


def _parse(
    raw: dict[str, Any], where: str, overrides: dict[str, Scalar], source: Path
) -> ScenarioConfig:
    """Check tables and keys, apply overrides, validate values and build the dataclasses."""
    for table, content in raw.items():
        if table not in _SCHEMA:
            raise ScenarioError(
                f"{where}: unknown table [{table}]; allowed tables: "
                f"{', '.join(f'[{t}]' for t in _SCHEMA)}; fix: remove it or correct its spelling",
                table=table,
            )
        if not isinstance(content, dict):
            raise ScenarioError(
                f"{where}: {table} = {content!r} must be a table [{table}]", table=table
            )
        for key, value in content.items():
            if key not in _SCHEMA[table]:
                raise ScenarioError(
                    f"{where}: unknown key [{table}] {key} (value {value!r}); allowed keys in "
                    f"[{table}]: {', '.join(_SCHEMA[table])}; fix: remove it or correct its "
                    "spelling",
                    table=table,
                    key=key,
                )
    merged = {table: dict(raw.get(table, {})) for table in _SCHEMA}
    origin: dict[tuple[str, str], str] = {}
    for dotted, value in overrides.items():
        table, _, key = dotted.partition(".")
        if dotted not in OVERRIDE_KEYS:
            raise ScenarioError(
                f"{where}: unknown override {dotted!r} (value {value!r}); allowed: "
                f"{', '.join(OVERRIDE_KEYS)}",
                table=table,
                key=key,
            )
        merged[table][key] = str(value) if isinstance(value, Path) else value
        origin[(table, key)] = f"{where} (override {dotted})"

    values: dict[str, dict[str, Any]] = {}
    for table, keys in _SCHEMA.items():
        if table == "sweep" and table not in raw:
            continue
        overridden = any(t == table for t, _ in origin)
        if table not in raw and table not in _OPTIONAL_TABLES and not overridden:
            raise ScenarioError(
                f"{where}: missing table [{table}] (keys {', '.join(keys)}); fix: add it, "
                "as in scenarios/default.toml",
                table=table,
            )
        values[table] = {
            key: _value(merged[table], table, key, spec, origin.get((table, key), where))
            for key, spec in keys.items()
        }
    return _build(values, where, source)


def _value(content: dict[str, Any], table: str, key: str, spec: _Key, where: str) -> Any:
    """One checked value, or the default for an optional key that is absent."""
    if key not in content:
        if spec.default is not _MISSING:
            return spec.default
        raise ScenarioError(
            f"{where}: missing key [{table}] {key}; expected {spec.allowed}; fix: add "
            f"`{key} = ...` to [{table}]",
            table=table,
            key=key,
        )
    value = content[key]
    ok_type = (
        isinstance(value, bool)
        if spec.kind is bool
        else isinstance(value, spec.kind) and not isinstance(value, bool)
    )
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok_type = float(value), True
    if not ok_type or not spec.check(value):
        fix = f"; {spec.fix}" if spec.fix else ""
        raise ScenarioError(
            f"{where}: [{table}] {key} = {value!r} is invalid: expected {spec.allowed}{fix}",
            table=table,
            key=key,
        )
    return value


def _absolute(path: str) -> Path:
    """A path made absolute against the working directory (``~`` expanded)."""
    out = Path(path).expanduser()
    return out if out.is_absolute() else Path.cwd() / out


def _data_dir(dataset: str, given: str | None, where: str) -> Path | None:
    """The checked data folder of a dataset; ``None`` for the embedded ``faces``."""
    if dataset == "faces":
        return None
    if given is not None:
        folder = _absolute(given)
        if not folder.is_dir():
            raise ScenarioError(
                f"{where}: [data] data-dir = {given!r} is invalid: {str(folder)!r} is not a "
                f"folder; fix: point it (or --data-dir) at the folder holding the {dataset} "
                "npz subset or a torchvision root",
                table="data",
                key="data-dir",
            )
        return folder
    folder = default_data_dir()
    if folder is None or not folder.is_dir():
        reason = (
            f"${DATA_DIR_ENV} = {os.environ.get(DATA_DIR_ENV)!r} is not a folder"
            if folder is not None
            else f"${DATA_DIR_ENV} is unset and no shared/datasets folder sits beside the repo"
        )
        raise ScenarioError(
            f"{where}: [data] data-dir is unset and {reason}; fix: set [data] data-dir, pass "
            f"--data-dir, or set ${DATA_DIR_ENV} to the folder holding the {dataset} data",
            table="data",
            key="data-dir",
        )
    return folder


def _build(values: dict[str, dict[str, Any]], where: str, source: Path) -> ScenarioConfig:
    """Turn checked raw values into the dataclasses, with cross-key checks."""
    run, data, model, client, server, attack, defense = (
        values[t] for t in ("run", "data", "model", "client", "server", "attack", "defense")
    )
    dataset = canonical_name(data["dataset"])
    if server["min-clients"] > data["num-clients"]:
        raise ScenarioError(
            f"{where}: [server] min-clients = {server['min-clients']} is invalid: it exceeds "
            f"[data] num-clients = {data['num-clients']}, so the server would wait forever; "
            "fix: lower min-clients or raise num-clients",
            table="server",
            key="min-clients",
        )
    return ScenarioConfig(
        run=RunConfig(
            name=run["name"],
            rounds=run["rounds"],
            seed=run["seed"],
            out_dir=_absolute(run["out-dir"]),
        ),
        data=DataConfig(
            dataset=dataset,
            data_dir=_data_dir(dataset, data["data-dir"], where),
            num_clients=data["num-clients"],
            partitioning=Partitioning(data["partitioning"]),
            dirichlet_alpha=data["dirichlet-alpha"],
            test_fraction=data["test-fraction"],
            limit=data["limit"],
        ),
        model=ModelConfig(
            name=model["name"],
            activation=model["activation"],
            init=Init(model["init"]),
            seed=model["seed"],
            num_classes=model["num-classes"],
        ),
        client=ClientConfig(
            batch_size=client["batch-size"],
            local_steps=client["local-steps"],
            lr=client["lr"],
        ),
        server=ServerConfig(
            min_clients=server["min-clients"],
            fraction_train=server["fraction-train"],
            round_timeout=server["round-timeout"],
            dp_clip_norm=server["dp-clip-norm"],
            dp_noise_multiplier=server["dp-noise-multiplier"],
        ),
        attack=AttackConfig(
            enabled=attack["enabled"],
            threat_model=ThreatModel(attack["threat-model"]),
            method=attack["method"],
            dlg_iterations=attack["dlg-iterations"],
            workers=attack["workers"],
        ),
        source=source,
        defense=_defense(defense, where),
        sweep=_sweep(values.get("sweep"), where),
    )


def _defense(defense: dict[str, Any], where: str) -> DefenseConfig:
    """The ``[defense]`` table, with the keys its kind needs."""
    kind = DefenseKind(defense["kind"])
    if kind is DefenseKind.CLIP_GAUSSIAN and defense["clip-norm"] is None:
        raise ScenarioError(
            f"{where}: [defense] kind = 'clip-gaussian' needs clip-norm; fix: set "
            "`clip-norm = ...` (> 0) in [defense]",
            table="defense",
            key="clip-norm",
        )
    return DefenseConfig(
        kind=kind,
        scale=defense["scale"],
        relative=defense["relative"],
        clip_norm=defense["clip-norm"],
        noise_multiplier=defense["noise-multiplier"],
        delta=defense["delta"],
        fraction=defense["fraction"],
        format=defense["format"],
    )


def _sweep(sweep: dict[str, Any] | None, where: str) -> SweepConfig | None:
    """The ``[sweep]`` table: axes must be numeric scenario keys, a second axis its values."""
    if sweep is None:
        return None
    numeric = [
        f"{t}.{k}"
        for t, keys in _SCHEMA.items()
        if t != "sweep"
        for k, spec in keys.items()
        if spec.kind in (int, float)
    ]
    for key in ("axis", "axis2"):
        axis = sweep[key]
        if axis is not None and axis not in numeric:
            raise ScenarioError(
                f"{where}: [sweep] {key} = {axis!r} is invalid: expected a numeric scenario "
                f"key, one of {', '.join(numeric)}",
                table="sweep",
                key=key,
            )
    if (sweep["axis2"] is None) != (sweep["values2"] is None):
        raise ScenarioError(
            f"{where}: [sweep] axis2 and values2 go together; fix: set both or neither",
            table="sweep",
            key="values2" if sweep["values2"] is None else "axis2",
        )
    return SweepConfig(
        axis=sweep["axis"],
        values=tuple(sweep["values"]),
        seeds=tuple(int(v) for v in sweep["seeds"]),
        axis2=sweep["axis2"],
        values2=tuple(sweep["values2"] or ()),
    )
