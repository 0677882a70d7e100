"""Shared part of the static-image recipes (CIFAR-10/100, ImageNet): config fields, the
dataset builders and the small generated image set used by ``--demo``.

Images are float32 [3, H, W] (normalised); the model repeats them over its ``T`` time
steps (direct encoding, as Spikformer does).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from evformer.data.synthetic_images import SyntheticImages
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
