"""Event-to-frame binning: event streams -> count frames ``[T, 2, H, W]``.

Frame ``k`` counts, per pixel and polarity, the events that fall into bin ``k``:
channel 0 = OFF (``p == 0``), channel 1 = ON (``p == 1``); ``x`` indexes the width
axis, ``y`` the height axis. Counts are ``int32`` (``int64`` for a stream of 2**31
events or more): a pixel can hold at most N counts, so neither can overflow (tonic's
int16 frames wrap at 32768).

Binning modes (pass exactly one of ``n_frames``, ``time_window``, ``event_count``,
``duration``; ``t0`` = first, ``t_last`` = last timestamp, N = number of events):

- ``n_frames=T, split_by="number"`` (spikingjelly's ``'number'``, tonic's
  ``n_event_bins``): ``di = N // T``; frame ``k`` takes events ``[k*di, (k+1)*di)``,
  the last frame takes the rest up to N. Fewer events than frames (``di = 0``): every
  event lands in the last frame.
- ``n_frames=T, split_by="time"`` (spikingjelly's ``'time'``, tonic's
  ``n_time_bins``): ``dt = (t_last - t0) // T`` µs; frame ``k`` takes events with
  ``t0 + k*dt <= t < t0 + (k+1)*dt``, the last frame runs to the end of the stream.
  Bins without events give empty frames; a span shorter than T µs (``dt = 0``) puts
  every event in the last frame (the rule's limit: all earlier bins are empty).
- ``overlap`` with ``n_frames``: a fraction in [0, 1). The bin stride stays ``di``
  (events) or ``dt`` (µs) and every bin but the last is extended by
  ``rint(overlap * di)`` events / ``rint(overlap * dt)`` µs (round half to even), so
  neighbouring frames share events and T stays fixed.
- ``duration=D`` µs (spikingjelly's ``integrate_events_by_fixed_duration``):
  ``max(1, ceil((t_last - t0) / D))`` frames; frame ``k`` takes
  ``t0 + k*D <= t < t0 + (k+1)*D`` and the last frame runs to the end (so an event at
  exactly ``t0 + T*D`` is kept).
- ``time_window=W`` µs, ``overlap=O`` µs (tonic's ``time_window``): windows
  ``[t0 + k*(W-O), t0 + k*(W-O) + W)``. Without ``include_incomplete``: the
  ``max(1, (t_last - t0 - W) // (W - O) + 1)`` windows that end by ``t_last``
  (one, incomplete, when the stream is shorter than W, as in tonic); with it: the
  fewest windows that contain ``t_last``. Events after the last window are not binned.
- ``event_count=C``, ``overlap=O`` events (tonic's ``event_count``): windows of events
  ``[k*(C-O), k*(C-O) + C)``; without ``include_incomplete`` only full windows (one
  window with all events when N < C, as in tonic); with it, a last short window so
  that every event is binned.
- Empty stream: ``n_frames`` gives T empty frames; the other modes one empty frame.

Input: a structured array of ``EVENT_DTYPE`` (or any 1-D structured array with
integer fields t, x, y, p) or a mapping of 1-D field arrays ``{"t", "x", "y", "p"}``
(see ``evformer.events.core.columns``). Nothing is copied: the Numba kernels read the
records of a structured array directly and the columns of a mapping as they are.
Streams must be sorted by ``t``; an unsorted stream is stably sorted by ``t`` first
(a copy), never silently truncated. ``x`` outside ``[0, width)``, ``y`` outside
``[0, height)`` or ``p`` outside ``{0, 1}`` raise ``ValueError`` naming the field,
value and event index (in the stream as given).

Speed: ``split_by="number"`` is one pass over the events; ``split_by="time"`` and
``duration`` find the T bin edges by bisection (O(T log N)) and then make the same one
pass. That pass also checks order and ranges, so valid input is read once from memory
(integer columns are indexed and checked by vectorised passes over blocks of 32768
events, the clean blocks then counted from those indices without tests; records are
checked event by event). A single stream is binned on one thread (splitting its frames
over threads measured slower on a shared 2-core machine, and dataset workers already
run in parallel);
``to_frames_batch`` bins many streams at once (Numba ``prange`` over streams), from a
list of streams or from concatenated columns plus offsets, the layout of the dataset
cache.

Differences from tonic 1.7 ``ToFrame`` (deliberate; each one a tonic bug or hazard):

1. Counts are int32/int64 ``[T, 2, H, W]``, also for an empty stream (tonic: int16,
   which wraps at 32768 events per pixel, and float64 ``(T, P, W, H)`` when empty).
2. ``n_time_bins`` (here ``n_frames=T, split_by="time"``): the last bin runs to the
   last event. tonic's bins end at ``t0 + T*((t_last - t0) // T)`` exclusive, so it
   always drops the last event (and every event of the floor remainder).
3. ``n_event_bins`` (here ``split_by="number"``): the last bin takes the
   ``N - T*(N//T)`` remainder events that tonic drops.
4. ``overlap`` in the bin-count modes keeps the stride equal to the bin size; tonic
   uses a stride of ``size * (1 + overlap) * (1 - overlap)``, so its bins drift
   towards the start and, once ``T > 1 + 1 / overlap``, leave the end of the stream
   unbinned.
5. Fewer events than bins / span shorter than T µs: all events go to the last frame
   (tonic returns all-empty frames: every event is lost).
6. ``time_window`` with ``include_incomplete=True`` always bins the last event; tonic
   uses ``ceil((span - W) / stride) + 1`` windows, one too few when ``span - W`` is a
   multiple of the stride, and drops the events at ``t_last``.
7. Unsorted input is sorted (tonic's searchsorted on unsorted ``t`` silently loses
   most events); out-of-range ``x``/``y``/``p`` raise (tonic raises an IndexError or,
   for negative values, silently wraps around to the far edge / other polarity).
8. ``time_window``/``overlap`` (µs) and ``event_count``/``overlap`` are integers
   (tonic accepts floats); ``start_time``/``end_time`` are not offered (slice the
   stream first); the frame size is always given (tonic can infer it from the largest
   ``x``/``y`` of each sample, which breaks batching); always two polarity channels.
9. ``include_incomplete=True`` with ``n_frames`` (or ``duration``) raises ``ValueError``:
   it only means something for ``time_window`` and ``event_count``, and tonic ignores
   it silently in the bin-count modes.

Differences from spikingjelly 2.0 ``integrate_events_by_fixed_frames_number``: counts
are int32, not float64; ``'time'`` returns empty frames where spikingjelly raises
``IndexError`` (an empty bin: a gap, a span shorter than T µs, an empty stream);
unsorted input is sorted first (spikingjelly bins array positions). Its
``integrate_events_by_fixed_duration`` crashes on a span of 0 µs; ``duration`` gives
one frame there.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from evformer.events.core import columns

__all__ = ["to_frames", "to_frames_batch", "count_dtype"]

# Kernel status codes: what stopped a pass, with the event index returned beside it.
_OK = 0
_UNSORTED = 1  # t[i] < t[i - 1]
_BAD_X = 2
_BAD_Y = 3
_BAD_P = 4

_INT32_LIMIT = 2**31 - 1


def count_dtype(n_events: int) -> np.dtype:
    """Frame dtype for a stream of ``n_events``: int32 below 2**31 events, else int64.

    One pixel of one frame counts at most every event of the stream once (also with
    overlapping bins), so a stream of at most 2**31 - 1 events cannot overflow int32.
    """
    return np.dtype(np.int32) if n_events <= _INT32_LIMIT else np.dtype(np.int64)


# --------------------------------------------------------------------------- kernels


# The kernels take one stream as ``ev``: either a tuple of the four column arrays
# (t, x, y, p) or the structured event array itself. The accessors below compile to
# plain loads for both; passing the structured array (not its four field views) lets
# Numba address fields at fixed offsets of a compile-time record size instead of
# through four runtime strides, measured ~16 % faster than the views.


def _event(ev, j):
    """``(t as int64, x, y, p as uint64)`` of event ``j`` (Numba only)."""
    raise NotImplementedError("called from Numba kernels only")


def _time(ev, j):
    """``t`` of event ``j`` as int64 (Numba only)."""
    raise NotImplementedError("called from Numba kernels only")


def _n_events(ev):
    """Number of events of ``ev`` (Numba only)."""
    raise NotImplementedError("called from Numba kernels only")


def _is_record_array(ev) -> bool:
    return isinstance(ev, types.Array) and isinstance(ev.dtype, types.Record)


@overload(_event, jit_options={"cache": True})
def _event_impl(ev, j):
    if isinstance(ev, types.BaseTuple):
        return lambda ev, j: (
            np.int64(ev[0][j]),
            np.uint64(ev[1][j]),
            np.uint64(ev[2][j]),
            np.uint64(ev[3][j]),
        )
    if _is_record_array(ev):

        def impl(ev, j):
            r = ev[j]
            return np.int64(r.t), np.uint64(r.x), np.uint64(r.y), np.uint64(r.p)

        return impl
    return None


@overload(_time, jit_options={"cache": True})
def _time_impl(ev, j):
    if isinstance(ev, types.BaseTuple):
        return lambda ev, j: np.int64(ev[0][j])
    if _is_record_array(ev):
        return lambda ev, j: np.int64(ev[j].t)
    return None


@overload(_n_events, jit_options={"cache": True})
def _n_events_impl(ev):
    if isinstance(ev, types.BaseTuple):
        return lambda ev: ev[0].shape[0]
    if _is_record_array(ev):
        return lambda ev: ev.shape[0]
    return None


# Index arithmetic in the per-event loops is unsigned (np.uint64): Numba then drops the
# negative-index wrap-around code from every array access (1.8x faster loops), and a
# negative x/y/p becomes a huge unsigned value that fails the same `< size` test. Mixing
# uint64 with int64 would make Numba compute in float64, so only uint64 meets uint64.
_U1 = np.uint64(1)


# Takes scalars, not the arrays: a per-event call with array arguments costs ~40 ns
# (arrays are passed as structs and reference-counted, also with inline="always"),
# 20x the check itself; with scalars LLVM inlines it and the loop stays tight.
@njit(cache=True)
def _event_status(out_of_order, xv, yv, pv, height, width):
    """Status of one event: its order against the previous one, then the (unsigned) ranges."""
    if out_of_order:
        return _UNSORTED
    if xv >= width:
        return _BAD_X
    if yv >= height:
        return _BAD_Y
    if pv > _U1:
        return _BAD_P
    return _OK


@njit(cache=True)
def _scan(ev, height, width):
    """One checking pass over a whole stream -> (status, index of the first bad event)."""
    n = np.uint64(_n_events(ev))
    uh = np.uint64(height)
    uw = np.uint64(width)
    prev = _time(ev, 0) if n else np.int64(0)
    i = np.uint64(0)
    while i < n:
        ti, xv, yv, pv = _event(ev, i)
        st = _event_status(ti < prev, xv, yv, pv, uh, uw)
        if st != _OK:
            return st, np.int64(i)
        prev = ti
        i += _U1
    return _OK, -1


# Events per block of ``_add_run``'s fast path for columns: the block's columns (13 bytes
# per event, 426 KB) and its flat indices (64-128 KB) stay in L2 beside a 128x128 frame
# between the preparing pass and the count. Measured on 1e6 events (DVS128, T = 16):
# 16384 ~4 % and 8192 ~8 % slower, smaller blocks more so (per-block cost).
_BLOCK = 32768


def _block_prepare(ev, j, end, prev, height, width, flat):
    """Flat frame indices ``p*H*W + y*W + x`` of events ``[j, end)`` into ``flat[:end-j]``
    (an unsigned integer array wide enough for ``2*H*W - 1``), and whether they are all
    in order (also against ``prev``, the time of event ``j - 1``) and in range, the
    indices being valid only then (Numba only; columns only)."""
    raise NotImplementedError("called from Numba kernels only")


def _has_fast_path(ev):
    """Whether ``_add_run`` checks ``ev`` by blocks first (Numba only)."""
    raise NotImplementedError("called from Numba kernels only")


def _fast_columns(ev) -> bool:
    """Whether ``ev`` is a tuple of integer columns (the type, at compile time)."""
    return isinstance(ev, types.BaseTuple) and all(isinstance(a.dtype, types.Integer) for a in ev)


@overload(_has_fast_path, jit_options={"cache": True})
def _has_fast_path_impl(ev):
    # Integer columns: the checks vectorise (contiguous loads). The records of a
    # structured array interleave the fields: their checks do not vectorise, and the
    # checking loop measured faster there.
    fast = _fast_columns(ev)
    return lambda ev: fast


def _unsigned_max_check(dtype):
    """``(U, limit)`` for a column of integer ``dtype``: its values v are in ``[0, bound)``
    iff ``max(U(v)) < min(bound, limit)``, U being the unsigned type of the same width
    (a negative v becomes at least 2**(bits-1) = limit; a non-negative v of a signed
    type is below it)."""
    bits = dtype.bitwidth
    unsigned = getattr(np, f"uint{bits}")
    limit = 2 ** (bits - 1) if dtype.signed else 2**64 - 1
    return unsigned, np.uint64(limit)


@overload(_block_prepare, jit_options={"cache": True})
def _block_prepare_impl(ev, j, end, prev, height, width, flat):
    if not _fast_columns(ev):
        # typed but never taken (_has_fast_path is False there)
        return lambda ev, j, end, prev, height, width, flat: False
    ux, lim_x = _unsigned_max_check(ev[1].dtype)
    uy, lim_y = _unsigned_max_check(ev[2].dtype)
    up, lim_p = _unsigned_max_check(ev[3].dtype)
    u = getattr(np, flat.dtype.name)

    def impl(ev, j, end, prev, height, width, flat):
        # Separate loops over slices of the block, so that LLVM vectorises each in the
        # columns' own widths (indexing by j + q, or fusing the loops, did not
        # vectorise and measured 3-10x slower): the indices (computed from
        # possibly truncated values, used only when the checks pass), the unsigned
        # maxima of x, y, p, and any t[q] < t[q - 1] (integers, not bools, are or-ed).
        t = ev[0][j:end]
        x = ev[1][j:end]
        y = ev[2][j:end]
        p = ev[3][j:end]
        m = t.shape[0]
        hw = u(height * width)
        w = u(width)
        for q in range(m):
            flat[q] = u(p[q]) * hw + u(y[q]) * w + u(x[q])
        mx = ux(0)
        for q in range(m):
            mx = max(mx, ux(x[q]))
        my = uy(0)
        for q in range(m):
            my = max(my, uy(y[q]))
        mp = up(0)
        for q in range(m):
            mp = max(mp, up(p[q]))
        bad = np.int64(np.int64(t[0]) < prev)
        for q in range(1, m):
            bad |= np.int64(np.int64(t[q]) < np.int64(t[q - 1]))
        bad |= np.int64(np.uint64(mx) >= min(width, lim_x))
        bad |= np.int64(np.uint64(my) >= min(height, lim_y))
        bad |= np.int64(np.uint64(mp) >= min(np.uint64(2), lim_p))
        return bad == 0

    return impl


@njit(cache=True)
def _count(frame, flat, m):
    """``frame[flat[q]] += 1`` for ``q < m``, without tests (indices already checked)."""
    for q in range(m):
        frame[flat[q]] += 1


@njit(cache=True)
def _add_run(ev, i, stop, first, height, width, out, base):
    """Count events ``[i, stop)`` into the frame at ``out[base:]`` (flat ``[2, H, W]``),
    checking each one first (its order against event ``i - 1`` too, unless ``i == first``).

    Returns ``(status, index)``: ``(_OK, -1)``, or a bad event's status and index (the
    frame is then partly filled and must be discarded).

    Integer columns take a fast path: for each block of ``_BLOCK`` events a vectorised
    pass (``_block_prepare``, exact) computes the flat pixel indices and checks order
    and ranges by branch-free reductions (~0.3-0.45 ns/event, streaming the columns); a
    clean block is then counted from those indices by a loop without tests (~0.5
    ns/event, scattered increments into the frame). The indices are uint16 where
    ``2*H*W <= 2**16`` (DVS128: half the bytes, twice the vector lanes, measured ~7 %
    faster overall), else uint32. A block that fails is counted by the checking loop,
    which stops at its first bad event (order is checked first, as in the event-by-event
    loop). Records take the checking loop throughout.
    """
    if i >= stop:
        return _OK, -1
    # The previous timestamp lives in a register: re-reading t[i - 1] after each store to
    # `out` (which Numba cannot prove distinct from t) made the loop 3x slower.
    prev = _time(ev, i - 1) if i > first else _time(ev, i)
    uh = np.uint64(height)
    uw = np.uint64(width)
    hw = uh * uw
    ubase = np.uint64(base)
    j = np.uint64(i)
    end = np.uint64(stop)
    fast = _has_fast_path(ev) and 2 * hw <= np.uint64(2**32)
    small = 2 * hw <= np.uint64(2**16)
    n_flat = min(_BLOCK, stop - i) if fast else 0
    flat16 = np.empty(n_flat if small else 0, dtype=np.uint16)
    flat32 = np.empty(0 if small else n_flat, dtype=np.uint32)
    frame = out[base : base + 2 * hw]
    while j < end:
        bend = min(j + np.uint64(_BLOCK), end) if fast else end
        if fast:
            if small:
                clean = _block_prepare(ev, j, bend, prev, uh, uw, flat16)
            else:
                clean = _block_prepare(ev, j, bend, prev, uh, uw, flat32)
            if clean:
                if small:
                    _count(frame, flat16, bend - j)
                else:
                    _count(frame, flat32, bend - j)
                prev = _time(ev, bend - _U1)
                j = bend
                continue
        while j < bend:
            tj, xv, yv, pv = _event(ev, j)
            st = _event_status(tj < prev, xv, yv, pv, uh, uw)
            if st != _OK:
                return st, np.int64(j)
            prev = tj
            out[ubase + pv * hw + yv * uw + xv] += 1
            j += _U1
    return _OK, -1


@njit(cache=True)
def _lower_bound(ev, i, hi, value):
    """First index in ``[i, hi)`` with ``t >= value`` (``hi`` if none), by bisection.

    On unsorted input the result is some index in ``[i, hi]``; the runs between such
    bounds still cover the stream, so ``_add_run`` reports the disorder.
    """
    while i < hi:
        mid = (i + hi) // 2
        if _time(ev, mid) < value:
            i = mid + 1
        else:
            hi = mid
    return i


@njit(cache=True)
def _fixed_count_steps(ev, lo, hi, n_frames, by_time, overlap):
    """Bin stride (µs for ``by_time``, else events) and overlap extension of one stream."""
    if by_time:
        step = (_time(ev, hi - 1) - _time(ev, lo)) // n_frames if hi > lo else np.int64(0)
    else:
        step = np.int64((hi - lo) // n_frames)
    extend = np.int64(np.rint(overlap * step))
    return step, extend


# Output frames arrive uninitialised (np.empty) and each kernel zeroes frame k right
# before counting into it: the frame is then cache-hot for the random increments, which
# measured 20 % faster than np.zeros of all T frames up front (whose first lines are
# evicted again by the time they are counted into). A kernel that stops on a bad event
# leaves later frames uninitialised; callers then discard the array.


@njit(cache=True)
def _bin_by_index(ev, lo, hi, n_frames, step, extend, height, width, out, base):
    """Frame k <- events ``lo + [k*step, (k+1)*step + extend)``; the last frame runs to hi.

    The ranges cover ``[lo, hi)`` and every event is checked against its predecessor,
    so an unsorted stream is always reported. Returns ``(status, index)``.
    """
    fsize = 2 * height * width
    for k in range(n_frames):
        s = lo + k * step
        e = hi if k == n_frames - 1 else min(s + step + extend, hi)
        fb = base + k * fsize
        out[fb : fb + fsize] = 0
        st, j = _add_run(ev, s, e, lo, height, width, out, fb)
        if st != _OK:
            return st, j
    return _OK, -1


@njit(cache=True)
def _bin_by_time(ev, lo, hi, n_frames, step, extend, height, width, out, base):
    """Frame k <- events with ``t0 + k*step <= t < t0 + (k+1)*step + extend`` (t0 = t[lo]);
    the last frame runs to hi.

    Not O(N*T): each bin edge is found by bisection (O(T log N)), then the events between
    edges are counted exactly like ``_bin_by_index`` (one pass, no per-event test of t
    against the edge). The runs cover ``[lo, hi)``, so an unsorted stream is reported.
    """
    fsize = 2 * height * width
    t0 = _time(ev, lo) if hi > lo else np.int64(0)
    i = lo
    for k in range(n_frames):
        fb = base + k * fsize
        out[fb : fb + fsize] = 0
        if k == n_frames - 1:
            return _add_run(ev, i, hi, lo, height, width, out, fb)
        edge = t0 + (k + 1) * step
        j = _lower_bound(ev, i, hi, edge)
        st, bad = _add_run(ev, i, j, lo, height, width, out, fb)
        if st != _OK:
            return st, bad
        if extend > 0:
            st, bad = _add_run(
                ev, j, _lower_bound(ev, j, hi, edge + extend), lo, height, width, out, fb
            )
            if st != _OK:
                return st, bad
        i = j
    return _OK, -1


@njit(cache=True)
def _bin_fixed_count(ev, n_frames, by_time, overlap, height, width, out):
    """One stream, ``n_frames`` mode, into flat ``out`` [T*2*H*W] -> (status, index)."""
    hi = _n_events(ev)
    step, extend = _fixed_count_steps(ev, 0, hi, n_frames, by_time, overlap)
    if by_time:
        return _bin_by_time(ev, 0, hi, n_frames, step, extend, height, width, out, 0)
    return _bin_by_index(ev, 0, hi, n_frames, step, extend, height, width, out, 0)


@njit(cache=True, parallel=True)
def _bin_fixed_count_batch(
    ev, offsets, n_frames, by_time, overlap, height, width, out, status, where
):
    """Streams ``offsets[b]:offsets[b+1]`` of the concatenated ``ev``, in parallel, into
    flat ``out`` [B*T*2*H*W] (uninitialised); per stream ``status[b]`` and absolute
    event ``where[b]``."""
    n_streams = offsets.shape[0] - 1
    stream_size = n_frames * 2 * height * width
    for b in prange(n_streams):
        lo = offsets[b]
        hi = offsets[b + 1]
        base = b * stream_size
        step, extend = _fixed_count_steps(ev, lo, hi, n_frames, by_time, overlap)
        if by_time:
            st, j = _bin_by_time(ev, lo, hi, n_frames, step, extend, height, width, out, base)
        else:
            st, j = _bin_by_index(ev, lo, hi, n_frames, step, extend, height, width, out, base)
        status[b] = st
        where[b] = j


@njit(cache=True)
def _bin_ranges(ev, starts, ends, height, width, out):
    """Frame k <- events ``[starts[k], ends[k])`` (ranges may overlap) -> (status, index)."""
    fsize = 2 * height * width
    for k in range(starts.shape[0]):
        out[k * fsize : (k + 1) * fsize] = 0
        st, j = _add_run(ev, starts[k], ends[k], 0, height, width, out, k * fsize)
        if st != _OK:
            return st, j
    return _OK, -1


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class _Spec:
    """A validated binning mode (see the module docstring)."""

    mode: str  # "number" | "time" | "duration" | "time_window" | "event_count"
    size: int  # n_frames, duration (µs), time_window (µs) or event_count
    overlap: float | int = 0  # fraction (number/time) or µs / events (windows)
    include_incomplete: bool = False

    @property
    def fixed_count(self) -> bool:
        return self.mode in ("number", "time")


def _whole(value, name: str) -> int:
    """``value`` as an int; integral floats (``1e4``) are accepted, others raise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def _positive(value, name: str) -> int:
    v = _whole(value, name)
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


