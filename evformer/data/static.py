"""Static image datasets (CIFAR-10/100, ImageNet) with the paper's transforms, and
static-to-spike encoders.

Images become float tensors ``[3, H, W]`` (normalised); a model for static data then
needs ``[T, 3, H, W]`` per sample (``[T, B, 3, H, W]`` per batch, time first):

- ``RepeatEncoder(T)``: the image repeated T times (direct encoding; what Spikformer
  V1/V2 use: the first conv layer turns it into spikes);
- ``PoissonEncoder(T)``: rate coding, each value in [0, 1] becomes T Bernoulli spikes
  with that probability (apply it to un-normalised images).

Both work on one sample or a batch (a new leading time axis) and can be used as the
last dataset transform or on the device inside the training step (cheaper: the
DataLoader then moves T times less data).

Every random transform here is called ``transform(x, generator=None)`` and draws from
``generator`` or, when None, from ``evformer.data.transforms.worker_generator()`` (one
generator per process, distinct in every DataLoader worker); they compose with the frame
transforms of ``evformer.data.transforms``. Crops, flips and erasing are
``torchvision.transforms.v2`` transforms run with a seed drawn from that generator
(``evformer.data._tv``: torch's global RNG is forked around the call and left as it
was); RandAugment is timm's policy over torchvision's functional ops.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as tvf

from evformer.data import _tv
from evformer.data.neuromorphic import DatasetNotFoundError
from evformer.data.transforms import (
    Compose,
    RandomErasing,
    RandomHorizontalFlip,
    worker_generator,
)

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CenterCrop",
    "ImageNet",
    "Normalize",
    "PoissonEncoder",
    "RandAugment",
    "RandomCropPad",
    "RandomResizedCrop",
    "RepeatEncoder",
    "Resize",
    "ToImageTensor",
    "cifar_eval_transform",
    "cifar_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

# Official Spikformer cifar10.yml; CIFAR-100 and ImageNet: the usual statistics.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _gen(generator: torch.Generator | None) -> torch.Generator:
    return worker_generator() if generator is None else generator


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """Uniform integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


# --------------------------------------------------------------------------- image transforms


