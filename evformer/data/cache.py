"""Prepared-once event caches (HDF5): fingerprints, preparation, and the readers.

Preparation parses every raw recording once, in parallel processes, and writes
ONE HDF5 file per split:

- ``t`` (int64, µs), ``x`` (int16), ``y`` (int16), ``p`` (int8, 0 = OFF, 1 = ON):
  the events of all samples concatenated, chunked and compressed (HDF5 scale-offset);
- ``offsets`` (int64 [N + 1]): sample ``i`` is rows ``offsets[i]:offsets[i + 1]``;
- ``labels`` (int64 [N]), ``source_index`` (int64 [N]) and ``source_names`` (UTF-8 [S]);
- ``chunk_sums`` (int64 [chunks, 4]): per chunk of each event column the wrapping sum
  of the decoded values (``_chunk_sums``), checked on every read;
- attributes: ``format_version``, ``fingerprint`` (of the source files and of
  every parameter that shaped the samples), ``meta`` (JSON), ``bad`` (JSON list
  of skipped sources and why), ``index_digest`` (blake2b of the index datasets and
  the attributes, checked on open) and ``complete``.

Corruption is detected, never read back as other events: every dataset has HDF5
Fletcher-32 checksums (checked per chunk on read), the file uses HDF5 1.10 metadata
(checksummed object headers and chunk indexes), ``chunk_sums`` catch what Fletcher-32
cannot (a chunk zeroed together with its checksum), and opening validates the digest,
offsets (0 .. event count, non-decreasing), labels (within ``meta["classes"]``) and
source indexes. A failure on open makes the cache not current (rebuilt); one on read
raises ``CacheCorruptError`` naming the file.

The file is written under a temporary name in the same folder and renamed into
place only when complete (``evformer._atomic.atomic_path``), so an interrupted run
never leaves a file that looks finished; a cache whose format version or fingerprint
differs from the current one is rebuilt, never trusted. Reading one sample is one slice
per column; each process (DataLoader worker) opens its own file handle. Preparation
runs under a lock file (``_build_lock``) that names its holder, is never inherited by
the worker processes, and is waited for with a message and a timeout; the workers
die with the process that started them.

Binned frames can be cached the same way (``ensure_frame_cache``, ``FrameCache``). The
dataset base built on these files is ``evformer.data.event_dataset``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from evformer._atomic import atomic_path, remove_stale_temps
from evformer.events.core import EVENT_DTYPE, FIELDS, from_columns, is_sorted

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheCorruptError",
    "CachePreparationError",
    "EventCache",
    "FrameCache",
    "PrepareReport",
    "cache_is_current",
    "default_num_workers",
    "ensure_event_cache",
    "ensure_frame_cache",
    "fingerprint",
    "prepare_event_cache",
]

# Bump whenever the layout or the meaning of a stored field changes: every
# existing cache then fails `cache_is_current` and is rebuilt.
# 2: Fletcher-32 checksums on every dataset, HDF5 1.10 (checksummed) metadata, and the
# ``index_digest`` attribute over the index and attributes.
CACHE_FORMAT_VERSION = 2

# HDF5 file-format bounds: 1.10 structures carry checksums of their own (object headers,
# chunk indexes), so a corrupted chunk address or attribute is detected, not followed.
_LIBVER = ("v110", "v110")
# Seconds a process waits for another one's build lock before giving up (the other one
# may be preparing a large dataset); overridden by EVFORMER_CACHE_LOCK_TIMEOUT.
LOCK_TIMEOUT_S = 2 * 3600.0

# Events per HDF5 chunk: small enough that slicing one sample (typically 1e5-1e6
# events) decodes little beyond the sample itself, large enough to amortise the
# per-chunk filter overhead.
CHUNK_EVENTS = 1 << 15
# Event columns use HDF5's lossless integer scale-offset filter: per chunk it stores
# value - min in the fewest bits (t: ~20 bits within a chunk, x/y: 7, p: 1), ~3x
# smaller than raw. Measured on 200k-event samples it decodes ~3x faster than
# shuffle+lzf and ~2x faster than shuffle+gzip-1 at a similar size, and loading
# speed is what a training run pays every epoch. Alternatives: "gzip", "lzf", None.
COMPRESSION = "scaleoffset"
# Cached frames are mostly zeros: shuffle + gzip level 1 was both smaller and faster
# to read than lzf or scale-offset there.
_FRAME_FILTERS = {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
_COMPRESSIONS = ("scaleoffset", "gzip", "lzf", None)


def _column_filters(compression: str | None) -> dict[str, Any]:
    # Fletcher-32 runs last on write and first on read: every chunk read is checked.
    if compression == "scaleoffset":
        # h5py refuses fletcher32 next to scale-offset (lossy for floats); for integers
        # (SO_INT, 0 = minimum bits chosen per chunk) it is lossless, so the pipeline is
        # built by hand: scale-offset, then the checksum of the stored bytes.
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_scaleoffset(h5py.h5z.SO_INT, 0)
        dcpl.set_fletcher32()
        return {"dcpl": dcpl}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True, "fletcher32": True}
    if compression is None:
        return {"fletcher32": True}
    raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")


_STORE_DTYPES = {f: EVENT_DTYPE[f] for f in FIELDS}
_FRAME_BATCH = 32  # samples binned per to_frames_batch call when caching frames
_HASH_EDGE = 64 * 1024  # bytes hashed at each end of a source file


# --------------------------------------------------------------------------- fingerprints


def fingerprint(
    items: Iterable[str | os.PathLike | bytes], *, root: str | os.PathLike | None = None
) -> str:
    """Stable hex digest (blake2b, 32 hex chars) of source files and parameters.

    - an ``os.PathLike`` (e.g. ``pathlib.Path``) is a source FILE: its name (relative to
      ``root`` when given, else the bare file name, so moving the data folder keeps the
      digest), size, ``mtime_ns`` and a hash of its first and last 64 KiB enter the
      digest; a missing file raises ``FileNotFoundError`` naming it;
    - ``bytes`` and ``str`` are raw DATA (e.g. ``json.dumps(params)``) hashed as is.

    Items are order-sensitive. A file that is rewritten (new mtime or size) or edited
    near either end changes the digest; the cache built from it is then rebuilt.
    """
    h = hashlib.blake2b(digest_size=16)
    root_path = Path(root) if root is not None else None
    for item in items:
        if isinstance(item, bytes):
            h.update(b"B%d:" % len(item) + item)
        elif isinstance(item, str):
            data = item.encode("utf-8")
            h.update(b"S%d:" % len(data) + data)
        elif isinstance(item, os.PathLike):
            path = Path(item)
            try:
                st = path.stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"fingerprint: source file {path} does not exist") from None
            if root_path is not None:
                try:
                    name = path.relative_to(root_path).as_posix()
                except ValueError:
                    name = path.name
            else:
                name = path.name
            h.update(f"F{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            with open(path, "rb") as fh:
                h.update(fh.read(_HASH_EDGE))
                if st.st_size > _HASH_EDGE:
                    fh.seek(max(_HASH_EDGE, st.st_size - _HASH_EDGE))
                    h.update(fh.read(_HASH_EDGE))
        else:
            raise TypeError(
                f"fingerprint: items must be os.PathLike (a source file), bytes or str "
                f"(raw data), got {type(item).__name__}"
            )
    return h.hexdigest()


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class PrepareReport:
    """What one preparation did: sources read, samples written, sources skipped (name, why)."""

    n_sources: int
    n_samples: int
    bad: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


class CachePreparationError(RuntimeError):
    """A source could not be loaded (the message names it) and ``skip_bad`` was off."""


class CacheCorruptError(ValueError):
    """A finished cache file fails its checksums or its index checks; the message names the
    file and says to delete it (it is rebuilt from the sources on the next use)."""


# Errors that mean "this recording is unreadable" (corrupt, truncated, wrong format):
# `skip_bad` may skip those. Anything else is a bug and always propagates.
_SKIPPABLE = (OSError, ValueError, EOFError)


def default_num_workers() -> int:
    """Processes used for preparation when none is given: ``min(os.cpu_count(), 8)``."""
    return max(1, min(os.cpu_count() or 1, 8))


def _load_source(load: Callable[[Any], Any], source: Any) -> Any:
    # Top-level so a process pool can pickle it under any start method.
    return load(source)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _die_with(owner: int, parent: int) -> None:
    # Workers of a killed preparation would otherwise wait on the task queue forever.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent or not _pid_alive(owner):
            os._exit(1)


def _worker_init(owner: int) -> None:
    """Initializer of preparation workers: never outlive the process ``owner`` that
    started them (SIGKILL, SIGTERM or out-of-memory of the owner included)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: killed with the parent
    parent = os.getppid()
    if not _pid_alive(owner):  # the owner died before the line above took effect
        os._exit(1)
    # Portable fallback, and the owner of a forkserver/spawn worker is not its parent.
    threading.Thread(target=_die_with, args=(owner, parent), daemon=True).start()


