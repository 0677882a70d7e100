"""SyntheticGesture: the built-in demo dataset (11 gesture-like classes of moving shapes).

Generated deterministically on first use (``evformer.events.gestures`` renders each
sample and ``evformer.events.simulate`` turns it into DVS events), cached as an HDF5
event cache like the real datasets, then binned into frames [T, 2, H, W] on access.
Needs no download, so the demo recipe and the tests run anywhere.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from evformer.data.event_dataset import FrameTransform, RecordingDataset
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


class SyntheticGesture(RecordingDataset):
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
    ``resize``. See ``RecordingDataset`` for ``transform``, ``event_transform``,
    ``resize``, ``cache_frames``, ``cache_dir`` and ``num_workers``.
    """

    classes = GESTURE_CLASSES
    cache_name = "synthetic-gesture"
    cache_folder = "synthetic_gesture"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        n_frames: int = 16,
        split_by: str = "number",
        transform: FrameTransform | None = None,
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
        **kwargs: Any,
    ) -> None:
        self.n_per_class = {
            "train": _positive_int(n_train_per_class, "n_train_per_class"),
            "test": _positive_int(n_test_per_class, "n_test_per_class"),
        }
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if len(noise_rate_hz) != 2:
            raise ValueError(f"noise_rate_hz: expected a range (low, high), got {noise_rate_hz!r}")
        self.generator_params = {
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
        self.sensor_size = (self.generator_params["height"], self.generator_params["width"])
        super().__init__(root, split, n_frames, split_by, transform, **kwargs)

    def sources(self) -> list[int]:
        return list(range(self.n_per_class[self.split] * len(GESTURE_CLASSES)))

    def params(self) -> dict[str, Any]:
        n_samples = self.n_per_class[self.split] * len(GESTURE_CLASSES)
        return {
            "generator_version": GENERATOR_VERSION,
            "n_samples": n_samples,
            **self.generator_params,
        }

    def loader(self):
        gen = self.generator_params
        return functools.partial(synthetic_gesture_sample, split=self.split, **gen)

    def before_prepare(self, sources) -> None:
        # Generate one sample here first: a bad generator argument then raises its own
        # error in this process, not a preparation error from inside a worker.
        self.loader()(0)
