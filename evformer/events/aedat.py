"""AEDAT 3.1 (DVS128 Gesture) and AEDAT 2.0 (CIFAR10-DVS) readers and writers.

Readers return a structured array of ``EVENT_DTYPE`` (``t`` int64 µs, ``x``/``y``
int16 sensor column/row, ``p`` int8 with 0 = OFF, 1 = ON) sorted by ``t``, in
SENSOR coordinates of the DVS128 (128 x 128): no flipping or transposing here.
Dataset code applies any orientation convention (e.g. spikingjelly's for
CIFAR10-DVS) on top.

Every malformed file raises ``AedatError`` (a ``ValueError``) naming the file,
the byte offset and what is wrong; nothing is silently dropped except what the
format itself marks as droppable (AEDAT 3.1 events without the valid bit,
packets that do not hold polarity events).

Decoding is done by Numba kernels (``backend="numba"``, the default). A plain
NumPy implementation of the same rules (``backend="numpy"``) is the reference the
tests compare against, error for error.

Timestamp order policy (both formats): files are expected to be time ordered.
With ``on_unsorted="sort"`` (default) a stream whose timestamps ever decrease is
stably sorted by ``t`` (events with equal ``t`` keep their file order; no event
is dropped); with ``on_unsorted="raise"`` the reader raises ``AedatError`` at the
first event whose timestamp is smaller than its predecessor's.
Real DVS recordings are monotonic apart from the counter wrap (unwrapped here)
and small back-steps between USB packets. A sort that moves any event further
than ``UNSORTED_JITTER_US`` is repairing corruption (one flipped high bit throws
an event 2**k µs away, and the sort then stretches a 2 s sample to 36 min), so
the reader warns (``UnsortedEventsWarning``, with the count and the largest
displacement) instead of sorting silently. An event's displacement is measured
against a longest time-ordered subsequence of the file (the events the sort
leaves in relative order): how far its timestamp lies outside the interval
spanned by its kept neighbours; the events outside that subsequence are the
ones the sort moves.

Writers produce real files of either format (used by tests and benchmarks) and
write atomically (``evformer._atomic``: a temporary file in the target directory,
fsync, rename).
"""

from __future__ import annotations

import os
import struct
import warnings
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from numba import njit

from evformer._atomic import atomic_write_bytes
from evformer.events.core import EVENT_DTYPE, columns, empty_events, sort_events

__all__ = [
    "AedatError",
    "UnsortedEventsWarning",
    "UNSORTED_JITTER_US",
    "read_aedat",
    "read_aedat31",
    "read_aedat2",
    "write_aedat31",
    "write_aedat2",
]

DVS128_WIDTH = 128
DVS128_HEIGHT = 128

_V31 = b"#!AER-DAT3.1"
_V20 = b"#!AER-DAT2.0"
_END_HEADER = b"#!END-HEADER"
# A header larger than this is not a header (real ones are < 1 KiB): stop looking.
_MAX_HEADER = 1 << 20

# AEDAT 3.1 packet header: eventType, eventSource, eventSize, eventTSOffset,
# eventTSOverflow, eventCapacity, eventNumber, eventValid.
_PACKET_HEADER = struct.Struct("<hhiiiiii")
_PH = _PACKET_HEADER.size  # 28
_POLARITY_TYPE = 1
_POLARITY_SIZE = 8
_TS_OFFSET = 4
_SPECIAL_TYPE = 0
_IMU6_TYPE = 3
_IMU6_SIZE = 36

_UNSORTED_POLICIES = ("sort", "raise")

# Plausible timestamp jitter (µs): the largest displacement the "sort" policy repairs
# silently. DVS128 recordings step back by well under a millisecond between USB
# packets; 5 ms leaves a wide margin, while a flipped timestamp bit of weight
# 2**13 µs (8 ms) or more is reported.
UNSORTED_JITTER_US = 5_000
_BACKENDS = ("numba", "numpy")

# Error codes shared by the Numba kernels and the NumPy reference; one place
# (_raise_code) turns them into messages so both backends fail identically.
_OK = 0
_E_TRUNC_HEADER = 1
_E_COUNTS = 2
_E_NEG_SIZE = 3
_E_POL_SIZE = 4
_E_POL_TSOFFSET = 5
_E_NEG_OVERFLOW = 6
_E_TRUNC_BODY = 7
_E_XY_RANGE = 8
_E_NEG_TS = 9
_E_TRUNC_RECORD = 20
_E_DAVIS_ADDR = 21

_WRAP32 = 1 << 32
_HALF32 = 1 << 31


class AedatError(ValueError):
    """A file that is not a well-formed AEDAT recording of the kind asked for.

    ``path`` is the file, ``offset`` the byte offset where the problem was found,
    ``reason`` what is wrong (and what to do, where there is something to do).
    """

    def __init__(self, path: str | os.PathLike, offset: int, reason: str):
        self.path = str(path)
        self.offset = int(offset)
        self.reason = reason
        super().__init__(f"{self.path}: at byte offset {self.offset}: {reason}")

    def __reduce__(self):
        # DataLoader workers pickle exceptions; rebuild from the three fields.
        return (type(self), (self.path, self.offset, self.reason))


class UnsortedEventsWarning(UserWarning):
    """Sorting a file's events moved some further than ``UNSORTED_JITTER_US`` µs.

    ``path`` is the file, ``n_events`` how many events lie more than the jitter
    bound out of place, ``max_displacement_us`` the largest displacement and
    ``event_index`` that event's position among the file's polarity events.
    The stream is still returned sorted with every event: turn the warning into
    an error (``warnings.simplefilter("error", UnsortedEventsWarning)``) or read
    with ``on_unsorted="raise"`` to refuse such files.
    """

    def __init__(
        self, path: str | os.PathLike, n_events: int, max_displacement_us: int, event_index: int
    ):
        self.path = str(path)
        self.n_events = int(n_events)
        self.max_displacement_us = int(max_displacement_us)
        self.event_index = int(event_index)
        s = "" if self.n_events == 1 else "s"
        super().__init__(
            f"{self.path}: timestamps out of order by more than the plausible jitter of "
            f"{UNSORTED_JITTER_US} µs: sorting moved {self.n_events} event{s} that far, the "
            f"furthest (event {self.event_index} in file order) by "
            f"{self.max_displacement_us} µs; the file is probably corrupt (e.g. a flipped "
            f"timestamp bit). The events are returned sorted; pass on_unsorted='raise' to "
            f"refuse such files"
        )

    def __reduce__(self):
        return (type(self), (self.path, self.n_events, self.max_displacement_us, self.event_index))


