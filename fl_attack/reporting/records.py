"""JSON records and rich tables of a reconstruction."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.table import Table

from fl_attack.engine import Reconstruction

__all__ = ["diagnostics_table", "reconstruction_record"]


def reconstruction_record(result: Reconstruction) -> dict[str, Any]:
    """JSON-ready summary of a :class:`Reconstruction` (image left out)."""
    return {
        "label": result.label,
        "seconds": result.seconds,
        "exact": result.exact,
        "warnings": list(result.warnings),
        "notes": list(result.notes),
        "layers": [asdict(d) for d in result.layers],
    }


def diagnostics_table(result: Reconstruction, *, title: str = "per-layer diagnostics") -> Table:
    """One row per layer: constraints, rank against unknowns, residual, unit counts, time."""
    table = Table(title=title, title_justify="left")
    for column in ("layer", "type", "constraints", "equations", "rank / unknowns", "residual"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    table.add_column("zero/sat/ambig", justify="right")
    table.add_column("ms", justify="right")
    for d in result.layers:
        rank = f"{d.rank} / {d.unknowns}" if d.unknowns else "-"
        if d.rank_deficient:
            rank = f"[bold red]{rank}[/]"
        units = f"{d.zero_units}/{d.saturated_units}/{d.ambiguous_units}"
        table.add_row(
            d.name,
            d.kind,
            d.constraints,
            str(d.equations) if d.equations else "-",
            rank,
            f"{d.relative_residual:.1e}" if d.unknowns else "-",
            units,
            f"{d.seconds * 1e3:.1f}",
        )
    return table
