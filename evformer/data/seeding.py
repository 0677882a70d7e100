"""Every generator evformer's data pipeline draws from, in one place.

Training (resumable, worker-count independent): sample ``i`` of epoch ``e`` of a run
with seed ``s`` gets its generators from :func:`sample_generators` ``(s, e, i)`` -- a
CPU ``torch.Generator`` for frame transforms and a ``np.random.Generator`` for event
transforms (``evformer.events.augment``), both derived from one
``np.random.SeedSequence([s, e, i])``. A sample's augmentation is then a function of
(seed, epoch, index) alone: the same with 0 or 8 DataLoader workers, on one process or
many, and after a resume. ``evformer.engine.SeededTransformDataset`` hands them out.

Outside such a pipeline (a dataset indexed by hand, a plain DataLoader),
:func:`worker_generator` / :func:`worker_rng` give one generator per process, seeded
from ``torch.initial_seed()`` (distinct in every DataLoader worker); they are the
fallback used when no generator is passed, and do not make a run resumable.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "epoch_generator",
    "sample_generators",
    "seed_worker",
    "worker_generator",
    "worker_rng",
]


# ----------------------------------------------------------------------------- per sample


def _torch_generator(ss: np.random.SeedSequence) -> torch.Generator:
    words = ss.generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(words[0]) << 32 | int(words[1]))
    return g


def epoch_generator(seed: int, epoch: int, *streams: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, epoch, *streams)`` alone (all >= 0).

    NumPy's SeedSequence mixes the integers, so nearby epochs or ranks get unrelated
    streams (``seed + epoch`` would make run (seed=1, epoch=0) replay run (seed=0, epoch=1)).
    """
    return _torch_generator(np.random.SeedSequence([seed, epoch, *streams]))


def sample_generators(
    seed: int, epoch: int, index: int
) -> tuple[torch.Generator, np.random.Generator]:
    """The generators of sample ``index`` in ``epoch``: ``(torch_gen, numpy_rng)``.

    ``torch_gen`` (frame transforms) equals ``epoch_generator(seed, epoch, index)``;
    ``numpy_rng`` (event transforms) comes from a child of the same SeedSequence, so the
    two streams are unrelated to each other yet fixed by ``(seed, epoch, index)``.
    """
    ss = np.random.SeedSequence([seed, epoch, index])
    return _torch_generator(ss), np.random.default_rng(ss.spawn(1)[0])


# ----------------------------------------------------------------------------- per process

_TORCH_STREAM, _NUMPY_STREAM, _LEGACY_STREAM = 0x7A1, 0x7A2, 0x7A3
_streams: dict[str, tuple[tuple[int, int], object]] = {}


def _derived_seed(stream: int, bits: int = 64) -> int:
    # Hash (process seed, stream) so the torch and NumPy streams are unrelated to each other
    # and to torch's global generator, which DataLoader seeds with the same number.
    state = np.random.SeedSequence([torch.initial_seed(), stream]).generate_state(1, np.uint64)[0]
    return int(state) >> (64 - bits)


def _cached(name: str, make: Callable[[], object]):
    # Keyed on pid and seed: a forked worker inherits the parent's generator object, and
    # must not replay the parent's (or a sibling's) stream.
    key = (os.getpid(), torch.initial_seed())
    hit = _streams.get(name)
    if hit is None or hit[0] != key:
        hit = (key, make())
        _streams[name] = hit
    return hit[1]


def worker_generator() -> torch.Generator:
    """This process's ``torch.Generator`` for frame transforms, seeded from torch.initial_seed().

    Distinct in every DataLoader worker (whose initial seed is ``base_seed + worker_id``);
    re-seeded when ``torch.manual_seed`` changes the initial seed in this process. Setting
    the *same* seed again does not restart the stream (nothing observable changes); call
    ``seed_worker(0)`` to restart it, or pass an explicit generator for full control.
    """

    def make() -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(_derived_seed(_TORCH_STREAM))
        return g

    return _cached("torch", make)


def worker_rng() -> np.random.Generator:
    """This process's ``np.random.Generator`` for event transforms (seeded as worker_generator).

    The fallback of ``EventFrameDataset`` when it is indexed without a per-sample
    generator; training through ``SeededTransformDataset`` uses :func:`sample_generators`.
    """
    return _cached("numpy", lambda: np.random.default_rng(_derived_seed(_NUMPY_STREAM)))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader: fresh per-worker generators and NumPy's global seed.

    evformer never draws from NumPy's global RNG; seeding it here only stops third-party
    transforms that do (tonic's) from producing the same draws in every forked worker.
    """
    del worker_id  # torch.initial_seed() already differs per worker
    _streams.clear()
    worker_generator()
    worker_rng()
    np.random.seed(_derived_seed(_LEGACY_STREAM, bits=32))  # noqa: NPY002 (seeding only, see above)
