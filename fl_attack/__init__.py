"""fl-attack: a federated-learning attack simulator built around the R-CONV analytic attack."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
