"""evformer.events hardening: corrupt timestamps made visible, tonic-compatible crop and ranges."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evformer.events import (
    EVENT_DTYPE,
    AedatError,
    UnsortedEventsWarning,
    from_columns,
    read_aedat,
    read_aedat2,
    read_aedat31,
    to_frames,
    write_aedat2,
    write_aedat31,
)
from evformer.events import aedat as aedat_mod
from evformer.events import augment as A

JITTER = aedat_mod.UNSORTED_JITTER_US


def monotonic(n=20_000, span=2_200_000, seed=0, t0=1_000):
    """A time-ordered DVS128 stream of ``n`` events over ``span`` µs (a CIFAR10-DVS-like sample)."""
    rng = np.random.default_rng(seed)
    t = t0 + np.sort(rng.integers(0, span, n))
    return from_columns(t, rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n))


def read_quiet(fn, path, **kw):
    """Read with both backends; no warning may be raised, and both must agree."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = fn(path, backend="numba", **kw)
        b = fn(path, backend="numpy", **kw)
    np.testing.assert_array_equal(a, b)
    return a


def read_warned(fn, path, **kw) -> UnsortedEventsWarning:
    """Read with both backends; each must warn once, identically. Returns the warning."""
    got = []
    for backend in ("numba", "numpy"):
        with pytest.warns(UnsortedEventsWarning) as rec:
            ev = fn(path, backend=backend, **kw)
        assert len(rec) == 1
        assert np.all(np.diff(ev["t"]) >= 0)  # still sorted, nothing dropped
        got.append(rec[0].message)
    a, b = got
    assert str(a) == str(b)
    return a


# ----------------------------------------------------------------- item 6: corrupt timestamps


def _flip_aedat2(path, index, bit, n):
    """Flip ``bit`` of record ``index``'s timestamp in an AEDAT 2.0 file of ``n`` records."""
    data = bytearray(path.read_bytes())
    rec = len(data) - 8 * (n - index)
    ts = int.from_bytes(data[rec + 4 : rec + 8], "big") ^ (1 << bit)
    data[rec + 4 : rec + 8] = ts.to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return rec


@pytest.mark.parametrize("bit", [31, 25, 20])
def test_flipped_timestamp_bit_warns_with_count_and_displacement(tmp_path, bit):
    ev = monotonic()
    n = len(ev)
    # bit 20 is set in this event's timestamp: the flip clears it (a jump back in time);
    # bits 25 and 31 are clear everywhere: the flip throws the event 2**bit µs ahead.
    k = int(np.flatnonzero(ev["t"] >> 20 & 1)[100]) if bit == 20 else n // 3
    path = write_aedat2(tmp_path / "flip.aedat", ev)
    rec = _flip_aedat2(path, k, bit, n)
    w = read_warned(read_aedat2, path)
    assert w.path == str(path) and w.n_events == 1 and w.event_index == k
    # the event lies 2**bit µs from its place, less the gap to its neighbour
    assert 0 <= (1 << bit) - w.max_displacement_us < 2_000
    msg = str(w)
    assert str(path) in msg and "1 event" in msg and str(w.max_displacement_us) in msg
    assert "on_unsorted='raise'" in msg
    # the events are kept and sorted: a forward flip still ends the stream 2**bit µs late
    with pytest.warns(UnsortedEventsWarning):
        got = read_aedat(path)
    assert len(got) == n
    if bit > 20:
        assert got["t"][-1] == ev["t"][k] + (1 << bit)
    # 'raise' still refuses at the first record whose timestamp steps back
    with pytest.raises(AedatError) as e:
        read_aedat2(path, on_unsorted="raise")
    assert e.value.offset == (rec + 8 if bit > 20 else rec)


