"""The HDF5 event cache: content, atomicity, invalidation, worker safety."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from evformer.data import cache as cache_mod
from evformer.data.cache import (
    CACHE_FORMAT_VERSION,
    CachePreparationError,
    EventCache,
    cache_is_current,
    ensure_event_cache,
    fingerprint,
    prepare_event_cache,
)
from evformer.data.event_dataset import EventFrameDataset
from evformer.data.seeding import seed_worker
from evformer.events import from_columns

# ----------------------------------------------------------------- picklable loaders


def synth_samples(seed: int) -> list[tuple[np.ndarray, int]]:
    """Deterministic samples of one fake source (sizes 0..3000, some spanning chunks)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(int(rng.integers(1, 4))):
        n = int(rng.integers(0, 3000)) if k else 0  # first sample of each source empty
        t = np.sort(rng.integers(0, 10**6, n))
        ev = from_columns(t, rng.integers(0, 32, n), rng.integers(0, 24, n), rng.integers(0, 2, n))
        out.append((ev, int(seed * 7 + k) % 5))
    return out


def load_synth(seed: int) -> list[tuple[np.ndarray, int]]:
    if seed < 0:
        raise ValueError(f"source {seed} is corrupt")
    return synth_samples(seed)


def load_unsorted(seed: int):
    ev = from_columns([5, 3, 9], [0, 1, 2], [0, 0, 0], [1, 0, 1])
    return [(ev, 0)]


def load_out_of_sensor(seed: int):
    ev = from_columns([1, 2], [0, 40], [0, 0], [1, 0])
    return [(ev, 0)]


def load_interrupted(seed: int):
    if seed == 2:
        raise KeyboardInterrupt  # not a "bad file": must propagate, leaving nothing behind
    return synth_samples(seed)


def expected_samples(sources):
    return [s for src in sources for s in synth_samples(src)]


