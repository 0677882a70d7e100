"""Shared part of the event-camera recipes (DVS128 Gesture, CIFAR10-DVS): config fields
and the dataset builders. Samples are frames [T, 2, H, W] (channel 0 = OFF, 1 = ON);
batches [B, T, 2, H, W] go to the model as they are."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from evformer.recipes._common import Data, RecipeConfig

EVENT_DATASETS = ("dvs_gesture", "cifar10_dvs", "synthetic")


@dataclass
class EventConfig(RecipeConfig):
    dataset: str = "dvs_gesture"  # dvs_gesture, cifar10_dvs, or synthetic (SyntheticGesture)
    split_by: str = "number"  # frames with equal event counts (spikingjelly's rule) or "time"
    augment: str = "none"  # frame policy: none, nda, spikformer_cifar10dvs
    resize: int | None = None  # sum-pool the sensor grid to this size (e.g. 64)
    cache_frames: bool = True  # store binned frames in HDF5 (binning happens once)
    orientation: str = "spikingjelly"  # CIFAR10-DVS only: spikingjelly or sensor
    synthetic_size: int = 64  # SyntheticGesture sensor height = width
    synthetic_train_per_class: int = 64
    synthetic_test_per_class: int = 16
    prepare_workers: int | None = None  # processes that parse / generate the event cache
    skip_bad: bool = False  # skip unreadable recordings (listed in a warning) instead of failing
    cache_dir: str | None = None  # folder of the event caches (default <data-root>/.evformer)


def _frame_kwargs(cfg: EventConfig, n_frames: int) -> dict:
    return dict(
        n_frames=n_frames,
        split_by=cfg.split_by,
        resize=cfg.resize,
        cache_frames=cfg.cache_frames,
        num_workers=cfg.prepare_workers,
        progress=cfg.progress,
        skip_bad=cfg.skip_bad,
        cache_dir=cfg.cache_dir,
    )


def event_dataset(cfg: EventConfig, split: str, n_frames: int) -> Dataset:
    """The ``split`` ("train"/"test") of ``cfg.dataset`` binned into ``n_frames`` frames."""
    from evformer.data import CIFAR10DVS, DVSGesture, SyntheticGesture

    kw = _frame_kwargs(cfg, n_frames)
    if cfg.dataset == "dvs_gesture":
        return DVSGesture(cfg.data_root, split, **kw)
    if cfg.dataset == "cifar10_dvs":
        return CIFAR10DVS(cfg.data_root, split, orientation=cfg.orientation, **kw)
    if cfg.dataset == "synthetic":
        return SyntheticGesture(
            cfg.data_root,
            split,
            height=cfg.synthetic_size,
            width=cfg.synthetic_size,
            n_train_per_class=cfg.synthetic_train_per_class,
            n_test_per_class=cfg.synthetic_test_per_class,
            **kw,
        )
    raise ValueError(f"--dataset must be one of {EVENT_DATASETS}, got {cfg.dataset!r}")


def build_event_data(cfg: EventConfig, *, train: bool = True) -> Data:
    """Train/test sets at ``cfg.T`` frames and the augmentation policy."""
    from evformer.data import get_policy

    test = event_dataset(cfg, "test", cfg.T)
    names = list(getattr(test, "classes", ())) or [str(i) for i in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        raise ValueError(
            f"{cfg.dataset} has {len(names)} classes but --num-classes is {cfg.num_classes}"
        )
    train_set = event_dataset(cfg, "train", cfg.T) if train else None
    policy = None if cfg.augment == "none" else get_policy(cfg.augment)
    return Data(train=train_set, test=test, class_names=names, train_transform=policy)


def build_event_test(cfg: EventConfig, T: int) -> Dataset:
    """The test set re-binned into ``T`` frames (for evaluation at several T)."""
    return event_dataset(cfg, "test", T)