def test_small_jitter_is_sorted_silently(tmp_path):
    ev = monotonic()
    t = ev["t"].copy()
    t[::97] -= 50  # DVS128-like small back-steps between packets
    t[5_000] = t[4_999] - JITTER  # the bound itself is still plausible jitter
    jittered = ev.copy()
    jittered["t"] = t
    want = jittered[np.argsort(t, kind="stable")]
    for write, read in ((write_aedat2, read_aedat2), (write_aedat31, read_aedat31)):
        path = write(tmp_path / f"jitter_{read.__name__}.aedat", jittered)
        np.testing.assert_array_equal(read_quiet(read, path), want)
    # one µs beyond the bound is reported
    jittered["t"][5_000] = jittered["t"][4_999] - JITTER - 1
    path = write_aedat2(tmp_path / "beyond.aedat", jittered)
    w = read_warned(read_aedat2, path)
    assert (w.n_events, w.max_displacement_us, w.event_index) == (1, JITTER + 1, 5_000)


def test_corrupt_aedat31_packet_block_warns(tmp_path):
    """A packet whose overflow counter is wrong moves a whole block: every event is counted."""
    ev = monotonic(n=8_000, seed=3)
    bad = ev.copy()
    bad["t"][4096 : 4096 + 512] += 1 << 31  # as if eventTSOverflow were off by one
    path = write_aedat31(tmp_path / "ovf.aedat", bad, events_per_packet=512)
    w = read_warned(read_aedat31, path)
    assert w.n_events == 512 and w.event_index >= 4096
    assert 0 <= (1 << 31) - w.max_displacement_us < 10_000


def test_unsorted_warning_is_a_userwarning_and_can_be_an_error(tmp_path):
    ev = monotonic(n=1000)
    ev["t"][10] += 10**9
    path = write_aedat2(tmp_path / "w.aedat", ev)
    assert issubclass(UnsortedEventsWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsortedEventsWarning)
        with pytest.raises(UnsortedEventsWarning, match="1 event"):
            read_aedat(path)


def _lnds_length_brute(t):
    best = [1] * len(t)
    for i in range(len(t)):
        for j in range(i):
            if t[j] <= t[i]:
                best[i] = max(best[i], best[j] + 1)
    return max(best, default=0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=40))
def test_longest_sorted_kernel_matches_reference(values):
    t = np.asarray(values, dtype=np.int64)
    got = aedat_mod._longest_sorted_nb(t)
    np.testing.assert_array_equal(got, aedat_mod._longest_sorted_reference(t))
    kept = t[got]
    assert np.all(np.diff(kept) >= 0) and kept.size == _lnds_length_brute(values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 20_000), max_size=40))
def test_displacement_definition(values):
    """Reported iff some pair is more than the jitter apart in the wrong order (or none moves)."""
    t = np.asarray(values, dtype=np.int64)
    for backend in ("numba", "numpy"):
        n, d, i = aedat_mod._displaced(t, backend)
        lag = np.maximum.accumulate(t) - t if t.size else t
        if t.size == 0 or lag.max() <= JITTER:
            assert (n, d, i) == (0, 0, -1)
        else:
            assert d <= lag.max() and (n == 0) == (d <= JITTER)
            if n:
                assert 0 <= i < t.size


# ----------------------------------------------------------------- CenterCrop larger than sensor


def _tonic_center_crop():
    if importlib.util.find_spec("tonic") is None:
        pytest.skip("tonic is not installed")
    from tonic.transforms import CenterCrop

    return CenterCrop


