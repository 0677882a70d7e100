"""Event-level augmentation and filtering on ``EVENT_DTYPE`` streams (NumPy + Numba, no torch).

Every function is pure: it returns a new array of the input's dtype and never
modifies its argument. Streams are structured arrays sorted by ``t`` (µs) with
``x`` (column), ``y`` (row) and ``p`` (0 = OFF, 1 = ON); see ``evformer.events.core``.
Functions that need the sensor take ``sensor_size=(height, width)`` (default
128 x 128) -- note that tonic's ``sensor_size`` is ``(W, H, P)``, a different order.

Randomness comes only from the ``rng: np.random.Generator`` argument, so a result is a
function of (input, parameters, generator state). As a dataset's ``event_transform`` in
training, ``rng`` is the sample's own generator of (seed, epoch, index)
(``evformer.data.seeding.sample_generators``, handed out by
``evformer.engine.SeededTransformDataset``): resumable and the same with any number of
DataLoader workers. Elsewhere, ``evformer.data.seeding.worker_rng()`` gives one per process.

Two layers, tonic style:

- functions (``drop_event``, ``denoise``, ...) do the work;
- small frozen dataclasses (``DropEvent``, ``Denoise``, ...) hold validated parameters
  and are called as ``transform(events, rng)``; ``Compose`` and ``RandomChoice``
  combine them.

Deliberate differences from tonic 1.7 (each documented at the function):

- ``drop_by_area`` with a ratio range samples from that range (tonic evaluates
  ``uniform(lo and hi)``, i.e. ``uniform(hi, 1)``, a range the user never asked for);
- ``drop_by_time`` places the window inside ``[t_first, t_last]`` (tonic uses ``[0, t_max]``,
  so a stream that does not start at 0 often loses nothing);
- ``denoise`` and ``refractory_period`` start with "no event seen yet" (tonic's initial
  memory keeps every event of the first ``filter_time`` µs and drops a first event at t = 0);
- ``refractory_period`` measures the dead time from the last *kept* event, and keeps an
  event exactly ``period`` µs after it (tonic keeps only gaps larger than the period);
- ``RefractoryPeriod((low, high))`` draws an integer period from [low, high], ``high``
  included, from the generator (tonic's ``int(low + (high - low) * random())`` never
  draws ``high``);
- ``time_reversal`` maps ``t`` to ``t_first + t_last - t``, keeping the stream's time
  range (tonic's ``max(t) - t`` moves it to ``[0, t_last - t_first]``);
- ``downsample`` takes integer divisors and keeps µs: ``x // f``, ``t`` quantised to
  multiples of ``time_factor`` (tonic multiplies by float factors and truncates, and
  ``time_factor=0.001`` silently changes the unit to ms);
- random crops and boxes can touch the last row/column (tonic's draws never reach it);
- nothing modifies the input in place (tonic's functional ``spatial_jitter`` does).

Numba kernels use no ``parallel=True``: augmentation runs per sample inside DataLoader
workers, which are already the unit of parallelism, and Numba's thread pools are not
safe to use across the ``fork`` that starts those workers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numba import njit

from evformer.events.core import columns, is_sorted

__all__ = [
    # functions
    "drop_event",
    "drop_by_time",
    "drop_by_area",
    "spatial_jitter",
    "time_jitter",
    "flip_lr",
    "flip_ud",
    "flip_polarity",
    "time_reversal",
    "uniform_noise",
    "denoise",
    "refractory_period",
    "crop",
    "center_crop",
    "random_crop",
    "downsample",
    # transforms
    "EventTransform",
    "DropEvent",
    "DropEventByTime",
    "DropEventByArea",
    "SpatialJitter",
    "TimeJitter",
    "RandomFlipLR",
    "RandomFlipUD",
    "RandomFlipPolarity",
    "RandomTimeReversal",
    "UniformNoise",
    "Denoise",
    "RefractoryPeriod",
    "CenterCrop",
    "RandomCrop",
    "Downsample",
    "Compose",
    "RandomChoice",
]

DEFAULT_SENSOR_SIZE = (128, 128)  # (height, width) of the DVS128 sensor
_NEVER = np.iinfo(np.int64).min  # "no event yet" marker in the per-pixel time memories

Ratio = float | tuple[float, float]


# ----------------------------------------------------------------------------- validation


def _structured(events: np.ndarray, fn: str):
    """Field views of ``events``; raise a clear error for anything but a 1-D structured array."""
    if not isinstance(events, np.ndarray):
        raise TypeError(
            f"{fn}: events must be a structured NumPy array of evformer.events.EVENT_DTYPE, "
            f"got {type(events).__name__}"
        )
    return columns(events, name=f"{fn}: events")


def _check_rng(rng: object, fn: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{fn}: rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}; the global NumPy RNG is never used"
        )
    return rng


def _check_sensor(sensor_size: Sequence[int], fn: str) -> tuple[int, int]:
    try:
        size = tuple(int(s) for s in sensor_size)
    except TypeError:
        raise TypeError(f"{fn}: sensor_size must be (height, width), got {sensor_size!r}") from None
    if len(size) != 2 or any(s != v for s, v in zip(size, sensor_size)) or min(size) < 1:
        raise ValueError(
            f"{fn}: sensor_size must be two positive integers (height, width), got "
            f"{tuple(sensor_size)!r} (tonic's (W, H, P) order is not accepted here)"
        )
    return size  # type: ignore[return-value]


def _check_in_sensor(x: np.ndarray, y: np.ndarray, height: int, width: int, fn: str) -> None:
    """Coordinates index per-pixel arrays in the kernels: out-of-range ones must never get there."""
    if x.shape[0] == 0:
        return
    xmin, xmax, ymin, ymax = int(x.min()), int(x.max()), int(y.min()), int(y.max())
    if xmin < 0 or xmax >= width or ymin < 0 or ymax >= height:
        raise ValueError(
            f"{fn}: events fall outside sensor_size=(height={height}, width={width}): "
            f"x in [{xmin}, {xmax}], y in [{ymin}, {ymax}]; pass the sensor size the stream "
            f"was recorded (or cropped/downsampled) with"
        )


def _check_sorted(t: np.ndarray, fn: str) -> None:
    if not is_sorted(t):
        raise ValueError(
            f"{fn}: events are not sorted by t; sort them first with "
            f"evformer.events.sort_events (this filter depends on time order)"
        )


def _check_polarity(p: np.ndarray, fn: str) -> None:
    if p.shape[0] and (int(p.min()) < 0 or int(p.max()) > 1):
        raise ValueError(
            f"{fn}: polarity must be 0 (OFF) or 1 (ON), found values in "
            f"[{int(p.min())}, {int(p.max())}]; map -1/1 polarities to 0/1 first"
        )


def _check_prob(p: float, name: str, fn: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{fn}: {name} must be a probability in [0, 1], got {p}")
    return p


def _check_ratio(value: Ratio, name: str, fn: str) -> Ratio:
    """A ratio in [0, 1), or a range (lo, hi) with 0 <= lo <= hi < 1."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{fn}: {name} range must be (low, high), got {value!r}")
        lo, hi = float(value[0]), float(value[1])
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"{fn}: {name} range must satisfy 0 <= low <= high < 1, got {value!r}")
        return (lo, hi)
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1), got {value!r}")
    return v