class _OrderedRunner:
    """Run ``load`` over ``sources`` and yield ``(index, samples, error)`` in source order.

    At most ``2 * num_workers`` sources are in flight, so memory stays bounded by a few
    recordings however slow the first one is. Entering the context loads the first
    source in this process (so JIT-compiled readers are compiled once and inherited by
    forked workers, and a systematic error shows before any process starts), then
    starts the worker processes, all before the caller opens its output file (a forked
    child must not inherit an HDF5 file open for writing). Workers die with this process
    (``_worker_init``) and do not keep the build lock (``_build_lock``).
    """

    def __init__(
        self, load: Callable[[Any], Any], sources: Sequence[Any], num_workers: int, mp_context: Any
    ) -> None:
        self.load = load
        self.sources = sources
        self.parallel = num_workers > 1 and len(sources) > 1
        self.num_workers = num_workers
        self.mp_context = mp_context
        self.pending: deque[tuple[int, Future]] = deque()
        self.ex: ProcessPoolExecutor | None = None
        self.it = iter(enumerate(sources))
        self.first: tuple[int, Any, BaseException | None] | None = None

    def _run_here(self, i: int, src: Any) -> tuple[int, Any, BaseException | None]:
        try:
            return i, self.load(src), None
        except _SKIPPABLE as err:
            return i, None, err

    def __enter__(self) -> _OrderedRunner:
        if self.parallel:
            self.first = self._run_here(*next(self.it))
            self.ex = ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=self.mp_context,
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
            self._refill()
        return self

    def __exit__(self, *exc: object) -> None:
        for _, fut in self.pending:
            fut.cancel()
        self.pending.clear()
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)
            self.ex = None

    def _refill(self) -> None:
        assert self.ex is not None
        while len(self.pending) < 2 * self.num_workers:
            nxt = next(self.it, None)
            if nxt is None:
                return
            self.pending.append((nxt[0], self.ex.submit(_load_source, self.load, nxt[1])))

    def __iter__(self) -> Iterator[tuple[int, Any, BaseException | None]]:
        if not self.parallel:
            for i, src in self.it:
                yield self._run_here(i, src)
            return
        if self.first is not None:
            first, self.first = self.first, None
            yield first
        while self.pending:
            i, fut = self.pending.popleft()
            try:
                out, err = fut.result(), None
            except _SKIPPABLE as e:
                out, err = None, e
            self._refill()
            yield i, out, err


