"""Event-level augmentation: kernels vs plain-Python references, exact results, reproducibility."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evformer.events import EVENT_DTYPE, from_columns
from evformer.events import augment as A

SENSOR = (16, 24)  # (height, width): small, non-square, so x/y mix-ups show


def make_events(n=3000, seed=0, sensor=SENSOR, t_span=100_000, t0=0):
    rng = np.random.default_rng(seed)
    h, w = sensor
    t = np.sort(rng.integers(t0, t0 + t_span, n))
    return from_columns(t, rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n))


def ev(rows):
    """Events from (t, x, y, p) tuples."""
    return np.array([tuple(r) for r in rows], dtype=EVENT_DTYPE)


def is_subsequence(sub: np.ndarray, seq: np.ndarray) -> bool:
    it = iter(seq.tolist())
    return all(any(s == q for q in it) for s in sub.tolist())


# ----------------------------------------------------------------------------- kernels

streams = st.integers(0, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 40), min_size=n, max_size=n),  # t deltas (ties common)
        st.lists(st.integers(0, 4), min_size=n, max_size=n),  # x on a 5-wide sensor
        st.lists(st.integers(0, 3), min_size=n, max_size=n),  # y on a 4-high sensor
    )
)


@settings(max_examples=60, deadline=None)
@given(streams, st.integers(0, 60), st.booleans())
def test_denoise_kernel_matches_reference(stream, filter_time, diagonal):
    dt, x, y = (np.asarray(v, dtype=np.int64) for v in stream)
    t = np.cumsum(dt)
    x, y = x.astype(np.int16), y.astype(np.int16)
    got = A._denoise_kernel(t, x, y, 4, 5, np.int64(filter_time), diagonal)
    want = A._denoise_reference(t, x, y, 4, 5, filter_time, diagonal)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(streams, st.integers(0, 60))
def test_refractory_kernel_matches_reference(stream, period):
    dt, x, y = (np.asarray(v, dtype=np.int64) for v in stream)
    t = np.cumsum(dt)
    x, y = x.astype(np.int16), y.astype(np.int16)
    got = A._refractory_kernel(t, x, y, 4, 5, np.int64(period))
    np.testing.assert_array_equal(got, A._refractory_reference(t, x, y, 4, 5, period))


@pytest.mark.parametrize("inside", [True, False])
def test_box_mask_kernel_matches_reference(inside):
    e = make_events(2000, seed=3)
    args = (e["x"], e["y"], 3, 2, 11, 9, inside)
    np.testing.assert_array_equal(A._box_mask(*args), A._box_mask_reference(*args))


def test_merge_sorted_equals_stable_sort_of_concatenation():
    a = make_events(500, seed=1, t_span=300)  # many equal times
    b = make_events(200, seed=2, t_span=300)
    both = np.concatenate([a, b])
    want = both[np.argsort(both["t"], kind="stable")]
    np.testing.assert_array_equal(A._merge_sorted(a, b), want)


# ----------------------------------------------------------------------------- denoise / refractory


def test_denoise_hand_example():
    e = ev(
        [
            (1000, 5, 5, 1),  # nothing before: dropped
            (1500, 6, 5, 0),  # (5, 5) fired 500 µs before: kept
            (1600, 6, 6, 1),  # (6, 5) fired 100 µs before: kept
            (1700, 7, 7, 1),  # only diagonal neighbour (6, 6): dropped with 4-connectivity
            (3000, 5, 5, 1),  # (6, 5) fired 1500 µs before >= filter_time: dropped
            (3000, 9, 9, 1),  # nothing near
        ]
    )
    out = A.denoise(e, filter_time=1000, sensor_size=(16, 16))
    np.testing.assert_array_equal(out["t"], [1500, 1600])
    out8 = A.denoise(e, filter_time=1000, sensor_size=(16, 16), diagonal=True)
    np.testing.assert_array_equal(out8["t"], [1500, 1600, 1700])


def _tonic_function(module: str, name: str):
    """Load one of tonic's NumPy-only functional files without importing tonic (slow: torch)."""
    spec = importlib.util.find_spec("tonic")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tonic is not installed")
    path = Path(spec.submodule_search_locations[0]) / "functional" / f"{module}.py"
    mod_spec = importlib.util.spec_from_file_location(f"_tonic_{module}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return getattr(mod, name)


def test_denoise_matches_tonic_where_tonic_is_right():
    tonic_denoise = _tonic_function("denoise", "denoise_numpy")
    # tonic's memory starts "fired at t = 0", so compare on streams starting after filter_time
    e = make_events(1500, seed=5, t0=20_000, t_span=100_000)
    for ft in (1000, 20_000):
        want = tonic_denoise(e.copy(), filter_time=ft)
        np.testing.assert_array_equal(A.denoise(e, filter_time=ft, sensor_size=SENSOR), want)


def test_denoise_no_free_pass_at_stream_start():
    # tonic keeps this isolated event (its memory starts at filter_time); evformer drops it
    e = ev([(10, 3, 3, 1), (20, 10, 10, 0)])
    assert len(A.denoise(e, filter_time=1000, sensor_size=(16, 16))) == 0


def test_refractory_hand_example():
    e = ev(
        [
            (0, 2, 2, 1),  # first at this pixel: kept (tonic drops an event at t = 0)
            (500, 2, 2, 0),  # 500 < 1000 after kept 0: dropped (either polarity)
            (700, 3, 2, 1),  # other pixel: kept
            (1000, 2, 2, 1),  # exactly 1000 after the last kept: kept
            (1600, 2, 2, 1),  # 600 after kept 1000: dropped
            (2100, 2, 2, 1),  # 1100 after kept 1000 (the dropped 1600 does not count): kept
        ]
    )
    out = A.refractory_period(e, period=1000, sensor_size=(8, 8))
    np.testing.assert_array_equal(out["t"], [0, 700, 1000, 2100])
    np.testing.assert_array_equal(A.refractory_period(e, period=0, sensor_size=(8, 8)), e)


@pytest.mark.parametrize("fn", [A.denoise, A.refractory_period])
def test_filters_reject_unsorted_and_off_sensor(fn):
    kw = {"filter_time": 10} if fn is A.denoise else {"period": 10}
    with pytest.raises(ValueError, match="not sorted"):
        fn(ev([(5, 0, 0, 1), (1, 0, 0, 1)]), sensor_size=(4, 4), **kw)
    with pytest.raises(ValueError, match="outside sensor_size"):
        fn(ev([(5, 4, 0, 1)]), sensor_size=(4, 4), **kw)


# ----------------------------------------------------------------------------- drops


def test_drop_event_count_order_and_frequency():
    e = make_events(1001, seed=0)
    e["t"] = np.arange(1001)  # unique ids
    rng = np.random.default_rng(0)
    out = A.drop_event(e, 0.3, rng)
    assert len(out) == 1001 - int(0.3 * 1001 + 0.5)  # 300 dropped, rounding half up
    assert np.all(np.diff(out["t"]) > 0) and np.isin(out["t"], e["t"]).all()
    # every event equally likely to go
    survived = np.zeros(1001)
    for _ in range(200):
        survived[A.drop_event(e, 0.3, rng)["t"]] += 1
    assert abs(survived.mean() / 200 - 0.7) < 0.01
    assert survived.min() > 200 * 0.7 - 5 * np.sqrt(200 * 0.21)
    lengths = {len(A.drop_event(e, (0.1, 0.5), rng)) for _ in range(50)}
    assert min(lengths) >= 1001 - 501 and max(lengths) <= 1001 - 100 and len(lengths) > 10


def test_drop_by_time_removes_one_window_inside_the_stream():
    # a stream that starts late: tonic's window lies in [0, t_max] and mostly misses it
    e = make_events(5000, seed=1, t0=1_000_000, t_span=100_000)
    rng = np.random.default_rng(1)
    for _ in range(20):
        out = A.drop_by_time(e, 0.25, rng)
        gone_t = np.setdiff1d(e["t"], out["t"])
        assert len(gone_t) > 0
        lo, hi = gone_t.min(), gone_t.max()
        assert hi - lo < 0.25 * (e["t"][-1] - e["t"][0])
        assert not ((out["t"] >= lo) & (out["t"] <= hi)).any()  # one contiguous window
        assert 0.15 < 1 - len(out) / len(e) < 0.35
    assert len(A.drop_by_time(e, 0.0, rng)) == len(e)


def test_drop_by_area_samples_the_requested_range():
    h, w = 40, 50
    yy, xx = np.mgrid[0:h, 0:w]
    e = from_columns(np.arange(h * w), xx.ravel(), yy.ravel(), np.ones(h * w))  # one per pixel
    rng = np.random.default_rng(2)
    sides, lefts = [], []
    for _ in range(300):
        out = A.drop_by_area(e, (0.1, 0.3), rng, sensor_size=(h, w))
        gone = np.ones((h, w), bool)
        gone[out["y"], out["x"]] = False
        rows, cols = np.nonzero(gone.any(1))[0], np.nonzero(gone.any(0))[0]
        assert gone.sum() == len(rows) * len(cols)  # a filled rectangle
        assert gone[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        sides.append(len(cols))
        lefts.append(cols.min())
        # one ratio r for both sides: width int(50 r), height int(40 r)
        assert int(len(cols) * 0.8) <= len(rows) <= int((len(cols) + 1) * 0.8)
    # box width int(r * 50) with r in [0.1, 0.3): 5..14 px (tonic samples r in [0.3, 1))
    assert min(sides) == 5 and max(sides) == 14
    assert max(lefts) >= w - 14  # positions reach the right edge


def test_drop_by_area_box_reaches_last_column():
    e = from_columns(np.arange(8), np.arange(8), np.zeros(8), np.ones(8))  # row y=0
    rng = np.random.default_rng(0)
    kept_first = kept_last = False
    for _ in range(200):
        out = A.drop_by_area(e, 0.5, rng, sensor_size=(8, 8))  # 4x4 box, left in 0..4
        kept_last |= 7 not in out["x"]
        kept_first |= 0 not in out["x"]
    assert kept_last and kept_first


# ----------------------------------------------------------------------------- jitter


def test_spatial_jitter_statistics_and_bounds():
    n = 40_000
    e = from_columns(np.arange(n), np.full(n, 64), np.full(n, 64), np.zeros(n))
    out = A.spatial_jitter(
        e, np.random.default_rng(0), var_x=4.0, var_y=2.0, cov_xy=1.5, sensor_size=(128, 128)
    )
    d = np.stack([out["x"] - 64.0, out["y"] - 64.0])
    cov = np.cov(d)
    # rounding to whole pixels adds ~1/12 px^2 of variance on each axis
    np.testing.assert_allclose(cov, [[4 + 1 / 12, 1.5], [1.5, 2 + 1 / 12]], atol=0.12)
    assert np.abs(d.mean(1)).max() < 0.05
    np.testing.assert_array_equal(out["t"], e["t"])

    edge = make_events(5000, seed=1)
    dropped = A.spatial_jitter(edge, np.random.default_rng(1), var_x=9, var_y=9, sensor_size=SENSOR)
    clipped = A.spatial_jitter(
        edge, np.random.default_rng(1), var_x=9, var_y=9, sensor_size=SENSOR, out_of_bounds="clip"
    )
    assert len(clipped) == len(edge) > len(dropped)
    for o in (dropped, clipped):
        assert o["x"].min() >= 0 and o["x"].max() < SENSOR[1]
        assert o["y"].min() >= 0 and o["y"].max() < SENSOR[0]
    # same draws: "drop" only removes the events that "clip" would have moved to the border
    assert is_subsequence(dropped, clipped)
    still = A.spatial_jitter(edge, np.random.default_rng(5), var_x=0, var_y=0, sensor_size=SENSOR)
    np.testing.assert_array_equal(still, edge)


def test_spatial_jitter_rejects_non_covariance():
    with pytest.raises(ValueError, match="not a covariance"):
        A.SpatialJitter(var_x=1, var_y=1, cov_xy=2)


def test_time_jitter_matches_numpy_reference_and_is_stable():
    e = make_events(3000, seed=4)
    out = A.time_jitter(e, np.random.default_rng(7), std=500.0, negative="keep")
    t = e["t"] + np.rint(np.random.default_rng(7).normal(0, 500.0, len(e))).astype(np.int64)
    ref = e.copy()
    ref["t"] = t
    np.testing.assert_array_equal(out, ref[np.argsort(t, kind="stable")])
    # equal times keep their input order (std small enough that no offset rounds off 0)
    ties = from_columns(np.full(50, 1000), np.arange(50), np.zeros(50), np.ones(50))
    np.testing.assert_array_equal(A.time_jitter(ties, np.random.default_rng(0), std=0.01), ties)


def test_time_jitter_negative_modes():
    e = make_events(3000, seed=4, t_span=2000)
    drop = A.time_jitter(e, np.random.default_rng(3), std=500.0)
    clip = A.time_jitter(e, np.random.default_rng(3), std=500.0, negative="clip")
    keep = A.time_jitter(e, np.random.default_rng(3), std=500.0, negative="keep")
    n_neg = int((keep["t"] < 0).sum())
    assert n_neg > 0 and len(drop) == len(e) - n_neg and drop["t"].min() >= 0
    assert len(clip) == len(e) and (clip["t"] == 0).sum() >= n_neg


# ----------------------------------------------------------------------------- flips, reversal


def test_flips_exact():
    e = ev([(0, 0, 0, 1), (5, 23, 3, 0), (9, 7, 15, 1)])
    lr = A.flip_lr(e, sensor_size=SENSOR)
    np.testing.assert_array_equal(lr["x"], [23, 0, 16])
    np.testing.assert_array_equal(lr["y"], e["y"])
    ud = A.flip_ud(e, sensor_size=SENSOR)
    np.testing.assert_array_equal(ud["y"], [15, 12, 0])
    np.testing.assert_array_equal(A.flip_lr(lr, sensor_size=SENSOR), e)
    with pytest.raises(ValueError, match="outside sensor_size"):
        A.flip_lr(e, sensor_size=(16, 20))


def test_flip_polarity_modes():
    e = make_events(20_000, seed=6)
    np.testing.assert_array_equal(A.flip_polarity(e)["p"], 1 - e["p"])
    out = A.flip_polarity(e, p=0.3, rng=np.random.default_rng(0))
    assert abs((out["p"] != e["p"]).mean() - 0.3) < 0.015
    np.testing.assert_array_equal(A.flip_polarity(e, p=0.0, rng=np.random.default_rng(0)), e)
    with pytest.raises(ValueError, match="polarity must be 0"):
        A.flip_polarity(ev([(0, 0, 0, -1)]))
    per_sample = A.RandomFlipPolarity(p=0.5)
    rng = np.random.default_rng(1)
    flips = [bool((per_sample(e, rng)["p"] != e["p"]).all()) for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6  # whole sample flips, or nothing


def test_time_reversal_exact():
    e = ev([(10, 1, 1, 1), (20, 2, 2, 0), (20, 3, 3, 1), (50, 4, 4, 0)])
    out = A.time_reversal(e)
    np.testing.assert_array_equal(out["t"], [10, 40, 40, 50])
    np.testing.assert_array_equal(out["x"], [4, 3, 2, 1])
    np.testing.assert_array_equal(out["p"], [1, 0, 1, 0])
    np.testing.assert_array_equal(A.time_reversal(out), e)
    np.testing.assert_array_equal(A.time_reversal(e, flip_polarities=False)["p"], [0, 1, 0, 1])


# ------------------------------------------------------------------ noise, crop, downsample


def test_uniform_noise_counts_bounds_order():
    e = make_events(2000, seed=8)
    out = A.uniform_noise(e, 500, np.random.default_rng(0), sensor_size=SENSOR)
    assert len(out) == 2500 and np.all(np.diff(out["t"]) >= 0)
    assert is_subsequence(e, out)
    assert out["t"].min() >= e["t"].min() and out["t"].max() <= e["t"].max()
    pure = A.uniform_noise(
        e[:0], 24_000, np.random.default_rng(1), sensor_size=SENSOR, t_range=(5, 9)
    )
    np.testing.assert_array_equal(np.bincount(pure["t"] - 5, minlength=5) > 4000, True)
    counts_x = np.bincount(pure["x"], minlength=24)
    assert len(counts_x) == 24 and counts_x.min() > 800 and counts_x.max() < 1200
    assert np.bincount(pure["y"]).shape == (16,) and set(np.unique(pure["p"])) == {0, 1}
    assert len(A.uniform_noise(e[:0], 10, np.random.default_rng(0))) == 0


def test_crops_exact():
    e = ev([(0, 0, 0, 1), (1, 40, 50, 0), (2, 95, 95, 1), (3, 96, 32, 0), (4, 32, 95, 1)])
    out = A.center_crop(e, 64, sensor_size=(128, 128))  # rows/cols 32..95
    np.testing.assert_array_equal(out["t"], [1, 2, 4])
    np.testing.assert_array_equal(out["x"], [8, 63, 0])
    np.testing.assert_array_equal(out["y"], [18, 63, 63])
    # one event per pixel, t = pixel id: the kept ids give the crop origin
    h, w = SENSOR
    yy, xx = np.mgrid[0:h, 0:w]
    full = from_columns(np.arange(h * w), xx.ravel(), yy.ravel(), np.ones(h * w))
    rng = np.random.default_rng(0)
    origins = set()
    for _ in range(300):
        c = A.random_crop(full, (12, 20), rng, sensor_size=SENSOR)
        assert len(c) == 12 * 20
        top, left = divmod(int(c["t"][0]), w)
        np.testing.assert_array_equal(c["x"], full["x"][c["t"]] - left)
        np.testing.assert_array_equal(c["y"], full["y"][c["t"]] - top)
        origins.add((top, left))
    # every origin 0..4 x 0..4, the last row/column included (tonic's draw never picks it)
    assert origins == {(t, l) for t in range(5) for l in range(5)}


def test_downsample_exact():
    e = ev([(999, 5, 7, 1), (1000, 6, 9, 0), (2500, 127, 0, 1)])
    out = A.downsample(e, spatial_factor=2, time_factor=1000)
    np.testing.assert_array_equal(out["x"], [2, 3, 63])
    np.testing.assert_array_equal(out["y"], [3, 4, 0])
    np.testing.assert_array_equal(out["t"], [0, 1000, 2000])
    np.testing.assert_array_equal(A.downsample(e, spatial_factor=(1, 4))["x"], [1, 1, 31])


# ----------------------------------------------------------------------------- transforms


RANDOM_TRANSFORMS = [
    A.DropEvent(0.2),
    A.DropEvent((0.0, 0.5)),
    A.DropEventByTime((0.1, 0.3)),
    A.DropEventByArea((0.1, 0.4), sensor_size=SENSOR),
    A.SpatialJitter(var_x=2, var_y=2, sensor_size=SENSOR),
    A.TimeJitter(std=300),
    A.RandomFlipPolarity(p=0.5, per_event=True),
    A.UniformNoise(n=(10, 100), sensor_size=SENSOR),
    A.RandomCrop((8, 8), sensor_size=SENSOR),
    A.Compose((A.RandomFlipLR(sensor_size=SENSOR), A.RandomFlipUD(sensor_size=SENSOR))),
    A.RandomChoice((A.DropEvent(0.5), A.RandomTimeReversal(p=1.0))),
]
DETERMINISTIC = [
    A.Denoise(filter_time=2000, sensor_size=SENSOR),
    A.RefractoryPeriod(period=500, sensor_size=SENSOR),
    A.CenterCrop((8, 10), sensor_size=SENSOR),
    A.Downsample(spatial_factor=2, time_factor=100),
]


@pytest.mark.parametrize("tr", RANDOM_TRANSFORMS, ids=repr)
def test_random_transforms_reproducible_sorted_pure(tr):
    e = make_events(2000, seed=10)
    before = e.copy()
    a = tr(e, np.random.default_rng(42))
    b = tr(e, np.random.default_rng(42))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == e.dtype and np.all(np.diff(a["t"]) >= 0)
    assert any(not np.array_equal(a, tr(e, np.random.default_rng(s))) for s in range(5))
    np.testing.assert_array_equal(e, before)  # input untouched
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        tr(e, None)
    assert len(tr(e[:0], np.random.default_rng(0))) == 0


@pytest.mark.parametrize("tr", DETERMINISTIC, ids=repr)
def test_deterministic_transforms(tr):
    e = make_events(2000, seed=11)
    before = e.copy()
    out = tr(e)
    np.testing.assert_array_equal(out, tr(e, np.random.default_rng(0)))
    assert np.all(np.diff(out["t"]) >= 0)
    np.testing.assert_array_equal(e, before)
    assert len(tr(e[:0])) == 0


def test_compose_equals_manual_chain_and_choice_frequencies():
    e = make_events(1000, seed=12)
    comp = A.Compose((A.DropEvent(0.3), A.SpatialJitter(sensor_size=SENSOR)))
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    manual = A.spatial_jitter(A.drop_event(e, 0.3, r2), r2, sensor_size=SENSOR)
    np.testing.assert_array_equal(comp(e, r1), manual)
    choice = A.RandomChoice((A.DropEvent(0.1), A.DropEvent(0.2), A.DropEvent(0.3)), (1, 2, 1))
    rng = np.random.default_rng(0)
    counts = np.bincount([choice.choose(rng) for _ in range(4000)], minlength=3)
    np.testing.assert_allclose(counts / 4000, [0.25, 0.5, 0.25], atol=0.03)


def test_parameter_validation_messages():
    with pytest.raises(ValueError, match=r"area_ratio range"):
        A.DropEventByArea((0.5, 0.2))
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        A.DropEvent(1.0)
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        A.RandomFlipLR(sensor_size=(128, 128, 2))
    with pytest.raises(ValueError, match="filter_time"):
        A.Denoise(filter_time=-1)
    with pytest.raises(ValueError, match="exceeds sensor_size"):
        A.RandomCrop(200)
    with pytest.raises(TypeError, match="structured NumPy array"):
        A.drop_event([1, 2, 3], 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="plain int64"):
        A.drop_event(np.arange(3), 0.1, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        A.drop_event(make_events(10), 0.1, np.random.RandomState(0))


def test_augment_imports_no_torch():
    code = "import sys, evformer.events.augment; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