def _draw_ratio(value: Ratio, rng: np.random.Generator) -> float:
    """A scalar stays as is; a range (lo, hi) is sampled uniformly from [lo, hi)."""
    if isinstance(value, tuple):
        lo, hi = value
        return float(rng.uniform(lo, hi)) if hi > lo else lo
    return float(value)


def _check_int(value, name: str, fn: str, *, minimum: int = 0, unit: str = "") -> int:
    """An integer-valued number >= ``minimum`` (floats like 1e4 are accepted)."""
    try:
        ok = int(value) == value and value >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}{unit}, got {value!r}")
    return int(value)


def _check_int_or_range(value, name: str, fn: str, *, unit: str = "") -> int | tuple[int, int]:
    """An integer >= 0, or a range ``(low, high)`` of integers with 0 <= low <= high."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{fn}: {name} range must be (low, high), got {value!r}")
        lo = _check_int(value[0], f"{name}[0]", fn, unit=unit)
        return lo, _check_int(value[1], f"{name}[1]", fn, minimum=lo, unit=unit)
    return _check_int(value, name, fn, unit=unit)


def _draw_int(value: int | tuple[int, int], rng: np.random.Generator) -> int:
    """A scalar stays as is; a range (lo, hi) is sampled uniformly from [lo, hi], both included."""
    if isinstance(value, tuple):
        return int(rng.integers(value[0], value[1], endpoint=True))
    return value


def _check_size(size: int | Sequence[int], name: str, fn: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(size)
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"{fn}: {name} must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


# ----------------------------------------------------------------------------- kernels
#
# Each kernel has a plain-Python reference right after it; tests compare the two.


@njit(cache=True)
def _box_mask_kernel(x, y, left, top, right, bottom, inside):  # pragma: no cover - numba
    """Per event: is (x, y) inside the half-open box [left, right) x [top, bottom)?

    With ``inside=False`` the mask is negated, in the same single pass.
    """
    n = x.shape[0]
    mask = np.empty(n, dtype=np.bool_)
    for i in range(n):
        xi = x[i]
        yi = y[i]
        hit = xi >= left and xi < right and yi >= top and yi < bottom
        mask[i] = hit == inside
    return mask


def _box_mask_reference(x, y, left, top, right, bottom, inside):
    hit = (x >= left) & (x < right) & (y >= top) & (y < bottom)
    return hit if inside else ~hit


@njit(cache=True)
def _denoise_kernel(t, x, y, height, width, filter_time, diagonal):  # pragma: no cover - numba
    """Keep an event when a neighbouring pixel fired less than ``filter_time`` µs before it.

    ``last[y, x]`` holds the time of the latest event (kept or not) at each pixel; the
    event's own pixel is not a neighbour. Neighbourhood: 4-connected, or 8-connected
    with ``diagonal``.
    """
    n = t.shape[0]
    last = np.full((height, width), _NEVER, dtype=np.int64)
    keep = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        ti = t[i]
        xi = np.int64(x[i])
        yi = np.int64(y[i])
        ok = False
        for dy in range(-1, 2):
            yy = yi + dy
            if yy < 0 or yy >= height:
                continue
            for dx in range(-1, 2):
                if dx == 0 and dy == 0:
                    continue
                if dx != 0 and dy != 0 and not diagonal:
                    continue
                xx = xi + dx
                if xx < 0 or xx >= width:
                    continue
                tn = last[yy, xx]
                if tn != _NEVER and ti - tn < filter_time:
                    ok = True
        keep[i] = ok
        last[yi, xi] = ti
    return keep


def _denoise_reference(t, x, y, height, width, filter_time, diagonal):
    last: dict[tuple[int, int], int] = {}
    keep = np.zeros(len(t), dtype=bool)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if not diagonal:
        offsets = [(dy, dx) for dy, dx in offsets if dy == 0 or dx == 0]
    for i in range(len(t)):
        ti, xi, yi = int(t[i]), int(x[i]), int(y[i])
        for dy, dx in offsets:
            tn = last.get((yi + dy, xi + dx))
            if tn is not None and ti - tn < filter_time:
                keep[i] = True
        last[(yi, xi)] = ti
    return keep


@njit(cache=True)
def _refractory_kernel(t, x, y, height, width, period):  # pragma: no cover - numba
    """Keep an event when its pixel's last *kept* event is at least ``period`` µs older."""
    n = t.shape[0]
    last = np.full((height, width), _NEVER, dtype=np.int64)
    keep = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        ti = t[i]
        xi = x[i]
        yi = y[i]
        tl = last[yi, xi]
        if tl == _NEVER or ti - tl >= period:
            keep[i] = True
            last[yi, xi] = ti
    return keep