def _fixed_strings(values: Sequence[str]) -> np.ndarray:
    """UTF-8 strings as one fixed-length bytes array (HDF5 fixed-length strings).

    Variable-length strings live in HDF5's global heap, which has no checksum, and a
    corrupted global heap can make the HDF5 library loop for ever on read; fixed-length
    strings are stored inline (in checksummed object headers or chunks).
    """
    data = [v.encode("utf-8") for v in values]
    return np.asarray(data, dtype=f"S{max([1, *map(len, data)])}")


def _chunk_sums(a: np.ndarray, chunk: int) -> np.ndarray:
    """int64 [ceil(len(a) / chunk)]: per chunk of ``a`` (starting at a chunk boundary) the
    wrapping sum of its values.

    Fletcher-32 cannot see a chunk zeroed together with its checksum (the checksum of
    zeros is zero), and scale-offset decodes such a chunk to zeros; its sum then drops to
    0, which an intact chunk of other values only has by a coincidence of signs.
    """
    n_full = a.shape[0] // chunk
    with np.errstate(over="ignore"):
        sums = a[: n_full * chunk].reshape(n_full, chunk).sum(axis=1, dtype=np.int64)
        if a.shape[0] > n_full * chunk:
            sums = np.append(sums, a[n_full * chunk :].sum(dtype=np.int64))
    return sums


class _ColumnWriter:
    """Append-only writer of one 1-D chunked column that only ever writes whole chunks.

    Writing partial chunks makes HDF5 re-read, re-compress and re-allocate them (the
    freed space is never reclaimed), so values are buffered until a chunk is full.
    """

    def __init__(
        self, f: h5py.File, name: str, dtype: np.dtype, chunk: int, compression: str | None
    ):
        self.ds = f.create_dataset(
            name,
            shape=(0,),
            maxshape=(None,),
            dtype=dtype,
            chunks=(chunk,),
            **_column_filters(compression),
        )
        self.dtype = dtype
        self.chunk = chunk
        self.buf: list[np.ndarray] = []
        self.nbuf = 0
        self.written = 0
        self.sums: list[np.ndarray] = []  # _chunk_sums of the chunks written

    def append(self, a: np.ndarray) -> None:
        if a.shape[0] == 0:
            return
        self.buf.append(a)
        self.nbuf += a.shape[0]
        if self.nbuf >= self.chunk:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if self.nbuf == 0:
            return
        data = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        n = data.shape[0] if final else (data.shape[0] // self.chunk) * self.chunk
        self.ds.resize((self.written + n,))
        self.ds[self.written : self.written + n] = data[:n]
        self.sums.append(_chunk_sums(data[:n], self.chunk))
        self.written += n
        rest = data[n:]
        self.buf = [rest] if rest.shape[0] else []
        self.nbuf = rest.shape[0]

    def close(self) -> None:
        self._flush(final=True)


def _checked_columns(
    events: Any, source_name: str, k: int, sensor_size: tuple[int, int] | None
) -> list[np.ndarray]:
    """The four storage columns of one loaded sample, validated (never silently cast)."""
    what = f"source {source_name!r}, sample {k}"
    if isinstance(events, np.ndarray) and events.dtype.names is not None:
        cols = {f: events[f] for f in FIELDS if f in events.dtype.names}
    elif isinstance(events, Mapping):
        cols = {f: np.asarray(events[f]) for f in FIELDS if f in events}
    else:
        raise TypeError(
            f"{what}: load() must return (events, label) pairs with events a structured "
            f"array of evformer.events.EVENT_DTYPE, got {type(events).__name__}"
        )
    missing = [f for f in FIELDS if f not in cols]
    if missing:
        raise ValueError(f"{what}: events lack field(s) {missing}")
    n = cols["t"].shape[0]
    out = []
    for f in FIELDS:
        c = cols[f]
        if c.ndim != 1 or c.shape[0] != n:
            raise ValueError(f"{what}: field {f!r} has shape {c.shape}, expected ({n},)")
        if not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"{what}: field {f!r} must be integer, got {c.dtype}")
        want = _STORE_DTYPES[f]
        if c.dtype != want and n:
            info = np.iinfo(want)
            lo, hi = int(c.min()), int(c.max())
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"{what}: field {f!r} holds values in [{lo}, {hi}], outside {want} range"
                )
        out.append(np.ascontiguousarray(c, dtype=want))
    t, x, y, p = out
    if not is_sorted(t):
        raise ValueError(
            f"{what}: events are not sorted by t; sort them (evformer.events.sort_events) "
            "in the load function"
        )
    if n:
        if p.min() < 0 or p.max() > 1:
            raise ValueError(
                f"{what}: polarity must be 0 (OFF) or 1 (ON), got [{p.min()}, {p.max()}]"
            )
        if sensor_size is not None:
            h, w = sensor_size
            if x.min() < 0 or x.max() >= w or y.min() < 0 or y.max() >= h:
                raise ValueError(
                    f"{what}: coordinates x in [{x.min()}, {x.max()}], y in [{y.min()}, {y.max()}] "
                    f"fall outside the {h}x{w} sensor (height x width)"
                )
    return out


