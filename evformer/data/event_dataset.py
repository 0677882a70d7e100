"""The event-dataset base classes: sample ``i`` -> ``(frames [T, 2, H, W], label)``.

- :class:`EventFrameDataset` bins the samples of a prepared ``EventCache`` into frames
  (orientation, event augmentation, resize, binning, frame transform);
- :class:`RecordingDataset` adds the path from raw data to that cache, the sequence every
  dataset shares: list the sources, fingerprint them with the parameters, prepare the
  cache once, open it. A dataset subclasses it and supplies only what differs:

  - ``sources()``: the split's sources (picklable; ``os.PathLike`` members are the files
    fingerprinted), e.g. ``[(recording.aedat, label), ...]``;
  - ``loader()``: a top-level function (or ``functools.partial`` of one) taking one
    source and returning ``[(events, label), ...]``; it runs in worker processes;
  - ``params()``: the parameters (JSON) that shape the samples besides the files;
  - class attributes ``sensor_size``, ``classes``, ``cache_name``.

  The README ("Adding a dataset") shows a complete one: N-MNIST-like AEDAT 2.0 files.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from evformer.data.cache import (
    CACHE_FORMAT_VERSION,
    CachePreparationError,
    EventCache,
    FrameCache,
    cache_is_current,
    ensure_event_cache,
    ensure_frame_cache,
    fingerprint,
)
from evformer.events.core import FIELDS, from_columns

__all__ = ["EventFrameDataset", "RecordingDataset"]

EventTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
FrameTransform = Callable[[torch.Tensor], torch.Tensor]


def _resize_coords(x: np.ndarray, size_in: int, size_out: int) -> np.ndarray:
    """Map pixel coordinates of a ``size_in`` axis onto a ``size_out`` axis.

    ``floor(x * size_out / size_in)`` in integer arithmetic: every target pixel sums
    the events of the source pixels that land on it (for an integer factor this is
    exactly sum pooling of the full-resolution count frames).
    """
    if size_in == size_out:
        return x
    return ((x.astype(np.int32) * size_out) // size_in).astype(np.int16)


class EventFrameDataset(Dataset):
    """Base of every event dataset: sample ``i`` -> ``(frames, label)``, from an ``EventCache``.

    ``frames`` is a float32 tensor [T, 2, H, W] of event counts (channel 0 = OFF,
    1 = ON; T = ``n_frames``) binned by ``evformer.events.to_frames`` with
    ``split_by`` ``"number"`` (equal event counts per frame, spikingjelly's rule)
    or ``"time"`` (equal durations). Per sample, in order:

    1. read the events from the cache, then ``orient_events`` (subclass hook, e.g.
       CIFAR10-DVS orientation);
    2. ``event_transform(events, rng)`` if given: a callable on the structured event
       array and a ``np.random.Generator`` returning events (augmentation);
    3. ``resize`` (an int or (height, width)) maps coordinates onto the smaller grid,
       so each output pixel sums its source pixels (128 -> 64 = 2x2 sum pooling);
    4. bin, convert to float32, then ``transform(frames)`` if given (frame transforms).

    ``cache_frames=True`` stores the result of steps 1-4 (without ``transform``) once,
    in a second HDF5 file next to the event cache whose name and attributes carry the
    binning parameters, so changing any of them builds a new file; counts are stored
    exactly (uint16, or uint32 when a pixel exceeds 65535). It cannot be combined
    with an ``event_transform`` (random per epoch).

    Randomness: ``getitem(i, rng)`` passes ``rng`` to ``event_transform``; training wraps
    the dataset in ``evformer.engine.SeededTransformDataset``, which calls it with the
    sample's generator of ``(seed, epoch, i)`` (``evformer.data.seeding``), so event
    augmentation is exactly resumable and independent of the worker count. ``ds[i]``
    (no generator) falls back to ``worker_rng()``, one stream per process.
    """

    #: (height, width) of the sensor; subclasses set it, else taken from the cache
    sensor_size: tuple[int, int] | None = None
    #: class names, index = label
    classes: tuple[str, ...] = ()

    def __init__(
        self,
        cache: EventCache,
        *,
        n_frames: int = 16,
        split_by: str = "number",
        transform: FrameTransform | None = None,
        event_transform: EventTransform | None = None,
        resize: int | tuple[int, int] | None = None,
        cache_frames: bool = False,
        progress: bool = True,
    ) -> None:
        if not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
            raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
        if split_by not in ("number", "time"):
            raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
        if cache_frames and event_transform is not None:
            raise ValueError(
                "cache_frames=True stores fixed frames, but event_transform is random per "
                "sample: use one or the other (frame `transform`s work with cached frames)"
            )
        self.cache = cache
        size = self.sensor_size or cache.sensor_size
        if size is None:
            raise ValueError(
                f"{type(self).__name__}: sensor size unknown; set the class attribute "
                "sensor_size or prepare the cache with sensor_size=(height, width)"
            )
        self.sensor_size = (int(size[0]), int(size[1]))
        if resize is None:
            out = self.sensor_size
        elif isinstance(resize, (int, np.integer)):
            out = (int(resize), int(resize))
        else:
            out = (int(resize[0]), int(resize[1]))
        if not (0 < out[0] <= self.sensor_size[0] and 0 < out[1] <= self.sensor_size[1]):
            raise ValueError(
                f"resize must give a size between 1 and the sensor size {self.sensor_size}, "
                f"got {resize!r}"
            )
        self.frame_size = out
        self.n_frames = int(n_frames)
        self.split_by = split_by
        self.transform = transform
        self.event_transform = event_transform
        self._frames: FrameCache | None = None
        if cache_frames:
            self._frames = self._ensure_frame_cache(progress=progress)

    # -- overridable hooks -------------------------------------------------------

    def orient_events(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map stored (sensor) events to the dataset's output orientation (identity here)."""
        return cols

    def frame_key(self) -> dict[str, Any]:
        """Everything that determines a sample's frames (keys the frame cache)."""
        return {
            "events": self.cache.fingerprint,
            "format_version": CACHE_FORMAT_VERSION,
            "n_frames": self.n_frames,
            "split_by": self.split_by,
            "sensor_size": list(self.sensor_size),
            "frame_size": list(self.frame_size),
            "dataset": type(self).__name__,
        }

    # -- public API ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def labels(self) -> np.ndarray:
        """int64 [N]: the label of every sample (no data is read)."""
        return self.cache.labels

    @property
    def targets(self) -> list[int]:
        """Labels as a list (the torchvision attribute name, used by samplers)."""
        return self.cache.labels.tolist()

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Sources skipped at preparation (``skip_bad=True``): (source name, reason)."""
        return list(self.cache.bad)

    def events(self, i: int) -> np.ndarray:
        """Events of sample ``i`` in the output orientation (before augmentation/resize)."""
        c = self.orient_events(self.cache.columns(i))
        return from_columns(c["t"], c["x"], c["y"], c["p"])

    def frames_numpy(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Integer counts [T, 2, H, W] of sample ``i`` (no frame ``transform``); ``rng``
        feeds ``event_transform`` (default: ``worker_rng()``)."""
        if self._frames is not None:
            return self._frames.frames(i)
        cols = self.orient_events(self.cache.columns(i))
        if self.event_transform is not None:
            if rng is None:
                from evformer.data.seeding import worker_rng

                rng = worker_rng()
            ev = from_columns(cols["t"], cols["x"], cols["y"], cols["p"])
            ev = self.event_transform(ev, rng)
            cols = {f: ev[f] for f in FIELDS}
        return self._bin(cols)

    def getitem(self, i: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``(frames, label)`` of sample ``i`` with ``event_transform`` drawing from ``rng``
        (the per-sample generator ``SeededTransformDataset`` passes); ``ds[i]`` is
        ``ds.getitem(i)``."""
        frames = torch.from_numpy(np.asarray(self.frames_numpy(i, rng), dtype=np.float32))
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, int(self.cache.labels[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.getitem(i)

    def frames_numpy_uncached(self, i: int) -> np.ndarray:
        """Counts [T, 2, H, W] of sample ``i`` binned from events (ignores the frame cache)."""
        return self._bin(self.orient_events(self.cache.columns(i)))

    # -- internals -----------------------------------------------------------------

    def _resized(self, cols: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        h, w = self.sensor_size
        oh, ow = self.frame_size
        if (oh, ow) == (h, w):
            return cols
        return {
            "t": cols["t"],
            "x": _resize_coords(cols["x"], w, ow),
            "y": _resize_coords(cols["y"], h, oh),
            "p": cols["p"],
        }

    def _bin(self, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        from evformer.events import to_frames

        oh, ow = self.frame_size
        return to_frames(
            self._resized(cols), n_frames=self.n_frames, split_by=self.split_by, height=oh, width=ow
        )

    def _bin_range(self, a: int, b: int) -> np.ndarray:
        """Counts [b - a, T, 2, H, W] of samples ``a .. b - 1`` (one read, one batched binning)."""
        from evformer.events import to_frames_batch

        cols, offsets = self.cache.columns_range(a, b)
        oh, ow = self.frame_size
        return to_frames_batch(
            self._resized(self.orient_events(cols)),
            n_frames=self.n_frames,
            split_by=self.split_by,
            height=oh,
            width=ow,
            offsets=offsets,
        )

    def _ensure_frame_cache(self, *, progress: bool) -> FrameCache:
        key = self.frame_key()
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=6)
        p = self.cache.path
        return ensure_frame_cache(
            p.with_name(f"{p.stem}-frames-{digest.hexdigest()}.h5"),
            key,
            (len(self), self.n_frames, 2, *self.frame_size),
            self._bin_range,
            desc=f"frames {p.stem}",
            progress=progress,
        )


# --------------------------------------------------------------------------- from raw data


def _files_of(source: Any) -> list[os.PathLike]:
    """The files named by one source descriptor (itself, or the PathLike members of a tuple)."""
    if isinstance(source, os.PathLike):
        return [source]
    if isinstance(source, (tuple, list)):
        return [s for s in source if isinstance(s, os.PathLike)]
    return []


def _writable_dir(d: Path) -> Path:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the cache folder {d} ({err}); pass cache_dir= a writable folder"
        ) from err
    if not os.access(d, os.W_OK):
        raise PermissionError(
            f"cache folder {d} is not writable; pass cache_dir= a writable folder"
        )
    return d


def _check_skipped(cache: EventCache, skip_bad: bool) -> None:
    """Report sources a cache skipped; refuse such a cache unless skip_bad is on."""
    if not cache.bad:
        return
    listing = ", ".join(n for n, _ in cache.bad[:5]) + (" ..." if len(cache.bad) > 5 else "")
    if not skip_bad:
        raise CachePreparationError(
            f"{cache.path} was prepared with skip_bad=True and lacks {len(cache.bad)} "
            f"unreadable recording(s): {listing}. Pass skip_bad=True to use it as is, or "
            "replace those files (the cache is then rebuilt)."
        )
    warnings.warn(
        f"{cache.path.name}: {len(cache.bad)} unreadable recording(s) skipped: {listing} "
        "(see the dataset's .skipped)",
        stacklevel=3,
    )


class RecordingDataset(EventFrameDataset):
    """An event dataset read from raw sources: ``ds[i] -> (frames [T, 2, H, W], label)``.

    Construction lists the split's ``sources()``, fingerprints their files together with
    the dataset name, the split and ``params()``, and opens
    ``<cache_dir>/<cache_name>-<split>.h5``, preparing it first (``loader()`` over the
    sources in ``num_workers`` processes) unless a current one exists: a changed file or
    parameter rebuilds it. ``cache_dir`` defaults to ``<root>/<cache_folder>``; it must be
    writable only when the cache is (re)built (a current cache on a read-only root is read).
    ``skip_bad`` skips unreadable sources (warned about, listed in ``self.skipped``);
    a cache that skipped sources is refused without it. ``n_frames``, ``split_by``,
    ``transform``, ``event_transform``, ``resize``, ``cache_frames``: see
    ``EventFrameDataset``.

    A subclass sets ``sensor_size``, ``classes`` and ``cache_name`` and defines
    ``sources()``, ``loader()`` and (if any) ``params()``; parameters of its own are
    keyword arguments of its ``__init__``, stored on ``self`` before calling this one.
    """

    #: cache file name stem: ``<cache_dir>/<cache_name>-<split>.h5``
    cache_name: str = ""
    #: folder of the caches under ``root`` when no ``cache_dir`` is given
    cache_folder: str = ".evformer"
    #: accepted values of ``split``
    splits: tuple[str, ...] = ("train", "test")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        n_frames: int = 16,
        split_by: str = "number",
        transform: FrameTransform | None = None,
        *,
        event_transform: EventTransform | None = None,
        resize: int | tuple[int, int] | None = None,
        cache_frames: bool = False,
        cache_dir: str | os.PathLike | None = None,
        skip_bad: bool = False,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> None:
        if split not in self.splits:
            raise ValueError(f"split must be {' or '.join(map(repr, self.splits))}, got {split!r}")
        if not self.cache_name:
            raise TypeError(f"{type(self).__name__} must set the class attribute cache_name")
        self.root = Path(root)
        self.split = split
        sources = list(self.sources())
        params = {"dataset": type(self).__name__, "split": split, **self.params()}
        files = [f for s in sources for f in _files_of(s)]
        fp = fingerprint([*files, json.dumps(params, sort_keys=True)], root=self.root)
        folder = Path(cache_dir) if cache_dir is not None else self.root / self.cache_folder
        path = folder / f"{self.cache_name}-{split}.h5"
        if not cache_is_current(path, fp):
            # Only a (re)build writes: a current cache on a read-only root is simply read.
            _writable_dir(folder)
            self.before_prepare(sources)
        cache = ensure_event_cache(
            path,
            sources,
            self.loader(),
            fingerprint=fp,
            meta={**params, "n_sources": len(sources), "classes": list(self.classes)},
            sensor_size=self.sensor_size,
            num_workers=num_workers,
            skip_bad=skip_bad,
            desc=f"{type(self).__name__} {split}",
            progress=progress,
        )
        _check_skipped(cache, skip_bad)
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

    # -- what a dataset supplies ---------------------------------------------------

    def sources(self) -> Sequence[Any]:
        """The sources of ``self.split`` under ``self.root``, in sample order (picklable)."""
        raise NotImplementedError(f"{type(self).__name__} must define sources()")

    def loader(self) -> Callable[[Any], list[tuple[Any, int]]]:
        """``load(source) -> [(events, label), ...]``: a picklable top-level function (or a
        ``functools.partial`` of one); see ``evformer.data.prepare_event_cache``."""
        raise NotImplementedError(f"{type(self).__name__} must define loader()")

    def params(self) -> dict[str, Any]:
        """JSON parameters that shape the samples besides the source files (fingerprinted
        and stored in the cache's ``meta``); bump a rule string when the loader changes."""
        return {}

    def before_prepare(self, sources: Sequence[Any]) -> None:
        """Runs in this process when the cache is about to be (re)built; a place to raise
        argument errors as themselves rather than from a worker (default: nothing)."""
