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
    "Run": "runs",
    "load_run": "runs",
    "run_curves_figure": "runs",
    "run_confusion_figure": "runs",
    "per_class_accuracy_figure": "runs",
    "accuracy_vs_t_figure": "runs",
    # -- end runs
    # -- masked pretraining
    "plot_mae_reconstructions": "reconstruction",
    "reconstruction_panels": "reconstruction",
    "mask_figure": "reconstruction",
    "stem_stage_outputs": "reconstruction",
    "stem_activity_figure": "reconstruction",
    "StemActivity": "reconstruction",
    "StemOutput": "reconstruction",
    "STEM_OUTPUTS": "reconstruction",
    # -- end masked pretraining
    # -- event streams
    "event_scatter_figure": "events",
    "event_rate_figure": "events",
    "count_map_figure": "events",
    # -- end event streams
    # -- frames
    "ON_COLOR": "frames",
    "OFF_COLOR": "frames",
    "frames_to_rgb": "frames",
    "frame_grid_figure": "frames",
    "save_frames_gif": "frames",
    # -- end frames
    # -- networks: spikes, firing rates, attention, energy
    "SpikeRecord": "network",
    "record_spikes": "network",
    "firing_rate_figure": "network",
    "spike_raster_figure": "network",
    "AttentionMaps": "network",
    "attention_maps": "network",
    "attention_figure": "network",
    "calibrate_batchnorm": "network",
    "energy_figure": "network",
    "energy_table": "network",
    # -- end networks
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