def prepare_event_cache(
    path: str | os.PathLike,
    sources: Sequence[Any],
    load: Callable[[Any], list[tuple[np.ndarray, int]]],
    *,
    fingerprint: str,
    meta: Mapping[str, Any],
    sensor_size: tuple[int, int] | None = None,
    num_workers: int | None = None,
    skip_bad: bool = False,
    desc: str = "preparing",
    progress: bool = True,
    mp_context: Any = None,
    chunk_events: int = CHUNK_EVENTS,
    compression: str | None = COMPRESSION,
) -> PrepareReport:
    """Parse every source once and write one HDF5 event cache at ``path`` (atomically).

    ``load(source)`` returns a list of ``(events, label)`` samples: ``events`` a
    structured array of ``EVENT_DTYPE`` (t µs int64, x/y int16, p int8 0 = OFF /
    1 = ON) or a mapping of those four columns (cheapest: stored without a copy when
    contiguous and of those dtypes), sorted by ``t``; ``label`` an int. It runs in
    ``num_workers`` processes (default ``min(os.cpu_count(), 8)``; 0 or 1 runs in this
    process; the first source always runs here, so Numba readers compile once and
    forked workers inherit them), so it must be a picklable top-level function or a
    ``functools.partial`` of one. Samples are written in source order, then in the
    order ``load`` returned them.

    A source whose ``load`` raises ``OSError`` / ``ValueError`` / ``EOFError`` (corrupt,
    truncated, wrong format) stops preparation with ``CachePreparationError`` naming
    it, unless ``skip_bad``: then it is listed in ``report.bad``, stored in the file's
    ``bad`` attribute and warned about. ``sensor_size`` (height, width), when given,
    makes every event coordinate be checked against it.

    ``fingerprint`` (see ``fingerprint()``) and ``meta`` (JSON-serialisable) are stored
    in the file; ``cache_is_current(path, fingerprint)`` later says whether it is reusable.
    The file appears at ``path`` only once complete (``evformer._atomic.atomic_path``:
    temporary file, fsync, rename).
    """
    path = Path(path)
    t0 = time.perf_counter()
    _column_filters(compression)  # validate before any work
    meta_json = json.dumps(dict(meta), sort_keys=True)  # fail before any work if not JSON
    nw = default_num_workers() if num_workers is None else int(num_workers)
    names = [_source_name(s) for s in sources]
    bad: list[tuple[str, str]] = []
    offsets = [0]
    labels: list[int] = []
    src_index: list[int] = []
    from tqdm.auto import tqdm

    # The runner starts its processes before the output file is opened (see _OrderedRunner).
    with _OrderedRunner(load, sources, nw, mp_context) as runner, atomic_path(path) as tmp:
        with (
            h5py.File(tmp, "w", libver=_LIBVER) as f,
            tqdm(total=len(sources), desc=desc, unit="file", disable=not progress) as bar,
        ):
            f.attrs["complete"] = False
            writers = [
                _ColumnWriter(f, name, _STORE_DTYPES[name], chunk_events, compression)
                for name in FIELDS
            ]
            for i, samples, err in runner:
                bar.update(1)
                checked: list[tuple[list[np.ndarray], int]] = []
                if err is None:
                    if not isinstance(samples, (list, tuple)):
                        raise TypeError(
                            f"{desc}: load({names[i]!r}) returned {type(samples).__name__}, "
                            "expected a list of (events, label) pairs"
                        )
                    try:  # validate every sample before writing any: all or nothing
                        for k, (events, label) in enumerate(samples):
                            checked.append(
                                (_checked_columns(events, names[i], k, sensor_size), int(label))
                            )
                    except ValueError as e:
                        err = e
                if err is not None:
                    if not skip_bad:
                        raise CachePreparationError(
                            f"{desc}: cannot use {names[i]}: {type(err).__name__}: {err}\n"
                            "Replace or remove that file, or pass skip_bad=True to skip "
                            "unreadable files (they are counted and reported)."
                        ) from err
                    bad.append((names[i], f"{type(err).__name__}: {err}"))
                    bar.set_postfix(samples=len(labels), bad=len(bad))
                    continue
                for cols, label in checked:
                    for w, c in zip(writers, cols):
                        w.append(c)
                    offsets.append(offsets[-1] + cols[0].shape[0])
                    labels.append(label)
                    src_index.append(i)
                bar.set_postfix(samples=len(labels), bad=len(bad))
            for w in writers:
                w.close()
            sums = [np.concatenate([np.zeros(0, np.int64), *w.sums]) for w in writers]
            f.create_dataset("chunk_sums", data=np.stack(sums, axis=1))  # [chunks, 4]
            for name, values in (
                ("offsets", offsets),
                ("labels", labels),
                ("source_index", src_index),
            ):
                f.create_dataset(
                    name, data=np.asarray(values, dtype=np.int64), fletcher32=bool(len(values))
                )
            f.create_dataset(
                "source_names", data=_fixed_strings(names), fletcher32=bool(len(names))
            )
            f.attrs["format_version"] = CACHE_FORMAT_VERSION
            f.attrs["fingerprint"] = _fixed_strings([fingerprint])[0]
            f.attrs["meta"] = _fixed_strings([meta_json])[0]
            f.attrs["bad"] = _fixed_strings([json.dumps(bad)])[0]
            sensor_json = json.dumps(list(sensor_size) if sensor_size else None)
            f.attrs["sensor_size"] = _fixed_strings([sensor_json])[0]
            f.attrs["n_events"] = offsets[-1]
            f.attrs["index_digest"] = _fixed_strings([_index_digest(f)])[0]
            # Set last: a file lacking it (or False) is never taken as finished.
            f.attrs["complete"] = True
    if bad:
        warnings.warn(
            f"{path.name}: skipped {len(bad)} unreadable source(s) of {len(sources)}: "
            + "; ".join(f"{n} ({why})" for n, why in bad[:5])
            + (" ..." if len(bad) > 5 else ""),
            stacklevel=2,
        )
    return PrepareReport(
        n_sources=len(sources),
        n_samples=len(labels),
        bad=bad,
        seconds=time.perf_counter() - t0,
    )


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (tuple, list)) and source and isinstance(source[0], os.PathLike):
        return os.fspath(source[0])  # e.g. (recording, labels file): name the recording
    return repr(source)


