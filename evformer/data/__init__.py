"""evformer.data (names are imported lazily on first use; see _LAZY)."""

from __future__ import annotations

import importlib

# public name -> submodule of evformer.data that defines it
_LAZY: dict[str, str] = {}

__all__ = list(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'evformer.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"evformer.data.{mod}"), name)
    globals()[name] = value
    return value