def _refractory_reference(t, x, y, height, width, period):
    last: dict[tuple[int, int], int] = {}
    keep = np.zeros(len(t), dtype=bool)
    for i in range(len(t)):
        key = (int(y[i]), int(x[i]))
        if key not in last or int(t[i]) - last[key] >= period:
            keep[i] = True
            last[key] = int(t[i])
    return keep


def _box_mask(x, y, left, top, right, bottom, inside: bool) -> np.ndarray:
    # Numba wants contiguous typed arrays; field views of a structured array are strided.
    return _box_mask_kernel(
        np.ascontiguousarray(x),
        np.ascontiguousarray(y),
        int(left),
        int(top),
        int(right),
        int(bottom),
        bool(inside),
    )


def _records(events: np.ndarray) -> np.ndarray:
    """``events`` viewed as opaque fixed-size records (no copy).

    NumPy copies, masks and gathers structured arrays field by field; on the record view
    the same operations move whole 13-byte records, 5-10x faster on 1e6 events.
    """
    return events.view(np.dtype((np.void, events.dtype.itemsize)))


def _select(events: np.ndarray, index) -> np.ndarray:
    """``events[index]`` (a boolean mask, integer indices or a slice), always a new array."""
    out = _records(events)[index]
    if isinstance(index, slice):
        out = out.copy()
    return out.view(events.dtype)


def _copy(events: np.ndarray) -> np.ndarray:
    return _records(events).copy().view(events.dtype)


