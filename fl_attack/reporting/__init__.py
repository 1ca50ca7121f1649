"""Reporting: pictures, JSON records and tables of what leaked."""

from __future__ import annotations

from fl_attack.reporting.figures import save_side_by_side, to_display
from fl_attack.reporting.files import atomic_write, write_json
from fl_attack.reporting.records import diagnostics_table, reconstruction_record

__all__ = [
    "atomic_write",
    "diagnostics_table",
    "reconstruction_record",
    "save_side_by_side",
    "to_display",
    "write_json",
]
