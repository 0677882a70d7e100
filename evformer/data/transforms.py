"""Frame augmentation for event-frame samples ``[T, C, H, W]``, policies, and batch Mixup/CutMix.

One random draw per sample: every op here picks its parameters once and applies them to
all ``T`` frames (and all channels), so an object moves the same way in every time step.
Ops accept any tensor ``[..., H, W]`` with at least three dimensions; the leading
dimensions all share the draw. Channel order is whatever the frames use (evformer's
binning gives 0 = OFF, 1 = ON); nothing here mixes channels.

Randomness
----------
Each random transform is called as ``transform(x, generator=None)``. Parameters are drawn
on the CPU from ``generator`` (a ``torch.Generator``); the global torch RNG's stream is
never consumed (torchvision ops run on a forked, seeded copy, see below).
With ``generator=None`` the transform uses ``worker_generator()``: one generator per
process, seeded from ``torch.initial_seed()``. A DataLoader sets that seed to
``base_seed + worker_id`` in each worker, with ``base_seed`` drawn from the loader's own
``generator``, so::

    loader = DataLoader(ds, num_workers=4, worker_init_fn=seed_worker,
                        generator=torch.Generator().manual_seed(0))

gives different augmentations in each worker and epoch and the same ones on every rerun.
``worker_rng()`` is the NumPy twin for event-level transforms (``evformer.events.augment``).
All of these live in ``evformer.data.seeding``; training passes each sample its own
generators instead (``sample_generators(seed, epoch, index)``, see there).
``seed_worker`` is optional for evformer's own transforms (the generators re-seed
themselves when the process or its seed changes); it also seeds NumPy's legacy global
RNG, which the DataLoader leaves identical in every forked worker, so third-party
transforms that use it (tonic's) stop repeating across workers.

Library ops
-----------
Flip, translate, rotate, shear and erasing are ``torchvision.transforms.v2`` transforms
(``RandomHorizontalFlip``, ``RandomCrop`` with padding, ``RandomRotation``,
``RandomAffine``, ``RandomErasing``), which treat leading dimensions as a batch: one draw
applies to all of them. Their draws come from ``generator`` through ``evformer.data._tv``
(one seed per call, torch's global RNG forked around the call and restored). Geometry is
torchvision's: positive rotation angles turn the image counter-clockwise; positive
translations move content right (x) and down (y); areas uncovered by a transform are
filled with 0 (no events). Hand-written: roll (wrap-around, no torchvision op), resize
``mode="sum"`` (event-count preserving), the policies' composition (it threads one
generator through evformer and torchvision ops alike) and Mixup/CutMix (timm's
batch-flip pairing, label smoothing and switch probability, which torchvision's
``MixUp``/``CutMix`` lack).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as tvf

from evformer.data import _tv
from evformer.data.seeding import seed_worker, worker_generator, worker_rng

__all__ = [
    # seeding
    "worker_generator",
    "worker_rng",
    "seed_worker",
    # deterministic ops
    "hflip",
    "roll",
    "translate",
    "rotate",
    "shear_x",
    "erase",
    "resize",
    # random transforms
    "FrameTransform",
    "Identity",
    "RandomHorizontalFlip",
    "RandomRoll",
    "RandomRotate",
    "RandomShearX",
    "RandomTranslate",
    "RandomErasing",
    "Resize",
    "Compose",
    "RandomChoice",
    # policies and batch mixing
    "POLICIES",
    "get_policy",
    "Mixup",
]

Interpolation = Literal["nearest", "bilinear"]
ResizeMode = Literal["sum", "area", "nearest", "nearest-exact", "bilinear"]

# ----------------------------------------------------------------------------- generators

# worker_generator, worker_rng and seed_worker are defined in evformer.data.seeding (with
# the per-sample generators) and re-exported here.


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return worker_generator()
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (parameters are drawn on the CPU), "
            f"got one on {generator.device}"
        )
    return generator


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


# ----------------------------------------------------------------------------- validation


def _check_frames(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor [T, C, H, W], got {type(x).__name__}")
    if x.ndim < 3:
        raise ValueError(
            f"{fn}: expected frames [T, C, H, W] (or [C, H, W]), got shape {tuple(x.shape)}"
        )


def _interp(mode: str, fn: str) -> InterpolationMode:
    if mode == "nearest":
        return InterpolationMode.NEAREST
    if mode == "bilinear":
        return InterpolationMode.BILINEAR
    raise ValueError(f"{fn}: interpolation must be 'nearest' or 'bilinear', got {mode!r}")


def _check_nonneg(value: float, name: str, fn: str) -> float:
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}")
    return value


def _check_nonneg_int(value: int, name: str, fn: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_prob(p: float, fn: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{fn}: p must be a probability in [0, 1], got {p}")
    return p


def _check_range(value: Sequence[float], name: str, fn: str, *, positive: bool = False):
    lo, hi = (float(v) for v in value)
    if not lo <= hi or (positive and lo <= 0) or lo < 0:
        raise ValueError(
            f"{fn}: {name} must be (low, high) with {'0 <' if positive else '0 <='} low <= high, "
            f"got {tuple(value)!r}"
        )
    return lo, hi


# ----------------------------------------------------------------------------- deterministic ops


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror ``x [..., H, W]`` left-right (along W)."""
    _check_frames(x, "hflip")
    return tvf.horizontal_flip(x)