def _index_digest(f: h5py.File) -> str:
    """blake2b of everything ``EventCache`` reads eagerly: the index datasets and the
    attributes (the event columns carry Fletcher-32 checksums per chunk instead)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("offsets", "labels", "source_index", "chunk_sums"):
        a = np.ascontiguousarray(f[name][()], dtype=np.int64)
        h.update(f"{name}:{a.shape[0]}:".encode() + a.tobytes())
    names = [_attr_str(n) or "" for n in f["source_names"][()]]
    h.update(json.dumps(names).encode())
    for key in ("fingerprint", "meta", "bad", "sensor_size", "n_events"):
        h.update(f"\0{key}={_attr_str(f.attrs.get(key))}".encode())
    return h.hexdigest()


def _read_index(f: h5py.File) -> dict[str, Any]:
    """The validated index of an open cache file; ``ValueError`` saying what is wrong.

    Checks, besides completeness and version: the stored digest, the shapes, offsets
    starting at 0, non-decreasing and ending at the event count of every column, labels in
    ``[0, len(meta["classes"]))`` (when classes are known) and source indexes in range.
    """
    a = f.attrs
    if not bool(a.get("complete", False)):
        raise ValueError("the file is incomplete (preparation did not finish)")
    version = int(a.get("format_version", -1))
    if version != CACHE_FORMAT_VERSION:
        raise ValueError(f"format version {version}, this evformer reads {CACHE_FORMAT_VERSION}")
    if _attr_str(a.get("index_digest")) != _index_digest(f):
        raise CacheCorruptError("its index or attributes do not match their checksum")
    offsets = f["offsets"][()]
    labels = f["labels"][()]
    source_index = f["source_index"][()]
    names = [_attr_str(n) or "" for n in f["source_names"][()]]
    meta = json.loads(_attr_str(a["meta"]))
    n = labels.shape[0]
    n_events = int(a["n_events"])
    if offsets.shape != (n + 1,) or source_index.shape != (n,):
        raise CacheCorruptError(
            f"offsets {offsets.shape} / source_index {source_index.shape} do not fit {n} labels"
        )
    if offsets[0] != 0 or offsets[-1] != n_events or np.any(np.diff(offsets) < 0):
        raise CacheCorruptError(
            f"offsets must start at 0, never decrease and end at the {n_events} events"
        )
    chunk = f["t"].chunks[0]
    for c in FIELDS:
        if f[c].shape != (n_events,) or f[c].chunks != (chunk,):
            raise CacheCorruptError(f"column {c!r} holds {f[c].shape} values, not {n_events}")
    chunk_sums = f["chunk_sums"][()]
    if chunk_sums.shape != (-(-n_events // chunk), len(FIELDS)):
        raise CacheCorruptError(f"chunk_sums {chunk_sums.shape} do not fit the columns")
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if n and classes and (labels.min() < 0 or labels.max() >= len(classes)):
        raise CacheCorruptError(
            f"labels in [{labels.min()}, {labels.max()}] fall outside the {len(classes)} classes"
        )
    if n and (source_index.min() < 0 or source_index.max() >= len(names)):
        raise CacheCorruptError(f"source indexes outside the {len(names)} sources")
    ss = json.loads(_attr_str(a["sensor_size"]))
    return {
        "offsets": offsets,
        "labels": labels,
        "source_index": source_index,
        "source_names": names,
        "fingerprint": _attr_str(a["fingerprint"]),
        "meta": meta,
        "bad": [tuple(b) for b in json.loads(_attr_str(a["bad"]))],
        "sensor_size": tuple(ss) if ss is not None else None,
        "n_events": n_events,
        "chunk": chunk,
        "chunk_sums": chunk_sums,
    }


def _cache_problem(path: Path, fingerprint: str) -> tuple[str, bool] | None:
    """None when ``path`` is a current cache, else (why not, whether it is corrupt)."""
    if not path.is_file():
        return "missing", False
    try:
        with h5py.File(path, "r") as f:
            if _attr_str(f.attrs.get("fingerprint")) != fingerprint:
                return "other sources or parameters", False
            _read_index(f)
    except CacheCorruptError as err:
        return str(err), True
    except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
        # complete files of this version that fail to parse are corrupt; others are stale
        return f"{type(err).__name__}: {err}", _looks_finished(path)
    return None


def _looks_finished(path: Path) -> bool:
    with contextlib.suppress(Exception), h5py.File(path, "r") as f:
        return (
            bool(f.attrs.get("complete", False))
            and int(f.attrs.get("format_version", -1)) == CACHE_FORMAT_VERSION
        )
    return True  # not even openable, yet named like a finished cache


def cache_is_current(path: str | os.PathLike, fingerprint: str) -> bool:
    """True when ``path`` is a complete, intact cache of this format version and ``fingerprint``.

    Anything else (missing, unreadable, truncated, older format, other sources or
    parameters, an index or attribute that fails its checksum or its checks) is False:
    the caller rebuilds. Event data is checked per chunk when read (Fletcher-32).
    """
    return _cache_problem(Path(path), fingerprint) is None


def _attr_str(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


# Descriptors of the build locks this process holds. A forked child shares the open file
# description and with it the flock: a child that kept it (a pool worker outliving a
# killed run) would hold the lock for ever. The at-fork hook closes the child's copies,
# which drops only the child's reference; O_CLOEXEC covers fork + exec.
_HELD_LOCKS: set[int] = set()


def _drop_held_locks_in_child() -> None:
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks_in_child)


def _lock_holder(fd: int) -> tuple[int, str] | None:
    """(pid, host) written into the lock file by its holder, if any."""
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()
        return int(pid), host
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _same_file(fd: int, lock: Path) -> bool:
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def _lock_timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    env = os.environ.get("EVFORMER_CACHE_LOCK_TIMEOUT")
    return float(env) if env else LOCK_TIMEOUT_S


@contextlib.contextmanager
def _build_lock(path: Path, *, timeout: float | None = None, poll: float = 0.2) -> Iterator[None]:
    """Exclusive lock ``<path>.lock`` so concurrent processes (e.g. DDP ranks) build a
    cache only once.

    The holder writes ``<pid> <host>`` into the lock file. A process that finds the lock
    busy says once on stderr which file it waits for and which process holds it, and
    raises ``TimeoutError`` after ``timeout`` seconds (default ``LOCK_TIMEOUT_S``, or the
    environment variable ``EVFORMER_CACHE_LOCK_TIMEOUT``). A lock whose recorded holder no
    longer runs (its lock kept alive by a leftover child) is taken over: the file is
    replaced by a new one. Forked children never keep the lock (``_HELD_LOCKS``).
    """
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): builds may repeat, never corrupt
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    limit = _lock_timeout(timeout)
    t0 = time.monotonic()
    announced = False
    dead_since: dict[tuple[int, str], float] = {}
    host = socket.gethostname()
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            now = time.monotonic()
            if holder is not None and holder[1] == host and not _pid_alive(holder[0]):
                # Seen dead twice, a second apart: a live holder writes its pid at once.
                first = dead_since.setdefault(holder, now)
                if now - first >= 1.0 and _same_file(fd, lock):
                    print(
                        f"evformer: {lock} is held by a leftover of process {holder[0]}, "
                        "which no longer runs; taking it over",
                        file=sys.stderr,
                        flush=True,
                    )
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock)
                    os.close(fd)
                    continue
            who = f"process {holder[0]} on {holder[1]}" if holder else "an unknown process"
            if not announced:
                print(
                    f"evformer: waiting for {lock} held by {who} (it is preparing "
                    f"{path.name}; giving up after {limit:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                announced = True
            os.close(fd)
            if now - t0 >= limit:
                raise TimeoutError(
                    f"gave up after {now - t0:.0f} s waiting for the lock {lock}, held by "
                    f"{who}. If that process is stuck, stop it (or delete {lock} if it no "
                    "longer runs) and start again; to wait longer set "
                    "EVFORMER_CACHE_LOCK_TIMEOUT (seconds)."
                ) from None
            time.sleep(poll)
            continue
        if not _same_file(fd, lock):  # taken over meanwhile: lock the new file instead
            os.close(fd)
            continue
        break
    _HELD_LOCKS.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {host}\n".encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale pid for the next waiter to misjudge
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_event_cache(
    path: str | os.PathLike,
    sources: Sequence[Any],
    load: Callable[[Any], list[tuple[np.ndarray, int]]],
    *,
    fingerprint: str,
    meta: Mapping[str, Any],
    lock_timeout: float | None = None,
    **prepare_kwargs: Any,
) -> EventCache:
    """Return the ``EventCache`` at ``path``, preparing it first unless it is current.

    The check-then-build runs under a file lock (``<path>.lock``, see ``_build_lock``;
    ``lock_timeout`` seconds at most of waiting for another process) so that several
    processes asking at once build it once; temporary files of dead runs are removed.
    A corrupt cache is rebuilt with a warning; when that fails (sources gone), the error
    names the corrupt file. ``prepare_kwargs`` go to ``prepare_event_cache``.
    """
    path = Path(path)
    if not len(sources):
        raise ValueError(
            f"{path.name}: no sources to prepare (the split lists no recordings); check "
            "the data folder"
        )
    if _cache_problem(path, fingerprint) is not None:
        with _build_lock(path, timeout=lock_timeout):
            problem = _cache_problem(path, fingerprint)
            if problem is not None:
                why, corrupt = problem
                if corrupt:
                    warnings.warn(
                        f"{path}: the cache is corrupt ({why}); rebuilding it from the sources",
                        stacklevel=2,
                    )
                remove_stale_temps(path)
                try:
                    prepare_event_cache(
                        path, sources, load, fingerprint=fingerprint, meta=meta, **prepare_kwargs
                    )
                except CachePreparationError as err:
                    if not corrupt:
                        raise
                    raise CachePreparationError(
                        f"{path}: the cache is corrupt ({why}) and cannot be rebuilt: {err}"
                    ) from err
    return EventCache(path)


# --------------------------------------------------------------------------- reading


class _LazyH5:
    """An h5py read handle opened on first use in each process.

    A handle inherited through ``fork`` (DataLoader workers) shares the parent's HDF5
    library state and file descriptor; using it from two processes is unsafe, so a
    process that finds a handle opened by another pid drops it and opens its own.
    Pickling (spawn start method) carries only the path.
    """

    path: Path

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def _h5(self) -> h5py.File:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            if self._file is not None:
                # Close the child's copy of the inherited handle so HDF5 does not hand
                # the shared descriptor back when the same file is opened again.
                with contextlib.suppress(Exception):
                    self._file.close()
            self._file = h5py.File(self.path, "r")
            self._pid = pid
        return self._file

    def close(self) -> None:
        """Close this process's handle (it reopens on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._file.close()
        self._file = None
        self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        state.pop("_ds", None)  # h5py objects do not pickle; reopened per process
        state.pop("_ds_file", None)
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class EventCache(_LazyH5):
    """Read side of one event cache file (see the module docstring for the layout).

    ``labels`` int64 [N], ``offsets`` int64 [N + 1], ``source_index`` int64 [N],
    ``source_names`` list[str], ``meta`` dict, ``bad`` list of (source, reason),
    ``sensor_size`` (height, width) or None. ``events(i)`` / ``columns(i)`` read
    sample ``i``; the h5py handle opens lazily per process (DataLoader-worker safe).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(Path(path))
        try:
            with h5py.File(self.path, "r") as f:
                index = _read_index(f)
        except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
            raise CacheCorruptError(
                f"{self.path}: not a readable evformer event cache ({err}); delete it and "
                "construct the dataset again to rebuild it"
            ) from err
        self.offsets = index["offsets"]
        self.labels = index["labels"]
        self.source_index = index["source_index"]
        self.source_names = index["source_names"]
        self.fingerprint = index["fingerprint"]
        self.meta = index["meta"]
        self.bad = index["bad"]
        self.sensor_size = index["sensor_size"]
        self.n_events = index["n_events"]
        self._chunk = index["chunk"]
        self._chunk_sums = index["chunk_sums"]
        self._verified = np.zeros(self._chunk_sums.shape[0], bool)  # chunks checked here

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"EventCache({str(self.path)!r}, samples={len(self)}, events={self.n_events})"

    def _range(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples in {self.path.name}")
        i = int(i) % n
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def _columns_ds(self) -> dict[str, h5py.Dataset]:
        # Dataset handles of this process's file (looking them up costs ~20 µs each).
        f = self._h5()
        if getattr(self, "_ds_file", None) is not f:
            self._ds = {c: f[c] for c in FIELDS}
            self._ds_file = f
        return self._ds

    def _read(self, lo: int, hi: int, what: str) -> dict[str, np.ndarray]:
        """Columns of events ``lo .. hi - 1``. The first read of a chunk in this process
        checks it against ``chunk_sums`` (reading the chunk-aligned range, which HDF5
        decodes whole anyway); Fletcher-32 checks every read."""
        if hi <= lo:
            return {c: np.empty(0, _STORE_DTYPES[c]) for c in FIELDS}
        C = self._chunk
        k0, k1 = lo // C, -(-hi // C)
        check = not self._verified[k0:k1].all()
        a0, a1 = (k0 * C, min(k1 * C, self.n_events)) if check else (lo, hi)
        out = {}
        try:
            for j, (c, d) in enumerate(self._columns_ds().items()):
                v = d[a0:a1]
                if check and not np.array_equal(_chunk_sums(v, C), self._chunk_sums[k0:k1, j]):
                    raise OSError(f"column {c!r} does not match its chunk sums")
                out[c] = v[lo - a0 : hi - a0] if check else v
        except OSError as err:  # a checksum mismatch, a broken chunk
            raise CacheCorruptError(
                f"{self.path}: {what} (events {lo}..{hi}) cannot be read, the file is "
                f"corrupt ({err}); delete it and construct the dataset again to rebuild it "
                "from the sources"
            ) from err
        self._verified[k0:k1] = True
        return out

    def columns(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as contiguous arrays: t int64 µs, x int16, y int16, p int8."""
        lo, hi = self._range(i)
        return self._read(lo, hi, f"sample {i}")

    def columns_range(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Samples ``start .. stop - 1`` in one read: concatenated columns and their
        offsets (int64 [stop - start + 1], starting at 0)."""
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"sample range [{start}, {stop}) outside [0, {n}) in {self.path.name}")
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        cols = self._read(lo, hi, f"samples {start}..{stop - 1}")
        return cols, self.offsets[start : stop + 1] - lo

    def events(self, i: int) -> np.ndarray:
        """Sample ``i`` as a structured array of ``EVENT_DTYPE`` sorted by ``t``."""
        c = self.columns(i)
        return from_columns(c["t"], c["x"], c["y"], c["p"])


# --------------------------------------------------------------------------- frames


class FrameCache(_LazyH5):
    """Read side of a cached-frames file: ``frames`` [N, T, 2, H, W] unsigned counts."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(Path(path))
        with h5py.File(self.path, "r") as f:
            self.shape = tuple(f["frames"].shape)
            self.key = json.loads(_attr_str(f.attrs["key"]))

    def __len__(self) -> int:
        return int(self.shape[0])

    def frames(self, i: int) -> np.ndarray:
        """Cached frames of sample ``i``: [T, 2, H, W] counts (uint16 or uint32)."""
        try:
            return self._h5()["frames"][i]
        except OSError as err:  # a Fletcher-32 mismatch, a broken chunk
            raise CacheCorruptError(
                f"{self.path}: frames of sample {i} cannot be read, the file is corrupt "
                f"({err}); delete it and construct the dataset again to rebuild it"
            ) from err


def _frame_cache_current(path: Path, key_json: str) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return (
                bool(f.attrs.get("complete", False))
                and int(f.attrs.get("format_version", -1)) == CACHE_FORMAT_VERSION
                and _attr_str(f.attrs.get("key")) == key_json
                and "frames" in f
            )
    except (OSError, KeyError, ValueError):
        return False


def ensure_frame_cache(
    path: str | os.PathLike,
    key: Mapping[str, Any],
    shape: tuple[int, ...],
    frames: Callable[[int, int], np.ndarray],
    *,
    desc: str = "frames",
    progress: bool = True,
    lock_timeout: float | None = None,
) -> FrameCache:
    """Return the ``FrameCache`` at ``path``, writing it first unless it holds ``key``.

    ``shape`` is ``[N, T, 2, H, W]`` (N > 0); ``frames(a, b)`` returns the integer counts of samples
    ``a .. b - 1`` (called for consecutive blocks of ``_FRAME_BATCH``). Counts are stored
    exactly as uint16, or uint32 when one exceeds 65535. ``key`` (JSON) is stored in the file
    and must match for the file to be reused. Written like the event cache: under a lock
    (``lock_timeout`` as in ``ensure_event_cache``), atomically, ``complete`` set last,
    with Fletcher-32 checksums.
    """
    path = Path(path)
    if not shape[0]:
        raise ValueError(f"{path.name}: no samples to cache frames of (the dataset is empty)")
    key_json = json.dumps(dict(key), sort_keys=True)
    if not _frame_cache_current(path, key_json):
        with _build_lock(path, timeout=lock_timeout):
            if not _frame_cache_current(path, key_json):
                remove_stale_temps(path)
                try:
                    _write_frame_cache(path, key_json, shape, frames, np.uint16, desc, progress)
                except OverflowError:
                    _write_frame_cache(path, key_json, shape, frames, np.uint32, desc, progress)
    return FrameCache(path)


def _write_frame_cache(
    path: Path,
    key_json: str,
    shape: tuple[int, ...],
    frames: Callable[[int, int], np.ndarray],
    dtype: type,
    desc: str,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    n = shape[0]
    limit = np.iinfo(dtype).max
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=_LIBVER) as f:
        f.attrs["complete"] = False
        ds = f.create_dataset(
            "frames", shape=shape, dtype=dtype, chunks=(1, *shape[1:]), **_FRAME_FILTERS
        )
        with tqdm(total=n, desc=desc, unit="sample", disable=not progress) as bar:
            for a in range(0, n, _FRAME_BATCH):
                b = min(n, a + _FRAME_BATCH)
                fr = frames(a, b)
                if fr.size and int(fr.max()) > limit:
                    raise OverflowError(f"samples {a}..{b - 1}: a count exceeds {limit}")
                ds[a:b] = fr
                bar.update(b - a)
        f.attrs["key"] = _fixed_strings([key_json])[0]
        f.attrs["format_version"] = CACHE_FORMAT_VERSION
        f.attrs["complete"] = True
