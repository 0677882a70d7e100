"""A DVS simulator: intensity frames in, events out.

Model (the one ESIM and v2e use, reduced to what a synthetic benchmark needs):

- Each pixel keeps a reference log intensity ``R`` (set from the first frame) and
  two contrast thresholds, ``C_on`` and ``C_off``, drawn once per pixel from
  ``N(threshold, threshold_sigma)`` (fixed-pattern mismatch, independently per polarity).
- Between consecutive frames the log intensity ``L = log(max(I, eps))`` is taken to
  change linearly in time. Every time it crosses ``R + C_on`` the pixel emits an ON
  event (p = 1) and ``R`` moves up by ``C_on``; every crossing of ``R - C_off`` gives an
  OFF event (p = 0) and moves ``R`` down by ``C_off``. A change of ``dL`` from the
  reference therefore gives ``floor(dL / C)`` events, timestamped where the linear
  ramp meets each level (rounded to the nearest µs).
- Refractory period: an event closer than ``refractory_us`` to the previous *emitted*
  event of the same pixel is not emitted. The reference still moves by the crossing,
  so a suppressed event is lost, not delayed.
- Background activity: Poisson events at ``noise_rate_hz`` per pixel, uniform in
  time and position, random polarity. They are added independently of the pixel
  state (they neither reset the reference nor start a refractory period), which is
  a simplification of real leak / shot noise.

``DVSSimulator`` holds that state and consumes frames in chunks (streaming);
``simulate`` runs it over a whole clip. The per-pixel work is two Numba kernels
(count crossings, then write them); ``simulate_reference`` is a plain-Python
reference of the same model (without noise) that the tests compare them with.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from evformer.events.core import EVENT_DTYPE, empty_events

# A pixel threshold drawn below this fraction of the nominal one is clipped up to it,
# so a large mismatch cannot create a pixel that fires on every tiny change.
MIN_THRESHOLD_FRACTION = 0.25

# Sentinel "last event time" for a pixel that has not fired yet (far enough in the
# past that any refractory period is over, without overflow when subtracted).
_NEVER = np.int64(-(2**62))

_MAX_SENSOR = int(np.iinfo(np.int16).max) + 1  # x and y are int16


# Pixels are processed in blocks: the outer loop runs over blocks, the inner loops over
# frames and then over the block's pixels, so reads of a frame row are contiguous (a
# per-pixel loop over frames would stride by H * W through memory).
#
# The kernels are serial on purpose. A clip is small (128 x 128 x 300 frames: ~15 ms per
# kernel), datasets generate many clips in parallel worker processes, and a Numba
# ``parallel=True`` kernel starts an OpenMP pool that makes any later fork() of the
# process abort ("fork() called from a process already using GNU OpenMP"), which is
# exactly what the cache preparation and DataLoader workers do. Measured on a shared
# 2-core machine, two threads were no faster than one at this size.
_BLOCK = 256


@njit(cache=True)
def _count_crossings(logs, ref, c_on, c_off):
    """Number of level crossings per pixel over a chunk: logs [K, P], ref/c_on/c_off [P]."""
    n_frames, n_pix = logs.shape
    counts = np.zeros(n_pix, dtype=np.int64)
    r = ref.copy()
    n_blocks = (n_pix + _BLOCK - 1) // _BLOCK
    for b in range(n_blocks):
        i1 = min((b + 1) * _BLOCK, n_pix)
        for k in range(n_frames):
            for i in range(b * _BLOCK, i1):
                d = logs[k, i] - r[i]
                if d >= c_on[i]:
                    m = np.floor(d / c_on[i])
                    counts[i] += np.int64(m)
                    r[i] += m * c_on[i]
                elif -d >= c_off[i]:
                    m = np.floor(-d / c_off[i])
                    counts[i] += np.int64(m)
                    r[i] -= m * c_off[i]
    return counts


@njit(cache=True)
def _write_crossings(
    logs,
    log_prev,
    times,
    t_prev,
    ref,
    last_t,
    c_on,
    c_off,
    refractory_us,
    width,
    offsets,
    out_t,
    out_x,
    out_y,
    out_p,
    keep,
):
    """Write the crossings counted by ``_count_crossings`` and advance the pixel state.

    logs [K, P] log intensities of the new frames, log_prev [P] of the frame before,
    times [K] µs, t_prev µs of the frame before; ref, log_prev, last_t [P] are updated
    in place. Pixel i writes slots offsets[i]:offsets[i+1] in time order; keep marks
    the events outside the refractory period.
    """
    n_frames, n_pix = logs.shape
    cursor = offsets[:-1].copy()
    n_blocks = (n_pix + _BLOCK - 1) // _BLOCK
    for b in range(n_blocks):
        i1 = min((b + 1) * _BLOCK, n_pix)
        t0 = t_prev
        for k in range(n_frames):
            t1 = times[k]
            dt = t1 - t0
            for i in range(b * _BLOCK, i1):
                l1 = logs[k, i]
                r = ref[i]
                d = l1 - r
                if d >= c_on[i]:
                    m = np.floor(d / c_on[i])
                    step = c_on[i]
                    pol = np.int8(1)
                elif -d >= c_off[i]:
                    m = np.floor(-d / c_off[i])
                    step = -c_off[i]
                    pol = np.int8(0)
                else:
                    log_prev[i] = l1
                    continue
                l0 = log_prev[i]
                dl = l1 - l0
                lt = last_t[i]
                j = cursor[i]
                for q in range(1, np.int64(m) + 1):
                    level = r + q * step
                    frac = (level - l0) / dl if dl != 0.0 else 1.0
                    frac = min(max(frac, 0.0), 1.0)
                    t = t0 + np.int64(np.floor(frac * dt + 0.5))
                    out_t[j] = t
                    out_x[j] = np.int16(i % width)
                    out_y[j] = np.int16(i // width)
                    out_p[j] = pol
                    if t - lt >= refractory_us:
                        keep[j] = True
                        lt = t
                    else:
                        keep[j] = False
                    j += 1
                cursor[i] = j
                last_t[i] = lt
                ref[i] = r + m * step
                log_prev[i] = l1
            t0 = t1


class DVSSimulator:
    """Streaming DVS simulator for a ``height`` x ``width`` sensor (state kept between calls).

    Feed frames with ``step``; the first frame ever given sets every pixel's reference
    and emits nothing. Per-pixel thresholds (``c_on``, ``c_off``, [H, W] float64) are
    drawn from ``rng`` here; background noise is drawn from the same ``rng`` in ``step``.
    Without noise the events do not depend on how a clip is split into chunks; with
    noise, the same seed and the same chunking give the same events.

    Args:
        height, width: sensor size in pixels (at most 32768 each: x and y are int16).
        rng: the only source of randomness (threshold mismatch and noise).
        threshold: nominal log-intensity contrast threshold ``C`` (> 0).
        threshold_sigma: standard deviation of the per-pixel, per-polarity mismatch.
        refractory_us: minimum time between two emitted events of one pixel, µs (>= 0).
        noise_rate_hz: background events per pixel per second (>= 0).
        eps: intensities are floored at ``eps`` before the log (> 0).
    """

    def __init__(
        self,
        height: int,
        width: int,
        *,
        rng: np.random.Generator,
        threshold: float = 0.2,
        threshold_sigma: float = 0.03,
        refractory_us: int = 100,
        noise_rate_hz: float = 0.1,
        eps: float = 1e-3,
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        for name, v in (("height", height), ("width", width)):
            if int(v) != v or not 1 <= v <= _MAX_SENSOR:
                raise ValueError(f"{name}: expected an integer in [1, {_MAX_SENSOR}], got {v!r}")
        if not threshold > 0:
            raise ValueError(f"threshold: must be > 0 (a log-intensity contrast), got {threshold}")
        if not threshold_sigma >= 0:
            raise ValueError(f"threshold_sigma: must be >= 0, got {threshold_sigma}")
        if not refractory_us >= 0:
            raise ValueError(f"refractory_us: must be >= 0 µs, got {refractory_us}")
        if not noise_rate_hz >= 0:
            raise ValueError(f"noise_rate_hz: must be >= 0 events/pixel/s, got {noise_rate_hz}")
        if not eps > 0:
            raise ValueError(f"eps: must be > 0 (floor before the log), got {eps}")
        self.height = int(height)
        self.width = int(width)
        self.rng = rng
        self.threshold = float(threshold)
        self.threshold_sigma = float(threshold_sigma)
        self.refractory_us = int(refractory_us)
        self.noise_rate_hz = float(noise_rate_hz)
        self.eps = float(eps)
        lo = MIN_THRESHOLD_FRACTION * self.threshold
        shape = (self.height, self.width)
        self.c_on = np.maximum(rng.normal(self.threshold, self.threshold_sigma, shape), lo)
        self.c_off = np.maximum(rng.normal(self.threshold, self.threshold_sigma, shape), lo)
        self._ref: np.ndarray | None = None  # [P] float64 reference log intensity
        self._log_prev: np.ndarray | None = None  # [P] log intensity of the last frame
        self._last_t = np.full(self.height * self.width, _NEVER, dtype=np.int64)
        self._t_prev: int | None = None

    @property
    def time_us(self) -> int | None:
        """Timestamp of the last frame consumed (µs), or None before the first frame."""
        return self._t_prev

    def reference(self) -> np.ndarray | None:
        """A copy of the per-pixel reference log intensity [H, W] (None before the first frame)."""
        return None if self._ref is None else self._ref.reshape(self.height, self.width).copy()

    def _log(self, frames: np.ndarray) -> np.ndarray:
        """log(max(I, eps)) as [K, P], float64 for float64 input, float32 otherwise."""
        dtype = np.float64 if frames.dtype == np.float64 else np.float32
        f = frames.reshape(frames.shape[0], -1).astype(dtype, copy=False)
        return np.log(np.maximum(f, dtype(self.eps)))

    def step(self, frames: np.ndarray, times_us: np.ndarray | int) -> np.ndarray:
        """Consume frames and return the events they cause, sorted by ``t``.

        Args:
            frames: one frame [H, W] or a chunk [K, H, W] of linear intensities
                (finite, >= 0; the generator uses (0, 1]).
            times_us: the frame time (int, µs) or the chunk's times [K], strictly
                increasing and later than every frame consumed before.

        Returns:
            EVENT_DTYPE array: events with ``t`` in [previous frame time, last frame time]
            (a crossing within half a µs of an interval's start rounds to it), x = column,
            y = row, p = 1 for a brightness increase, 0 for a decrease.
        """
        frames = np.asarray(frames)
        times = np.asarray(times_us)
        if frames.ndim == 2:
            frames = frames[None]
            times = times.reshape(1) if times.ndim == 0 else times
        if frames.ndim != 3 or frames.shape[1:] != (self.height, self.width):
            raise ValueError(
                f"frames: expected shape [K, {self.height}, {self.width}] or "
                f"[{self.height}, {self.width}], got {np.shape(frames)}"
            )
        if not (
            np.issubdtype(frames.dtype, np.floating) or np.issubdtype(frames.dtype, np.integer)
        ):
            raise ValueError(f"frames: expected real intensities, got dtype {frames.dtype}")
        if times.shape != (frames.shape[0],):
            raise ValueError(
                f"times_us: expected shape ({frames.shape[0]},) (one time per frame), "
                f"got {times.shape}"
            )
        if not np.issubdtype(times.dtype, np.integer):
            if not np.all(np.isfinite(times)) or np.any(times != np.round(times)):
                raise ValueError(f"times_us: expected integer microseconds, got {times.dtype}")
        times = times.astype(np.int64)
        if frames.shape[0] == 0:
            return empty_events()
        if np.any(np.diff(times) <= 0):
            k = int(np.flatnonzero(np.diff(times) <= 0)[0])
            raise ValueError(
                f"times_us: must be strictly increasing, but times_us[{k + 1}]={times[k + 1]} "
                f"<= times_us[{k}]={times[k]}"
            )
        if self._t_prev is not None and times[0] <= self._t_prev:
            raise ValueError(
                f"times_us: the chunk starts at {times[0]} µs, not after the last frame "
                f"consumed ({self._t_prev} µs); time must move forward"
            )
        if not np.all(np.isfinite(frames)) or frames.min() < 0:
            raise ValueError("frames: intensities must be finite and >= 0 (linear, not log)")

        logs = self._log(frames)
        if self._ref is None:
            # The first frame only sets the reference: a sensor switched on sees no change.
            self._ref = logs[0].astype(np.float64)
            self._log_prev = logs[0].copy()
            self._t_prev = int(times[0])
            logs, times = logs[1:], times[1:]
            if times.shape[0] == 0:
                return empty_events()
        t_prev = self._t_prev
        assert self._log_prev is not None
        log_prev = self._log_prev.astype(logs.dtype)  # a copy: the kernel advances it

        c_on = self.c_on.reshape(-1)
        c_off = self.c_off.reshape(-1)
        counts = _count_crossings(logs, self._ref, c_on, c_off)
        offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        n = int(offsets[-1])
        out_t = np.empty(n, np.int64)
        out_x = np.empty(n, np.int16)
        out_y = np.empty(n, np.int16)
        out_p = np.empty(n, np.int8)
        keep = np.empty(n, np.bool_)
        _write_crossings(
            logs,
            log_prev,
            times,
            np.int64(t_prev),
            self._ref,
            self._last_t,
            c_on,
            c_off,
            np.int64(self.refractory_us),
            np.int64(self.width),
            offsets,
            out_t,
            out_x,
            out_y,
            out_p,
            keep,
        )
        self._log_prev = log_prev
        self._t_prev = int(times[-1])

        signal = np.empty(int(keep.sum()), dtype=EVENT_DTYPE)
        signal["t"] = out_t[keep]
        signal["x"] = out_x[keep]
        signal["y"] = out_y[keep]
        signal["p"] = out_p[keep]
        noise = self._noise(np.concatenate(([t_prev], times)))
        events = np.concatenate((signal, noise)) if noise.shape[0] else signal
        # Stable: ties keep pixel-major order, then signal before noise (deterministic).
        return events[np.argsort(events["t"], kind="stable")]

    def _noise(self, times: np.ndarray) -> np.ndarray:
        """Background events in (times[0], times[-1]]: Poisson per frame interval."""
        if self.noise_rate_hz == 0.0:
            return empty_events()
        dt = np.diff(times)
        lam = self.noise_rate_hz * self.height * self.width * dt * 1e-6
        per_interval = self.rng.poisson(lam)
        n = int(per_interval.sum())
        if n == 0:
            return empty_events()
        start = np.repeat(times[:-1], per_interval)
        span = np.repeat(dt, per_interval)
        out = np.empty(n, dtype=EVENT_DTYPE)
        out["t"] = start + 1 + self.rng.integers(0, span)  # uniform in (t0, t1]
        out["x"] = self.rng.integers(0, self.width, n)
        out["y"] = self.rng.integers(0, self.height, n)
        out["p"] = self.rng.integers(0, 2, n)
        return out


def simulate(
    frames: np.ndarray,
    times_us: np.ndarray,
    *,
    rng: np.random.Generator,
    threshold: float = 0.2,
    threshold_sigma: float = 0.03,
    refractory_us: int = 100,
    noise_rate_hz: float = 0.1,
    eps: float = 1e-3,
) -> np.ndarray:
    """Events a DVS would emit watching ``frames`` (see the module docstring for the model).

    Args:
        frames: [N, H, W] linear intensities (finite, >= 0; typically in (0, 1]).
        times_us: [N] int64 frame timestamps in µs, strictly increasing.
        rng: draws the per-pixel thresholds, then the background noise.
        threshold, threshold_sigma, refractory_us, noise_rate_hz, eps: see ``DVSSimulator``.

    Returns:
        EVENT_DTYPE array sorted by ``t`` (in [times_us[0], times_us[-1]]), x = column,
        y = row, p = 1 (ON) for a brightness increase, 0 (OFF) for a decrease.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames: expected shape [N, H, W], got {frames.shape}")
    sim = DVSSimulator(
        frames.shape[1],
        frames.shape[2],
        rng=rng,
        threshold=threshold,
        threshold_sigma=threshold_sigma,
        refractory_us=refractory_us,
        noise_rate_hz=noise_rate_hz,
        eps=eps,
    )
    return sim.step(frames, times_us)


def simulate_reference(
    frames: np.ndarray,
    times_us: np.ndarray,
    *,
    c_on: np.ndarray,
    c_off: np.ndarray,
    refractory_us: int,
    eps: float = 1e-3,
) -> np.ndarray:
    """Plain-Python reference of the noiseless model, one pixel and one crossing at a time.

    ``c_on``, ``c_off`` are the per-pixel thresholds [H, W]; frames [N, H, W] and
    times_us [N] as for ``simulate``. Slow: for tests on small clips only.
    """
    frames = np.asarray(frames, dtype=np.float64)
    times = [int(t) for t in times_us]
    n_frames, height, width = frames.shape
    rows = []
    for y in range(height):
        for x in range(width):
            levels = [float(np.log(max(float(v), eps))) for v in frames[:, y, x]]
            ref = levels[0]
            last = None
            con, coff = float(c_on[y, x]), float(c_off[y, x])
            for k in range(1, n_frames):
                l0, l1 = levels[k - 1], levels[k]
                t0, t1 = times[k - 1], times[k]
                # Walk level by level rather than via floor(): independent of the kernel's maths.
                while True:
                    if l1 - ref >= con:
                        ref_next, pol = ref + con, 1
                    elif ref - l1 >= coff:
                        ref_next, pol = ref - coff, 0
                    else:
                        break
                    frac = (ref_next - l0) / (l1 - l0)
                    t = t0 + int(np.floor(min(max(frac, 0.0), 1.0) * (t1 - t0) + 0.5))
                    if last is None or t - last >= refractory_us:
                        rows.append((t, x, y, pol))
                        last = t
                    ref = ref_next
    out = np.array(rows, dtype=EVENT_DTYPE) if rows else empty_events()
    return out[np.argsort(out["t"], kind="stable")]