@pytest.mark.parametrize("size", [(20, 30), (21, 27), (16, 31), (9, 40), (30, 11), (16, 24)])
def test_center_crop_pads_like_tonic(size):
    sensor = (16, 24)  # (height, width)
    rng = np.random.default_rng(1)
    n = 2000
    e = from_columns(
        np.sort(rng.integers(0, 10_000, n)),
        rng.integers(0, sensor[1], n),
        rng.integers(0, sensor[0], n),
        rng.integers(0, 2, n),
    )
    h, w = size
    got = A.center_crop(e, size, sensor_size=sensor)
    assert A.CenterCrop(size, sensor_size=sensor)(e).tobytes() == got.tobytes()
    # tonic: sensor_size (W, H, P), size (W, H) in effect (it compares size[0] with W)
    want = _tonic_center_crop()(sensor_size=(sensor[1], sensor[0], 2), size=(w, h))(e.copy())
    np.testing.assert_array_equal(got, want)
    assert got["x"].min() >= 0 and got["x"].max() < w and got["y"].max() < h
    if h >= sensor[0] and w >= sensor[1]:  # pure padding: every event kept, shifted
        assert len(got) == n
        np.testing.assert_array_equal(got["x"] - e["x"], (w - sensor[1] + 1) // 2)
        np.testing.assert_array_equal(got["y"] - e["y"], (h - sensor[0] + 1) // 2)


def test_center_crop_pad_hand_example():
    e = np.array([(0, 0, 0, 1), (5, 127, 127, 0)], dtype=EVENT_DTYPE)
    out = A.center_crop(e, (131, 130), sensor_size=(128, 128))
    # pad ceil(3/2) = 2 rows on top, 1 column on the left; no event added or removed
    np.testing.assert_array_equal(out["x"], [1, 128])
    np.testing.assert_array_equal(out["y"], [2, 129])
    frames = to_frames(out, 1, "number", height=131, width=130)
    assert frames.sum() == 2 and frames[0, 1, 2, 1] == 1 and frames[0, 0, 129, 128] == 1


# ----------------------------------------------------------------- RefractoryPeriod range


def test_refractory_period_range_draws_from_rng():
    e = np.array([(0, 1, 1, 1), (300, 1, 1, 0), (600, 1, 1, 1), (1000, 1, 1, 0)], dtype=EVENT_DTYPE)
    tr = A.RefractoryPeriod(period=(200, 700), sensor_size=(4, 4))
    assert tr.period == (200, 700)
    for seed in range(20):
        want_period = int(np.random.default_rng(seed).integers(200, 700, endpoint=True))
        want = A.refractory_period(e, period=want_period, sensor_size=(4, 4))
        np.testing.assert_array_equal(tr(e, np.random.default_rng(seed)), want)
    # hand-computed: period 300 keeps 0, 300, 600 (gaps equal to the period are kept), 1000
    # is 400 after 600: kept; period 500 keeps 0, 600 (1000 is only 400 later)
    np.testing.assert_array_equal(
        A.refractory_period(e, period=300, sensor_size=(4, 4))["t"], [0, 300, 600, 1000]
    )
    np.testing.assert_array_equal(
        A.refractory_period(e, period=500, sensor_size=(4, 4))["t"], [0, 600]
    )
    # every period in [low, high], both ends included, is drawn
    rng = np.random.default_rng(0)
    narrow = A.RefractoryPeriod(period=(300, 301), sensor_size=(4, 4))
    lens = {len(narrow(e, rng)) for _ in range(200)}
    assert lens == {4, 3}  # 300 keeps 4 events; 301 drops the t=300 one
    with pytest.raises(TypeError, match="Generator"):
        tr(e, None)
    assert len(A.RefractoryPeriod(period=(0, 10))(e[:0], np.random.default_rng(0))) == 0


@pytest.mark.parametrize("bad", [(5, 1), (-1, 3), (1, 2, 3), (0.5, 2), "10"])
def test_refractory_period_range_validation(bad):
    with pytest.raises(ValueError, match="RefractoryPeriod: period"):
        A.RefractoryPeriod(period=bad)


def test_refractory_period_scalar_stays_deterministic():
    e = np.array([(0, 1, 1, 1), (300, 1, 1, 0)], dtype=EVENT_DTYPE)
    tr = A.RefractoryPeriod(period=300, sensor_size=(4, 4))
    np.testing.assert_array_equal(tr(e), e)  # no generator needed
    fixed_range = A.RefractoryPeriod(period=(300, 300), sensor_size=(4, 4))
    assert fixed_range(e, np.random.default_rng(0)).size == 2
