"""Data-layer hardening: build lock and worker lifetime, cache corruption, bad labels files,
empty splits, read-only data roots, files that are not checkpoints."""

from __future__ import annotations

import contextlib
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
    CacheCorruptError,
    CachePreparationError,
    EventCache,
    cache_is_current,
    ensure_event_cache,
    prepare_event_cache,
)
from evformer.data.neuromorphic import CIFAR10_DVS_CLASSES, CIFAR10DVS, DVSGesture, cifar10dvs_split
from evformer.engine.checkpoint import load_checkpoint, save_checkpoint
from evformer.events import from_columns, write_aedat2, write_aedat31

QUIET = dict(num_workers=0, progress=False)


def small_samples(seed: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(2):
        n = int(rng.integers(50, 400))
        t = np.sort(rng.integers(0, 10**6, n))
        ev = from_columns(t, rng.integers(0, 32, n), rng.integers(0, 24, n), rng.integers(0, 2, n))
        out.append((ev, int(seed + k) % 3))
    return out


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(d.name))
    return out


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


# ----------------------------------------------------------------- item 1: lock, workers

_PREP_SCRIPT = textwrap.dedent(
    """
    import time
    from evformer.data.cache import ensure_event_cache
    from evformer.events import from_columns

    def slow(seed):
        if seed >= 1:
            time.sleep(60)  # the parent is killed while workers sit here
        return [(from_columns([1, 2], [0, 1], [0, 1], [0, 1]), 0)]

    ensure_event_cache({path!r}, list(range(8)), slow, fingerprint="fp", meta={{}},
                       num_workers=2, progress=False)
    """
)


def quick_load(seed: int):
    return [(from_columns([1, 2, 3], [0, 1, 2], [0, 1, 2], [0, 1, 0]), 0)]


