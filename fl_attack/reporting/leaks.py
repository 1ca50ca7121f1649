"""The evaluator of a federated run: joins each leak with the clients' audit records.

:class:`LeakRecorder` receives what the malicious server recovered (it implements the
server's ``LeakSink``), looks up what the client really trained on in the out-of-band
audit record, and scores the leak: PSNR, SSIM, label, identifiability. It writes
``leaks.jsonl`` (one line per client and round), ``round_<r>.png`` and ``summary.json``
into the run folder, and shows a progress bar per round and a closing table.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from fl_attack.config import ScenarioConfig
from fl_attack.defenses.mods import defense_epsilon
from fl_attack.engine import Evidence, Reconstruction, Verdict
from fl_attack.metrics import image_metrics, is_identified
from fl_attack.reporting.checkpoint import CHECKPOINT_FILE
from fl_attack.reporting.figures import save_round_grid
from fl_attack.reporting.files import append_jsonl, atomic_write, write_json
from fl_attack.simulation import (
    AUDIT_DIR,
    AuditRecord,
    FederatedData,
    client_partition,
    read_audit,
)

__all__ = [
    "GOOD_DB",
    "LEAKS_FILE",
    "SUMMARY_FILE",
    "DiagnosticsSummary",
    "LeakRecord",
    "LeakRecorder",
    "RoundSummary",
    "RunSummary",
    "summary_table",
]

GOOD_DB = 40.0
"""A leak at or above this PSNR counts as a successful reconstruction."""

LEAKS_FILE = "leaks.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True, slots=True)
class DiagnosticsSummary:
    """The engine's diagnostics of one reconstruction, condensed.

    Attributes
    ----------
    exact : bool
        No layer lost information.
    warnings : tuple of str
        The engine's reasons the image may be wrong.
    notes : tuple of str
        Information lost without leaving the input open (e.g. saturated units).
    rank_deficient_layers : tuple of str
        Layers whose constraints did not determine their input.
    max_relative_residual : float
        Worst relative residual over the solved layers.
    zero_units, saturated_units, ambiguous_units, unresolved_units : int
        Totals over the layers.
    """

    exact: bool
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    rank_deficient_layers: tuple[str, ...]
    max_relative_residual: float
    zero_units: int
    saturated_units: int
    ambiguous_units: int
    unresolved_units: int

    @classmethod
    def of(cls, result: Reconstruction) -> DiagnosticsSummary:
        """Condense a reconstruction's per-layer diagnostics."""
        solved = [d for d in result.layers if d.unknowns]
        return cls(
            exact=result.exact,
            warnings=result.warnings,
            notes=result.notes,
            rank_deficient_layers=tuple(d.name for d in result.layers if d.rank_deficient),
            max_relative_residual=max((d.relative_residual for d in solved), default=0.0),
            zero_units=sum(d.zero_units for d in result.layers),
            saturated_units=sum(d.saturated_units for d in result.layers),
            ambiguous_units=sum(d.ambiguous_units for d in result.layers),
            unresolved_units=sum(d.unresolved_units for d in result.layers),
        )


