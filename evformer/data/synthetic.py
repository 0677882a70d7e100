"""SyntheticGesture: the built-in demo dataset (11 gesture-like classes of moving shapes).

Generated deterministically on first use (``evformer.events.gestures`` renders each
sample and ``evformer.events.simulate`` turns it into DVS events), cached as an HDF5
event cache like the real datasets, then binned into frames [T, 2, H, W] on access.
Needs no download, so the demo recipe and the tests run anywhere.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evformer.data.cache import (
    EventFrameDataset,
    cache_is_current,
    ensure_event_cache,
    fingerprint,
)
from evformer.events.gestures import GENERATOR_VERSION, GESTURE_CLASSES, make_gesture_events

__all__ = ["SyntheticGesture", "synthetic_gesture_sample"]

# Part of every sample's seed: the two splits draw from disjoint seed streams.
_SPLIT_IDS = {"train": 0, "test": 1}


def synthetic_gesture_sample(
    index: int,
    *,
    split: str,
    seed: int,
    height: int,
    width: int,
    duration_us: int,
    fps: float,
    threshold: float,
    threshold_sigma: float,
    refractory_us: int,
    noise_rate_hz: tuple[float, float],
) -> list[tuple[np.ndarray, int]]:
    """Sample ``index`` of a split as ``[(events EVENT_DTYPE sorted by t, label)]``.

    The label is ``index % 11`` (classes interleaved, so every prefix of the split is
    balanced). The sample's generator is seeded by ``SeedSequence([seed, split id,
    index])``: a sample depends on nothing but these three numbers and the generator
    parameters, not on the other samples, their order or the number of worker processes.
    Top-level so the cache preparation can run it in worker processes.
    """
    label = int(index) % len(GESTURE_CLASSES)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], int(index)]))
    events = make_gesture_events(
        label,
        rng,
        height=height,
        width=width,
        duration_us=duration_us,
        fps=fps,
        threshold=threshold,
        threshold_sigma=threshold_sigma,
        refractory_us=refractory_us,
        noise_rate_hz=tuple(noise_rate_hz),
    )
    return [(events, label)]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class SyntheticGesture(EventFrameDataset):
    """Synthetic gestures: 11 classes of moving shapes on a DVS; ``ds[i] -> (frames, label)``.

    Classes (``classes``, see ``evformer.events.gestures``): swipe right / left / down /
    up, circle clockwise / counter-clockwise, grow / shrink, clap, drum, roll. The pairs
    (0, 1), (2, 3), (4, 5), (6, 7) differ only in the direction of time, so summing the
    frames over time cannot tell them apart; the order of the frames can.

    The split holds ``n_<split>_per_class * 11`` samples, label ``i % 11``; sample ``i``
    is generated from ``SeedSequence([seed, split, i])`` with the generator
    parameters below (see ``synthetic_gesture_sample``), so train and test never share
    a sample. The first use of a split generates it in ``num_workers`` processes into
    ``<cache_dir>/synthetic-gesture-<split>.h5`` (``cache_dir`` defaults to
    ``<root>/synthetic_gesture``); later uses open that file, unless a generator
    parameter (or the generator version) changed, which rebuilds it.

    Generator parameters: ``height`` x ``width`` sensor, clips of ``duration_us`` µs
    rendered at ``fps``, DVS ``threshold`` (log contrast) with per-pixel
    ``threshold_sigma``, ``refractory_us``, background rate drawn per sample from the
    range ``noise_rate_hz`` (events / pixel / s). The defaults give 12k-150k events per
    sample (mean 44k), ~0.1 s each to generate.

    ``frames``: float32 [T, 2, H, W] event counts (channel 0 = OFF, 1 = ON),
    T = ``n_frames``, ``split_by`` ``"number"`` or ``"time"``, H x W the sensor or
    ``resize``. See ``EventFrameDataset`` for ``transform``, ``event_transform``,
    ``resize`` and ``cache_frames``.
    """

    classes = GESTURE_CLASSES

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        n_frames: int = 16,
        split_by: str = "number",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        n_train_per_class: int = 64,
        n_test_per_class: int = 16,
        seed: int = 0,
        height: int = 128,
        width: int = 128,
        duration_us: int = 1_000_000,
        fps: float = 300.0,
        threshold: float = 0.2,
        threshold_sigma: float = 0.03,
        refractory_us: int = 100,
        noise_rate_hz: tuple[float, float] = (0.05, 0.3),
        event_transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        resize: int | tuple[int, int] | None = None,
        cache_frames: bool = False,
        cache_dir: str | os.PathLike | None = None,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        n_per_class = {
            "train": _positive_int(n_train_per_class, "n_train_per_class"),
            "test": _positive_int(n_test_per_class, "n_test_per_class"),
        }[split]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if len(noise_rate_hz) != 2:
            raise ValueError(f"noise_rate_hz: expected a range (low, high), got {noise_rate_hz!r}")
        gen = {
            "split": split,
            "seed": int(seed),
            "height": _positive_int(height, "height"),
            "width": _positive_int(width, "width"),
            "duration_us": _positive_int(duration_us, "duration_us"),
            "fps": float(fps),
            "threshold": float(threshold),
            "threshold_sigma": float(threshold_sigma),
            "refractory_us": int(refractory_us),
            "noise_rate_hz": [float(noise_rate_hz[0]), float(noise_rate_hz[1])],
        }
        n_samples = n_per_class * len(GESTURE_CLASSES)
        params = {
            "dataset": "SyntheticGesture",
            "generator_version": GENERATOR_VERSION,
            "n_samples": n_samples,
            **gen,
        }
        fp = fingerprint([json.dumps(params, sort_keys=True)])
        folder = Path(cache_dir) if cache_dir is not None else Path(root) / "synthetic_gesture"
        path = folder / f"synthetic-gesture-{split}.h5"
        if not cache_is_current(path, fp):
            # Generate one sample here first: a bad generator argument then raises its own
            # error in this process, not a preparation error from inside a worker.
            synthetic_gesture_sample(0, **gen)
        cache = ensure_event_cache(
            path,
            list(range(n_samples)),
            functools.partial(synthetic_gesture_sample, **gen),
            fingerprint=fp,
            meta={**params, "classes": list(GESTURE_CLASSES)},
            sensor_size=(gen["height"], gen["width"]),
            num_workers=num_workers,
            desc=f"SyntheticGesture {split}",
            progress=progress,
        )
        self.root = Path(root)
        self.split = split
        self.sensor_size = (gen["height"], gen["width"])
        super().__init__(
            cache,
            n_frames=n_frames,
            split_by=split_by,
            transform=transform,
            event_transform=event_transform,
            resize=resize,
            cache_frames=cache_frames,
            progress=progress,
        )
