"""evformer.data (names are imported lazily on first use; see _LAZY)."""

from __future__ import annotations

from evformer._lazy import lazy_exports

# public name -> submodule of evformer.data that defines it
_LAZY: dict[str, str] = {
    # cache.py
    "CACHE_FORMAT_VERSION": "cache",
    "CacheCorruptError": "cache",
    "CachePreparationError": "cache",
    "EventCache": "cache",
    "FrameCache": "cache",
    "PrepareReport": "cache",
    "cache_is_current": "cache",
    "ensure_event_cache": "cache",
    "ensure_frame_cache": "cache",
    "fingerprint": "cache",
    "prepare_event_cache": "cache",
    # event_dataset.py
    "EventFrameDataset": "event_dataset",
    "RecordingDataset": "event_dataset",
    # seeding.py
    "sample_generators": "seeding",
    "worker_generator": "seeding",
    "worker_rng": "seeding",
    "seed_worker": "seeding",
    # neuromorphic.py
    "DatasetNotFoundError": "neuromorphic",
    "DVSGesture": "neuromorphic",
    "CIFAR10DVS": "neuromorphic",
    "cifar10dvs_split": "neuromorphic",
    # synthetic.py
    "SyntheticGesture": "synthetic",
    "SyntheticImages": "synthetic_images",
    # static.py
    "CIFAR10": "static",
    "CIFAR100": "static",
    "ImageNet": "static",
    "RepeatEncoder": "static",
    "PoissonEncoder": "static",
    "RandAugment": "static",
    "cifar_train_transform": "static",
    "cifar_eval_transform": "static",
    "imagenet_train_transform": "static",
    "imagenet_eval_transform": "static",
    # transforms.py
    "hflip": "transforms",
    "roll": "transforms",
    "translate": "transforms",
    "rotate": "transforms",
    "shear_x": "transforms",
    "erase": "transforms",
    "resize": "transforms",
    "FrameTransform": "transforms",
    "Identity": "transforms",
    "RandomHorizontalFlip": "transforms",
    "RandomRoll": "transforms",
    "RandomRotate": "transforms",
    "RandomShearX": "transforms",
    "RandomTranslate": "transforms",
    "RandomErasing": "transforms",
    "Resize": "transforms",
    "Compose": "transforms",
    "RandomChoice": "transforms",
    "POLICIES": "transforms",
    "get_policy": "transforms",
    "Mixup": "transforms",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
