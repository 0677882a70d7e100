"""SyntheticImages: generated colour images for the static-image demos (``--demo`` of the
CIFAR and ImageNet recipes, notebooks). Needs no download."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticImages"]


class SyntheticImages(Dataset):
    """Generated colour images for the static-recipe demos: ``ds[i] -> (uint8 [3, S, S],
    label)``, label ``i % num_classes``.

    Class ``k`` is a set of concentric rings of hue ``k / num_classes`` (rings of 1 to 3
    periods per radius, by ``k % 3``) around a random centre, on a random dim, noisy
    background; brightness, saturation, ring phase and noise level are random per sample.
    Hue and ring spacing survive flips, rotations, shears, crops and erasing, so the
    published augmentation policies can run on it unchanged. Sample ``i`` depends only on
    ``(seed, split, i)``.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        num_classes: int = 10,
        n_per_class: int = 60,
        size: int = 32,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "test", "val"):
            raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
        if num_classes < 2 or n_per_class < 1 or size < 8:
            raise ValueError(
                f"need num_classes >= 2, n_per_class >= 1, size >= 8; got {num_classes}, "
                f"{n_per_class}, {size}"
            )
        self.split_id = 0 if split == "train" else 1
        self.num_classes, self.size, self.seed = num_classes, size, seed
        self.n = num_classes * n_per_class
        self.classes = tuple(f"hue{k}" for k in range(num_classes))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        k = i % self.num_classes
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.split_id, i]))
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        cy, cx = rng.uniform(0.25, 0.75, size=2)
        r = np.hypot(yy - cy, xx - cx)
        periods = 1 + k % 3
        rings = 0.5 + 0.5 * np.cos(2 * np.pi * (periods * 2.5 * r + rng.uniform()))
        hue = (k / self.num_classes + rng.normal(0, 0.01)) % 1.0
        fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
        bg = rng.uniform(0.0, 0.3, size=3)
        img = rings[None] * fg[:, None, None] + (1 - rings[None]) * bg[:, None, None]
        img = img + rng.normal(0, rng.uniform(0.02, 0.08), size=img.shape)
        img = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        return torch.from_numpy(img), k