# --------------------------------------------------------------------------- headers


def _load(path: str | os.PathLike) -> np.ndarray:
    """The whole file as a 1-D uint8 array (one read; kernels index into it)."""
    return np.fromfile(os.fspath(path), dtype=np.uint8)


def _first_line(buf: np.ndarray) -> bytes:
    head = buf[:256].tobytes()
    nl = head.find(b"\n")
    return (head if nl < 0 else head[:nl]).rstrip(b"\r")


def _detect_version(buf: np.ndarray, path) -> str:
    line = _first_line(buf)
    if line == _V31:
        return "3.1"
    if line == _V20:
        return "2.0"
    shown = line[:40].decode("latin-1")
    if line.startswith(b"#!AER-DAT"):
        raise AedatError(
            path,
            0,
            f"unknown or unsupported AEDAT version header {shown!r}: evformer reads "
            f"'#!AER-DAT3.1' (DVS128 Gesture) and '#!AER-DAT2.0' (CIFAR10-DVS) files; "
            f"convert AEDAT 4 files with the iniVation dv tools",
        )
    raise AedatError(
        path,
        0,
        f"missing AEDAT header: the file starts with {shown!r}, not '#!AER-DAT3.1' or "
        f"'#!AER-DAT2.0'; is this an AEDAT recording?",
    )


def _require_version(buf: np.ndarray, path, want: str) -> None:
    got = _detect_version(buf, path)
    if got != want:
        other = {"3.1": "read_aedat31", "2.0": "read_aedat2"}[got]
        raise AedatError(
            path,
            0,
            f"this is an AEDAT {got} file, not AEDAT {want}: read it with {other}() "
            f"or read_aedat(), which detects the version",
        )


def _header31(buf: np.ndarray, path) -> tuple[int, list[str]]:
    """Parse the AEDAT 3.1 text header; returns (data start offset, header lines).

    Lines start with '#' and end with '\\r\\n' (a bare '\\n' is tolerated); the last
    one is '#!END-HEADER'.
    """
    # Real headers take a few hundred bytes: look at 4 KiB first, at most 1 MiB.
    for limit in (4096, _MAX_HEADER):
        head = buf[:limit].tobytes()
        pos = 0
        lines: list[str] = []
        while pos < len(head) and head[pos : pos + 1] == b"#":
            nl = head.find(b"\n", pos)
            if nl < 0:
                break
            line = head[pos:nl].rstrip(b"\r")
            lines.append(line.decode("latin-1"))
            pos = nl + 1
            if line == _END_HEADER:
                return pos, lines
        if len(head) < limit or (pos < len(head) and head[pos : pos + 1] != b"#"):
            break  # the whole file was seen, or a line does not start with '#'
    if pos < len(head) and head[pos : pos + 1] != b"#":
        what = "a header line does not start with '#'"
    elif pos < len(head):
        what = "a header line has no line end"
    elif len(head) < _MAX_HEADER:
        what = f"the file ends (size {len(head)} bytes)"
    else:
        what = f"the first {_MAX_HEADER} bytes end"
    raise AedatError(
        path,
        pos,
        f"AEDAT 3.1 header is not terminated: {what} before the '#!END-HEADER' "
        f"line; the file is truncated or not AEDAT 3.1",
    )


def _header2(buf: np.ndarray, path) -> tuple[int, list[str]]:
    """Parse the AEDAT 2.0 header: every line starting with '#' up to the first that does not.

    DVS128 addresses fit in 15 bits, so the first (big-endian) data byte is 0 and
    cannot be mistaken for a '#'.
    """
    for limit in (4096, _MAX_HEADER):  # look at 4 KiB first, at most 1 MiB
        head = buf[:limit].tobytes()
        whole = len(head) < limit  # the prefix is the whole file
        pos = 0
        lines: list[str] = []
        while pos < len(head) and head[pos : pos + 1] == b"#":
            nl = head.find(b"\n", pos)
            if nl < 0:
                if not whole:
                    break  # the line runs past the prefix: look further
                # Header only, last line unterminated: no data follows.
                lines.append(head[pos:].rstrip(b"\r").decode("latin-1"))
                return len(head), lines
            lines.append(head[pos:nl].rstrip(b"\r").decode("latin-1"))
            pos = nl + 1
        else:
            if whole or pos < len(head):
                return pos, lines
    raise AedatError(path, pos, f"AEDAT 2.0 header longer than {_MAX_HEADER} bytes")


def _sources(lines: Sequence[str]) -> str:
    """The '#Source N: NAME' names of an AEDAT 3.1 header, for error messages."""
    # "#Source 1: DVS128"; a damaged line without the colon is named as it stands
    names = [ln.partition(":")[2].strip() or ln for ln in lines if ln.startswith("#Source")]
    return ", ".join(repr(n) for n in names) if names else "none declared"


