"""The DVS simulator: Numba kernels against the plain-Python reference, hand-computed cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evformer.events import EVENT_DTYPE, DVSSimulator, simulate
from evformer.events.core import is_sorted
from evformer.events.simulator import MIN_THRESHOLD_FRACTION, simulate_reference


def _quiet(h, w, *, threshold=0.2, sigma=0.0, refractory_us=0, seed=0):
    """A noiseless simulator (thresholds exactly ``threshold`` when sigma = 0)."""
    return DVSSimulator(
        h,
        w,
        rng=np.random.default_rng(seed),
        threshold=threshold,
        threshold_sigma=sigma,
        refractory_us=refractory_us,
        noise_rate_hz=0.0,
    )


def _ramp(i0, i1, t1=1000):
    """One pixel going from i0 to i1 between t = 0 and t = t1."""
    return np.array([i0, i1], dtype=np.float64).reshape(2, 1, 1), np.array([0, t1])


# --------------------------------------------------------------------------- hand-computed


@pytest.mark.parametrize("i0, i1, pol", [(0.2, 0.9, 1), (0.9, 0.2, 0)])
def test_single_pixel_ramp_counts_polarity_and_interpolated_times(i0, i1, pol):
    c = 0.2
    frames, times = _ramp(i0, i1)
    ev = _quiet(1, 1, threshold=c).step(frames, times)
    dl = abs(math.log(i1) - math.log(i0))  # log(4.5) = 1.504: 7 crossings of 0.2
    n = math.floor(dl / c)
    assert n == 7
    assert ev.dtype == EVENT_DTYPE and len(ev) == n
    assert np.all(ev["p"] == pol) and np.all(ev["x"] == 0) and np.all(ev["y"] == 0)
    # The k-th crossing lies k*C along the linear log ramp: t = 1000 * k*C / dL.
    expected = [math.floor(1000 * k * c / dl + 0.5) for k in range(1, n + 1)]
    assert ev["t"].tolist() == expected


def test_reference_level_carries_over_between_frames():
    # log I: 0 -> 0.3 -> 0.5 with C = 0.2: one event in each interval, the second at the
    # crossing of 0.4, half-way through (the 0.1 left over from the first interval counts).
    frames = np.exp(np.array([0.0, 0.3, 0.5])).reshape(3, 1, 1) / np.e
    times = np.array([0, 300, 500])
    ev = _quiet(1, 1).step(frames, times)
    assert ev["p"].tolist() == [1, 1]
    assert ev["t"].tolist() == [round(300 * 0.2 / 0.3), 300 + 100]


def test_refractory_period_suppresses_and_the_reference_still_moves():
    c, refr = 0.2, 300
    up, times = _ramp(0.2, 0.9)
    dl = math.log(4.5)
    all_t = [math.floor(1000 * k * c / dl + 0.5) for k in range(1, 8)]  # 133, 266, ..., 931
    kept, last = [], None
    for t in all_t:  # greedy: an event is emitted only refr µs after the last emitted one
        if last is None or t - last >= refr:
            kept.append(t)
            last = t
    assert kept == [133, 532, 931]
    sim = _quiet(1, 1, threshold=c, refractory_us=refr)
    ev = sim.step(up, times)
    assert ev["t"].tolist() == kept
    # The suppressed crossings still moved the reference: going back down gives all 7 OFF
    # events (a simulator that froze the reference during refractory would give 3).
    back = sim.step(np.full((1, 1, 1), 0.19), np.array([1_000_000]))  # 1.45 below the ref
    assert len(back) == 7 and np.all(back["p"] == 0)


def test_no_change_no_events_without_noise():
    frames = np.full((5, 8, 9), 0.37)
    ev = simulate(frames, np.arange(5) * 1000, rng=np.random.default_rng(0), noise_rate_hz=0.0)
    assert len(ev) == 0 and ev.dtype == EVENT_DTYPE


def test_eps_floors_the_log():
    # Intensities at or below eps are all eps: 0 -> 1e-4 is no change at all.
    frames = np.array([0.0, 1e-4]).reshape(2, 1, 1)
    assert len(_quiet(1, 1).step(frames, np.array([0, 10]))) == 0
    # 0 -> 1 is a log change of -log(eps) = 6.9: floor(6.9 / 0.2) = 34 ON events.
    ev = _quiet(1, 1).step(np.array([0.0, 1.0]).reshape(2, 1, 1), np.array([0, 10]))
    assert len(ev) == 34 and np.all(ev["p"] == 1)


# --------------------------------------------------------------------------- noise


def test_background_noise_rate_and_uniformity():
    h, w, rate, dur = 32, 32, 5.0, 2_000_000
    frames = np.full((3, h, w), 0.5)
    times = np.array([0, dur // 2, dur])
    ev = simulate(frames, times, rng=np.random.default_rng(1), noise_rate_hz=rate)
    lam = rate * h * w * dur * 1e-6  # 10240 expected
    assert abs(len(ev) - lam) < 5 * math.sqrt(lam)
    assert is_sorted(ev["t"]) and ev["t"].min() > 0 and ev["t"].max() <= dur
    n = len(ev)
    assert abs(ev["p"].mean() - 0.5) < 5 * 0.5 / math.sqrt(n)
    assert abs(ev["t"].mean() - dur / 2) < 5 * (dur / math.sqrt(12)) / math.sqrt(n)
    for field, size in (("x", w), ("y", h)):
        counts = np.bincount(ev[field], minlength=size)
        assert counts.shape == (size,)
        expected = n / size
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < size - 1 + 5 * math.sqrt(2 * (size - 1))  # df 31: mean 31, sd 7.9


def test_noise_off_gives_exactly_the_reference():
    rng = np.random.default_rng(3)
    frames = rng.uniform(0.05, 1.0, (6, 4, 5))
    times = np.cumsum(rng.integers(50, 500, 6))
    sim = DVSSimulator(4, 5, rng=np.random.default_rng(4), noise_rate_hz=0.0, refractory_us=50)
    ev = sim.step(frames, times)
    ref = simulate_reference(
        frames, times, c_on=sim.c_on, c_off=sim.c_off, refractory_us=50, eps=sim.eps
    )
    assert len(ev) > 0
    np.testing.assert_array_equal(ev, ref)


# --------------------------------------------------------------------------- kernel vs reference


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 7),
    h=st.integers(1, 4),
    w=st.integers(1, 5),
    refractory=st.sampled_from([0, 30, 400]),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernel_matches_reference(n, h, w, refractory, seed):
    rng = np.random.default_rng(seed)
    # Mix large jumps, small changes and unchanged pixels.
    frames = rng.uniform(0.01, 1.0, (n, h, w))
    frames[:, rng.random((h, w)) < 0.3] = 0.5
    frames[1:] = np.where(rng.random((n - 1, h, w)) < 0.3, frames[:-1], frames[1:])
    times = np.cumsum(rng.integers(1, 2000, n))
    sim = DVSSimulator(
        h, w, rng=rng, threshold=0.2, threshold_sigma=0.05, refractory_us=refractory,
        noise_rate_hz=0.0,
    )  # fmt: skip
    ev = sim.step(frames, times)
    ref = simulate_reference(
        frames, times, c_on=sim.c_on, c_off=sim.c_off, refractory_us=refractory
    )
    np.testing.assert_array_equal(ev, ref)


def test_streaming_in_chunks_equals_one_call():
    rng = np.random.default_rng(7)
    frames = rng.uniform(0.05, 1.0, (30, 6, 7))
    times = np.cumsum(rng.integers(10, 1000, 30))
    whole = _quiet(6, 7, sigma=0.03, refractory_us=200, seed=11).step(frames, times)
    sim = _quiet(6, 7, sigma=0.03, refractory_us=200, seed=11)
    parts = [sim.step(frames[0], int(times[0]))]  # a single [H, W] frame first
    for a, b in ((1, 4), (4, 5), (5, 17), (17, 30)):
        parts.append(sim.step(frames[a:b], times[a:b]))
    assert sim.time_us == times[-1]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_events_different_seed_different():
    rng = np.random.default_rng(0)
    frames = rng.uniform(0.05, 1.0, (10, 16, 16))
    times = np.arange(10) * 1000
    a = simulate(frames, times, rng=np.random.default_rng(5), noise_rate_hz=20.0)
    b = simulate(frames, times, rng=np.random.default_rng(5), noise_rate_hz=20.0)
    c = simulate(frames, times, rng=np.random.default_rng(6), noise_rate_hz=20.0)
    np.testing.assert_array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


def test_threshold_mismatch_statistics_and_clipping():
    sim = DVSSimulator(100, 100, rng=np.random.default_rng(0), threshold=0.2, threshold_sigma=0.03)
    for c in (sim.c_on, sim.c_off):
        assert c.shape == (100, 100)
        assert abs(c.mean() - 0.2) < 0.002 and abs(c.std() - 0.03) < 0.002
    assert abs(np.corrcoef(sim.c_on.ravel(), sim.c_off.ravel())[0, 1]) < 0.05  # independent
    wide = DVSSimulator(50, 50, rng=np.random.default_rng(0), threshold=0.2, threshold_sigma=0.2)
    assert wide.c_on.min() == pytest.approx(MIN_THRESHOLD_FRACTION * 0.2)
    assert (wide.c_on == MIN_THRESHOLD_FRACTION * 0.2).mean() > 0.1  # ~23% clipped


def test_output_is_sorted_events_within_the_sensor():
    rng = np.random.default_rng(2)
    frames = rng.uniform(0.05, 1.0, (8, 5, 9))
    times = 100 + np.arange(8) * 250
    ev = simulate(frames, times, rng=rng, noise_rate_hz=100.0)
    assert ev.dtype == EVENT_DTYPE and len(ev) > 0
    assert is_sorted(ev["t"]) and ev["t"].min() >= times[0] and ev["t"].max() <= times[-1]
    assert ev["x"].min() >= 0 and ev["x"].max() < 9 and ev["y"].min() >= 0 and ev["y"].max() < 5
    assert set(np.unique(ev["p"]).tolist()) <= {0, 1}


# --------------------------------------------------------------------------- errors


def test_bad_input_raises_clear_errors():
    rng = np.random.default_rng(0)
    frames = np.full((3, 2, 2), 0.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        simulate(frames, np.array([0, 5, 5]), rng=rng)
    with pytest.raises(ValueError, match=r"times_us: expected shape \(3,\)"):
        simulate(frames, np.array([0, 5]), rng=rng)
    with pytest.raises(ValueError, match="frames: expected shape"):
        simulate(frames[0], np.array([0]), rng=rng)
    with pytest.raises(ValueError, match="finite and >= 0"):
        simulate(-frames, np.array([0, 1, 2]), rng=rng)
    bad = frames.copy()
    bad[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        simulate(bad, np.array([0, 1, 2]), rng=rng)
    with pytest.raises(ValueError, match="integer microseconds"):
        simulate(frames, np.array([0.0, 1.5, 2.0]), rng=rng)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        simulate(frames, np.array([0, 1, 2]), rng=0)
    with pytest.raises(ValueError, match="threshold: must be > 0"):
        simulate(frames, np.array([0, 1, 2]), rng=rng, threshold=0.0)
    sim = DVSSimulator(2, 2, rng=rng)
    sim.step(frames, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="time must move forward"):
        sim.step(frames[:1], np.array([2]))
    with pytest.raises(ValueError, match=r"expected shape \[K, 2, 2\]"):
        sim.step(np.full((1, 3, 2), 0.5), np.array([10]))