@dataclass(frozen=True, slots=True)
class LeakRecord:
    """One client in one round: what leaked and how good it is.

    Attributes
    ----------
    server_round : int
        The round.
    node_id : int
        The client's node id, as the server sees it.
    status : str
        ``"leaked"`` (inverted and scored), ``"unaudited"`` (inverted, but no audit
        record to score it against) or ``"failed"`` (not inverted).
    partition_id : int or None
        From the audit record.
    indices : tuple of int
        Dataset indices the client trained on (from the audit record).
    label_true : int or None
        Label of the matched image.
    label_guessed : int or None
        Label recovered from the update.
    psnr, ssim : float or None
        Quality of the leak against the matched training image (the best of the batch).
    identified : bool or None
        The leak is nearer to one of the client's own training images than to any other
        image of its partition.
    seconds : float or None
        Time the engine took.
    diagnostics : DiagnosticsSummary or None
        Condensed engine diagnostics.
    error : str
        Why the reconstruction failed (status ``"failed"``).
    verdict : str
        The engine's verdict on the update: ``"leak"`` (one sample's gradient),
        ``"noise-detected"`` (estimate only) or ``"not-single-sample"``; ``""`` when none
        was given. Only ``"leak"`` counts as a clean leak.
    evidence : Evidence or None
        The numbers behind the verdict.
    """

    server_round: int
    node_id: int
    status: str
    partition_id: int | None = None
    indices: tuple[int, ...] = ()
    label_true: int | None = None
    label_guessed: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    identified: bool | None = None
    seconds: float | None = None
    diagnostics: DiagnosticsSummary | None = None
    error: str = ""
    verdict: str = ""
    evidence: Evidence | None = None

    @property
    def flagged(self) -> bool:
        """The update was inverted but is not one sample's gradient (noise, batch, steps)."""
        return self.verdict not in ("", Verdict.LEAK.value)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (one line of ``leaks.jsonl``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LeakRecord:
        """Rebuild a record from one parsed line of ``leaks.jsonl`` (the inverse of ``to_json``).

        Raises
        ------
        KeyError, TypeError, ValueError
            If the mapping is not such a line.
        """
        values = {f.name: _from_json(f.type, raw[f.name]) for f in fields(cls) if f.name in raw}
        diagnostics = values.get("diagnostics")
        if isinstance(diagnostics, Mapping):
            values["diagnostics"] = DiagnosticsSummary(
                **{
                    f.name: _from_json(f.type, diagnostics[f.name])
                    for f in fields(DiagnosticsSummary)
                }
            )
        evidence = values.get("evidence")
        if isinstance(evidence, Mapping):
            parsed = {f.name: _from_json(f.type, evidence[f.name]) for f in fields(Evidence)}
            parsed["verdict"] = Verdict(parsed["verdict"])
            values["evidence"] = Evidence(**parsed)
        return cls(**values)


def _from_json(annotation: Any, value: Any) -> Any:
    """Undo ``files.write_json``'s spelling: lists back to tuples, "inf"/"nan" to floats."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and "float" in str(annotation) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """What one round leaked, and the model's test accuracy after it.

    Attributes
    ----------
    server_round : int
        The round.
    clients : int
        Replies attacked.
    leaked : int
        Leaks scored at or above :data:`GOOD_DB`.
    failed : int
        Replies that could not be inverted.
    scored : int
        Inverted replies with an audit record to score them against.
    labels_recovered : int
        Scored leaks whose label was recovered.
    identified : int
        Scored leaks nearer to the client's own image than to any other of its partition.
    psnr_min, psnr_mean : float or None
        Over the scored leaks.
    ssim_mean : float or None
        Over the scored leaks.
    label_accuracy : float or None
        Fraction of scored leaks whose label was recovered.
    identifiability : float or None
        Fraction of scored leaks identified among their client's partition.
    attack_seconds : float
        Wall time of the round's inversions.
    test_accuracy : float or None
        Accuracy of the aggregated model on the held-out images.
    flagged : int
        Inverted updates the engine flagged as noised or not one sample's gradient: their
        images are estimates, not leaks (``leaked`` never counts them).
    clean_psnr_min, clean_psnr_mean : float or None
        Over the scored leaks whose verdict is ``leak``.
    """

    server_round: int
    clients: int
    leaked: int
    failed: int
    scored: int
    labels_recovered: int
    identified: int
    psnr_min: float | None
    psnr_mean: float | None
    ssim_mean: float | None
    label_accuracy: float | None
    identifiability: float | None
    attack_seconds: float
    test_accuracy: float | None
    flagged: int = 0
    clean_psnr_min: float | None = None
    clean_psnr_mean: float | None = None


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A whole run (``summary.json``).

    Attributes
    ----------
    name : str
        Run name.
    run_dir : str
        Folder of the artefacts.
    scenario : str
        The scenario file.
    dataset, model, activation, init : str
        What was attacked.
    attack : bool
        Whether the malicious server was active.
    threat_model : str
        Its threat model.
    lr : float
        Clients' learning rate.
    rounds : tuple of RoundSummary
        Per round.
    client_rounds : int
        Replies attacked over the run.
    leaked : int
        Of those, leaks at or above :data:`GOOD_DB`.
    psnr_min : float or None
        Worst scored leak of the run.
    initial_test_accuracy : float or None
        Before the first round.
    final_test_accuracy : float or None
        After the last round.
    seconds : float
        Wall time of the run (server side).
    model_digest : str
        SHA-256 of the final global model's arrays (equal digests: identical models).
    flagged : int
        Inverted updates flagged as noised or not single-sample, over the run.
    defense : str
        The clients' ``[defense] kind``.
    epsilon, delta : float or None
        Per client and round, for ``clip-gaussian`` (no composition over rounds).
    """

    name: str
    run_dir: str
    scenario: str
    dataset: str
    model: str
    activation: str
    init: str
    attack: bool
    threat_model: str
    lr: float
    rounds: tuple[RoundSummary, ...]
    client_rounds: int
    leaked: int
    psnr_min: float | None
    initial_test_accuracy: float | None
    final_test_accuracy: float | None
    seconds: float
    model_digest: str = ""
    good_db: float = field(default=GOOD_DB)
    flagged: int = 0
    defense: str = "none"
    epsilon: float | None = None
    delta: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return asdict(self)


class LeakRecorder:
    """Score and log every leak of a run (the server's ``LeakSink``).

    Parameters
    ----------
    scenario : ScenarioConfig
        The run's scenario (run folder, partitioning, seed).
    fed : FederatedData
        The data set, for the ground-truth pixels the audit records point at.
    console : rich.console.Console, optional
        Where the progress bars and the closing table go; ``None`` shows nothing.

    Notes
    -----
    Ground truth comes only from ``<run-dir>/audit/``, written by the clients out of
    band; a leak whose client wrote no audit record is logged as ``"unaudited"``.
    """

    def __init__(
        self, scenario: ScenarioConfig, fed: FederatedData, *, console: Console | None = None
    ) -> None:
        self.scenario = scenario
        self.fed = fed
        self.console = console
        self.run_dir = scenario.run.run_dir
        self._records: dict[int, list[LeakRecord]] = {}
        self._images: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
        self._accuracy: dict[int, float] = {}
        self._round_seconds: dict[int, float] = {}
        self._round_start = 0.0
        self._progress: Progress | None = None
        self._task: int | None = None
        self._start = time.perf_counter()

    @property
    def leaks_path(self) -> Path:
        """``<run-dir>/leaks.jsonl``."""
        return self.run_dir / LEAKS_FILE

    def start(self) -> None:
        """Create the run folder and clear the artefacts a previous run of the name left."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stale = [self.leaks_path, self.run_dir / SUMMARY_FILE, self.run_dir / CHECKPOINT_FILE]
        stale += list(self.run_dir.glob("round_*.png"))
        stale += list((self.run_dir / AUDIT_DIR).glob("node_*.jsonl"))
        for path in stale:
            path.unlink(missing_ok=True)
        self._start = time.perf_counter()

    def resume(
        self,
        done: int,
        *,
        accuracy: Mapping[int, float],
        round_seconds: Mapping[int, float],
    ) -> int:
        """Pick a killed run up after its last completed round ``done``.

        The records of rounds ``<= done`` are kept (and reloaded for the summary); those
        of a round cut mid-way, and a torn last line, are dropped from ``leaks.jsonl``
        (rewritten atomically), so the redone round is logged exactly once.

        Parameters
        ----------
        done : int
            Rounds completed, from the checkpoint (0: none).
        accuracy, round_seconds : Mapping[int, float]
            Per-round figures saved with the checkpoint.

        Returns
        -------
        int
            Records kept.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("round_*.png", SUMMARY_FILE, CHECKPOINT_FILE, LEAKS_FILE):
            for tmp in self.run_dir.glob(f".{name}.*"):
                tmp.unlink(missing_ok=True)  # a temporary file the kill left before its rename
        kept: list[str] = []
        if self.leaks_path.is_file():
            for line in self.leaks_path.read_text(encoding="utf-8").splitlines():
                try:
                    record = LeakRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # the torn line of a write cut by the kill
                if record.server_round <= done:
                    kept.append(line)
                    self._records.setdefault(record.server_round, []).append(record)
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.leaks_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        self._accuracy.update({int(k): float(v) for k, v in accuracy.items() if k <= done})
        self._round_seconds.update(
            {int(k): float(v) for k, v in round_seconds.items() if k <= done}
        )
        return len(kept)

    def progress(self) -> tuple[dict[int, float], dict[int, float]]:
        """Copies of the test accuracy and the attack seconds per round so far."""
        return dict(self._accuracy), dict(self._round_seconds)

    # ------------------------------------------------------------ LeakSink

    def begin_round(self, server_round: int, num_replies: int) -> None:
        """Open the round's progress bar."""
        self._records[server_round] = []
        self._images[server_round] = []
        self._round_start = time.perf_counter()
        if self.console is not None:
            self._progress = Progress(
                TextColumn("[bold]round {task.fields[round]}[/] inverting updates"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task(
                "attack", total=num_replies, round=server_round, status=""
            )
            self._progress.start()

    def record_leak(self, server_round: int, node_id: int, result: Reconstruction) -> None:
        """Score one inverted update against its audit record and log it."""
        audit = read_audit(self.run_dir, server_round, node_id)
        diagnostics = DiagnosticsSummary.of(result)
        if audit is None:
            record = LeakRecord(
                server_round=server_round,
                node_id=node_id,
                status="unaudited",
                label_guessed=result.label,
                seconds=result.seconds,
                diagnostics=diagnostics,
                verdict=_verdict(result),
                evidence=result.evidence,
            )
            self._add(record, None, result.image)
            return
        estimate = result.image.to(torch.float64)
        scored = [
            (image_metrics(self.fed.images[i], estimate), i, label)
            for i, label in zip(audit.indices, audit.labels, strict=True)
        ]
        metrics, index, label = max(scored, key=lambda item: item[0].psnr)
        record = LeakRecord(
            server_round=server_round,
            node_id=node_id,
            status="leaked",
            partition_id=audit.partition_id,
            indices=audit.indices,
            label_true=label,
            label_guessed=result.label,
            psnr=metrics.psnr,
            ssim=metrics.ssim,
            identified=self._identified(estimate, audit),
            seconds=result.seconds,
            diagnostics=diagnostics,
            verdict=_verdict(result),
            evidence=result.evidence,
        )
        self._add(record, self.fed.images[index], result.image)

    def record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        """Log an update that could not be inverted (a runtime's traceback cut to its cause)."""
        reason = _one_line(reason)
        audit = read_audit(self.run_dir, server_round, node_id)
        record = LeakRecord(
            server_round=server_round,
            node_id=node_id,
            status="failed",
            partition_id=audit.partition_id if audit else None,
            indices=audit.indices if audit else (),
            label_true=audit.labels[0] if audit else None,
            error=reason,
        )
        original = self.fed.images[audit.indices[0]] if audit else None
        self._add(record, original, None)

    def end_round(self, server_round: int) -> None:
        """Close the progress bar and draw ``round_<r>.png``."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._round_seconds[server_round] = time.perf_counter() - self._round_start
        records = self._records.get(server_round, [])
        images = self._images.get(server_round, [])
        order = sorted(
            range(len(records)),
            key=lambda k: (
                records[k].partition_id is None,
                records[k].partition_id or 0,
                records[k].node_id,
            ),
        )
        originals = [images[k][0] for k in order]
        leaks = [images[k][1] for k in order]
        headers = [_header(records[k]) for k in order]
        captions = [_caption(records[k]) for k in order]
        if records:
            save_round_grid(
                self.run_dir / f"round_{server_round}.png",
                originals,
                leaks,
                captions,
                headers=headers,
                title=(
                    f"{_literal(self.scenario.run.name)}: round {server_round}, "
                    f"{self.fed.name} on {self.scenario.model.name} "
                    f"({self.scenario.model.activation}) - originals above, leaked below"
                ),
            )
        self._images.pop(server_round, None)

    # ------------------------------------------------------------ run level

    def record_accuracy(self, server_round: int, accuracy: float) -> None:
        """Note the aggregated model's test accuracy after ``server_round`` (0 = initial)."""
        self._accuracy[server_round] = float(accuracy)

    def records(self, server_round: int) -> tuple[LeakRecord, ...]:
        """The leak records of one round so far."""
        return tuple(self._records.get(server_round, ()))

    def finish(self, rounds: int, *, model_digest: str = "") -> RunSummary:
        """Write ``summary.json``, show the closing table and return the summary.

        Parameters
        ----------
        rounds : int
            Number of rounds the run had (rounds without leaks still get a row).
        model_digest : str
            Digest of the final global model, recorded as is.
        """
        per_round = tuple(self._round_summary(r) for r in range(1, rounds + 1))
        scored = [
            rec.psnr for recs in self._records.values() for rec in recs if rec.psnr is not None
        ]
        privacy = defense_epsilon(self.scenario.defense)
        summary = RunSummary(
            name=self.scenario.run.name,
            run_dir=str(self.run_dir),
            scenario=str(self.scenario.source or ""),
            dataset=self.fed.name,
            model=self.scenario.model.name,
            activation=self.scenario.model.activation,
            init=self.scenario.model.init.value,
            attack=self.scenario.attack.enabled,
            threat_model=self.scenario.attack.threat_model.value,
            lr=self.scenario.client.lr,
            rounds=per_round,
            client_rounds=sum(r.clients for r in per_round),
            leaked=sum(r.leaked for r in per_round),
            psnr_min=min(scored) if scored else None,
            initial_test_accuracy=self._accuracy.get(0),
            final_test_accuracy=self._accuracy.get(rounds),
            seconds=time.perf_counter() - self._start,
            model_digest=model_digest,
            flagged=sum(r.flagged for r in per_round),
            defense=self.scenario.defense.kind.value,
            epsilon=privacy[0] if privacy else None,
            delta=privacy[1] if privacy else None,
        )
        write_json(self.run_dir / SUMMARY_FILE, summary.to_json())
        if self.console is not None:
            self.console.print(summary_table(summary))
        return summary

    # ------------------------------------------------------------ helpers

    def _add(
        self, record: LeakRecord, original: torch.Tensor | None, leak: torch.Tensor | None
    ) -> None:
        """Append a record to ``leaks.jsonl`` and to the round, advance the progress bar."""
        append_jsonl(self.leaks_path, record.to_json())
        self._records.setdefault(record.server_round, []).append(record)
        self._images.setdefault(record.server_round, []).append((original, leak))
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, status=_caption(record))

    def _identified(self, estimate: torch.Tensor, audit_record: AuditRecord) -> bool:
        """Is the nearest image of the client's partition one it trained on?"""
        partition = client_partition(
            self.fed,
            self.scenario.data,
            seed=self.scenario.run.seed,
            partition_id=audit_record.partition_id,
            num_partitions=audit_record.num_partitions,
            min_size=self.scenario.client.batch_size,
        )
        used = set(audit_record.indices)
        positions = [k for k, index in enumerate(partition) if int(index) in used]
        pool = self.fed.images[torch.from_numpy(partition)]
        return is_identified(estimate, pool, positions)

    def _round_summary(self, server_round: int) -> RoundSummary:
        """Aggregate one round's records."""
        records = self._records.get(server_round, [])
        scored = [r for r in records if r.psnr is not None]
        psnrs = [r.psnr for r in scored if r.psnr is not None]
        finite = [p for p in psnrs if math.isfinite(p)]
        # A flagged update's image is an estimate, not a leak: clean figures skip it.
        clean = [r.psnr for r in scored if r.psnr is not None and not r.flagged]
        clean_finite = [p for p in clean if math.isfinite(p)]
        return RoundSummary(
            server_round=server_round,
            clients=len(records),
            leaked=sum(1 for p in clean if p >= GOOD_DB),
            failed=sum(1 for r in records if r.status == "failed"),
            scored=len(scored),
            labels_recovered=sum(1 for r in scored if r.label_guessed == r.label_true),
            identified=sum(1 for r in scored if r.identified),
            psnr_min=min(psnrs) if psnrs else None,
            psnr_mean=statistics.fmean(finite) if finite else (math.inf if psnrs else None),
            ssim_mean=statistics.fmean(r.ssim for r in scored if r.ssim is not None)
            if scored
            else None,
            label_accuracy=_mean(r.label_guessed == r.label_true for r in scored),
            identifiability=_mean(bool(r.identified) for r in scored),
            attack_seconds=self._round_seconds.get(server_round, 0.0),
            test_accuracy=self._accuracy.get(server_round),
            flagged=sum(1 for r in records if r.flagged),
            clean_psnr_min=min(clean) if clean else None,
            clean_psnr_mean=statistics.fmean(clean_finite)
            if clean_finite
            else (math.inf if clean else None),
        )


def summary_table(summary: RunSummary) -> Table:
    """The closing table: one row per round, then the run's totals.

    Parameters
    ----------
    summary : RunSummary
        What :meth:`LeakRecorder.finish` returned.

    Returns
    -------
    rich.table.Table
        Ready for ``console.print``; counts are out of the round's clients (leaked,
        failed) or of its scored leaks (label, ident); without an attack only the test
        accuracy is shown.
    """
    if summary.attack:
        title = (
            f"{summary.name}: {summary.dataset}, {summary.model} {summary.activation} "
            f"(init {summary.init}), lr {summary.lr:g}, {summary.threat_model}"
        )
    else:
        title = f"{summary.name}: {summary.dataset}, no attack"
    table = Table(
        title=escape(title),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        min_width=min(len(title), 79),
    )
    table.add_column("round", justify="right")
    if not summary.attack:
        table.add_column("test acc", justify="right")
        if summary.initial_test_accuracy is not None:
            table.add_row("0", _pct(summary.initial_test_accuracy))
        for r in summary.rounds:
            table.add_row(str(r.server_round), _pct(r.test_accuracy))
        return table
    table.caption = (
        f"leaked: PSNR >= {summary.good_db:g} dB, verdict leak; flag: noise or not one "
        "sample (estimates, dB columns include them); label, ident: of scored leaks"
    )
    if summary.epsilon is not None:
        table.caption += f"; ({summary.epsilon:.3g}, {summary.delta:g})-DP per client-round"
    table.caption_justify = "left"
    columns = ("leaked", "fail", "flag", "min dB", "mean dB", "SSIM", "label", "ident", "sec")
    for column in columns:
        table.add_column(column, justify="right", min_width=len(column))
    table.add_column("test acc", justify="right", min_width=6)
    if summary.initial_test_accuracy is not None:
        table.add_row("0", *[""] * len(columns), _pct(summary.initial_test_accuracy))
    for r in summary.rounds:
        table.add_row(
            str(r.server_round),
            f"{r.leaked}/{r.clients}",
            str(r.failed),
            str(r.flagged),
            _db(r.psnr_min),
            _db(r.psnr_mean),
            "-" if r.ssim_mean is None else f"{r.ssim_mean:.3f}",
            f"{r.labels_recovered}/{r.scored}",
            f"{r.identified}/{r.scored}",
            f"{r.attack_seconds:.1f}",
            _pct(r.test_accuracy),
        )
    scored = sum(r.scored for r in summary.rounds)
    table.add_section()
    table.add_row(
        "all",
        f"{summary.leaked}/{summary.client_rounds}",
        str(sum(r.failed for r in summary.rounds)),
        str(summary.flagged),
        _db(summary.psnr_min),
        "",
        "",
        f"{sum(r.labels_recovered for r in summary.rounds)}/{scored}",
        f"{sum(r.identified for r in summary.rounds)}/{scored}",
        f"{sum(r.attack_seconds for r in summary.rounds):.1f}",
        _pct(summary.final_test_accuracy),
    )
    return table


def _mean(flags: Any) -> float | None:
    """Mean of booleans, or None when there are none."""
    values = [1.0 if f else 0.0 for f in flags]
    return statistics.fmean(values) if values else None


def _db(value: float | None) -> str:
    """A PSNR for the table."""
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _pct(value: float | None) -> str:
    """A fraction as a percentage for the table."""
    return "-" if value is None else f"{100 * value:.1f}%"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): *(.*)$", re.MULTILINE)


def _one_line(reason: str) -> str:
    """A failure reason as one line: a client's remote traceback becomes ``Type: message``.

    Flower's Simulation runtime reports a ClientApp exception with the whole Ray
    traceback (colour codes included); the leak log keeps the first exception raised.
    """
    text = _ANSI.sub("", reason)
    if "\n" not in text:
        return text
    prefix = text.split(":", 1)[0] if text.startswith("client error:") else ""
    for match in _RAISED.finditer(text):
        kind, message = match.group(1).rsplit(".", 1)[-1], match.group(2).strip()
        if kind != "ClientAppException" and message:
            return f"{prefix}: {kind}: {message}" if prefix else f"{kind}: {message}"
    return " ".join(text.split())


def _literal(text: str) -> str:
    """User text for a matplotlib title: a ``$`` would open math mode (and may not parse)."""
    return text.replace("$", r"\$")


def _header(record: LeakRecord) -> str:
    """Column header of the round picture."""
    where = f"client {record.partition_id}" if record.partition_id is not None else "client ?"
    return f"{where}\nnode {record.node_id % 10_000:04d}"


def _caption(record: LeakRecord) -> str:
    """Caption under a leaked image (flagged estimates say so)."""
    if record.status == "failed":
        return "failed"
    flag = {
        Verdict.NOISE_DETECTED.value: " (noise: estimate)",
        Verdict.NOT_SINGLE_SAMPLE.value: " (not 1 sample)",
    }.get(record.verdict, "")
    if record.psnr is None:
        return "no ground truth" + flag
    db = "inf" if math.isinf(record.psnr) else f"{record.psnr:.1f}"
    return f"{db} dB{flag}"


def _verdict(result: Reconstruction) -> str:
    """The verdict's value, or ``""`` when the attack gave no evidence."""
    return result.evidence.verdict.value if result.evidence is not None else ""