def _make_spec(
    n_frames, split_by, time_window, event_count, duration, overlap, include_incomplete
) -> _Spec:
    given = {
        "n_frames": n_frames,
        "time_window": time_window,
        "event_count": event_count,
        "duration": duration,
    }
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise ValueError(
            "pass exactly one of n_frames, time_window, event_count, duration "
            f"(got {', '.join(chosen) if chosen else 'none'})"
        )
    name = chosen[0]
    size = _positive(given[name], name)
    if split_by is not None and name != "n_frames":
        raise ValueError(f"split_by applies to n_frames only, not to {name}")
    if include_incomplete and name not in ("time_window", "event_count"):
        raise ValueError(f"include_incomplete applies to time_window and event_count, not {name}")
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real):
        raise TypeError(f"overlap must be a number, got {overlap!r}")
    if name == "n_frames":
        split_by = "number" if split_by is None else split_by
        if split_by not in ("number", "time"):
            raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
        ov = float(overlap)
        if not 0.0 <= ov < 1.0:
            raise ValueError(
                f"overlap with n_frames is a fraction of a bin in [0, 1), got {overlap!r}"
            )
        return _Spec(split_by, size, ov)
    if name == "duration":
        if overlap != 0:
            raise ValueError("overlap is not supported with duration; use time_window")
        return _Spec("duration", size)
    unit = "µs" if name == "time_window" else "events"
    ov = _whole(overlap, "overlap")
    if not 0 <= ov < size:
        raise ValueError(f"overlap must be in [0, {name}={size}) {unit}, got {ov}")
    return _Spec(name, size, ov, bool(include_incomplete))