def roll(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift ``x [..., H, W]`` by ``dy`` rows and ``dx`` columns, wrapping around (torch.roll)."""
    _check_frames(x, "roll")
    return torch.roll(x, shifts=(int(dy), int(dx)), dims=(-2, -1))


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift ``x [..., H, W]`` by whole pixels, filling the uncovered border with 0.

    Positive ``dx`` moves content right, positive ``dy`` down. A crop of the frame's size
    at ``(-dy, -dx)``: torchvision's ``crop`` zero-pads what lies outside (the
    ``RandomCrop(padding=...)`` mechanism); equals ``affine(translate=[dx, dy])`` with
    nearest sampling, 30x faster.
    """
    _check_frames(x, "translate")
    h, w = x.shape[-2:]
    return tvf.crop(x, -int(dy), -int(dx), h, w)


def rotate(
    x: torch.Tensor, angle: float, *, interpolation: Interpolation = "nearest"
) -> torch.Tensor:
    """Rotate ``x [..., H, W]`` by ``angle`` degrees counter-clockwise about the centre, 0 fill.

    Nearest sampling (default) keeps event counts integer; multiples of 90 degrees on a
    square frame are exact ``torch.rot90``.
    """
    _check_frames(x, "rotate")
    return tvf.rotate(x, float(angle), interpolation=_interp(interpolation, "rotate"), fill=0.0)


def shear_x(
    x: torch.Tensor, angle: float, *, interpolation: Interpolation = "nearest"
) -> torch.Tensor:
    """Shear ``x [..., H, W]`` along x by ``angle`` degrees about the centre, 0 fill.

    ``angle`` is torchvision's ``affine(shear=[angle, 0])`` angle in degrees; a
    magnitude given in radians (Spikformer's ±0.3) converts with ``math.degrees``.
    """
    _check_frames(x, "shear_x")
    return tvf.affine(
        x,
        angle=0.0,
        translate=[0, 0],
        scale=1.0,
        shear=[float(angle), 0.0],
        interpolation=_interp(interpolation, "shear_x"),
        fill=0.0,
    )


def erase(
    x: torch.Tensor, top: int, left: int, height: int, width: int, value: float = 0.0
) -> torch.Tensor:
    """Set rows ``[top, top+height)``, columns ``[left, left+width)`` of all frames to ``value``."""
    _check_frames(x, "erase")
    v = torch.tensor(value, dtype=x.dtype, device=x.device)
    return tvf.erase(x, int(top), int(left), int(height), int(width), v)


def resize(x: torch.Tensor, size: int | Sequence[int], *, mode: ResizeMode = "sum") -> torch.Tensor:
    """Resize ``x [..., H, W]`` to ``size=(h, w)`` (an int gives a square).

    Modes, for frames of event counts:

    - ``"sum"`` (default): sum pooling over ``H/h x W/w`` blocks (integer factors only).
      Event counts are preserved: the result is what binning the events with
      ``x // (W/w)``, ``y // (H/h)`` would give. Integer input gives int64 (no overflow).
    - ``"area"``: block mean (``F.interpolate(mode="area")``), any size; float output.
    - ``"nearest"``: torch's legacy nearest (what NDA's ``transforms.Resize`` used);
      ``"nearest-exact"``: nearest with correct pixel centres. Both keep the dtype.
    - ``"bilinear"``: smooth (antialias off, as in published recipes); float output.
    """
    fn = "resize"
    _check_frames(x, fn)
    h, w = (int(size), int(size)) if isinstance(size, (int, np.integer)) else map(int, size)
    if h < 1 or w < 1:
        raise ValueError(f"{fn}: size must be positive, got {size!r}")
    H, W = x.shape[-2:]
    lead = x.shape[:-2]
    if mode == "sum":
        if H % h or W % w:
            raise ValueError(
                f"{fn}: mode='sum' needs sizes that divide the input ({H}x{W} -> {h}x{w}); "
                f"use mode='area' (mean) or 'bilinear' for other sizes"
            )
        # two reductions over contiguous axes: ~5x faster than one sum over dims (-3, -1)
        rows = x.reshape(*lead, h, H // h, W).sum(dim=-2)
        return rows.reshape(*lead, h, w, W // w).sum(dim=-1)
    if mode not in ("area", "nearest", "nearest-exact", "bilinear"):
        raise ValueError(
            f"{fn}: mode must be 'sum', 'area', 'nearest', 'nearest-exact' or 'bilinear', "
            f"got {mode!r}"
        )
    flat = x.reshape(-1, 1, H, W)
    if not flat.is_floating_point():
        flat = flat.float()
    out = nnf.interpolate(flat, size=(h, w), mode=mode)
    if mode.startswith("nearest"):
        out = out.to(x.dtype)
    return out.reshape(*lead, h, w)


# ----------------------------------------------------------------------------- random transforms


class FrameTransform(ABC):
    """Base of the frame transforms: ``transform(x, generator=None) -> Tensor``.

    ``x`` is one sample ``[T, C, H, W]``; a random transform draws its parameters once
    from ``generator`` (``worker_generator()`` when None) and applies them to all frames.
    """

    @abstractmethod
    def __call__(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Identity(FrameTransform):
    """Return ``x`` unchanged (the "do nothing" option of a policy)."""

    def __call__(self, x, generator=None):
        _check_frames(x, "Identity")
        return x


@dataclass(frozen=True)
class RandomHorizontalFlip(FrameTransform):
    """With probability ``p``, mirror all frames left-right (torchvision's RandomHorizontalFlip)."""

    p: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "p", _check_prob(self.p, "RandomHorizontalFlip"))
        object.__setattr__(self, "_op", v2.RandomHorizontalFlip(self.p))

    def __call__(self, x, generator=None):
        _check_frames(x, "RandomHorizontalFlip")
        return _tv.run_seeded(self._op, x, _generator(generator))


@dataclass(frozen=True)
class RandomRoll(FrameTransform):
    """Roll with wrap-around by ``dy`` in ``[-max_dy, max_dy]``, ``dx`` in ``[-max_dx, max_dx]``.

    Shifts are whole pixels, uniform and independent. NDA's roll: ±5 px on both axes.
    """

    max_dy: int = 5
    max_dx: int = 5

    def __post_init__(self):
        for name in ("max_dy", "max_dx"):
            object.__setattr__(
                self, name, _check_nonneg_int(getattr(self, name), name, "RandomRoll")
            )

    def sample(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        g = _generator(generator)
        return _randint(-self.max_dy, self.max_dy, g), _randint(-self.max_dx, self.max_dx, g)

    def __call__(self, x, generator=None):
        dy, dx = self.sample(generator)
        return roll(x, dy, dx)


@dataclass(frozen=True)
class RandomTranslate(FrameTransform):
    """Shift by ``dx`` in ``[-max_dx, max_dx]``, ``dy`` in ``[-max_dy, max_dy]`` whole px; 0 fill.

    Shifts are uniform and independent: torchvision's ``RandomCrop`` of the frame's own
    size with padding ``(max_dx, max_dy)`` (zeros). Spikformer's TranslateX is
    ``RandomTranslate(max_dx=5, max_dy=0)``, TranslateY the reverse.
    """

    max_dx: int = 5
    max_dy: int = 0

    def __post_init__(self):
        for name in ("max_dx", "max_dy"):
            object.__setattr__(
                self, name, _check_nonneg_int(getattr(self, name), name, "RandomTranslate")
            )

    def _crop(self, height: int, width: int) -> v2.RandomCrop:
        return _padded_crop(height, width, self.max_dx, self.max_dy)

    def sample(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """``(dy, dx)`` that ``__call__`` applies for this generator state (any frame size)."""
        p = _tv.draw_params(self._crop(1, 1), _tv.probe(1, 1), _generator(generator))
        return self.max_dy - p["top"], self.max_dx - p["left"]

    def __call__(self, x, generator=None):
        _check_frames(x, "RandomTranslate")
        return _tv.run_seeded(self._crop(*x.shape[-2:]), x, _generator(generator))


@functools.lru_cache(maxsize=64)
def _padded_crop(height: int, width: int, pad_x: int, pad_y: int) -> v2.RandomCrop:
    return v2.RandomCrop((height, width), padding=[pad_x, pad_y], fill=0)


@dataclass(frozen=True)
class RandomRotate(FrameTransform):
    """Rotate by an angle uniform in ``[-degrees, degrees]`` (counter-clockwise positive)
    about the centre, 0 fill: torchvision's ``RandomRotation``."""

    degrees: float = 30.0
    interpolation: Interpolation = "nearest"

    def __post_init__(self):
        object.__setattr__(self, "degrees", _check_nonneg(self.degrees, "degrees", "RandomRotate"))
        mode = _interp(self.interpolation, "RandomRotate")
        object.__setattr__(
            self, "_op", v2.RandomRotation(self.degrees, interpolation=mode, fill=0.0)
        )

    def sample(self, generator: torch.Generator | None = None) -> float:
        """The angle ``__call__`` applies for this generator state."""
        return _tv.draw_params(self._op, _tv.probe(1, 1), _generator(generator))["angle"]

    def __call__(self, x, generator=None):
        _check_frames(x, "RandomRotate")
        return _tv.run_seeded(self._op, x, _generator(generator))


@dataclass(frozen=True)
class RandomShearX(FrameTransform):
    """Shear along x by an angle uniform in ``[-degrees, degrees]`` (degrees, torchvision's shear).

    torchvision's ``RandomAffine(degrees=0, shear=(-degrees, degrees))`` (about the
    centre, 0 fill). NDA: ``degrees=30``. Spikformer: ±0.3 rad, i.e.
    ``degrees=math.degrees(0.3)`` (17.19).
    """

    degrees: float = 30.0
    interpolation: Interpolation = "nearest"

    def __post_init__(self):
        object.__setattr__(self, "degrees", _check_nonneg(self.degrees, "degrees", "RandomShearX"))
        if self.degrees >= 90:
            raise ValueError(f"RandomShearX: degrees must be < 90, got {self.degrees}")
        mode = _interp(self.interpolation, "RandomShearX")
        shear = (-self.degrees, self.degrees)
        object.__setattr__(
            self, "_op", v2.RandomAffine(0.0, shear=shear, interpolation=mode, fill=0.0)
        )

    def sample(self, generator: torch.Generator | None = None) -> float:
        """The shear angle ``__call__`` applies for this generator state."""
        params = _tv.draw_params(self._op, _tv.probe(1, 1), _generator(generator))
        return params["shear"][0]

    def __call__(self, x, generator=None):
        _check_frames(x, "RandomShearX")
        return _tv.run_seeded(self._op, x, _generator(generator))


@dataclass(frozen=True)
class RandomErasing(FrameTransform):
    """With probability ``p``, set one random box of every frame to ``value`` (cutout).

    torchvision's ``RandomErasing``: area ``U(scale) * H * W``, aspect ratio ``h / w``
    log-uniform in ``ratio``, ``h = round(sqrt(area * ratio))``, ``w = round(sqrt(area /
    ratio))``, position uniform; up to 10 tries for a box smaller than the frame, else
    nothing is erased. Spikformer's CIFAR10-DVS cutout is
    ``RandomErasing(p=1, scale=(0.001, 0.11), ratio=(1, 1))``. Same box for all frames.
    """

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float = 0.0

    def __post_init__(self):
        fn = "RandomErasing"
        object.__setattr__(self, "p", _check_prob(self.p, fn))
        lo, hi = _check_range(self.scale, "scale", fn)
        if hi > 1:
            raise ValueError(f"{fn}: scale is a fraction of the frame area, got {self.scale!r}")
        object.__setattr__(self, "scale", (lo, hi))
        object.__setattr__(self, "ratio", _check_range(self.ratio, "ratio", fn, positive=True))
        object.__setattr__(
            self,
            "_op",
            v2.RandomErasing(self.p, scale=self.scale, ratio=self.ratio, value=self.value),
        )

    def sample(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int] | None:
        """``(top, left, h, w)`` that ``__call__`` erases in a ``height x width`` frame for
        this generator state, or None (no erase)."""
        p = _tv.draw_params(self._op, _tv.probe(height, width), _generator(generator))
        return None if p is None or p["v"] is None else (p["i"], p["j"], p["h"], p["w"])

    def __call__(self, x, generator=None):
        _check_frames(x, "RandomErasing")
        return _tv.run_seeded(self._op, x, _generator(generator))


@dataclass(frozen=True)
class Resize(FrameTransform):
    """Deterministic ``resize`` to ``size`` (see there for the modes; default sum pooling)."""

    size: int | tuple[int, int] = 64
    mode: ResizeMode = "sum"

    def __post_init__(self):
        if self.mode not in ("sum", "area", "nearest", "nearest-exact", "bilinear"):
            raise ValueError(f"Resize: unknown mode {self.mode!r}")

    def __call__(self, x, generator=None):
        return resize(x, self.size, mode=self.mode)


def _check_callables(transforms, fn: str) -> tuple:
    transforms = tuple(transforms)
    if not transforms:
        raise ValueError(f"{fn}: needs at least one transform")
    for i, tr in enumerate(transforms):
        if not callable(tr):
            raise TypeError(f"{fn}: transforms[{i}] is not callable: {tr!r}")
    return transforms


@dataclass(frozen=True)
class Compose(FrameTransform):
    """Apply ``transforms`` in order, all drawing from the one generator."""

    transforms: tuple[Callable, ...]

    def __post_init__(self):
        object.__setattr__(self, "transforms", _check_callables(self.transforms, "Compose"))

    def __call__(self, x, generator=None):
        g = _generator(generator)
        for tr in self.transforms:
            x = tr(x, g)
        return x


@dataclass(frozen=True)
class RandomChoice(FrameTransform):
    """Apply one of ``transforms``, picked with probabilities ``weights`` (default uniform)."""

    transforms: tuple[Callable, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        trs = _check_callables(self.transforms, "RandomChoice")
        object.__setattr__(self, "transforms", trs)
        if self.weights is not None:
            w = tuple(float(v) for v in self.weights)
            if len(w) != len(trs) or min(w) < 0 or sum(w) <= 0:
                raise ValueError(
                    f"RandomChoice: weights must be {len(trs)} non-negative numbers with a "
                    f"positive sum, got {self.weights!r}"
                )
            object.__setattr__(self, "weights", w)

    def choose(self, generator: torch.Generator | None = None) -> int:
        """Index of the transform to apply (one draw from ``generator``)."""
        g = _generator(generator)
        if self.weights is None:
            return int(torch.randint(len(self.transforms), (), generator=g))
        w = torch.tensor(self.weights, dtype=torch.float64)
        return int(torch.multinomial(w, 1, generator=g))

    def __call__(self, x, generator=None):
        g = _generator(generator)
        return self.transforms[self.choose(g)](x, g)


# ----------------------------------------------------------------------------- policies

POLICIES = ("nda", "spikformer_cifar10dvs")


def get_policy(name: str, *, interpolation: Interpolation = "nearest") -> FrameTransform:
    """A published frame-augmentation policy by name (applied per sample ``[T, C, H, W]``).

    - ``"nda"`` (Li et al., ECCV 2022, public code): one op per sample, uniformly from
      roll (±5 px on each axis, wrap-around), rotate (±30 deg), shear x (±30 deg).
    - ``"spikformer_cifar10dvs"`` (official Spikformer CIFAR10-DVS recipe): horizontal
      flip with p = 0.5, then one op uniformly from identity, shear x (±0.3 rad),
      translate x (±5 px), translate y (±5 px), rotate (±30 deg), random erasing
      (area 0.001-0.11 of the frame, square). Mixup (alpha 0.5) is batch-level: ``Mixup``.

    Magnitudes are uniform on the stated ranges (the official code picks one of 31 evenly
    spaced values and a random sign; translations are whole pixels in both).
    Interpolation is nearest, as in both published codes.
    """
    _interp(interpolation, "get_policy")
    if name == "nda":
        return RandomChoice(
            (
                RandomRoll(max_dy=5, max_dx=5),
                RandomRotate(degrees=30.0, interpolation=interpolation),
                RandomShearX(degrees=30.0, interpolation=interpolation),
            )
        )
    if name == "spikformer_cifar10dvs":
        return Compose(
            (
                RandomHorizontalFlip(p=0.5),
                RandomChoice(
                    (
                        Identity(),
                        RandomShearX(degrees=math.degrees(0.3), interpolation=interpolation),
                        RandomTranslate(max_dx=5, max_dy=0),
                        RandomTranslate(max_dx=0, max_dy=5),
                        RandomRotate(degrees=30.0, interpolation=interpolation),
                        RandomErasing(p=1.0, scale=(0.001, 0.11), ratio=(1.0, 1.0)),
                    )
                ),
            )
        )
    raise ValueError(f"get_policy: unknown policy {name!r}; choose one of {POLICIES}")


# ----------------------------------------------------------------------------- Mixup / CutMix


def _beta(alpha: float, g: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; derive a NumPy one from ours instead, so the
    # draw is still a pure function of the torch generator's state.
    seed = int(torch.randint(0, 2**63 - 1, (), generator=g))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


class Mixup:
    """Batch-level Mixup / CutMix with soft targets, timm's ``Mixup(mode="batch")`` semantics.

    Called as ``x, y = mixup(x, target, generator=None)`` with ``x [B, T, C, H, W]`` (any
    ``[B, ..., H, W]``) and integer labels ``target [B]``; returns the mixed batch (float:
    x's dtype when floating, else float32) and soft targets ``[B, num_classes]`` (rows sum
    to 1). Sample ``i`` is mixed with sample ``B-1-i`` (the batch flipped), with one
    ``lam`` for the whole batch:

    - with probability ``1 - prob`` (or when ``enabled`` is False) nothing is mixed
      (``lam = 1``), targets are still smoothed one-hots;
    - otherwise CutMix with probability ``switch_prob`` when both alphas are > 0 (only
      the enabled one otherwise), ``lam ~ Beta(alpha, alpha)``;
    - Mixup: ``x' = lam * x + (1 - lam) * x.flip(0)``;
    - CutMix: a box of side ratio ``sqrt(1 - lam)`` centred uniformly and clipped to the
      frame is pasted from the flipped batch into every frame and channel (the same box
      for all T); with ``correct_lam`` lam becomes ``1 - box area / (H * W)``.

    Targets: ``lam * onehot(y) + (1 - lam) * onehot(y.flip(0))`` with label smoothing
    ``off = label_smoothing / num_classes``, ``on = 1 - label_smoothing + off``.
    Set ``mixup.enabled = False`` to switch mixing off (Spikformer: after epoch 75).
    Unlike timm an odd batch size is allowed (the middle sample mixes with itself) and the
    input is not modified in place.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        correct_lam: bool = True,
    ) -> None:
        fn = "Mixup"
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"{fn}: num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.mixup_alpha = _check_nonneg(mixup_alpha, "mixup_alpha", fn)
        self.cutmix_alpha = _check_nonneg(cutmix_alpha, "cutmix_alpha", fn)
        self.prob = _check_prob(prob, fn)
        self.switch_prob = _check_prob(switch_prob, fn)
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.correct_lam = bool(correct_lam)
        self.enabled = True

    def __repr__(self) -> str:
        return (
            f"Mixup(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, "
            f"label_smoothing={self.label_smoothing}, correct_lam={self.correct_lam}, "
            f"enabled={self.enabled})"
        )

    def sample(self, generator: torch.Generator | None = None) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for the next batch; ``lam = 1.0`` means no mixing."""
        g = _generator(generator)
        if not self.enabled or (self.mixup_alpha == 0 and self.cutmix_alpha == 0):
            return 1.0, False
        if not _uniform(0.0, 1.0, g) < self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = _uniform(0.0, 1.0, g) < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return _beta(alpha, g), use_cutmix

    def cutmix_box(
        self, height: int, width: int, lam: float, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: box of side ratio ``sqrt(1 - lam)``, centre uniform, clipped."""
        g = _generator(generator)
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = _randint(0, height - 1, g), _randint(0, width - 1, g)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return y0, y1, x0, x1

    def soft_targets(self, target: torch.Tensor, lam: float) -> torch.Tensor:
        """``[B, num_classes]`` float32: smoothed one-hots of target and its flip, mixed by lam."""
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        onehot = torch.full(
            (target.shape[0], self.num_classes), off, dtype=torch.float32, device=target.device
        )
        onehot.scatter_(1, target.long().unsqueeze(1), on)
        return lam * onehot + (1.0 - lam) * onehot.flip(0)

    def __call__(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fn = "Mixup"
        if not isinstance(x, torch.Tensor) or x.ndim < 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{fn}: x must be a batch [B, T, C, H, W], got {shape}")
        if not isinstance(target, torch.Tensor) or target.ndim != 1 or target.is_floating_point():
            raise ValueError(
                f"{fn}: target must be integer class indices [B], got "
                f"{getattr(target, 'dtype', type(target).__name__)} "
                f"{tuple(getattr(target, 'shape', ()))}"
            )
        if target.shape[0] != x.shape[0]:
            raise ValueError(f"{fn}: x has batch {x.shape[0]} but target has {target.shape[0]}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(
                f"{fn}: target labels must be in [0, {self.num_classes}), got "
                f"[{int(target.min())}, {int(target.max())}]"
            )
        g = _generator(generator)
        x = x if x.is_floating_point() else x.float()
        lam, use_cutmix = self.sample(g)
        if lam < 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = self.cutmix_box(x.shape[-2], x.shape[-1], lam, g)
                x = x.clone()
                x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
                if self.correct_lam:
                    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(x.shape[-2] * x.shape[-1])
            else:
                x = lam * x + (1.0 - lam) * x.flip(0)
        return x, self.soft_targets(target, lam)