@pytest.mark.slow  # a fresh interpreter imports h5py and numba
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_parallel_preparation_leaves_no_worker_and_no_lock(tmp_path):
    path = tmp_path / "c.h5"
    proc = subprocess.Popen([sys.executable, "-c", _PREP_SCRIPT.format(path=str(path))])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 or not list(tmp_path.glob("c.h5.tmp-*")):
            assert proc.poll() is None, "preparation exited before it was killed"
            assert time.monotonic() < deadline, "workers never started"
            time.sleep(0.1)
            workers = _children(proc.pid)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        deadline = time.monotonic() + 10
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if _running(w)]
        assert not survivors, f"worker processes {survivors} outlived the killed preparation"
        # the next run neither blocks nor waits long: it builds the cache
        t0 = time.monotonic()
        c = ensure_event_cache(
            path, list(range(4)), quick_load, fingerprint="fp2", meta={}, lock_timeout=30, **QUIET
        )
        assert len(c) == 4 and time.monotonic() - t0 < 30
    finally:
        for w in workers:  # only if the fix failed: do not leave our own orphans behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open({lock!r}, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, ("%d %s\\n" % (os.getpid(), os.uname().nodename)).encode())
    if {orphan!r}:
        child = os.fork()
        if child:  # the recorded holder exits; its forked child keeps the lock
            print(child, flush=True)
            os._exit(0)
        time.sleep(60)
        os._exit(0)
    print(os.getpid(), flush=True)
    time.sleep(60)
    """
)


def _hold_lock(path: Path, *, orphan: bool) -> tuple[subprocess.Popen, int]:
    lock = path.with_name(path.name + ".lock")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(lock=str(lock), orphan=orphan)],
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(proc.stdout.readline())
    proc.stdout.close()
    return proc, pid


def test_waiting_for_the_lock_names_file_and_holder_and_times_out(tmp_path, capsys):
    path = tmp_path / "c.h5"
    proc, pid = _hold_lock(path, orphan=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            with cache_mod._build_lock(path, timeout=1.0):
                pass
        assert time.monotonic() - t0 < 10
        msg = str(info.value)
        assert "c.h5.lock" in msg and str(pid) in msg
        err = capsys.readouterr().err
        assert err.count("waiting for") == 1 and "c.h5.lock" in err and str(pid) in err
    finally:
        proc.kill()
        proc.wait()
    # released by the holder's death: taken at once
    with cache_mod._build_lock(path, timeout=5.0):
        pass


def test_lock_left_to_an_orphan_of_a_dead_run_is_taken_over(tmp_path, capsys):
    path = tmp_path / "c.h5"
    proc, child = _hold_lock(path, orphan=True)
    proc.wait()
    try:
        t0 = time.monotonic()
        with cache_mod._build_lock(path, timeout=20.0):
            assert time.monotonic() - t0 < 15
        assert "no longer runs" in capsys.readouterr().err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_forked_child_does_not_hold_the_build_lock(tmp_path):
    path = tmp_path / "c.h5"
    lock = str(path) + ".lock"
    with cache_mod._build_lock(path, timeout=5.0):
        pid = os.fork()
        if pid == 0:  # child: sleep holding whatever it inherited
            time.sleep(30)
            os._exit(0)
    try:
        # the parent released it: another process can take it although the child lives
        code = (
            f"import fcntl, os; fd = os.open({lock!r}, os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ----------------------------------------------------------------- item 2: corruption


def _prep(path, sources=(0, 1, 2, 3), fp="fp", **kw):
    return prepare_event_cache(
        path,
        list(sources),
        small_samples,
        fingerprint=fp,
        meta={"classes": ["a", "b", "c"]},
        sensor_size=(24, 32),
        chunk_events=64,
        **QUIET,
        **kw,
    )


def _snapshot(path: Path):
    c = EventCache(path)
    return (
        c.labels.tolist(),
        c.offsets.tolist(),
        c.source_index.tolist(),
        c.source_names,
        c.meta,
        c.bad,
        c.sensor_size,
        [c.events(i).tobytes() for i in range(len(c))],
    )


def test_every_stored_dataset_has_checksums_with_scaleoffset(tmp_path):
    path = tmp_path / "c.h5"
    _prep(path)
    with h5py.File(path, "r") as f:
        for name in ("t", "x", "y", "p", "offsets", "labels", "source_index", "source_names"):
            assert f[name].fletcher32, name
        assert f["t"].scaleoffset == 0
        assert "index_digest" in f.attrs
        # no variable-length strings: HDF5's global heap has no checksum (and a corrupted
        # one can hang the reader)
        assert h5py.check_string_dtype(f["source_names"].dtype).length is not None
        for key in ("fingerprint", "meta", "bad", "sensor_size", "index_digest"):
            assert isinstance(f.attrs[key], np.bytes_), key


def test_corrupted_cache_never_reads_back_different_data(tmp_path):
    path = tmp_path / "c.h5"
    _prep(path)
    good = path.read_bytes()
    want = _snapshot(path)
    rng = np.random.default_rng(0)
    cases = [("zero 4 KiB", o, None) for o in range(0, len(good), 4096)]
    cases += [("flip", int(o), None) for o in rng.choice(len(good), 250, replace=False)]
    bad = tmp_path / "bad.h5"
    detected = harmless = 0
    for kind, off, _ in cases:
        data = bytearray(good)
        if kind == "flip":
            data[off] ^= 0xFF
        else:
            data[off : off + 4096] = bytes(len(data[off : off + 4096]))
        bad.write_bytes(bytes(data))
        if not cache_is_current(bad, "fp"):
            detected += 1
            continue
        try:
            got = _snapshot(bad)
        except (CacheCorruptError, ValueError) as err:
            assert "bad.h5" in str(err), f"{kind} at {off}: error does not name the file: {err}"
            detected += 1
            continue
        assert got == want, f"{kind} at byte {off} read back different data silently"
        harmless += 1
    assert detected > len(cases) // 2  # most bytes of a small cache matter


def test_corrupt_chunk_read_error_names_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "c.h5"
    _prep(path)
    with h5py.File(path, "r") as f:
        off = f["t"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[off + 5] ^= 0x55
    path.write_bytes(bytes(data))
    c = EventCache(path)  # the small index is intact: opening works
    with pytest.raises(CacheCorruptError, match=r"c\.h5.*delete it"):
        c.events(0)


def test_corrupt_index_is_rebuilt_or_refused_naming_the_file(tmp_path):
    path = tmp_path / "c.h5"
    _prep(path)
    with h5py.File(path, "r+") as f:
        f["labels"][0] = 245  # a label outside the 3 classes, file otherwise valid
    assert not cache_is_current(path, "fp")
    with pytest.raises(ValueError, match=r"c\.h5"):
        EventCache(path)

    # the sources are gone: refused, naming the cache file
    def gone(seed):
        raise FileNotFoundError(f"source {seed} is gone")

    with (
        pytest.warns(UserWarning, match="corrupt"),
        pytest.raises(CachePreparationError, match=r"c\.h5.*corrupt"),
    ):
        ensure_event_cache(path, [0, 1], gone, fingerprint="fp", meta={}, **QUIET)
    # the sources are there: rebuilt (with a warning)
    with pytest.warns(UserWarning, match="corrupt"):
        c = ensure_event_cache(
            path,
            [0, 1, 2, 3],
            small_samples,
            fingerprint="fp",
            meta={"classes": ["a", "b", "c"]},
            **QUIET,
        )
    assert c.labels[0] != 245


def test_offsets_and_labels_are_validated_on_open(tmp_path):
    path = tmp_path / "c.h5"
    _prep(path)
    # rewrite consistent-looking but wrong index values and a matching digest: still refused
    with h5py.File(path, "r+") as f:
        off = f["offsets"][()]
        off[2], off[3] = off[3], off[2]  # not monotonic
        del f["offsets"]
        f.create_dataset("offsets", data=off)
        f.attrs["index_digest"] = cache_mod._index_digest(f)
    with pytest.raises(ValueError, match=r"offsets"):
        EventCache(path)


# ----------------------------------------------------------------- items 4, 8: labels CSV


def _gesture(root: Path, rows: list[str]) -> None:
    folder = root / "DvsGesture"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    n = 500
    t = np.sort(rng.integers(1_000, 1_001_000, n))
    ev = from_columns(t, rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n))
    write_aedat31(folder / "user01_lab.aedat", ev)
    write_aedat31(folder / "user02_lab.aedat", ev)
    (folder / "user01_lab_labels.csv").write_text(
        "class,startTime_usec,endTime_usec\n" + "".join(r + "\n" for r in rows)
    )
    (folder / "user02_lab_labels.csv").write_text(
        "class,startTime_usec,endTime_usec\n1,1000,500000\n"
    )
    (folder / "trials_to_train.txt").write_text("user01_lab.aedat\nuser02_lab.aedat\n")


@pytest.mark.parametrize(
    "rows, what",
    [
        (["1,1000,500000", "2,5000000,6000000"], "line 3"),  # beyond the end
        (["1,1,2", "2,1000,500000"], "line 2"),  # wrong units (ms): no events
        (["1,1000,500000", "2,600000,600000"], "line 3"),  # start == end
        ([], "no label rows"),  # header only
    ],
)
def test_labels_rows_without_events_are_refused_or_skipped(tmp_path, rows, what):
    _gesture(tmp_path, rows)
    with pytest.raises(CachePreparationError) as info:
        DVSGesture(tmp_path, "train", **QUIET)
    msg = str(info.value)
    assert "user01_lab_labels.csv" in msg and what in msg and "skip_bad" in msg
    with pytest.warns(UserWarning, match="user01_lab"):
        ds = DVSGesture(tmp_path, "train", skip_bad=True, **QUIET)
    assert len(ds) == 1 and len(ds.skipped) == 1  # user02's one sample; user01 reported
    assert all(len(ds.events(i)) for i in range(len(ds)))


def test_labels_value_beyond_int64_names_file_and_row(tmp_path):
    _gesture(tmp_path, ["1,1000,500000", "2,99999999999999999999999,6000000"])
    with pytest.raises(CachePreparationError, match=r"user01_lab_labels\.csv: line 3"):
        DVSGesture(tmp_path, "train", **QUIET)
    with pytest.warns(UserWarning, match="user01_lab"):
        ds = DVSGesture(tmp_path, "train", skip_bad=True, **QUIET)
    assert len(ds) == 1


# ----------------------------------------------------------------- item 5: empty split


def test_cifar10dvs_class_too_small_for_a_test_split_is_named(tmp_path):
    rng = np.random.default_rng(0)
    for cls in CIFAR10_DVS_CLASSES:
        d = tmp_path / "CIFAR10-DVS" / cls
        d.mkdir(parents=True)
        for i in range(9 if cls != "airplane" else 12):
            n = 20
            t = np.sort(rng.integers(0, 1000, n))
            ev = from_columns(t, rng.integers(0, 128, n), rng.integers(0, 128, n), np.ones(n))
            write_aedat2(d / f"cifar10_{cls}_{i}.aedat", ev)
    with pytest.raises(ValueError, match=r"'test'.*automobile.*9"):
        cifar10dvs_split(tmp_path / "CIFAR10-DVS", "test")
    with pytest.raises(ValueError, match=r"'test'.*automobile"):
        CIFAR10DVS(tmp_path, "test", cache_frames=True, **QUIET)
    assert len(cifar10dvs_split(tmp_path / "CIFAR10-DVS", "train")) == 11 + 9 * 9


def test_empty_dataset_is_refused_before_hdf5(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(ValueError, match="no sources"):
        ensure_event_cache(path, [], small_samples, fingerprint="fp", meta={}, **QUIET)


# ----------------------------------------------------------------- item 10: read-only root


def test_read_only_root_with_a_current_cache_is_used(tmp_path, monkeypatch):
    _gesture(tmp_path, ["1,1000,500000"])
    DVSGesture(tmp_path, "train", **QUIET)  # prepared while writable
    ro = {str(tmp_path / ".evformer"), str(tmp_path)}
    real = os.access

    def access(p, mode, *a, **kw):  # tests may run as root, for whom chmod does not bind
        if mode & os.W_OK and os.fspath(p) in ro:
            return False
        return real(p, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    assert len(DVSGesture(tmp_path, "train", **QUIET)) == 2
    # a missing or stale cache still needs a writable folder, and says so
    (tmp_path / ".evformer" / "dvsgesture-train.h5").unlink()
    with pytest.raises(PermissionError, match="not writable"):
        DVSGesture(tmp_path, "train", **QUIET)


# ----------------------------------------------------------------- item 11: not a checkpoint


@pytest.mark.parametrize(
    "content",
    [b"", b"\x13" + np.random.default_rng(0).bytes(3000), b"hello, world\n", b"PK\x03\x04junk"],
)
def test_a_file_that_is_not_a_checkpoint_is_called_so(tmp_path, content):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_checkpoint(p)
    msg = str(info.value)
    assert "not a checkpoint" in msg and "ckpt.pt" in msg and "pickles" not in msg


class _Custom:
    pass


def test_checkpoint_with_python_objects_still_says_so(tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save({"obj": _Custom()}, p)
    with pytest.raises(ValueError, match="pickles Python objects"):
        load_checkpoint(p)
    save_checkpoint(p, {"model": {"w": torch.zeros(2)}})
    assert load_checkpoint(p)["model"]["w"].shape == (2,)
    p.write_bytes(p.read_bytes()[:-200])  # a partial copy
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(p)
