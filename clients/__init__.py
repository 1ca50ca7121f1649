"""The Flower ClientApp: honest clients that train one step per round and audit it."""

from __future__ import annotations

__all__: list[str] = []
