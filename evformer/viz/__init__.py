"""Plotting helpers shared by recipes and notebooks (names are imported lazily on first use,
so importing evformer never imports matplotlib)."""

from __future__ import annotations

import importlib

# public name -> submodule of evformer.viz that defines it
_LAZY: dict[str, str] = {
    "plot_training_curves": "plots",
    "training_curves_figure": "plots",
    "plot_confusion_matrix": "plots",
    "confusion_matrix_figure": "plots",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'evformer.viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"evformer.viz.{mod}"), name)
    globals()[name] = value
    return value