def prep(path, sources, load=load_synth, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return prepare_event_cache(
        path, sources, load, fingerprint=kw.pop("fp", "fp1"), meta={"kind": "synth"}, **kw
    )


# ----------------------------------------------------------------- content


@pytest.mark.parametrize("chunk", [7, 1 << 15])
def test_cache_round_trips_every_sample_exactly(tmp_path, chunk):
    path = tmp_path / "c.h5"
    sources = [0, 1, 2, 3, 4]
    report = prep(path, sources, sensor_size=(24, 32), chunk_events=chunk)
    exp = expected_samples(sources)
    assert report.n_sources == 5 and report.n_samples == len(exp) and report.bad == []
    c = EventCache(path)
    assert len(c) == len(exp)
    assert c.meta == {"kind": "synth"} and c.sensor_size == (24, 32)
    assert c.labels.dtype == np.int64 and c.labels.tolist() == [lab for _, lab in exp]
    assert c.n_events == sum(len(e) for e, _ in exp)
    # source index: which source each sample came from, in source order
    want_src = [i for i, s in enumerate(sources) for _ in synth_samples(s)]
    assert c.source_index.tolist() == want_src
    assert c.source_names == [repr(s) for s in sources]
    for i, (ev, _) in enumerate(exp):
        got = c.events(i)
        assert got.dtype == ev.dtype
        np.testing.assert_array_equal(got, ev)
        cols = c.columns(i)
        assert cols["t"].dtype == np.int64 and cols["x"].dtype == np.int16
        assert cols["p"].dtype == np.int8
    np.testing.assert_array_equal(c.events(-1), exp[-1][0])
    with pytest.raises(IndexError, match="out of range"):
        c.events(len(exp))
    # a range read equals the per-sample reads
    cols, offs = c.columns_range(1, 4)
    assert offs[0] == 0 and len(offs) == 4
    for j, i in enumerate(range(1, 4)):
        np.testing.assert_array_equal(cols["t"][offs[j] : offs[j + 1]], exp[i][0]["t"])


@pytest.mark.parametrize("compression", ["scaleoffset", "gzip", "lzf", None])
def test_storage_is_chunked_compressed_and_lossless(tmp_path, compression):
    path = tmp_path / "c.h5"
    prep(path, [0, 1, 2, 3], chunk_events=64, compression=compression)
    c = EventCache(path)
    for i, (ev, _) in enumerate(expected_samples([0, 1, 2, 3])):
        np.testing.assert_array_equal(c.events(i), ev)
    with h5py.File(path, "r") as f:
        for name in ("t", "x", "y", "p"):
            ds = f[name]
            assert ds.chunks == (64,)
            if compression == "scaleoffset":
                assert ds.scaleoffset == 0
            else:
                assert ds.compression == compression
        assert f.attrs["format_version"] == CACHE_FORMAT_VERSION
        assert bool(f.attrs["complete"])
        assert f["offsets"].dtype == np.int64


def test_parallel_preparation_equals_in_process(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    sources = list(range(9))
    prep(a, sources, num_workers=0)
    prep(b, sources, num_workers=2)
    ca, cb = EventCache(a), EventCache(b)
    np.testing.assert_array_equal(ca.offsets, cb.offsets)
    np.testing.assert_array_equal(ca.labels, cb.labels)
    for i in range(len(ca)):
        np.testing.assert_array_equal(ca.events(i), cb.events(i))


@pytest.mark.slow  # each spawned worker imports torch
def test_spawned_workers_prepare_the_same(tmp_path):
    # Loaders are top-level functions, so the spawn start method (macOS, Windows, and
    # Python >= 3.14's forkserver default) works too.
    import multiprocessing

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    prep(a, [0, 1, 2])
    prep(b, [0, 1, 2], num_workers=2, mp_context=multiprocessing.get_context("spawn"))
    ca, cb = EventCache(a), EventCache(b)
    for i in range(len(ca)):
        np.testing.assert_array_equal(ca.events(i), cb.events(i))


def test_cache_and_dataset_pickle_without_their_file_handle(tmp_path):
    import pickle

    path = tmp_path / "c.h5"
    prep(path, [0, 1])
    ds = _Base(EventCache(path), n_frames=2)
    ref = ds[1][0]  # opens the handle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.cache._file is None
    torch.testing.assert_close(clone[1][0], ref)


def test_functools_partial_loader_in_workers(tmp_path):
    path = tmp_path / "c.h5"
    report = prep(path, [0, 1, 2], load=functools.partial(load_synth), num_workers=2)
    assert report.n_samples == len(expected_samples([0, 1, 2]))


# ----------------------------------------------------------------- validation / errors


def test_bad_source_stops_with_its_name(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(
        CachePreparationError,
        match=r"(?s)cannot use -3: ValueError: source -3 is corrupt.*skip_bad=True",
    ):
        prep(path, [0, -3, 1])
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_skip_bad_counts_and_reports(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable source\(s\) of 4"):
        report = prep(path, [0, -1, 1, -2], skip_bad=True, num_workers=2)
    assert [n for n, _ in report.bad] == ["-1", "-2"]
    assert "source -1 is corrupt" in report.bad[0][1]
    c = EventCache(path)
    assert c.bad == [
        ("-1", "ValueError: source -1 is corrupt"),
        ("-2", "ValueError: source -2 is corrupt"),
    ]
    assert len(c) == len(expected_samples([0, 1]))


def test_unsorted_and_out_of_sensor_events_are_refused(tmp_path):
    with pytest.raises(CachePreparationError, match=r"source '0', sample 0.*not sorted by t"):
        prep(tmp_path / "a.h5", [0], load=load_unsorted)
    with pytest.raises(CachePreparationError, match=r"outside the 24x32 sensor"):
        prep(tmp_path / "b.h5", [0], load=load_out_of_sensor, sensor_size=(24, 32))
    assert list(tmp_path.iterdir()) == []
    # invalid samples are a bad source like any other: skip_bad drops the whole source
    with pytest.warns(UserWarning, match="skipped 1"):
        report = prep(tmp_path / "c.h5", [0], load=load_unsorted, skip_bad=True)
    assert report.n_samples == 0 and "not sorted" in report.bad[0][1]


def test_scaleoffset_keeps_extreme_values(tmp_path):
    # timestamps past 2**31 and 2**32 µs and jumps inside one chunk stay exact
    t = np.array([0, 1, 2**31 - 1, 2**31, 2**32 + 5, 2**40, 2**40 + 1], dtype=np.int64)
    ev = from_columns(t, [0, 127, 5, 6, 0, 127, 3], [127, 0, 1, 2, 3, 4, 5], [0, 1, 1, 0, 1, 0, 1])
    path = tmp_path / "c.h5"
    prepare_event_cache(
        path, [0], _const_loader(ev), fingerprint="f", meta={}, num_workers=0, progress=False
    )
    np.testing.assert_array_equal(EventCache(path).events(0), ev)


class _const_loader:  # noqa: N801 - a picklable callable, named like the function it stands for
    def __init__(self, ev):
        self.ev = ev

    def __call__(self, source):
        return [(self.ev, 0)]


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        prepare_event_cache(
            tmp_path / "c.h5", [0], load_synth, fingerprint="f", meta={"x": object()}
        )


# ----------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_files_and_params(tmp_path):
    a = tmp_path / "d1" / "rec.bin"
    a.parent.mkdir()
    a.write_bytes(b"x" * 200_000)
    f1 = fingerprint([a, "params-v1"], root=a.parent)
    assert f1 == fingerprint([a, "params-v1"], root=a.parent)  # stable
    assert f1 != fingerprint([a, "params-v2"], root=a.parent)  # parameters count
    assert f1 != fingerprint(["params-v1", a], root=a.parent)  # order counts
    assert fingerprint([b"abc"]) != fingerprint(["abc"])  # typed
    # moving the data folder keeps the digest (names are relative; mtime preserved)
    b = tmp_path / "d2" / "rec.bin"
    b.parent.mkdir()
    os.replace(a, b)
    assert fingerprint([b, "params-v1"], root=b.parent) == f1
    # an edit near the end (same size, mtime restored) still changes it
    st = b.stat()
    data = bytearray(b.read_bytes())
    data[-5] ^= 1
    b.write_bytes(bytes(data))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint([b, "params-v1"], root=b.parent) != f1
    # a rewrite with identical bytes but a new mtime counts as a change
    data[-5] ^= 1
    b.write_bytes(bytes(data))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint([b, "params-v1"], root=b.parent) != f1
    with pytest.raises(FileNotFoundError, match="nope"):
        fingerprint([tmp_path / "nope"])
    with pytest.raises(TypeError):
        fingerprint([3])


# ----------------------------------------------------------------- currency / atomicity


def test_cache_is_current_rules(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    assert not cache_is_current(path, "fp1")
    prep(path, [0, 1])
    assert cache_is_current(path, "fp1")
    assert not cache_is_current(path, "other")
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    assert not cache_is_current(path, "fp1")
    monkeypatch.undo()
    # a file whose completion mark is missing is not a cache
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    assert not cache_is_current(path, "fp1")
    with pytest.raises(ValueError, match="incomplete"):
        EventCache(path)
    # garbage / truncated files are not caches either
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert not cache_is_current(path, "fp1")


def test_truncated_cache_is_not_current(tmp_path):
    path = tmp_path / "c.h5"
    prep(path, list(range(6)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not cache_is_current(path, "fp1")


def test_ensure_reuses_then_rebuilds_on_new_fingerprint_or_version(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    calls = []

    def counting(src):
        calls.append(src)
        return load_synth(src)

    kw = dict(meta={}, num_workers=0, progress=False)
    ensure_event_cache(path, [0, 1], counting, fingerprint="A", **kw)
    assert calls == [0, 1]
    ensure_event_cache(path, [0, 1], counting, fingerprint="A", **kw)
    assert calls == [0, 1]  # reused: nothing parsed
    c = ensure_event_cache(path, [2], counting, fingerprint="B", **kw)
    assert calls == [0, 1, 2] and len(c) == len(synth_samples(2))
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    ensure_event_cache(path, [2], counting, fingerprint="B", **kw)
    assert calls == [0, 1, 2, 2]
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == CACHE_FORMAT_VERSION + 1


def test_interrupt_leaves_no_cache_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        prep(path, [0, 1, 2, 3], load=load_interrupted)
    assert list(tmp_path.iterdir()) == []
    # an interrupted REbuild leaves the previous complete cache untouched
    prep(path, [0, 1], fp="old")
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        prep(path, [0, 1, 2, 3], load=load_interrupted, fp="new")
    assert path.read_bytes() == before and cache_is_current(path, "old")
    assert not cache_is_current(path, "new")


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import numpy as np
    from evformer.data.cache import prepare_event_cache
    from test_cache import synth_samples

    def slow(seed):
        if seed == 3:
            time.sleep(60)  # killed here, mid-write
        return synth_samples(seed)

    prepare_event_cache({path!r}, list(range(6)), slow, fingerprint="fp1", meta={{}},
                        num_workers=0, progress=False, chunk_events=16)
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_killed_preparation_leaves_nothing_that_looks_finished(tmp_path):
    path = tmp_path / "c.h5"
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("c.h5.tmp-*")):
            assert proc.poll() is None, "preparation exited before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # let it write samples of sources 0..2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = list(tmp_path.glob("c.h5.tmp-*"))
    assert leftovers and not path.exists()
    for p in leftovers:
        assert not cache_is_current(p, "fp1")  # even the partial file is not a valid cache
    # the next run cleans up the dead run's file and builds a complete cache
    c = ensure_event_cache(
        path, list(range(6)), load_synth, fingerprint="fp1", meta={}, num_workers=0, progress=False
    )
    assert len(c) == len(expected_samples(range(6)))
    assert list(tmp_path.glob("c.h5.tmp-*")) == []


# ----------------------------------------------------------------- dataset base / workers


class _Base(EventFrameDataset):
    sensor_size = (24, 32)


def _ref_frames(ev, n_frames, h, w):
    """split_by='number' count frames by the plain rule (spikingjelly's)."""
    out = np.zeros((n_frames, 2, h, w), np.int64)
    n = len(ev)
    di = n // n_frames
    for k in range(n_frames):
        lo, hi = k * di, (n if k == n_frames - 1 else (k + 1) * di)
        seg = ev[lo:hi]
        np.add.at(out[k], (seg["p"].astype(int), seg["y"].astype(int), seg["x"].astype(int)), 1)
    return out


def test_event_frame_dataset_frames_and_labels(tmp_path):
    path = tmp_path / "c.h5"
    prep(path, [0, 1, 2])
    ds = _Base(EventCache(path), n_frames=4)
    exp = expected_samples([0, 1, 2])
    assert len(ds) == len(exp) and ds.targets == [lab for _, lab in exp]
    for i, (ev, lab) in enumerate(exp):
        fr, y = ds[i]
        assert fr.dtype == torch.float32 and fr.shape == (4, 2, 24, 32) and y == lab
        np.testing.assert_array_equal(fr.numpy(), _ref_frames(ev, 4, 24, 32))


def test_sensor_size_from_cache_and_bad_arguments(tmp_path):
    path = tmp_path / "c.h5"
    prep(path, [0], sensor_size=(24, 32))
    ds = EventFrameDataset(EventCache(path), n_frames=2)
    assert ds.sensor_size == (24, 32) and ds[1][0].shape == (2, 2, 24, 32)
    prep(path, [0], fp="other")
    with pytest.raises(ValueError, match="sensor size unknown"):
        EventFrameDataset(EventCache(path))
    c = EventCache(path)
    with pytest.raises(ValueError, match="n_frames"):
        _Base(c, n_frames=0)
    with pytest.raises(ValueError, match="split_by"):
        _Base(c, split_by="count")
    with pytest.raises(ValueError, match="resize"):
        _Base(c, resize=64)
    with pytest.raises(ValueError, match="event_transform"):
        _Base(c, cache_frames=True, event_transform=lambda e, g: e)


def test_event_transform_gets_the_process_generator(tmp_path):
    path = tmp_path / "c.h5"
    prep(path, [0, 1])
    seen = []

    def drop_half(ev, rng):
        assert isinstance(rng, np.random.Generator)
        keep = rng.random(len(ev)) < 0.5
        seen.append(int(keep.sum()))
        return ev[keep]

    def run():
        torch.manual_seed(5)  # the main process's generators derive from the initial seed
        seed_worker(0)  # and restart from it
        ds = _Base(EventCache(path), n_frames=2, event_transform=drop_half)
        return [ds[i][0] for i in (1, 2)]

    a, b = run(), run()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert a[0].sum() == seen[0] and 0 < seen[0] < len(synth_samples(0)[1][0])
    # workers draw different streams than the parent: augmentations are not repeated
    ds = _Base(EventCache(path), n_frames=2, event_transform=drop_half)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, [1, 1]),
        batch_size=1,
        num_workers=2,
        generator=torch.Generator().manual_seed(0),
    )
    x0, x1 = (x for x, _ in loader)
    assert not torch.equal(x0, x1)


def test_dataloader_workers_read_the_same_as_in_process(tmp_path):
    path = tmp_path / "c.h5"
    prep(path, list(range(8)))
    ds = _Base(EventCache(path), n_frames=3)
    ref = [ds[i] for i in range(len(ds))]  # parent opened its handle before the fork
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    got_x = torch.cat([x for x, _ in loader])
    got_y = torch.cat([y for _, y in loader])
    torch.testing.assert_close(got_x, torch.stack([x for x, _ in ref]))
    assert got_y.tolist() == [y for _, y in ref]
    # the parent's handle still reads correctly after the workers are gone
    torch.testing.assert_close(ds[len(ds) - 1][0], ref[-1][0])


def test_frame_cache_matches_binning_and_is_keyed(tmp_path):
    path = tmp_path / "c.h5"
    prep(path, [0, 1, 2])
    plain = _Base(EventCache(path), n_frames=4)
    cached = _Base(EventCache(path), n_frames=4, cache_frames=True, progress=False)
    for i in range(len(plain)):
        torch.testing.assert_close(cached[i][0], plain[i][0])
    frame_files = sorted(p.name for p in tmp_path.glob("c-frames-*.h5"))
    assert len(frame_files) == 1
    with h5py.File(tmp_path / frame_files[0], "r") as f:
        assert f["frames"].dtype == np.uint16
        assert json.loads(f.attrs["key"])["n_frames"] == 4
    _Base(EventCache(path), n_frames=5, cache_frames=True, progress=False)
    assert len(list(tmp_path.glob("c-frames-*.h5"))) == 2  # other parameters, other file
    # reused: same parameters open the existing file without rewriting it
    mtime = (tmp_path / frame_files[0]).stat().st_mtime_ns
    _Base(EventCache(path), n_frames=4, cache_frames=True, progress=False)
    assert (tmp_path / frame_files[0]).stat().st_mtime_ns == mtime


def test_resize_sums_source_pixels(tmp_path):
    path = tmp_path / "c.h5"
    prep(path, [0, 1])
    full = _Base(EventCache(path), n_frames=3)
    half = _Base(EventCache(path), n_frames=3, resize=(12, 16))
    odd = _Base(EventCache(path), n_frames=3, resize=(7, 10))
    for i in range(len(full)):
        f = full[i][0].numpy()
        pooled = f.reshape(3, 2, 12, 2, 16, 2).sum(axis=(3, 5))
        np.testing.assert_array_equal(half[i][0].numpy(), pooled)
        # non-integer factor: pixel (y, x) -> (floor(y*7/24), floor(x*10/32))
        ref = np.zeros((3, 2, 7, 10))
        for yy in range(24):
            for xx in range(32):
                ref[:, :, yy * 7 // 24, xx * 10 // 32] += f[:, :, yy, xx]
        np.testing.assert_array_equal(odd[i][0].numpy(), ref)
