"""Samplers whose order is a pure function of (seed, epoch), so a resumed run sees exactly
the batches an uninterrupted one would, on one process or many.

- :class:`EpochSampler` (training): one permutation of the dataset per epoch, cut into
  global batches; rank ``r`` of ``w`` takes slice ``r`` of every global batch. The global
  batches are therefore the same for any number of processes, and a run resumed mid-epoch
  starts at a batch offset instead of replaying the loader.
- :class:`ShardSampler` (evaluation): every sample exactly once over all ranks, no padding
  (padding duplicates would bias the accuracy).
- :class:`SeededTransformDataset`: per-sample augmentation randomness -- frame and event
  level -- from generators seeded by ``(seed, epoch, index)``
  (``evformer.data.seeding.sample_generators``), independent of worker count and of where
  a run was interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

# The per-sample generators live with the datasets that consume them (one module for the
# torch and the NumPy stream); epoch_generator is re-exported here for the trainer.
from evformer.data.seeding import epoch_generator, sample_generators

__all__ = ["EpochSampler", "SeededTransformDataset", "ShardSampler", "epoch_generator"]


class EpochSampler(Sampler[int]):
    """Training indices for one rank: shuffled per epoch, grouped into global batches.

    ``n`` samples, global batch ``batch_size`` split evenly over ``num_replicas`` ranks
    (``batch_size % num_replicas == 0``). Each epoch yields ``n // batch_size`` full global
    batches (the remainder is dropped, as ``drop_last=True`` does). Use it with
    ``DataLoader(batch_size=batch_size // num_replicas, drop_last=False)``.

    :meth:`set_epoch` picks the permutation (``torch.randperm`` from
    :func:`epoch_generator` ``(seed, epoch)``, identical on every rank) and the number of
    global batches of that epoch already consumed.
    """

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        max_batches: int | None = None,
    ) -> None:
        if n <= 0:
            raise ValueError(f"the training set is empty (n={n})")
        if batch_size <= 0 or batch_size % num_replicas:
            raise ValueError(
                f"global batch_size={batch_size} must be a positive multiple of the number "
                f"of processes ({num_replicas})"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside [0, num_replicas={num_replicas})")
        if n < batch_size:
            raise ValueError(
                f"the training set has {n} samples, fewer than one global batch "
                f"({batch_size}); lower the batch size"
            )
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        batches = n // batch_size
        self.batches_per_epoch = min(batches, max_batches) if max_batches else batches
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select epoch ``epoch`` and skip its first ``start_batch`` global batches."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def global_order(self) -> torch.Tensor:
        """All indices of the current epoch in global order, ``[n]`` int64."""
        if self.shuffle:
            return torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
        return torch.arange(self.n)

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        per_rank = self.batch_size // self.num_replicas
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * self.batch_size + self.rank * per_rank
            yield from order[lo : lo + per_rank].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.batch_size // self.num_replicas)


class ShardSampler(Sampler[int]):
    """Evaluation indices ``rank, rank + w, rank + 2w, ...``: each sample once over all
    ranks, in order, without padding."""

    def __init__(self, n: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside [0, num_replicas={num_replicas})")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class SeededTransformDataset(Dataset):
    """``base[i]`` with every random draw taken from generators of ``(seed, epoch, i)``.

    Sample ``i`` gets ``sample_generators(seed, epoch, i)`` (see ``evformer.data.seeding``):
    a CPU ``torch.Generator`` and a ``np.random.Generator`` from one SeedSequence.

    - event level: when ``base`` has a ``getitem(i, rng)`` method (every
      ``evformer.data.EventFrameDataset``), it is called with the NumPy generator, which
      its ``event_transform`` draws from; otherwise ``base[i]`` is used;
    - frame level: ``transform(x, generator)`` (if given) gets the torch generator --
      evformer's frame and image transforms (``evformer.data.transforms``,
      ``evformer.data.static``) take it as their second argument, and must draw all their
      randomness from it.

    The epoch is set by the trainer through :meth:`set_epoch` before each epoch's loader is
    created. Augmentation is therefore reproducible with any number of loader workers, on
    any number of processes, and after a resume. ``base[i]`` must return ``(x, label)``.

    Loader workers receive a copy of the dataset when an epoch's iterator is created, so use
    ``persistent_workers=False`` (the default) for :meth:`set_epoch` to reach them.
    """

    def __init__(
        self,
        base: Dataset,
        transform: Callable[[Any, torch.Generator], Any] | None = None,
        *,
        seed: int,
    ) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        generator, rng = sample_generators(self.seed, self.epoch, int(index))
        getitem = getattr(self.base, "getitem", None)
        x, y = getitem(index, rng) if callable(getitem) else self.base[index]
        if self.transform is not None:
            x = self.transform(x, generator)
        return x, y