def _frame_size(height, width) -> tuple[int, int]:
    return _positive(height, "height"), _positive(width, "width")


# --------------------------------------------------------------------------- bin edges


def _frame_ranges(t: np.ndarray, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """Event index ranges ``[starts[k], ends[k])`` of every frame of a *sorted* stream.

    The plain NumPy statement of each mode's rule (see the module docstring); the
    reference implementation and the window modes use it.
    """
    t = np.asarray(t, dtype=np.int64)  # int64 edges meet int64 times (no copy if so)
    n = int(t.shape[0])
    if n == 0:
        count = spec.size if spec.fixed_count else 1
        z = np.zeros(count, dtype=np.int64)
        return z, z.copy()
    t0, span = int(t[0]), int(t[-1]) - int(t[0])
    k = np.arange(spec.size if spec.fixed_count else 0, dtype=np.int64)
    if spec.mode == "number":
        di = n // spec.size
        ext = int(np.rint(spec.overlap * di))
        starts = k * di
        ends = np.minimum(starts + di + ext, n)
        ends[-1] = n
    elif spec.mode == "time":
        dt = span // spec.size
        ext = int(np.rint(spec.overlap * dt))
        starts = np.searchsorted(t, t0 + k * dt, side="left")
        ends = np.searchsorted(t, t0 + (k + 1) * dt + ext, side="left")
        ends[-1] = n
    elif spec.mode == "duration":
        count = max(1, -(-span // spec.size))
        k = np.arange(count, dtype=np.int64)
        starts = np.searchsorted(t, t0 + k * spec.size, side="left")
        ends = np.searchsorted(t, t0 + (k + 1) * spec.size, side="left")
        ends[-1] = n
    elif spec.mode == "time_window":
        stride = spec.size - spec.overlap
        # complete windows end by t_last; with include_incomplete, the fewest that hold t_last
        extra = 2 if spec.include_incomplete else 1
        count = max(1, (span - spec.size) // stride + extra)
        k = np.arange(count, dtype=np.int64)
        starts = np.searchsorted(t, t0 + k * stride, side="left")
        ends = np.searchsorted(t, t0 + k * stride + spec.size, side="left")
    elif spec.mode == "event_count":
        stride = spec.size - spec.overlap
        room = n - min(spec.size, n)
        count = (-(-room // stride) if spec.include_incomplete else room // stride) + 1
        starts = np.arange(count, dtype=np.int64) * stride
        ends = np.minimum(starts + spec.size, n)
    else:  # pragma: no cover - _make_spec admits no other mode
        raise AssertionError(spec.mode)
    return starts.astype(np.int64), ends.astype(np.int64)


# --------------------------------------------------------------------------- one stream


def _stream(events, name: str):
    """``(ev, cols)`` of one stream: what the kernels take, and the four field arrays.

    ``ev`` is the structured array itself when its fields are all numeric (Numba reads
    its records directly), else the tuple of columns.
    """
    c = columns(events, name=name)
    cols = tuple(c)
    if isinstance(events, np.ndarray) and all(
        events.dtype[f].kind in "biuf" and events.dtype[f].isnative for f in events.dtype.names
    ):
        return events, cols
    cols = _native(cols)
    return cols, cols


def _native(cols: tuple) -> tuple:
    # Numba reads native byte order only (AEDAT 2.0 is big-endian): convert such
    # columns (a copy), leave the others as they are.
    return tuple(c if c.dtype.isnative else c.astype(c.dtype.newbyteorder("=")) for c in cols)


def _take(ev, cols, index):
    """``(ev, cols)`` of the events at ``index`` (a view for a slice, else a copy)."""
    if isinstance(ev, np.ndarray):
        ev = ev[index]
        return ev, (ev["t"], ev["x"], ev["y"], ev["p"])
    cols = tuple(c[index] for c in cols)
    return cols, cols


_FIELD_OF_STATUS = {_BAD_X: 1, _BAD_Y: 2, _BAD_P: 3}


def _value_error(status: int, value: int, index: int, height: int, width: int, name: str):
    """The ValueError for a bad ``x``/``y``/``p`` value at (original) event ``index``."""
    if status == _BAD_X:
        what = f"is outside [0, width={width}); pass the sensor width or crop the events first"
        field = "x"
    elif status == _BAD_Y:
        what = f"is outside [0, height={height}); pass the sensor height or crop the events first"
        field = "y"
    else:
        what = (
            "is not a polarity (expected 0 = OFF or 1 = ON); "
            "map other encodings first, e.g. p = (p > 0)"
        )
        field = "p"
    return ValueError(f"{name}: field {field!r} = {value} at event index {index} {what}")


def _bin_stream(ev, cols, spec: _Spec, height: int, width: int, name: str) -> np.ndarray:
    """Bin one stream (see ``_stream``); sort once if a kernel reports disorder; raise on
    bad values, naming the event by its index in the stream as given."""
    order = None
    while True:
        n = cols[0].shape[0]
        if spec.fixed_count:
            frames = np.empty((spec.size, 2, height, width), dtype=count_dtype(n))
            flat = frames.reshape(-1)
            by_time = spec.mode == "time"
            status, index = _bin_fixed_count(
                ev, spec.size, by_time, spec.overlap, height, width, flat
            )
        else:
            # The frame count depends on t_last - t0, only meaningful for a sorted
            # stream: check every event before allocating.
            status, index = _scan(ev, height, width)
            if status == _OK:
                starts, ends = _frame_ranges(cols[0], spec)
                frames = np.empty((starts.shape[0], 2, height, width), count_dtype(n))
                flat = frames.reshape(-1)
                status, index = _bin_ranges(ev, starts, ends, height, width, flat)
        if status == _OK:
            return frames
        if status == _UNSORTED and order is None:
            order = np.argsort(cols[0], kind="stable")
            ev, cols = _take(ev, cols, order)
            continue
        value = int(cols[_FIELD_OF_STATUS[status]][index])
        original = int(index if order is None else order[index])
        raise _value_error(status, value, original, height, width, name)


def to_frames(
    events: np.ndarray | Mapping[str, np.ndarray],
    n_frames: int | None = None,
    split_by: str | None = None,
    height: int = 128,
    width: int = 128,
    *,
    time_window: int | None = None,
    event_count: int | None = None,
    duration: int | None = None,
    overlap: float = 0,
    include_incomplete: bool = False,
) -> np.ndarray:
    """Bin one event stream into count frames ``[T, 2, height, width]``.

    Args:
        events: structured array of ``EVENT_DTYPE`` (fields t µs, x, y, p) or a mapping
            ``{"t", "x", "y", "p"}`` of equal-length 1-D integer arrays. Sorted by t
            (unsorted input is stably sorted first, a copy).
        n_frames: T, a fixed number of frames, split by ``split_by``: ``"number"``
            (default; equal event counts, the last frame takes the remainder) or
            ``"time"`` (equal durations ``(t_last - t0) // T`` µs, the last frame runs
            to the end). Equal to spikingjelly's ``integrate_events_by_fixed_frames_number``.
        height, width: frame size; ``y`` must lie in ``[0, height)``, ``x`` in ``[0, width)``.
        time_window: window length in µs (tonic's ``time_window``); T depends on the span.
        event_count: events per window (tonic's ``event_count``); T depends on N.
        duration: frame length in µs, ``max(1, ceil(span / duration))`` frames, the last
            one running to the end (spikingjelly's fixed-duration integration).
        overlap: with ``n_frames`` a fraction of a bin in [0, 1) by which each bin but
            the last is extended; with ``time_window`` µs, with ``event_count`` events
            shared by consecutive windows (an integer below the window).
        include_incomplete: with ``time_window`` / ``event_count``, add the last,
            partial window so that every event is binned.

    Pass exactly one of ``n_frames``, ``time_window``, ``event_count``, ``duration``.
    The module docstring states every rule and the differences from tonic/spikingjelly.

    Returns:
        ``[T, 2, height, width]`` counts; channel 0 = OFF (p = 0), 1 = ON (p = 1);
        dtype ``count_dtype(N)`` (int32 unless N >= 2**31).

    Raises:
        ValueError / TypeError: bad arguments (named), or an event with ``x``, ``y`` or
        ``p`` out of range (field, value and index named).
    """
    spec = _make_spec(
        n_frames, split_by, time_window, event_count, duration, overlap, include_incomplete
    )
    height, width = _frame_size(height, width)
    ev, cols = _stream(events, "events")
    return _bin_stream(ev, cols, spec, height, width, "events")


# --------------------------------------------------------------------------- many streams


def to_frames_batch(
    streams: Sequence[np.ndarray | Mapping[str, np.ndarray]] | np.ndarray | Mapping,
    n_frames: int,
    split_by: str | None = None,
    height: int = 128,
    width: int = 128,
    *,
    overlap: float = 0,
    offsets: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Bin B streams into ``[B, T, 2, height, width]`` counts, streams in parallel.

    ``streams`` is either a sequence of event streams (structured arrays or mappings,
    as for ``to_frames``), or, with ``offsets``, ONE stream holding the concatenated
    columns of all of them: stream ``b`` is events ``offsets[b]:offsets[b + 1]``
    (``offsets``: int [B + 1], non-decreasing, ``offsets[0] = 0``, ``offsets[-1] = N``;
    the layout of the dataset cache). Every stream is binned exactly as
    ``to_frames(stream, n_frames, split_by, height, width, overlap=overlap)`` would
    (only the fixed-count modes give every stream the same T); the dtype is
    ``count_dtype`` of the longest stream. Numba runs one stream per thread (``prange``;
    ``numba.set_num_threads`` sets how many); a sequence of streams is first
    concatenated into columns (one copy), the offsets form is read in place.

    Errors name the stream (``streams[b]``) and the event index within it.
    """
    spec = _make_spec(n_frames, split_by, None, None, None, overlap, False)
    height, width = _frame_size(height, width)
    if offsets is None:
        if isinstance(streams, (np.ndarray, Mapping)) or not isinstance(streams, Sequence):
            raise TypeError(
                "streams: expected a sequence of event streams; for one concatenated "
                "stream pass offsets= as well"
            )
        per_stream = [columns(s, name=f"streams[{b}]") for b, s in enumerate(streams)]
        lengths = np.array([c.n_events for c in per_stream], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # one copy into contiguous columns (np.concatenate of structured arrays measured
        # 5x slower than gathering the four fields)
        if per_stream:
            ev = cols = _native(tuple(np.concatenate([c[f] for c in per_stream]) for f in range(4)))
        else:
            ev = cols = tuple(np.zeros(0, dtype=np.int64) for _ in range(4))
    else:
        ev, cols = _stream(streams, "streams")
        offsets = _check_offsets(offsets, len(cols[0]))

    n_streams = offsets.shape[0] - 1
    longest = int(np.max(np.diff(offsets))) if n_streams else 0
    frames = np.empty((n_streams, spec.size, 2, height, width), dtype=count_dtype(longest))
    status = np.zeros(n_streams, dtype=np.int64)
    where = np.zeros(n_streams, dtype=np.int64)
    if n_streams:
        by_time = spec.mode == "time"
        _bin_fixed_count_batch(
            ev, offsets, spec.size, by_time, spec.overlap, height, width,
            frames.reshape(-1), status, where,
        )  # fmt: skip
    for b in np.flatnonzero(status):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        name = f"streams[{b}]"
        if status[b] != _UNSORTED:
            field = cols[_FIELD_OF_STATUS[int(status[b])]]
            raise _value_error(
                int(status[b]), int(field[where[b]]), int(where[b]) - lo, height, width, name
            )
        # rare: this stream is unsorted; bin it alone (sorted, re-checked)
        frames[b] = _bin_stream(*_take(ev, cols, slice(lo, hi)), spec, height, width, name)
    return frames


def _check_offsets(offsets, n_events: int) -> np.ndarray:
    off = np.asarray(offsets)
    if off.ndim != 1 or off.shape[0] < 1 or not np.issubdtype(off.dtype, np.integer):
        raise ValueError(
            f"offsets: expected a 1-D integer array [B + 1], got shape {off.shape} {off.dtype}"
        )
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != n_events:
        raise ValueError(
            f"offsets: must start at 0 and end at the number of events {n_events}, "
            f"got {int(off[0])} .. {int(off[-1])}"
        )
    if np.any(np.diff(off) < 0):
        b = int(np.flatnonzero(np.diff(off) < 0)[0])
        raise ValueError(f"offsets: decrease at index {b} ({int(off[b])} > {int(off[b + 1])})")
    return off


# --------------------------------------------------------------------------- reference


def _to_frames_reference(
    events,
    n_frames: int | None = None,
    split_by: str | None = None,
    height: int = 128,
    width: int = 128,
    *,
    time_window: int | None = None,
    event_count: int | None = None,
    duration: int | None = None,
    overlap: float = 0,
    include_incomplete: bool = False,
) -> np.ndarray:
    """Plain NumPy ``to_frames`` (np.add.at per frame): what the tests hold the kernels to."""
    spec = _make_spec(
        n_frames, split_by, time_window, event_count, duration, overlap, include_incomplete
    )
    height, width = _frame_size(height, width)
    t, x, y, p = (np.asarray(c).astype(np.int64) for c in columns(events))
    order = np.argsort(t, kind="stable")
    t, x, y, p = t[order], x[order], y[order], p[order]
    for field, values, bound in (("x", x, width), ("y", y, height), ("p", p, 2)):
        bad = np.flatnonzero((values < 0) | (values >= bound))
        if bad.size:
            raise ValueError(f"field {field!r} = {values[bad[0]]} out of range")
    starts, ends = _frame_ranges(t, spec)
    frames = np.zeros((starts.shape[0], 2, height, width), dtype=np.int64)
    for k, (s, e) in enumerate(zip(starts, ends)):
        np.add.at(frames[k], (p[s:e], y[s:e], x[s:e]), 1)
    return frames.astype(count_dtype(t.shape[0]))