def _raise_code(path, code: int, offset: int, a: int, b: int, sources: str = "") -> None:
    """Turn a kernel error code into the AedatError both backends raise."""
    if code == _E_TRUNC_HEADER:
        why = (
            f"truncated AEDAT 3.1 packet header: {a} bytes left where a 28-byte packet "
            f"header starts; the file is cut short (re-copy or re-download it)"
        )
    elif code == _E_COUNTS:
        why = (
            f"corrupt packet header: eventCapacity={a}, eventNumber={b} (need "
            f"0 <= eventNumber <= eventCapacity)"
        )
    elif code == _E_NEG_SIZE:
        why = f"corrupt packet header: negative eventSize={a}"
    elif code == _E_POL_SIZE:
        why = f"polarity packet declares eventSize={a}; AEDAT 3.1 polarity events are 8 bytes"
    elif code == _E_POL_TSOFFSET:
        why = f"polarity packet declares eventTSOffset={a}; AEDAT 3.1 polarity events use 4"
    elif code == _E_NEG_OVERFLOW:
        why = f"corrupt packet header: negative eventTSOverflow={a}"
    elif code == _E_TRUNC_BODY:
        why = (
            f"truncated packet body: the packet header declares {a} bytes of events "
            f"(eventCapacity * eventSize) but only {b} bytes remain; the file is cut short"
        )
    elif code == _E_XY_RANGE:
        why = (
            f"polarity event decodes to x={a}, y={b}, outside the DVS128 sensor "
            f"({DVS128_WIDTH}x{DVS128_HEIGHT}): the recording is not from a DVS128 "
            f"(header sources: {sources}); evformer's AEDAT 3.1 reader decodes DVS128 "
            f"recordings (DVS128 Gesture) only"
        )
    elif code == _E_NEG_TS:
        why = f"polarity event has a negative timestamp {a}; AEDAT 3.1 timestamps are 31-bit"
    elif code == _E_TRUNC_RECORD:
        why = (
            f"truncated record: {a} trailing bytes do not make a whole 8-byte AEDAT 2.0 "
            f"record; the file is cut short (re-copy or re-download it)"
        )
    elif code == _E_DAVIS_ADDR:
        why = (
            f"address 0x{a:08x} has bits above bit 15 set, impossible for a DVS128 "
            f"(bit 0 polarity, bits 1-7 x, bits 8-14 y, bit 15 special event); the file "
            f"looks like a DAVIS "
            f"recording (bit 31 APS/IMU flag, x = bits 12-21 = {(a >> 12) & 0x3FF}, "
            f"y = bits 22-30 = {(a >> 22) & 0x1FF}), which this reader does not decode"
        )
    else:  # pragma: no cover - a code without a message is a bug here, not in the file
        raise AssertionError(f"unknown AEDAT error code {code}")
    raise AedatError(path, offset, why)


