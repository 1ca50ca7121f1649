"""The Flower ServerApp: FedAvg, wrapped by the malicious strategy that inverts updates."""

from __future__ import annotations

__all__: list[str] = []