@dataclass(frozen=True)
class ToImageTensor:
    """PIL image / HWC uint8 array -> uint8 tensor [C, H, W] (no scaling)."""

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return img
        if isinstance(img, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return tvf.pil_to_tensor(img)


@dataclass(frozen=True)
class Normalize:
    """uint8 [C, H, W] (0..255) or float in [0, 1] -> float32 ``(x / 255 - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = tvf.to_dtype(x, torch.float32, scale=True)
        return tvf.normalize(x, list(self.mean), list(self.std))


@dataclass(frozen=True)
class Resize:
    """Resize the shorter side to ``size`` (bicubic, antialiased)."""

    size: int

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return tvf.resize(x, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)


@dataclass(frozen=True)
class CenterCrop:
    """Crop the central ``size x size`` region."""

    size: int

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return tvf.center_crop(x, [self.size, self.size])


@dataclass(frozen=True)
class RandomCropPad:
    """Zero-pad by ``padding`` pixels, then crop ``size x size`` at a uniform position
    (torchvision's ``RandomCrop(size, padding)``)."""

    size: int
    padding: int

    def __post_init__(self):
        object.__setattr__(self, "_op", v2.RandomCrop(self.size, padding=self.padding, fill=0))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _tv.run_seeded(self._op, x, _gen(generator))


@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` (bicubic, antialiased) drawing from ``generator``.

    Up to 10 tries: area fraction ``U(scale)``, aspect ratio log-uniform in ``ratio``;
    a box that fits is taken at a uniform position; otherwise the central crop with the
    aspect ratio clamped to ``ratio``. The box is resized to ``size x size``.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        object.__setattr__(
            self,
            "_op",
            v2.RandomResizedCrop(
                self.size,
                scale=self.scale,
                ratio=self.ratio,
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            ),
        )

    def box(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` that ``__call__`` crops from a ``height x width`` image for
        this generator state."""
        p = _tv.draw_params(self._op, _tv.probe(height, width), _gen(generator))
        return p["top"], p["left"], p["height"], p["width"]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _tv.run_seeded(self._op, x, _gen(generator))


# RandAugment operations (timm's "increasing" set, used with inc1). Each maps a magnitude
# m in [0, 10] to its argument; `signed` ops get a random sign.
_RA_LEVELS: dict[str, tuple[Callable[[float], float], bool]] = {
    "AutoContrast": (lambda m: 0.0, False),
    "Equalize": (lambda m: 0.0, False),
    "Invert": (lambda m: 0.0, False),
    "Rotate": (lambda m: m / 10 * 30.0, True),  # degrees
    "PosterizeIncreasing": (lambda m: 4 - int(m / 10 * 4), False),  # bits kept
    "SolarizeIncreasing": (lambda m: 256 - int(m / 10 * 256), False),  # threshold
    "SolarizeAdd": (lambda m: int(m / 10 * 110), False),  # added below 128
    "ColorIncreasing": (lambda m: m / 10 * 0.9, True),  # factor 1 +- level
    "ContrastIncreasing": (lambda m: m / 10 * 0.9, True),
    "BrightnessIncreasing": (lambda m: m / 10 * 0.9, True),
    "SharpnessIncreasing": (lambda m: m / 10 * 0.9, True),
    "ShearX": (lambda m: m / 10 * 0.3, True),  # shear factor (tan of the angle)
    "ShearY": (lambda m: m / 10 * 0.3, True),
    "TranslateXRel": (lambda m: m / 10 * 0.45, True),  # fraction of the width
    "TranslateYRel": (lambda m: m / 10 * 0.45, True),
}
#: rand-m9-mstd0.5-inc1 (ImageNet) uses all of them
RA_IMAGENET_OPS = tuple(_RA_LEVELS)
#: official Spikformer CIFAR code: RandAugment restricted to these five
RA_CIFAR_OPS = ("Equalize", "Rotate", "ShearX", "TranslateXRel", "TranslateYRel")


def _ra_apply(
    x: torch.Tensor, name: str, arg: float, fill: list[float], interp: InterpolationMode
) -> torch.Tensor:
    h, w = x.shape[-2:]
    if name == "AutoContrast":
        return tvf.autocontrast(x)
    if name == "Equalize":
        return tvf.equalize(x)
    if name == "Invert":
        return tvf.invert(x)
    if name == "Rotate":
        return tvf.rotate(x, arg, interpolation=interp, fill=fill)
    if name == "PosterizeIncreasing":
        return x if arg >= 8 else tvf.posterize(x, max(int(arg), 0))
    if name == "SolarizeIncreasing":
        return tvf.solarize(x, float(arg))
    if name == "SolarizeAdd":
        return torch.where(x < 128, (x.to(torch.int16) + int(arg)).clamp(max=255).to(x.dtype), x)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing"):
        factor = max(0.1, 1.0 + arg)
        fn = {
            "ColorIncreasing": tvf.adjust_saturation,
            "ContrastIncreasing": tvf.adjust_contrast,
            "BrightnessIncreasing": tvf.adjust_brightness,
        }[name]
        return fn(x, factor)
    if name == "SharpnessIncreasing":
        return tvf.adjust_sharpness(x, max(0.1, 1.0 + arg))
    if name in ("ShearX", "ShearY"):
        # about the top-left corner, as PIL's transform in timm: exactly its pixel mapping
        deg = math.degrees(math.atan(arg))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return tvf.affine(
            x,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=shear,
            interpolation=interp,
            fill=fill,
            center=[0.0, 0.0],
        )
    if name in ("TranslateXRel", "TranslateYRel"):
        t = [arg * w, 0.0] if name == "TranslateXRel" else [0.0, arg * h]
        return tvf.affine(
            x, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=interp, fill=fill
        )
    raise ValueError(f"RandAugment: unknown op {name!r}")


@dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment ``rand-m{magnitude}-n{num_ops}-mstd{std}-inc1`` on uint8 [C, H, W].

    Per image: ``num_ops`` operations drawn uniformly with replacement from ``ops``; each
    is applied with probability ``prob``, at a magnitude drawn from
    ``N(magnitude, magnitude_std)`` clipped to [0, 10]. Arguments at magnitude 10: rotate
    +-30 deg, shear factor +-0.3, translate +-45 % of the size, colour/contrast/
    brightness/sharpness factor 1 +- 0.9, posterize to 0 bits, solarize threshold 0.
    Geometric ops fill uncovered pixels with ``fill`` (0..255 per channel, timm's image
    mean) and sample bilinearly.

    The policy is hand-written because torchvision's ``v2.RandAugment`` is a different
    one (no per-op probability, no magnitude noise, another op set, magnitude 9 of 31
    bins = 9 degrees instead of timm's 27); every op is a ``torchvision.transforms.v2``
    functional on the uint8 tensor, with PIL's geometry: rotations about the centre,
    shears about the top-left corner (as timm's ``Image.transform``; with nearest sampling
    both are pixel-exact to PIL). Difference from timm: bilinear sampling (torchvision's
    tensor affine has no bicubic); translations move content right/down for a positive
    argument (timm's left/up; the sign is random, so the distribution is the same).
    """

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    ops: tuple[str, ...] = RA_IMAGENET_OPS
    prob: float = 0.5
    fill: tuple[float, ...] = (124.0, 116.0, 104.0)

    def __post_init__(self):
        unknown = [o for o in self.ops if o not in _RA_LEVELS]
        if unknown or not self.ops:
            raise ValueError(f"RandAugment: unknown ops {unknown}; choose from {RA_IMAGENET_OPS}")
        if self.num_ops < 1 or not 0.0 <= self.prob <= 1.0:
            raise ValueError("RandAugment: num_ops must be >= 1 and prob in [0, 1]")

    def sample(self, generator: torch.Generator | None = None) -> list[tuple[str, float]]:
        """The operations and arguments for one image (skipped ops left out)."""
        g = _gen(generator)
        plan = []
        for _ in range(self.num_ops):
            name = self.ops[_randint(0, len(self.ops) - 1, g)]
            if _uniform(0.0, 1.0, g) >= self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = m + self.magnitude_std * float(
                    torch.randn((), generator=g, dtype=torch.float64)
                )
            m = min(max(m, 0.0), 10.0)
            level, signed = _RA_LEVELS[name]
            arg = float(level(m))
            if signed and _uniform(0.0, 1.0, g) < 0.5:
                arg = -arg
            plan.append((name, arg))
        return plan

    def apply(self, x: torch.Tensor, plan: Sequence[tuple[str, float]]) -> torch.Tensor:
        """Apply a ``sample()`` plan to a uint8 image [C, H, W]."""
        if x.dtype != torch.uint8:
            raise TypeError(f"RandAugment works on uint8 images [C, H, W], got {x.dtype}")
        fill = list(self.fill)[: x.shape[-3]]
        for name, arg in plan:
            x = _ra_apply(x, name, arg, fill, InterpolationMode.BILINEAR)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(generator))


def _mean_fill(mean: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(min(255, round(255 * m))) for m in mean)


def cifar_train_transform(
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    *,
    crop_padding: int = 0,
    randaugment: bool = True,
    erasing: float = 0.25,
) -> Compose:
    """Training transform of the official Spikformer CIFAR recipe -> float32 [3, 32, 32].

    Horizontal flip (p 0.5); RandAugment ``rand-m9-n1-mstd0.4-inc1`` restricted to
    Equalize, Rotate, ShearX, TranslateX/Y (``RA_CIFAR_OPS``); normalise; random erasing
    (p ``erasing``, zeros). The official ``cifar10.yml`` crops nothing (RandomResizedCrop
    with scale = ratio = 1); ``crop_padding=4`` adds the common pad-4 random 32 crop first.
    """
    steps: list[Callable] = [ToImageTensor()]
    if crop_padding:
        steps.append(RandomCropPad(32, crop_padding))
    steps.append(RandomHorizontalFlip(0.5))
    if randaugment:
        steps.append(
            RandAugment(
                num_ops=1, magnitude=9, magnitude_std=0.4, ops=RA_CIFAR_OPS, fill=_mean_fill(mean)
            )
        )
    steps.append(Normalize(tuple(mean), tuple(std)))
    if erasing > 0:
        steps.append(RandomErasing(p=erasing))
    return Compose(tuple(steps))


def cifar_eval_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> Compose:
    """Evaluation transform for CIFAR: normalise only -> float32 [3, 32, 32]."""
    return Compose((ToImageTensor(), Normalize(tuple(mean), tuple(std))))


def imagenet_train_transform(
    size: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    randaugment: bool = True,
    erasing: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """ImageNet training transform (DeiT/MAE style, the paper's V2 recipe) -> [3, size, size].

    RandomResizedCrop ``size`` (area ``scale``, ratio 3/4..4/3, bicubic), horizontal flip,
    RandAugment ``rand-m9-mstd0.5-inc1`` (2 ops from the full increasing set), normalise,
    random erasing (p ``erasing``, zeros). The official V1 ``imagenet.yml`` used
    ``scale=(1.0, 1.0)``.
    """
    steps: list[Callable] = [ToImageTensor(), RandomResizedCrop(size, scale=scale)]
    steps.append(RandomHorizontalFlip(0.5))
    if randaugment:
        steps.append(RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5, fill=_mean_fill(mean)))
    steps.append(Normalize(tuple(mean), tuple(std)))
    if erasing > 0:
        steps.append(RandomErasing(p=erasing))
    return Compose(tuple(steps))


def imagenet_eval_transform(
    size: int = 224,
    *,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """ImageNet evaluation: resize the shorter side to ``floor(size / crop_pct)`` (256 for
    224), centre crop ``size``, normalise -> float32 [3, size, size]. (V1's yml: crop_pct 1.)"""
    return Compose(
        (
            ToImageTensor(),
            Resize(int(math.floor(size / crop_pct))),
            CenterCrop(size),
            Normalize(tuple(mean), tuple(std)),
        )
    )


# --------------------------------------------------------------------------- datasets

_PAPER = "paper"


class _CIFARMixin:
    """Clear errors and an optional checksum check on top of torchvision's CIFAR readers."""

    base_folder: str
    url: str
    train_list: list
    test_list: list
    meta: dict
    _mean: tuple[float, ...]
    _std: tuple[float, ...]
    _name: str

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable | str | None = _PAPER,
        target_transform: Callable | None = None,
        *,
        download: bool = False,
        verify: bool = True,
    ) -> None:
        train, tf = self._setup(root, split, transform, verify, download)
        self.split = split
        super().__init__(
            root, train=train, transform=tf, target_transform=target_transform, download=download
        )

    def _setup(
        self, root: str | os.PathLike, split: str, transform: Any, verify: bool, download: bool
    ) -> tuple[bool, Callable | None]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self._verify = verify
        self._checked = False
        folder = Path(root) / self.base_folder
        if not download:
            self._check_files(folder, raise_errors=True)
            self._checked = True
        if isinstance(transform, str):
            if transform != _PAPER:
                raise ValueError(
                    f"transform must be a callable, None or 'paper', got {transform!r}"
                )
            transform = (
                cifar_train_transform(self._mean, self._std)
                if split == "train"
                else cifar_eval_transform(self._mean, self._std)
            )
        return split == "train", transform

    def _check_files(self, folder: Path, *, raise_errors: bool) -> bool:
        from torchvision.datasets.utils import check_integrity

        entries = [*self.train_list, *self.test_list, [self.meta["filename"], self.meta["md5"]]]
        missing = [name for name, _ in entries if not (folder / name).is_file()]
        if missing:
            if not raise_errors:
                return False
            raise DatasetNotFoundError(
                f"{self._name} not found: expected {folder} with {', '.join(missing)}.\n"
                f"Download {self.url} and extract it (it creates {self.base_folder}/), or "
                f"pass download=True. Put it under the data root {folder.parent.resolve()} "
                "(the `root` argument); datasets/README.md shows every expected layout."
            )
        if self._verify:
            for name, md5 in entries:
                if not check_integrity(str(folder / name), md5):
                    if not raise_errors:
                        return False
                    raise ValueError(
                        f"{folder / name}: MD5 differs from the published {md5}; the file is "
                        f"corrupt or not the original. Re-extract {self.url} (or pass "
                        "verify=False to use it anyway)."
                    )
        return True

    # torchvision hooks ------------------------------------------------------------
    def _check_integrity(self) -> bool:
        if self._checked:
            return True
        return self._check_files(Path(self.root) / self.base_folder, raise_errors=False)

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as fh:
            data = pickle.load(fh, encoding="latin1")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10(_CIFARMixin, torchvision.datasets.CIFAR10):
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (the python version, as extracted).

    ``ds[i] -> (image, label)``; with the default ``transform="paper"`` the image is the
    float32 [3, 32, 32] output of ``cifar_train_transform`` (split ``"train"``) or
    ``cifar_eval_transform``; ``None`` gives the PIL image; any callable is applied to it.
    Encode to [T, 3, 32, 32] with ``RepeatEncoder`` / ``PoissonEncoder``. ``verify``
    checks every file's published MD5 (off for hand-made test data); ``download`` fetches
    the archive (network).
    """

    _mean, _std, _name = CIFAR10_MEAN, CIFAR10_STD, "CIFAR-10"


class CIFAR100(_CIFARMixin, torchvision.datasets.CIFAR100):
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python``; as ``CIFAR10`` otherwise."""

    _mean, _std, _name = CIFAR100_MEAN, CIFAR100_STD, "CIFAR-100"


class ImageNet(torchvision.datasets.ImageFolder):
    """ImageNet-1k in ImageFolder layout: ``<root>/ImageNet/{train,val}/<wnid>/*.JPEG``
    (or ``<root>/{train,val}``).

    ``val`` must be sorted into class folders like ``train`` (the official validation
    tarball is flat; see datasets/README.md). ``transform="paper"`` uses
    ``imagenet_train_transform`` / ``imagenet_eval_transform`` at ``image_size``.
    ``ds[i] -> (float32 [3, S, S], class index)``; classes are the sorted folder names.
    """

    folder_name = "ImageNet"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable | str | None = _PAPER,
        target_transform: Callable | None = None,
        *,
        image_size: int = 224,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root)
        folder = next(
            (d / split for d in (root / self.folder_name, root) if (d / split).is_dir()), None
        )
        if folder is None:
            raise DatasetNotFoundError(
                f"ImageNet not found: expected {root / self.folder_name / split}/<wnid>/*.JPEG "
                f"(ImageFolder layout).\nDownload ILSVRC2012 (train and validation images) from "
                "https://image-net.org/download.php (registration required), extract train into "
                "one folder per class and sort val into the same class folders. Put it under the "
                f"data root {root.resolve()} (the `root` argument); datasets/README.md shows "
                "every expected layout."
            )
        if isinstance(transform, str):
            if transform != _PAPER:
                raise ValueError(
                    f"transform must be a callable, None or 'paper', got {transform!r}"
                )
            transform = (
                imagenet_train_transform(image_size)
                if split == "train"
                else imagenet_eval_transform(image_size)
            )
        self.split = split
        super().__init__(str(folder), transform=transform, target_transform=target_transform)


