"""R-CONV engine: tensors in, tensors out; imports neither flwr nor the scenario config."""

from __future__ import annotations

from fl_attack.engine import inverters as _inverters  # noqa: F401  (fills the registry)
from fl_attack.engine.evidence import Evidence, Verdict, gather_evidence
from fl_attack.engine.oracle import LayerTrace, assert_all_close, trace
from fl_attack.engine.reconstruct import (
    check,
    layer_chain,
    reconstruct,
    reconstruct_many,
    single_sample_gradients,
    validate,
)
from fl_attack.engine.registry import INVERTERS, Inverter, register_inverter, registered_types
from fl_attack.engine.types import (
    EngineError,
    LayerDiagnostics,
    Reconstruction,
    ReconstructionError,
    Signal,
    SolveOptions,
    UnsupportedLayerError,
)
from fl_attack.engine.workers import available_cores

__all__ = [
    "INVERTERS",
    "EngineError",
    "Evidence",
    "Inverter",
    "LayerDiagnostics",
    "LayerTrace",
    "Reconstruction",
    "ReconstructionError",
    "Signal",
    "SolveOptions",
    "UnsupportedLayerError",
    "Verdict",
    "assert_all_close",
    "available_cores",
    "check",
    "gather_evidence",
    "layer_chain",
    "reconstruct",
    "reconstruct_many",
    "register_inverter",
    "registered_types",
    "single_sample_gradients",
    "trace",
    "validate",
]
