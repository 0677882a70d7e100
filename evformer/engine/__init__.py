"""evformer.engine (names are imported lazily on first use; see _LAZY)."""

from __future__ import annotations

from evformer._lazy import lazy_exports

# public name -> submodule of evformer.engine that defines it
_LAZY: dict[str, str] = {
    # optim
    "param_groups": "optim",
    "build_optimizer": "optim",
    "vit_layer_id": "optim",
    "count_layers": "optim",
    # batchnorm
    "recalibrate_batchnorm": "batchnorm",
    # probe
    "linear_probe": "probe",
    "extract_features": "probe",
    "ProbeResult": "probe",
    # schedule
    "lr_at": "schedule",
    "CosineSchedule": "schedule",
    # checkpoint
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "atomic_torch_save": "checkpoint",
    "model_state_from": "checkpoint",
    "capture_rng_state": "checkpoint",
    "restore_rng_state": "checkpoint",
    # distributed
    "DistInfo": "distributed",
    "init_distributed": "distributed",
    "cleanup_distributed": "distributed",
    "resolve_device": "distributed",
    "all_reduce": "distributed",
    "all_gather_objects": "distributed",
    "barrier": "distributed",
    # sampling
    "EpochSampler": "sampling",
    "ShardSampler": "sampling",
    "SeededTransformDataset": "sampling",
    "epoch_generator": "sampling",
    # metrics
    "accuracy": "metrics",
    "topk_correct": "metrics",
    "confusion_matrix": "metrics",
    "per_class_accuracy": "metrics",
    # tracking
    "MetricsLog": "tracking",
    "write_run_info": "tracking",
    "git_revision": "tracking",
    "atomic_write_text": "tracking",
    # trainer
    "FitConfig": "trainer",
    "FitResult": "trainer",
    "EvalResult": "trainer",
    "NonFiniteLossError": "trainer",
    "Objective": "trainer",
    "MaskedReconstruction": "trainer",
    "Trainer": "trainer",
    "fit": "trainer",
    "evaluate": "trainer",
    "evaluate_time_steps": "trainer",
    "classification_loss": "trainer",
    "reset_states": "trainer",
    "seed_everything": "trainer",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
