"""Plotting helpers shared by recipes and notebooks (names are imported lazily on first use,
so importing evformer never imports matplotlib)."""

from __future__ import annotations

from evformer._lazy import lazy_exports

# public name -> submodule of evformer.viz that defines it
_LAZY: dict[str, str] = {
    "plot_training_curves": "plots",
    "training_curves_figure": "plots",
    "plot_confusion_matrix": "plots",
    "confusion_matrix_figure": "plots",
    "plot_mae_reconstructions": "reconstruction",
    "reconstruction_panels": "reconstruction",
    "save_figure": "plots",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
