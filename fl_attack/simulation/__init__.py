"""Honest-client task code (no Flower imports): data, partitions, training, audit records."""

from __future__ import annotations

from fl_attack.simulation.audit import AUDIT_DIR, AuditRecord, audit_path, read_audit, write_audit
from fl_attack.simulation.task import (
    FederatedData,
    build_scenario_model,
    client_partition,
    evaluate,
    load_federated_data,
    partition_indices,
    pick_batch,
    split_train_test,
    train_step,
)

__all__ = [
    "AUDIT_DIR",
    "AuditRecord",
    "FederatedData",
    "audit_path",
    "build_scenario_model",
    "client_partition",
    "evaluate",
    "load_federated_data",
    "partition_indices",
    "pick_batch",
    "read_audit",
    "split_train_test",
    "train_step",
    "write_audit",
]
