"""Shared part of the static-image recipes (CIFAR-10/100, ImageNet): config fields, the
dataset builders and the small generated image set used by ``--demo``.

Images are float32 [3, H, W] (normalised); the model repeats them over its ``T`` time
steps (direct encoding, as Spikformer does).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from evformer.recipes._common import Data, RecipeConfig

STATIC_DATASETS = ("cifar10", "cifar100", "imagenet", "synthetic")


@dataclass
class StaticConfig(RecipeConfig):
    dataset: str = "cifar10"  # cifar10, cifar100, imagenet, or synthetic (generated images)
    transforms: str = "cifar"  # augmentation family: cifar or imagenet
    image_size: int = 32
    randaugment: bool = True
    erasing: float = 0.25  # random-erasing probability
    crop_padding: int = 0  # CIFAR: pad-and-crop (0 = none, as in the official recipe)
    crop_scale_min: float = 0.08  # ImageNet RandomResizedCrop lower area bound
    eval_crop_pct: float = 0.875  # ImageNet: resize to size / crop_pct, centre crop
    verify: bool = True  # CIFAR: check the published MD5 of every file
    synthetic_train_per_class: int = 60
    synthetic_test_per_class: int = 20


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


def _transforms(cfg: StaticConfig):
    from evformer.data import static as st

    if cfg.transforms == "cifar":
        mean, std = (
            (st.CIFAR100_MEAN, st.CIFAR100_STD)
            if cfg.dataset == "cifar100"
            else (st.CIFAR10_MEAN, st.CIFAR10_STD)
        )
        train_tf = st.cifar_train_transform(
            mean,
            std,
            crop_padding=cfg.crop_padding,
            randaugment=cfg.randaugment,
            erasing=cfg.erasing,
        )
        return train_tf, st.cifar_eval_transform(mean, std)
    if cfg.transforms == "imagenet":
        train_tf = st.imagenet_train_transform(
            cfg.image_size,
            scale=(cfg.crop_scale_min, 1.0),
            randaugment=cfg.randaugment,
            erasing=cfg.erasing,
        )
        return train_tf, st.imagenet_eval_transform(cfg.image_size, crop_pct=cfg.eval_crop_pct)
    raise ValueError(f"--transforms must be 'cifar' or 'imagenet', got {cfg.transforms!r}")


def build_static_data(cfg: StaticConfig, *, train: bool = True) -> Data:
    """Train/test sets of ``cfg.dataset`` with the paper's transforms. The random training
    transform is returned separately (the engine applies it with per-sample generators);
    the deterministic test transform is applied by the test set."""
    from evformer.data import CIFAR10, CIFAR100, ImageNet

    train_tf, test_tf = _transforms(cfg)
    name = cfg.dataset
    if name in ("cifar10", "cifar100"):
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        test = cls(cfg.data_root, "test", transform=test_tf, verify=cfg.verify)
        train_set = (
            cls(cfg.data_root, "train", transform=None, verify=cfg.verify) if train else None
        )
    elif name == "imagenet":
        test = ImageNet(cfg.data_root, "val", transform=test_tf)
        train_set = ImageNet(cfg.data_root, "train", transform=None) if train else None
    elif name == "synthetic":
        common = dict(num_classes=cfg.num_classes, size=cfg.image_size)
        test = _Mapped(
            SyntheticImages("test", n_per_class=cfg.synthetic_test_per_class, **common), test_tf
        )
        train_set = (
            SyntheticImages("train", n_per_class=cfg.synthetic_train_per_class, **common)
            if train
            else None
        )
    else:
        raise ValueError(f"--dataset must be one of {STATIC_DATASETS}, got {name!r}")
    names = list(test.classes)
    if len(names) != cfg.num_classes:
        raise ValueError(f"{name} has {len(names)} classes but --num-classes is {cfg.num_classes}")
    return Data(train=train_set, test=test, class_names=names, train_transform=train_tf)


class _Mapped(Dataset):
    """``(transform(x), y)`` for a deterministic ``transform``."""

    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", ())

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return self.transform(x), y


def build_static_test(cfg: StaticConfig, T: int) -> Dataset:
    """Static images do not depend on T (the model repeats them): the plain test set."""
    return build_static_data(cfg, train=False).test