def _merge_sorted(events: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Merge two t-sorted arrays of one dtype; at equal t, ``events`` come before ``extra``.

    O(N + n log n) with ``searchsorted`` instead of re-sorting all N + n events; equals
    ``concatenate((events, extra))[argsort(t, kind="stable")]``.
    """
    n, m = events.shape[0], extra.shape[0]
    # extra[j] lands after every event with t <= its t, and after the j extras before it
    pos = np.searchsorted(events["t"], extra["t"], side="right") + np.arange(m)
    out = np.empty(n + m, dtype=events.dtype)
    is_extra = np.zeros(n + m, dtype=bool)
    is_extra[pos] = True
    rec = _records(out)
    rec[is_extra] = _records(extra)
    rec[~is_extra] = _records(events)
    return out


# ----------------------------------------------------------------------------- functions


def drop_event(events: np.ndarray, ratio: Ratio, rng: np.random.Generator) -> np.ndarray:
    """Drop ``round(ratio * N)`` events chosen uniformly without replacement.

    ``ratio`` is a fraction in [0, 1) or a range ``(lo, hi)`` sampled uniformly per call.
    The count is exact (rounded half up, as tonic does), not a Bernoulli draw per event.
    Survivors keep their order.
    """
    fn = "drop_event"
    _structured(events, fn)
    ratio = _check_ratio(ratio, "ratio", fn)
    rng = _check_rng(rng, fn)
    r = _draw_ratio(ratio, rng)
    n = events.shape[0]
    k = int(math.floor(r * n + 0.5))
    keep = np.ones(n, dtype=bool)
    if k:
        keep[rng.choice(n, size=k, replace=False)] = False
    return _select(events, keep)


def drop_by_time(events: np.ndarray, ratio: Ratio, rng: np.random.Generator) -> np.ndarray:
    """Drop every event inside one random time window of ``ratio`` x the stream's span.

    The span is ``t_last - t_first`` µs; the window ``[start, start + ratio * span)`` is
    placed uniformly inside ``[t_first, t_last]``. ``ratio`` may be a range ``(lo, hi)``.
    (tonic measures from t = 0 instead of the first event: a stream with a late start
    can lose nothing at all.) Empty input is returned as an empty copy.
    """
    fn = "drop_by_time"
    cols = _structured(events, fn)
    ratio = _check_ratio(ratio, "ratio", fn)
    rng = _check_rng(rng, fn)
    r = _draw_ratio(ratio, rng)
    if events.shape[0] == 0:
        return _copy(events)
    _check_sorted(cols.t, fn)
    t0, t1 = float(cols.t[0]), float(cols.t[-1])
    width = r * (t1 - t0)
    start = float(rng.uniform(t0, t1 - width)) if t1 - width > t0 else t0
    t = cols.t
    return _select(events, ~((t >= start) & (t < start + width)))


def drop_by_area(
    events: np.ndarray,
    area_ratio: Ratio,
    rng: np.random.Generator,
    *,
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE,
) -> np.ndarray:
    """Drop every event inside one random box whose sides are ``area_ratio`` x the sensor's.

    Box: ``int(area_ratio * width)`` x ``int(area_ratio * height)`` pixels (tonic's
    convention: the ratio applies to each side, so the box covers about ``area_ratio**2``
    of the sensor), its top-left corner uniform over all positions that keep it on the
    sensor (last row/column included). A range ``(lo, hi)`` draws the ratio uniformly
    from [lo, hi) -- tonic 1.7 evaluates ``uniform(lo and hi)``, which samples [hi, 1).
    """
    fn = "drop_by_area"
    cols = _structured(events, fn)
    area_ratio = _check_ratio(area_ratio, "area_ratio", fn)
    height, width = _check_sensor(sensor_size, fn)
    rng = _check_rng(rng, fn)
    r = _draw_ratio(area_ratio, rng)
    box_w, box_h = int(r * width), int(r * height)
    left = int(rng.integers(0, width - box_w, endpoint=True))
    top = int(rng.integers(0, height - box_h, endpoint=True))
    if events.shape[0] == 0:
        return _copy(events)
    mask = _box_mask(cols.x, cols.y, left, top, left + box_w, top + box_h, inside=False)
    return _select(events, mask)


def _check_jitter(var_x, var_y, cov_xy, out_of_bounds, fn: str) -> tuple[float, float, float]:
    var_x, var_y, cov_xy = float(var_x), float(var_y), float(cov_xy)
    if not (var_x >= 0 and var_y >= 0 and cov_xy * cov_xy <= var_x * var_y):
        raise ValueError(
            f"{fn}: [[var_x, cov_xy], [cov_xy, var_y]] = [[{var_x}, {cov_xy}], [{cov_xy}, "
            f"{var_y}]] is not a covariance matrix (need var >= 0 and cov_xy^2 <= var_x*var_y)"
        )
    if out_of_bounds not in ("drop", "clip"):
        raise ValueError(f"{fn}: out_of_bounds must be 'drop' or 'clip', got {out_of_bounds!r}")
    return var_x, var_y, cov_xy


def spatial_jitter(
    events: np.ndarray,
    rng: np.random.Generator,
    *,
    var_x: float = 1.0,
    var_y: float = 1.0,
    cov_xy: float = 0.0,
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE,
    out_of_bounds: Literal["drop", "clip"] = "drop",
) -> np.ndarray:
    """Move each event by a 2-D Gaussian offset (px), rounded to the nearest pixel.

    Offsets have covariance ``[[var_x, cov_xy], [cov_xy, var_y]]`` (px^2; tonic's
    ``sigma_xy`` is this covariance). Events pushed off the sensor are dropped
    (``out_of_bounds="drop"``, the default: clipping would pile them up on the border
    rows, a pattern real sensors never produce) or clamped to the edge (``"clip"``).
    Times and order are unchanged, so the output stays sorted.
    """
    fn = "spatial_jitter"
    cols = _structured(events, fn)
    rng = _check_rng(rng, fn)
    height, width = _check_sensor(sensor_size, fn)
    var_x, var_y, cov_xy = _check_jitter(var_x, var_y, cov_xy, out_of_bounds, fn)
    n = events.shape[0]
    # Cholesky factor of the 2x2 covariance, written out (no LinAlgError at var_x = 0)
    a = math.sqrt(var_x)
    b = cov_xy / a if a > 0 else 0.0
    c = math.sqrt(max(var_y - b * b, 0.0))
    z = rng.standard_normal((2, n))
    x = cols.x + np.rint(a * z[0]).astype(np.int64)
    y = cols.y + np.rint(b * z[0] + c * z[1]).astype(np.int64)
    out = _copy(events)
    if out_of_bounds == "clip":
        out["x"] = np.clip(x, 0, width - 1)
        out["y"] = np.clip(y, 0, height - 1)
        return out
    out["x"] = np.clip(x, 0, width - 1)  # values of dropped events do not matter
    out["y"] = np.clip(y, 0, height - 1)
    return _select(out, (x >= 0) & (x < width) & (y >= 0) & (y < height))


def time_jitter(
    events: np.ndarray,
    rng: np.random.Generator,
    *,
    std: float,
    negative: Literal["drop", "clip", "keep"] = "drop",
) -> np.ndarray:
    """Add Gaussian noise of ``std`` µs to each timestamp (rounded to whole µs), then re-sort.

    The result is stably sorted by the new times: events that end up with equal times keep
    their original relative order (tonic leaves the stream unsorted unless asked and
    sorts unstably). Events pushed below t = 0 are dropped (``"drop"``, tonic's default),
    set to 0 (``"clip"``) or kept negative (``"keep"``).
    """
    fn = "time_jitter"
    cols = _structured(events, fn)
    rng = _check_rng(rng, fn)
    std = float(std)
    if not std >= 0:
        raise ValueError(f"{fn}: std must be >= 0 µs, got {std}")
    if negative not in ("drop", "clip", "keep"):
        raise ValueError(f"{fn}: negative must be 'drop', 'clip' or 'keep', got {negative!r}")
    t = cols.t.astype(np.int64) + np.rint(rng.normal(0.0, std, events.shape[0])).astype(np.int64)
    out = _copy(events)
    if negative == "clip":
        t = np.maximum(t, 0)
    out["t"] = t
    if negative == "drop":
        keep = t >= 0
        out, t = _select(out, keep), t[keep]
    return _select(out, np.argsort(t, kind="stable"))


def flip_lr(
    events: np.ndarray, *, sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE
) -> np.ndarray:
    """Mirror left-right: ``x' = width - 1 - x``. Raises if an event lies off the sensor."""
    fn = "flip_lr"
    cols = _structured(events, fn)
    height, width = _check_sensor(sensor_size, fn)
    _check_in_sensor(cols.x, cols.y, height, width, fn)
    out = _copy(events)
    out["x"] = width - 1 - cols.x
    return out


def flip_ud(
    events: np.ndarray, *, sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE
) -> np.ndarray:
    """Mirror up-down: ``y' = height - 1 - y``. Raises if an event lies off the sensor."""
    fn = "flip_ud"
    cols = _structured(events, fn)
    height, width = _check_sensor(sensor_size, fn)
    _check_in_sensor(cols.x, cols.y, height, width, fn)
    out = _copy(events)
    out["y"] = height - 1 - cols.y
    return out


def flip_polarity(
    events: np.ndarray, *, p: float | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Swap ON and OFF: ``p' = 1 - p`` for every event, or for each event with probability ``p``.

    With ``p=None`` (default) all events flip and no generator is needed. With a
    probability ``p`` each event flips independently (pass ``rng``). Per-sample random
    flipping is ``RandomFlipPolarity``.
    """
    fn = "flip_polarity"
    cols = _structured(events, fn)
    _check_polarity(cols.p, fn)
    out = _copy(events)
    if p is None:
        out["p"] = 1 - cols.p
        return out
    p = _check_prob(p, "p", fn)
    rng = _check_rng(rng, fn)
    flip = rng.random(events.shape[0]) < p
    out["p"] = np.where(flip, 1 - cols.p, cols.p)
    return out


def time_reversal(events: np.ndarray, *, flip_polarities: bool = True) -> np.ndarray:
    """Play the stream backwards: ``t' = t_first + t_last - t``, order reversed (still sorted).

    The time range ``[t_first, t_last]`` is preserved (tonic's ``max(t) - t`` maps it
    to ``[0, t_last - t_first]``, shifting streams that do not start at 0). Polarities
    are swapped by default, as tonic does, because a brightness increase played
    backwards is a decrease: the reversed stream is then what the camera would have
    seen on the reversed scene.
    Events with equal times come out in reverse of their input order (an exact reversal).
    """
    fn = "time_reversal"
    cols = _structured(events, fn)
    if events.shape[0] == 0:
        return _copy(events)
    _check_sorted(cols.t, fn)
    if flip_polarities:
        _check_polarity(cols.p, fn)
    out = _select(events, slice(None, None, -1))
    out["t"] = cols.t[0] + cols.t[-1] - out["t"]
    if flip_polarities:
        out["p"] = 1 - out["p"]
    return out


def uniform_noise(
    events: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE,
    t_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Add ``n`` events uniform over pixels, polarities and whole-µs times, merged in order.

    Noise times are uniform integers in ``t_range`` (inclusive; default the stream's
    ``[t_first, t_last]``). The output is sorted; at equal times original events come
    first. With no events and no ``t_range`` there is no time range to draw from and the
    (empty) input is returned, as tonic does.
    """
    fn = "uniform_noise"
    cols = _structured(events, fn)
    rng = _check_rng(rng, fn)
    height, width = _check_sensor(sensor_size, fn)
    n = _check_int(n, "n", fn)
    if t_range is None:
        if events.shape[0] == 0:
            return _copy(events)
        t_lo, t_hi = int(cols.t.min()), int(cols.t.max())
    else:
        t_lo, t_hi = int(t_range[0]), int(t_range[1])
        if t_hi < t_lo:
            raise ValueError(f"{fn}: t_range must be (low, high) with low <= high, got {t_range}")
    _check_sorted(cols.t, fn)
    noise = np.zeros(n, dtype=events.dtype)
    noise["x"] = rng.integers(0, width, n)
    noise["y"] = rng.integers(0, height, n)
    noise["p"] = rng.integers(0, 2, n)
    noise["t"] = np.sort(rng.integers(t_lo, t_hi, n, endpoint=True))
    return _merge_sorted(events, noise)


def denoise(
    events: np.ndarray,
    *,
    filter_time: int,
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE,
    diagonal: bool = False,
) -> np.ndarray:
    """Keep an event only when a neighbouring pixel fired less than ``filter_time`` µs before it.

    tonic's ``Denoise`` semantics: the neighbours are the 4 pixels sharing an edge
    (``diagonal=True`` adds the 4 corner pixels); events at the neighbour count whether
    or not they were kept; the event's own pixel does not count; only earlier events in
    the stream count. Unlike tonic, no pixel starts "recently fired" -- tonic's initial
    memory keeps every event of the first ``filter_time`` µs.
    Input must be sorted and on the sensor; output keeps the input order.
    """
    fn = "denoise"
    cols = _structured(events, fn)
    height, width = _check_sensor(sensor_size, fn)
    filter_time = _check_int(filter_time, "filter_time", fn, unit=" (µs)")
    if events.shape[0] == 0:
        return _copy(events)
    _check_sorted(cols.t, fn)
    _check_in_sensor(cols.x, cols.y, height, width, fn)
    keep = _denoise_kernel(
        np.ascontiguousarray(cols.t, dtype=np.int64),
        np.ascontiguousarray(cols.x),
        np.ascontiguousarray(cols.y),
        height,
        width,
        np.int64(filter_time),
        bool(diagonal),
    )
    return _select(events, keep)


def refractory_period(
    events: np.ndarray,
    *,
    period: int,
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE,
) -> np.ndarray:
    """Per-pixel dead time: drop events less than ``period`` µs after the pixel's last kept one.

    Both polarities share one pixel. The dead time runs from the last *kept* event, as
    a sensor's refractory period does: dropped events do not extend it (tonic updates
    the memory on dropped events too, so a pixel firing faster than 1/period stays
    silent forever after its first event, and tonic also drops a first event at t = 0).
    An event exactly ``period`` µs later is kept, so ``period=0`` keeps everything (tonic
    keeps only gaps larger than the period).
    Input must be sorted and on the sensor; output keeps the input order.
    """
    fn = "refractory_period"
    cols = _structured(events, fn)
    height, width = _check_sensor(sensor_size, fn)
    period = _check_int(period, "period", fn, unit=" (µs)")
    if events.shape[0] == 0:
        return _copy(events)
    _check_sorted(cols.t, fn)
    _check_in_sensor(cols.x, cols.y, height, width, fn)
    keep = _refractory_kernel(
        np.ascontiguousarray(cols.t, dtype=np.int64),
        np.ascontiguousarray(cols.x),
        np.ascontiguousarray(cols.y),
        height,
        width,
        np.int64(period),
    )
    return _select(events, keep)


def crop(events: np.ndarray, *, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Keep events in rows ``[top, top+height)`` and columns ``[left, left+width)``, shifted.

    Output coordinates are ``x - left``, ``y - top``; the new sensor is (height, width).
    Offsets may be negative or reach past the sensor (the box then covers less of it).
    """
    fn = "crop"
    cols = _structured(events, fn)
    if height < 1 or width < 1:
        raise ValueError(f"{fn}: height and width must be >= 1, got ({height}, {width})")
    if events.shape[0] == 0:
        return _copy(events)
    mask = _box_mask(cols.x, cols.y, left, top, left + width, top + height, inside=True)
    out = _select(events, mask)
    out["x"] -= left
    out["y"] -= top
    return out


def center_crop(
    events: np.ndarray,
    size: int | tuple[int, int],
    *,
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE,
) -> np.ndarray:
    """Crop the central ``size=(height, width)`` box; offsets ``(sensor - size) // 2`` (tonic).

    Along an axis where ``size`` exceeds the sensor the crop pads instead, as tonic
    does: the offset is negative, so events keep their place shifted by
    ``ceil((size - sensor) / 2)`` pixels, and no event is added or dropped there.
    """
    fn = "center_crop"
    h, w = _check_size(size, "size", fn)
    sh, sw = _check_sensor(sensor_size, fn)
    # floor division: a larger crop gets the negative offset -ceil(pad / 2), as in tonic
    return crop(events, top=(sh - h) // 2, left=(sw - w) // 2, height=h, width=w)


def random_crop(
    events: np.ndarray,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE,
) -> np.ndarray:
    """Crop a ``size=(height, width)`` box at a uniformly random position fully on the sensor.

    Every position, the last row/column included, is equally likely (tonic's
    ``int(rand() * (W - w))`` never picks the last one).
    """
    fn = "random_crop"
    h, w = _check_size(size, "size", fn)
    sh, sw = _check_sensor(sensor_size, fn)
    rng = _check_rng(rng, fn)
    if h > sh or w > sw:
        raise ValueError(f"{fn}: size {(h, w)} is larger than sensor_size {(sh, sw)}")
    top = int(rng.integers(0, sh - h, endpoint=True))
    left = int(rng.integers(0, sw - w, endpoint=True))
    return crop(events, top=top, left=left, height=h, width=w)


def downsample(
    events: np.ndarray,
    *,
    spatial_factor: int | tuple[int, int] = 1,
    time_factor: int = 1,
) -> np.ndarray:
    """Reduce resolution: ``x' = x // fx``, ``y' = y // fy``, ``t' = floor(t / ft) * ft``.

    ``spatial_factor`` is an integer or ``(fy, fx)``; the new sensor is
    ``(ceil(H / fy), ceil(W / fx))``. Integer division (not tonic's float scaling and
    truncation) maps equal-sized pixel blocks onto one pixel. Timestamps are quantised to
    multiples of ``time_factor`` µs but stay in µs (the unit of EVENT_DTYPE), and the
    mapping is monotone, so the output stays sorted. No event is dropped or merged.
    """
    fn = "downsample"
    _structured(events, fn)
    fy, fx = _check_size(spatial_factor, "spatial_factor", fn)
    time_factor = _check_int(time_factor, "time_factor", fn, minimum=1, unit=" (µs)")
    out = _copy(events)
    if fx > 1:
        out["x"] = np.floor_divide(out["x"], fx)
    if fy > 1:
        out["y"] = np.floor_divide(out["y"], fy)
    if time_factor > 1:
        out["t"] = np.floor_divide(out["t"], time_factor) * time_factor
    return out


# ----------------------------------------------------------------------------- transforms


class EventTransform(ABC):
    """Base of the transform dataclasses: ``transform(events, rng) -> events``.

    Deterministic transforms accept ``rng=None``; random ones raise ``TypeError``
    without a ``np.random.Generator``.
    """

    @abstractmethod
    def __call__(
        self, events: np.ndarray, rng: np.random.Generator | None = None
    ) -> np.ndarray: ...


def _freeze(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


def _norm_sensor(obj, fn: str) -> None:
    _freeze(obj, "sensor_size", _check_sensor(obj.sensor_size, fn))


@dataclass(frozen=True)
class DropEvent(EventTransform):
    """``drop_event``: drop a fraction ``ratio`` (or a range ``(lo, hi)``) of the events."""

    ratio: Ratio = 0.1

    def __post_init__(self):
        _freeze(self, "ratio", _check_ratio(self.ratio, "ratio", "DropEvent"))

    def __call__(self, events, rng=None):
        return drop_event(events, self.ratio, rng)


@dataclass(frozen=True)
class DropEventByTime(EventTransform):
    """``drop_by_time``: drop one window of ``ratio`` x the stream span (or a range)."""

    ratio: Ratio = 0.2

    def __post_init__(self):
        _freeze(self, "ratio", _check_ratio(self.ratio, "ratio", "DropEventByTime"))

    def __call__(self, events, rng=None):
        return drop_by_time(events, self.ratio, rng)


@dataclass(frozen=True)
class DropEventByArea(EventTransform):
    """``drop_by_area``: drop one box with sides ``area_ratio`` x the sensor's (or a range)."""

    area_ratio: Ratio = 0.2
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE

    def __post_init__(self):
        _freeze(self, "area_ratio", _check_ratio(self.area_ratio, "area_ratio", "DropEventByArea"))
        _norm_sensor(self, "DropEventByArea")

    def __call__(self, events, rng=None):
        return drop_by_area(events, self.area_ratio, rng, sensor_size=self.sensor_size)


@dataclass(frozen=True)
class SpatialJitter(EventTransform):
    """``spatial_jitter``: Gaussian pixel offsets (variances in px^2); off-sensor: drop or clip."""

    var_x: float = 1.0
    var_y: float = 1.0
    cov_xy: float = 0.0
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE
    out_of_bounds: Literal["drop", "clip"] = "drop"

    def __post_init__(self):
        _norm_sensor(self, "SpatialJitter")
        _check_jitter(self.var_x, self.var_y, self.cov_xy, self.out_of_bounds, "SpatialJitter")

    def __call__(self, events, rng=None):
        return spatial_jitter(
            events,
            rng,
            var_x=self.var_x,
            var_y=self.var_y,
            cov_xy=self.cov_xy,
            sensor_size=self.sensor_size,
            out_of_bounds=self.out_of_bounds,
        )


@dataclass(frozen=True)
class TimeJitter(EventTransform):
    """``time_jitter``: Gaussian time offsets of ``std`` µs, then a stable re-sort."""

    std: float = 1.0
    negative: Literal["drop", "clip", "keep"] = "drop"

    def __post_init__(self):
        if not float(self.std) >= 0:
            raise ValueError(f"TimeJitter: std must be >= 0 µs, got {self.std}")
        if self.negative not in ("drop", "clip", "keep"):
            raise ValueError(
                f"TimeJitter: negative must be 'drop', 'clip' or 'keep', got {self.negative!r}"
            )

    def __call__(self, events, rng=None):
        return time_jitter(events, rng, std=self.std, negative=self.negative)


def _coin(p: float, rng, fn: str) -> bool:
    """One Bernoulli(p) draw; always consumes one number so streams stay aligned across p."""
    return bool(_check_rng(rng, fn).random() < p)


@dataclass(frozen=True)
class RandomFlipLR(EventTransform):
    """With probability ``p``, ``flip_lr`` the whole stream."""

    p: float = 0.5
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE

    def __post_init__(self):
        _freeze(self, "p", _check_prob(self.p, "p", "RandomFlipLR"))
        _norm_sensor(self, "RandomFlipLR")

    def __call__(self, events, rng=None):
        if _coin(self.p, rng, "RandomFlipLR"):
            return flip_lr(events, sensor_size=self.sensor_size)
        return _copy(events)


@dataclass(frozen=True)
class RandomFlipUD(EventTransform):
    """With probability ``p``, ``flip_ud`` the whole stream."""

    p: float = 0.5
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE

    def __post_init__(self):
        _freeze(self, "p", _check_prob(self.p, "p", "RandomFlipUD"))
        _norm_sensor(self, "RandomFlipUD")

    def __call__(self, events, rng=None):
        if _coin(self.p, rng, "RandomFlipUD"):
            return flip_ud(events, sensor_size=self.sensor_size)
        return _copy(events)


@dataclass(frozen=True)
class RandomFlipPolarity(EventTransform):
    """Swap ON/OFF: whole sample with probability ``p``, or each event with ``p`` (``per_event``).

    tonic's ``RandomFlipPolarity`` documents per-event flipping but flips per sample.
    """

    p: float = 0.5
    per_event: bool = False

    def __post_init__(self):
        _freeze(self, "p", _check_prob(self.p, "p", "RandomFlipPolarity"))

    def __call__(self, events, rng=None):
        if self.per_event:
            return flip_polarity(events, p=self.p, rng=_check_rng(rng, "RandomFlipPolarity"))
        if _coin(self.p, rng, "RandomFlipPolarity"):
            return flip_polarity(events)
        return _copy(events)


@dataclass(frozen=True)
class RandomTimeReversal(EventTransform):
    """With probability ``p``, ``time_reversal`` (swapping polarities unless told not to)."""

    p: float = 0.5
    flip_polarities: bool = True

    def __post_init__(self):
        _freeze(self, "p", _check_prob(self.p, "p", "RandomTimeReversal"))

    def __call__(self, events, rng=None):
        if _coin(self.p, rng, "RandomTimeReversal"):
            return time_reversal(events, flip_polarities=self.flip_polarities)
        return _copy(events)


@dataclass(frozen=True)
class UniformNoise(EventTransform):
    """``uniform_noise``: add ``n`` events (or a count uniform in ``(lo, hi)``, inclusive)."""

    n: int | tuple[int, int] = 1000
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE

    def __post_init__(self):
        _freeze(self, "n", _check_int_or_range(self.n, "n", "UniformNoise"))
        _norm_sensor(self, "UniformNoise")

    def __call__(self, events, rng=None):
        rng = _check_rng(rng, "UniformNoise")
        return uniform_noise(events, _draw_int(self.n, rng), rng, sensor_size=self.sensor_size)


@dataclass(frozen=True)
class Denoise(EventTransform):
    """``denoise``: keep events with a neighbour event within ``filter_time`` µs (deterministic)."""

    filter_time: int = 10_000
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE
    diagonal: bool = False

    def __post_init__(self):
        _freeze(self, "filter_time", _check_int(self.filter_time, "filter_time", "Denoise"))
        _norm_sensor(self, "Denoise")

    def __call__(self, events, rng=None):
        return denoise(
            events,
            filter_time=self.filter_time,
            sensor_size=self.sensor_size,
            diagonal=self.diagonal,
        )


@dataclass(frozen=True)
class RefractoryPeriod(EventTransform):
    """``refractory_period``: per-pixel dead time of ``period`` µs, or a range drawn per call.

    ``period=(low, high)`` (tonic's ``delta`` range) draws an integer period uniformly
    from [low, high], both ends included, from ``rng`` on every call (tonic's
    ``int(low + (high - low) * random())`` never draws ``high`` and uses the global
    RNG). A single period is deterministic and needs no generator.
    """

    period: int | tuple[int, int] = 1000
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE

    def __post_init__(self):
        period = _check_int_or_range(self.period, "period", "RefractoryPeriod", unit=" (µs)")
        _freeze(self, "period", period)
        _norm_sensor(self, "RefractoryPeriod")

    def __call__(self, events, rng=None):
        period = self.period
        if isinstance(period, tuple):
            period = _draw_int(period, _check_rng(rng, "RefractoryPeriod"))
        return refractory_period(events, period=period, sensor_size=self.sensor_size)


@dataclass(frozen=True)
class CenterCrop(EventTransform):
    """``center_crop`` to ``size=(height, width)`` (deterministic); a larger size pads."""

    size: int | tuple[int, int] = 64
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE

    def __post_init__(self):
        _freeze(self, "size", _check_size(self.size, "size", "CenterCrop"))
        _norm_sensor(self, "CenterCrop")

    def __call__(self, events, rng=None):
        return center_crop(events, self.size, sensor_size=self.sensor_size)


@dataclass(frozen=True)
class RandomCrop(EventTransform):
    """``random_crop`` to ``size=(height, width)`` at a uniform position."""

    size: int | tuple[int, int] = 64
    sensor_size: tuple[int, int] = DEFAULT_SENSOR_SIZE

    def __post_init__(self):
        _freeze(self, "size", _check_size(self.size, "size", "RandomCrop"))
        _norm_sensor(self, "RandomCrop")
        if self.size[0] > self.sensor_size[0] or self.size[1] > self.sensor_size[1]:
            raise ValueError(f"RandomCrop: size {self.size} exceeds sensor_size {self.sensor_size}")

    def __call__(self, events, rng=None):
        return random_crop(events, self.size, rng, sensor_size=self.sensor_size)


@dataclass(frozen=True)
class Downsample(EventTransform):
    """``downsample`` by integer ``spatial_factor`` (or ``(fy, fx)``) and ``time_factor`` µs."""

    spatial_factor: int | tuple[int, int] = 1
    time_factor: int = 1

    def __post_init__(self):
        _freeze(
            self, "spatial_factor", _check_size(self.spatial_factor, "spatial_factor", "Downsample")
        )
        _freeze(
            self,
            "time_factor",
            _check_int(self.time_factor, "time_factor", "Downsample", minimum=1),
        )

    def __call__(self, events, rng=None):
        return downsample(events, spatial_factor=self.spatial_factor, time_factor=self.time_factor)


def _check_callables(transforms, fn: str) -> tuple:
    transforms = tuple(transforms)
    if not transforms:
        raise ValueError(f"{fn}: needs at least one transform")
    for i, tr in enumerate(transforms):
        if not callable(tr):
            raise TypeError(f"{fn}: transforms[{i}] is not callable: {tr!r}")
    return transforms


@dataclass(frozen=True)
class Compose(EventTransform):
    """Apply ``transforms`` in order, all drawing from the one ``rng``."""

    transforms: tuple[Callable, ...]

    def __post_init__(self):
        _freeze(self, "transforms", _check_callables(self.transforms, "Compose"))

    def __call__(self, events, rng=None):
        for tr in self.transforms:
            events = tr(events, rng)
        return events


@dataclass(frozen=True)
class RandomChoice(EventTransform):
    """Apply one of ``transforms``, chosen with probabilities ``weights`` (default uniform)."""

    transforms: tuple[Callable, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        trs = _check_callables(self.transforms, "RandomChoice")
        _freeze(self, "transforms", trs)
        if self.weights is not None:
            w = tuple(float(v) for v in self.weights)
            if len(w) != len(trs) or min(w) < 0 or sum(w) <= 0:
                raise ValueError(
                    f"RandomChoice: weights must be {len(trs)} non-negative numbers with a "
                    f"positive sum, got {self.weights!r}"
                )
            _freeze(self, "weights", w)

    def choose(self, rng: np.random.Generator) -> int:
        """Index of the transform the next call would apply (one draw from ``rng``)."""
        rng = _check_rng(rng, "RandomChoice")
        if self.weights is None:
            return int(rng.integers(len(self.transforms)))
        w = np.asarray(self.weights)
        return int(rng.choice(len(self.transforms), p=w / w.sum()))

    def __call__(self, events, rng=None):
        return self.transforms[self.choose(rng)](events, rng)
