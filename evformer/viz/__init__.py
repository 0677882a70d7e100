"""Plotting API shared by recipes and notebooks: every ``*_figure`` function returns a
matplotlib Figure and saves nothing (``save_figure`` writes one atomically). Names are
imported lazily on first use, so importing evformer never imports matplotlib."""

from __future__ import annotations

from evformer._lazy import lazy_exports

# public name -> submodule of evformer.viz that defines it
_LAZY: dict[str, str] = {
    # -- runs: metrics.jsonl, results.json, confusion matrices, accuracy against T
    "save_figure": "plots",
    "plot_training_curves": "plots",
    "training_curves_figure": "plots",
    "plot_confusion_matrix": "plots",
    "confusion_matrix_figure": "plots",
    # -- end runs
    # -- masked pretraining
    "plot_mae_reconstructions": "reconstruction",
    "reconstruction_panels": "reconstruction",
    # -- end masked pretraining
    # -- event streams
    # -- end event streams
    # -- frames
    # -- end frames
    # -- networks: spikes, firing rates, attention, energy
    # -- end networks
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