# --------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class RepeatEncoder:
    """Direct encoding: ``x [...]`` -> ``[T, ...]``, the input repeated T times.

    One image [C, H, W] gives [T, C, H, W]; a batch [B, C, H, W] gives [T, B, C, H, W]
    (time first, as the models take it). The result is a broadcast view (no copy):
    ``.contiguous()`` it before writing into it.
    """

    T: int

    def __post_init__(self):
        if self.T < 1:
            raise ValueError(f"RepeatEncoder: T must be >= 1, got {self.T}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.T, *x.shape)


@dataclass
class PoissonEncoder:
    """Rate coding: ``x [...]`` with values in [0, 1] -> float spikes ``[T, ...]`` in {0, 1}.

    Each element fires at each step independently with probability equal to its value
    (``spike = U(0, 1) < x``), so the mean over T estimates x. Apply it to images in
    [0, 1] (before normalisation); values outside raise ``ValueError``.

    Uniforms come from ``generator`` (on x's device, or the CPU: then moved), or when
    None from ``worker_generator()`` (per process, distinct in every DataLoader worker).
    A generator handed in is used as is: give each DataLoader worker its own (e.g. via
    ``worker_init_fn``) or leave it None, or workers repeat each other's spikes.
    """

    T: int
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.T < 1:
            raise ValueError(f"PoissonEncoder: T must be >= 1, got {self.T}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"PoissonEncoder: expected a float tensor in [0, 1], got {x.dtype}")
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(
                f"PoissonEncoder: values must be probabilities in [0, 1], got "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; encode before normalising"
            )
        g = generator if generator is not None else self.generator
        if g is None:
            g = worker_generator()
        u = torch.rand((self.T, *x.shape), generator=g, device=g.device, dtype=x.dtype)
        return (u.to(x.device) < x.unsqueeze(0)).to(x.dtype)