def _check_options(on_unsorted: str, backend: str) -> None:
    if on_unsorted not in _UNSORTED_POLICIES:
        raise ValueError(f"on_unsorted must be one of {_UNSORTED_POLICIES}, got {on_unsorted!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


@njit(cache=True)
def _longest_sorted_nb(t):
    """Mask of a longest non-decreasing subsequence of ``t`` [N] (patience sorting, O(N log N)).

    ``tails[L]`` is the index of the smallest last element of a subsequence of length
    L + 1 found so far; ``prev`` links each element to its predecessor.
    """
    n = t.shape[0]
    keep = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return keep
    tails = np.empty(n, dtype=np.int64)
    prev = np.empty(n, dtype=np.int64)
    length = 0
    for i in range(n):
        lo = 0
        hi = length
        while lo < hi:  # first length whose tail is > t[i] (bisect_right)
            mid = (lo + hi) // 2
            if t[tails[mid]] <= t[i]:
                lo = mid + 1
            else:
                hi = mid
        prev[i] = tails[lo - 1] if lo > 0 else -1
        tails[lo] = i
        if lo == length:
            length += 1
    k = tails[length - 1]
    while k >= 0:
        keep[k] = True
        k = prev[k]
    return keep


def _longest_sorted_reference(t: np.ndarray) -> np.ndarray:
    """Plain-Python reference of ``_longest_sorted_nb`` (same algorithm, same choice)."""
    tail_values: list[int] = []
    tails: list[int] = []
    prev = [-1] * len(t)
    for i, v in enumerate(t.tolist()):
        lo = bisect_right(tail_values, v)
        prev[i] = tails[lo - 1] if lo > 0 else -1
        if lo == len(tails):
            tails.append(i)
            tail_values.append(v)
        else:
            tails[lo] = i
            tail_values[lo] = v
    keep = np.zeros(len(t), dtype=bool)
    k = tails[-1] if tails else -1
    while k >= 0:
        keep[k] = True
        k = prev[k]
    return keep


def _displaced(t: np.ndarray, backend: str) -> tuple[int, int, int]:
    """How far sorting ``t`` [N] (µs, file order) moves events in time.

    Returns (number of events displaced by more than ``UNSORTED_JITTER_US``, the
    largest displacement in µs, its index), or (0, 0, -1) when no event lies more
    than the bound behind an earlier one. The sort keeps a longest non-decreasing
    subsequence in relative order and moves the rest; a moved event's displacement
    is how far its ``t`` lies outside ``[previous kept t, next kept t]``.
    """
    if t.shape[0] < 2:
        return 0, 0, -1
    # Fast path, O(N): no displacement exceeds the largest lag behind the running
    # maximum, so a stream with only small back-steps needs no subsequence.
    if int((np.maximum.accumulate(t) - t).max()) <= UNSORTED_JITTER_US:
        return 0, 0, -1
    t = np.ascontiguousarray(t, dtype=np.int64)
    keep = (_longest_sorted_nb if backend == "numba" else _longest_sorted_reference)(t)
    kept_t = t[keep]
    before = np.cumsum(keep) - keep  # kept events before each position
    lo = np.where(before > 0, kept_t[np.maximum(before - 1, 0)], t)  # previous kept t
    after = np.minimum(before, kept_t.size - 1)  # next kept t (a kept event's own)
    hi = np.where(before < kept_t.size, kept_t[after], t)
    disp = np.maximum(lo - t, t - hi)
    i = int(np.argmax(disp))
    return int(np.count_nonzero(disp > UNSORTED_JITTER_US)), int(disp[i]), i


def _finish(
    events: np.ndarray, unsorted_offset: int, path, on_unsorted: str, backend: str
) -> np.ndarray:
    if unsorted_offset < 0:
        return events
    if on_unsorted == "raise":
        raise AedatError(
            path,
            unsorted_offset,
            "event timestamp is smaller than the previous event's (the stream is not "
            "time ordered); pass on_unsorted='sort' to sort it stably",
        )
    n, largest, index = _displaced(events["t"], backend)
    if n:
        # stacklevel: _finish <- read_aedat31/read_aedat2 <- the caller
        warnings.warn(UnsortedEventsWarning(path, n, largest, index), stacklevel=3)
    return sort_events(events)


# --------------------------------------------------------------------------- AEDAT 3.1


@njit(cache=True)
def _u32le(buf, o):
    return (
        np.uint32(buf[o])
        | (np.uint32(buf[o + 1]) << np.uint32(8))
        | (np.uint32(buf[o + 2]) << np.uint32(16))
        | (np.uint32(buf[o + 3]) << np.uint32(24))
    )


@njit(cache=True)
def _i32le(buf, o):
    return np.int64(np.int32(_u32le(buf, o)))


@njit(cache=True)
def _i16le(buf, o):
    return np.int64(np.int16(np.uint16(buf[o]) | (np.uint16(buf[o + 1]) << np.uint16(8))))


@njit(cache=True)
def _walk31_nb(buf, start, offs, nums, ovfs):
    """Walk the AEDAT 3.1 packet headers from ``start``.

    Fills ``offs`` (body byte offset), ``nums`` (eventNumber) and ``ovfs``
    (eventTSOverflow) for the polarity packets with at least one event, as far
    as the arrays reach; returns (err, err_offset, a, b, n_polarity_packets). A
    count larger than the arrays means: call again with arrays that large.
    """
    n = buf.shape[0]
    cap = offs.shape[0]
    k = 0
    pos = np.int64(start)
    while pos < n:
        if n - pos < _PH:
            return _E_TRUNC_HEADER, pos, n - pos, 0, k
        etype = _i16le(buf, pos)
        size = _i32le(buf, pos + 4)
        tsoff = _i32le(buf, pos + 8)
        ovf = _i32le(buf, pos + 12)
        capacity = _i32le(buf, pos + 16)
        number = _i32le(buf, pos + 20)
        if capacity < 0 or number < 0 or number > capacity:
            return _E_COUNTS, pos, capacity, number, k
        if etype == _POLARITY_TYPE:
            if size != _POLARITY_SIZE:
                return _E_POL_SIZE, pos, size, 0, k
            if tsoff != _TS_OFFSET:
                return _E_POL_TSOFFSET, pos, tsoff, 0, k
            if ovf < 0:
                return _E_NEG_OVERFLOW, pos, ovf, 0, k
        elif size < 0:
            return _E_NEG_SIZE, pos, size, 0, k
        body = capacity * size
        left = n - pos - _PH
        if body > left:
            return _E_TRUNC_BODY, pos, body, left, k
        if etype == _POLARITY_TYPE and number > 0:
            if k < cap:
                offs[k] = pos + _PH
                nums[k] = number
                ovfs[k] = ovf
            k += 1
        pos += _PH + body
    return _OK, 0, 0, 0, k


@njit(cache=True)
def _decode31_nb(words, word_offs, nums, ovfs, n_packets, out):
    """Decode the polarity packets found by ``_walk31_nb`` into ``out`` (EVENT_DTYPE).

    ``words`` is the file (or the gathered packet bodies) as little-endian uint32;
    packet ``k`` has ``nums[k]`` events from word ``word_offs[k]`` on, 2 words each
    (data, timestamp). Events without the valid bit are skipped. Returns
    (n_written, err, err_packet, err_event, a, b, unsorted_packet, unsorted_event);
    unsorted_packet = -1 when timestamps never decrease.
    """
    j = 0
    prev = np.int64(-1)
    uk = -1
    ui = -1
    for k in range(n_packets):
        base = word_offs[k]
        hi = ovfs[k] << 31
        for i in range(nums[k]):
            data = words[base + 2 * i]
            if data & np.uint32(1) == 0:
                continue
            xi = np.int64(data >> np.uint32(17))
            yi = np.int64((data >> np.uint32(2)) & np.uint32(0x7FFF))
            if xi >= DVS128_WIDTH or yi >= DVS128_HEIGHT:
                return j, _E_XY_RANGE, k, i, xi, yi, uk, ui
            ts = np.int64(np.int32(words[base + 2 * i + 1]))
            if ts < 0:
                return j, _E_NEG_TS, k, i, ts, 0, uk, ui
            ti = hi | ts
            if ti < prev and uk < 0:
                uk = k
                ui = i
            prev = ti
            out[j].t = ti
            out[j].x = xi
            out[j].y = yi
            out[j].p = (data >> np.uint32(1)) & np.uint32(1)
            j += 1
    return j, _OK, 0, 0, 0, 0, uk, ui


def _walk31_numpy(buf: np.ndarray, start: int):
    """NumPy/Python reference of ``_walk31_nb`` (same checks, same order, same result)."""
    n = buf.shape[0]
    offs, nums, ovfs = [], [], []
    pos = start
    while pos < n:
        if n - pos < _PH:
            return (_E_TRUNC_HEADER, pos, n - pos, 0), offs, nums, ovfs
        etype, _src, size, tsoff, ovf, capacity, number, _valid = _PACKET_HEADER.unpack_from(
            buf, pos
        )
        if capacity < 0 or number < 0 or number > capacity:
            return (_E_COUNTS, pos, capacity, number), offs, nums, ovfs
        if etype == _POLARITY_TYPE:
            if size != _POLARITY_SIZE:
                return (_E_POL_SIZE, pos, size, 0), offs, nums, ovfs
            if tsoff != _TS_OFFSET:
                return (_E_POL_TSOFFSET, pos, tsoff, 0), offs, nums, ovfs
            if ovf < 0:
                return (_E_NEG_OVERFLOW, pos, ovf, 0), offs, nums, ovfs
        elif size < 0:
            return (_E_NEG_SIZE, pos, size, 0), offs, nums, ovfs
        body = capacity * size
        left = n - pos - _PH
        if body > left:
            return (_E_TRUNC_BODY, pos, body, left), offs, nums, ovfs
        if etype == _POLARITY_TYPE and number > 0:
            offs.append(pos + _PH)
            nums.append(number)
            ovfs.append(ovf)
        pos += _PH + body
    return (_OK, 0, 0, 0), offs, nums, ovfs


def _first_unsorted(t: np.ndarray) -> int:
    """Index of the first element smaller than its predecessor, or -1."""
    bad = np.flatnonzero(t[1:] < t[:-1])
    return int(bad[0]) + 1 if bad.size else -1


def _read31_numpy(buf: np.ndarray, start: int, path, sources: str):
    err, offs, nums, ovfs = _walk31_numpy(buf, start)
    if err[0] != _OK:
        _raise_code(path, *err, sources=sources)
    nums = np.asarray(nums, dtype=np.int64)
    total = int(nums.sum())
    if total == 0:
        return empty_events(), -1
    offs = np.asarray(offs, dtype=np.int64)
    packet = np.repeat(np.arange(nums.size), nums)  # packet of each event
    # Byte offset in the file of each event (for error messages).
    ev_off = offs[packet] + 8 * (np.arange(total) - (np.cumsum(nums) - nums)[packet])
    bodies = np.concatenate([buf[o : o + 8 * m] for o, m in zip(offs, nums)])
    words = bodies.view("<u4").reshape(total, 2)  # data, timestamp
    data = words[:, 0]
    ts = words[:, 1].view(np.int32).astype(np.int64)
    valid = (data & 1).astype(bool)
    x = (data >> 17).astype(np.int64)
    y = ((data >> 2) & 0x7FFF).astype(np.int64)
    bad = valid & ((x >= DVS128_WIDTH) | (y >= DVS128_HEIGHT) | (ts < 0))
    if bad.any():
        i = int(np.argmax(bad))
        if x[i] >= DVS128_WIDTH or y[i] >= DVS128_HEIGHT:
            _raise_code(path, _E_XY_RANGE, int(ev_off[i]), int(x[i]), int(y[i]), sources=sources)
        _raise_code(path, _E_NEG_TS, int(ev_off[i]), int(ts[i]), 0)
    t = (np.asarray(ovfs, dtype=np.int64)[packet] << 31) | ts
    out = np.empty(int(valid.sum()), dtype=EVENT_DTYPE)
    out["t"] = t[valid]
    out["x"] = x[valid]
    out["y"] = y[valid]
    out["p"] = (data[valid] >> 1) & 1
    i = _first_unsorted(out["t"])
    return out, (-1 if i < 0 else int(ev_off[valid][i]))


def _read31_numba(buf: np.ndarray, start: int, path, sources: str):
    # Files hold thousands of packets, not millions: small arrays, a second walk if too small.
    cap = 4096
    while True:
        offs, nums, ovfs = (np.empty(cap, np.int64) for _ in range(3))
        err, eoff, a, b, k = _walk31_nb(buf, start, offs, nums, ovfs)
        if err != _OK:
            _raise_code(path, err, eoff, a, b, sources=sources)
        if k <= cap:
            break
        cap = k
    offs, nums, ovfs = offs[:k], nums[:k], ovfs[:k]
    total = int(nums.sum())
    if total == 0:
        return empty_events(), -1
    # Decode through a uint32 view (one load per field instead of four byte loads).
    # Packet bodies normally share one alignment (all event sizes are multiples of
    # 4); a file whose packets do not gets its polarity bodies gathered first.
    rem = int(offs[0]) % 4
    if np.all(offs % 4 == rem):
        words = buf[rem : rem + (buf.shape[0] - rem) // 4 * 4].view("<u4")
        word_offs = (offs - rem) // 4
    else:
        words = np.concatenate([buf[o : o + 8 * m] for o, m in zip(offs, nums)]).view("<u4")
        word_offs = 2 * (np.cumsum(nums) - nums)
    out = np.empty(total, dtype=EVENT_DTYPE)
    n, err, ek, ei, a, b, uk, ui = _decode31_nb(words, word_offs, nums, ovfs, k, out)
    if err != _OK:
        _raise_code(path, err, int(offs[ek]) + 8 * ei, a, b, sources=sources)
    if n < total:
        # Invalid events were skipped; copy when the unused tail is worth freeing.
        out = out[:n].copy() if total - n > total // 8 else out[:n]
    return out, (-1 if uk < 0 else int(offs[uk]) + 8 * ui)


def read_aedat31(
    path: str | os.PathLike, *, on_unsorted: str = "sort", backend: str = "numba"
) -> np.ndarray:
    """Read the polarity events of a DVS128 AEDAT 3.1 file (DVS128 Gesture).

    Returns a 1-D structured array of ``EVENT_DTYPE`` in sensor coordinates:
    ``t`` µs on the camera clock, full 64-bit time ``(eventTSOverflow << 31) | ts``;
    ``x`` column and ``y`` row in 0..127; ``p`` 1 = ON, 0 = OFF.

    Only packets of type 1 (polarity) are decoded; every other packet type is
    skipped by its declared size. Of each polarity packet the first
    ``eventNumber`` events are read (``eventCapacity`` sets the bytes skipped);
    events without the valid bit are dropped. ``eventValid`` is not trusted.

    ``on_unsorted``: ``"sort"`` (default) stably sorts a stream whose timestamps
    ever decrease, warning (``UnsortedEventsWarning``) when that moves events by
    more than ``UNSORTED_JITTER_US``; ``"raise"`` raises ``AedatError`` at the
    first such event.
    ``backend``: ``"numba"`` (fast) or ``"numpy"`` (the reference implementation).

    Raises ``AedatError`` for: a missing/other-version header, an unterminated
    header, a truncated packet header or body, a polarity packet with
    eventSize != 8 or eventTSOffset != 4, negative or inconsistent counts, a
    negative timestamp or overflow, and x/y outside 128x128 (the recording is
    not from a DVS128, e.g. a DAVIS346). A file that cannot be opened raises
    ``OSError`` as usual.
    """
    _check_options(on_unsorted, backend)
    buf = _load(path)
    _require_version(buf, path, "3.1")
    start, lines = _header31(buf, path)
    reader = _read31_numba if backend == "numba" else _read31_numpy
    events, unsorted = reader(buf, start, path, _sources(lines))
    return _finish(events, unsorted, path, on_unsorted, backend)


# --------------------------------------------------------------------------- AEDAT 2.0


@njit(cache=True)
def _bswap32(v):
    return (
        ((v & np.uint32(0xFF)) << np.uint32(24))
        | ((v & np.uint32(0xFF00)) << np.uint32(8))
        | ((v >> np.uint32(8)) & np.uint32(0xFF00))
        | (v >> np.uint32(24))
    )


# DVS128 address bit 15 flags an external-input ("special") event, e.g. a sync pulse on
# the camera's input pin (jAER's DVS128 layout): it carries no pixel, so it is not a
# polarity event and is skipped, exactly as the AEDAT 3.1 reader skips special packets.
# Its timestamp still belongs to the counter, so it takes part in the wrap detection.
_SPECIAL_BIT = 0x8000
_DVS128_ADDR_MAX = 0xFFFF


@njit(cache=True)
def _decode2_nb(words, out):
    """Decode DVS128 AEDAT 2.0 records into ``out`` (EVENT_DTYPE), skipping special events.

    ``words`` holds the records as uint32 in file (big-endian) byte order, read
    as little endian: 2 per record (address, timestamp), byte-swapped here.
    Timestamps are read as uint32 and unwrapped: a backward step of more than
    2**31 µs is a counter wrap and adds 2**32 to this and all later events.
    Returns (err, err_record, address, first_unsorted_record or -1, events written).
    """
    wraps = np.int64(0)
    prev_raw = np.int64(0)
    prev = np.int64(-1)
    unsorted = -1
    j = 0
    for i in range(words.shape[0] // 2):
        addr = _bswap32(words[2 * i])
        if addr > np.uint32(_DVS128_ADDR_MAX):
            return _E_DAVIS_ADDR, i, np.int64(addr), unsorted, j
        raw = np.int64(_bswap32(words[2 * i + 1]))
        if i > 0 and prev_raw - raw > _HALF32:
            wraps += 1
        prev_raw = raw
        # branch-free skip: every record is written at j, which advances past
        # polarity events only (a special event is overwritten by the next one)
        keep = (addr & np.uint32(_SPECIAL_BIT)) == 0
        ti = raw + (wraps << 32)
        if keep and ti < prev and unsorted < 0:
            unsorted = i
        prev = ti if keep else prev
        out[j].t = ti
        out[j].x = (addr >> np.uint32(1)) & np.uint32(0x7F)
        out[j].y = (addr >> np.uint32(8)) & np.uint32(0x7F)
        out[j].p = addr & np.uint32(1)
        j += np.int64(keep)
    return _OK, 0, 0, unsorted, j


def _read2_numpy(buf: np.ndarray, start: int, n_records: int, path):
    rec = buf[start : start + 8 * n_records].view(">u4").reshape(n_records, 2)
    addr = rec[:, 0]
    bad = np.flatnonzero(addr > _DVS128_ADDR_MAX)
    if bad.size:
        i = int(bad[0])
        _raise_code(path, _E_DAVIS_ADDR, start + 8 * i, int(addr[i]), 0)
    raw = rec[:, 1].astype(np.int64)
    wraps = np.zeros(n_records, dtype=np.int64)
    wraps[1:] = np.cumsum(raw[:-1] - raw[1:] > _HALF32)
    keep = np.flatnonzero((addr & _SPECIAL_BIT) == 0)
    addr = addr[keep]
    out = np.empty(keep.size, dtype=EVENT_DTYPE)
    out["t"] = (raw + (wraps << 32))[keep]
    out["x"] = (addr >> 1) & 0x7F
    out["y"] = (addr >> 8) & 0x7F
    out["p"] = addr & 1
    i = _first_unsorted(out["t"])
    return out, (-1 if i < 0 else start + 8 * int(keep[i]))


def _read2_numba(buf: np.ndarray, start: int, n_records: int, path):
    out = np.empty(n_records, dtype=EVENT_DTYPE)
    words = buf[start : start + 8 * n_records].view("<u4")
    err, ei, addr, unsorted, n_events = _decode2_nb(words, out)
    if err != _OK:
        _raise_code(path, err, start + 8 * ei, addr, 0)
    if n_events < n_records:
        out = out[:n_events].copy()  # special events skipped: release the unused tail
    return out, (-1 if unsorted < 0 else start + 8 * unsorted)


def read_aedat2(
    path: str | os.PathLike,
    layout: str = "dvs128",
    *,
    on_unsorted: str = "sort",
    backend: str = "numba",
) -> np.ndarray:
    """Read a DVS128 AEDAT 2.0 file (CIFAR10-DVS) in sensor coordinates.

    Records are big-endian ``uint32 address, int32 timestamp`` (µs). The DVS128
    address layout (``layout="dvs128"``, the only one supported) is bit 0 =
    polarity (1 = ON), bits 1-7 = x (column), bits 8-14 = y (row), bit 15 =
    special event. No flip or
    transpose is applied: spikingjelly's CIFAR10-DVS orientation
    (x = 127 - y, y = 127 - x, p = 1 - p) is the dataset layer's business.

    Timestamps: the 32-bit counter is read unsigned (as spikingjelly and tonic
    do) and unwrapped: a backward step of more than 2**31 µs (~36 min) can only
    be a counter wrap, so 2**32 is added from there on. Smaller backward steps
    are disorder, handled by ``on_unsorted`` (``"sort"``: stable sort, default,
    with an ``UnsortedEventsWarning`` when that moves events by more than
    ``UNSORTED_JITTER_US``; ``"raise"``: ``AedatError`` at the first such record).

    Addresses with bit 15 set are the DVS128's external-input (special) events,
    e.g. sync pulses: they have no pixel and are skipped, as jAER does (and as
    the AEDAT 3.1 reader skips special packets).

    Raises ``AedatError`` for a missing/other-version header, trailing bytes
    that do not form a whole record, and any address with bits above 15 set
    (a DAVIS-layout recording, which this reader must not decode as garbage);
    ``OSError`` when the file cannot be opened. Returns a 1-D ``EVENT_DTYPE``
    array, empty for a header-only file.
    """
    if layout != "dvs128":
        raise ValueError(
            f"layout {layout!r} is not supported: read_aedat2 decodes the DVS128 address "
            f"layout ('dvs128') used by CIFAR10-DVS"
        )
    _check_options(on_unsorted, backend)
    buf = _load(path)
    _require_version(buf, path, "2.0")
    start, _lines = _header2(buf, path)
    n_records, tail = divmod(buf.shape[0] - start, 8)
    if tail:
        _raise_code(path, _E_TRUNC_RECORD, start + 8 * n_records, tail, 0)
    reader = _read2_numba if backend == "numba" else _read2_numpy
    events, unsorted = reader(buf, start, n_records, path)
    return _finish(events, unsorted, path, on_unsorted, backend)


def read_aedat(
    path: str | os.PathLike, *, on_unsorted: str = "sort", backend: str = "numba"
) -> np.ndarray:
    """Read a DVS128 AEDAT 3.1 or 2.0 file, detecting the version from its first line.

    Dispatches to ``read_aedat31`` (``#!AER-DAT3.1``) or ``read_aedat2``
    (``#!AER-DAT2.0``, DVS128 layout); any other first line raises ``AedatError``
    (unknown version / missing header). Returns a time-sorted ``EVENT_DTYPE``
    array in sensor coordinates; see those functions for the rules.
    """
    _check_options(on_unsorted, backend)
    with open(os.fspath(path), "rb") as f:
        version = _detect_version(np.frombuffer(f.read(256), dtype=np.uint8), path)
    if version == "3.1":
        return read_aedat31(path, on_unsorted=on_unsorted, backend=backend)
    return read_aedat2(path, on_unsorted=on_unsorted, backend=backend)


# --------------------------------------------------------------------------- writers


def _start_time_line(start_time: datetime | None) -> str:
    # A fixed default keeps the bytes a pure function of the events (reproducible fixtures).
    when = start_time or datetime(1970, 1, 1, tzinfo=timezone.utc)
    tz = when.strftime("%z") or "+0000"
    return f"#Start-Time: {when.strftime('%Y-%m-%d %H:%M:%S')} (TZ{tz})"


def _writer_columns(events, name: str):
    cols = columns(events, name=name)
    t = np.asarray(cols.t, dtype=np.int64)
    x = np.asarray(cols.x, dtype=np.int64)
    y = np.asarray(cols.y, dtype=np.int64)
    p = np.asarray(cols.p, dtype=np.int64)
    if t.size and t.min() < 0:
        raise ValueError(f"{name}: timestamps must be >= 0 µs, got min t = {int(t.min())}")
    if p.size and not np.isin(p, (0, 1)).all():
        raise ValueError(f"{name}: polarity p must be 0 (OFF) or 1 (ON)")
    return t, x, y, p


def write_aedat31(
    path: str | os.PathLike,
    events: np.ndarray | Mapping[str, np.ndarray],
    *,
    events_per_packet: int = 4096,
    source_name: str = "DVS128",
    extra_packets: bool | Sequence[int] = False,
    invalid: np.ndarray | None = None,
    start_time: datetime | None = None,
) -> Path:
    """Write ``events`` as an AEDAT 3.1 file of polarity packets, as cAER/jAER record DVS128 data.

    ``events``: ``EVENT_DTYPE`` array or mapping of ``t, x, y, p`` columns; ``t`` in
    µs, 0 <= t < 2**62, written in the given order (unsorted input stays
    unsorted: readers decide). ``x``, ``y`` must fit in 15 bits (values >= 128
    make a non-DVS128 file, useful for testing); ``p`` in {0, 1}.

    Header: ``#!AER-DAT3.1``, ``#Format: RAW``, ``#Source 1: <source_name>``,
    ``#Start-Time: ...`` (``start_time``; default the Unix epoch so identical
    events give identical bytes), ``#!END-HEADER``, lines ending ``\\r\\n``.

    Packets hold at most ``events_per_packet`` events and never straddle a
    change of ``t >> 31`` (each packet has one eventTSOverflow).
    ``extra_packets``: ``True`` inserts a non-polarity packet before every
    polarity packet and after the last; a sequence of ints inserts one before
    each listed polarity-packet index (``n_packets`` = at the end). Inserted
    packets alternate between type 0 (two 8-byte special events, external-input
    edges) and type 3 (one 36-byte IMU6 event), so readers must skip them by
    their declared size. ``invalid``: optional bool mask [N]; those events are
    written without the valid bit (readers drop them). Returns the path.
    """
    t, x, y, p = _writer_columns(events, "write_aedat31 events")
    n = t.shape[0]
    if n and t.max() >= 1 << 62:
        raise ValueError(f"write_aedat31: t must be < 2**62 µs, got max t = {int(t.max())}")
    for name, c in (("x", x), ("y", y)):
        if c.size and (c.min() < 0 or c.max() >= 1 << 15):
            raise ValueError(f"write_aedat31: {name} must be in [0, 32768) (15 bits)")
    if events_per_packet < 1:
        raise ValueError(f"events_per_packet must be >= 1, got {events_per_packet}")
    valid = np.ones(n, dtype=np.uint32)
    if invalid is not None:
        invalid = np.asarray(invalid, dtype=bool)
        if invalid.shape != (n,):
            raise ValueError(f"invalid mask has shape {invalid.shape}, expected ({n},)")
        valid[invalid] = 0

    body = np.empty((n, 2), dtype="<u4")
    body[:, 0] = (
        (x.astype(np.uint32) << 17) | (y.astype(np.uint32) << 2) | (p.astype(np.uint32) << 1)
    ) | valid
    body[:, 1] = t & 0x7FFFFFFF
    hi = t >> 31

    # Packet boundaries: every change of the overflow counter, then every events_per_packet.
    cuts = np.concatenate(([0], np.flatnonzero(hi[1:] != hi[:-1]) + 1, [n]))
    packets = [
        (s, min(s + events_per_packet, e))
        for a, e in zip(cuts[:-1], cuts[1:])
        for s in range(int(a), int(e), events_per_packet)
    ]
    if extra_packets is True:
        extra = set(range(len(packets) + 1))
    elif extra_packets is False:
        extra = set()
    else:
        extra = {int(i) for i in extra_packets}
        if any(i < 0 or i > len(packets) for i in extra):
            raise ValueError(f"extra_packets positions must be in [0, {len(packets)}]")

    header = (
        "\r\n".join(
            [
                _V31.decode(),
                "#Format: RAW",
                f"#Source 1: {source_name}",
                _start_time_line(start_time),
                _END_HEADER.decode(),
            ]
        )
        + "\r\n"
    ).encode("ascii")
    flat = body.reshape(-1).view(np.uint8)

    def chunks():
        yield header
        n_extra = 0
        for k in range(len(packets) + 1):
            if k in extra:
                # Timestamp of the neighbouring polarity event keeps the extra packet plausible.
                tk = int(t[packets[k][0]]) if k < len(packets) else (int(t[-1]) if n else 0)
                yield _extra_packet(n_extra, tk)
                n_extra += 1
            if k < len(packets):
                s, e = packets[k]
                nv = int(valid[s:e].sum())
                yield _PACKET_HEADER.pack(
                    _POLARITY_TYPE, 1, _POLARITY_SIZE, _TS_OFFSET, int(hi[s]), e - s, e - s, nv
                )
                yield flat[8 * s : 8 * e].data

    return atomic_write_bytes(path, chunks())


def _extra_packet(i: int, t: int) -> bytes:
    """A non-polarity packet (type 0 special events or type 3 IMU6) stamped at ``t`` µs."""
    ovf, ts = t >> 31, t & 0x7FFFFFFF
    if i % 2 == 0:
        # Special events: bit 0 valid, bits 1-7 type (2/3 = external input rising/falling).
        events = struct.pack("<Ii", (2 << 1) | 1, ts) + struct.pack("<Ii", (3 << 1) | 1, ts)
        return _PACKET_HEADER.pack(_SPECIAL_TYPE, 1, 8, _TS_OFFSET, ovf, 2, 2, 2) + events
    # IMU6: info (bit 0 valid), timestamp, accel xyz, temperature, gyro xyz (float32).
    imu = struct.pack("<Ii7f", 1, ts, 0.0, 0.0, -1.0, 25.0, 0.0, 0.0, 0.0)
    return _PACKET_HEADER.pack(_IMU6_TYPE, 1, _IMU6_SIZE, _TS_OFFSET, ovf, 1, 1, 1) + imu


def write_aedat2(
    path: str | os.PathLike,
    events: np.ndarray | Mapping[str, np.ndarray],
    *,
    start_time: datetime | None = None,
) -> Path:
    """Write ``events`` as a DVS128 AEDAT 2.0 file (the CIFAR10-DVS format), in the given order.

    ``events``: ``EVENT_DTYPE`` array or mapping of ``t, x, y, p``; sensor
    coordinates ``x``, ``y`` in 0..127, ``p`` in {0, 1}, ``t`` >= 0 µs. Records are
    big-endian ``uint32 address = y << 8 | x << 1 | p``, ``uint32 t mod 2**32``:
    like a camera's counter the timestamp wraps, and ``read_aedat2`` unwraps it
    as long as consecutive events are less than 2**31 µs apart. Header lines in
    jAER's style end ``\\r\\n``; ``start_time`` (default: the Unix epoch, for
    reproducible bytes) goes in a ``# created`` line. Returns the path.
    """
    t, x, y, p = _writer_columns(events, "write_aedat2 events")
    for name, c in (("x", x), ("y", y)):
        if c.size and (c.min() < 0 or c.max() >= 128):
            raise ValueError(f"write_aedat2: {name} must be in [0, 128) for a DVS128 file")
    rec = np.empty((t.shape[0], 2), dtype=">u4")
    rec[:, 0] = (y.astype(np.uint32) << 8) | (x.astype(np.uint32) << 1) | p.astype(np.uint32)
    rec[:, 1] = (t & 0xFFFFFFFF).astype(np.uint32)
    when = start_time or datetime(1970, 1, 1, tzinfo=timezone.utc)
    header = (
        "\r\n".join(
            [
                _V20.decode(),
                "# This is a raw AE data file created by evformer - do not edit",
                "# Data format is int32 address, int32 timestamp (8 bytes total), "
                "repeated for each event",
                "# Timestamps tick is 1 us",
                f"# created {when.strftime('%a %b %d %H:%M:%S %Z %Y')}",
                "# AEChip: DVS128",
            ]
        )
        + "\r\n"
    ).encode("ascii")
    return atomic_write_bytes(path, [header, rec.reshape(-1).view(np.uint8).data])
