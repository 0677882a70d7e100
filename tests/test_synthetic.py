"""Synthetic gestures and the SyntheticGesture dataset: determinism, time reversal, caching,
and that direction-only pairs need the frame order (a linear probe on time-summed frames
is at chance, on the frame sequence near perfect)."""

import os

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import evformer.data.synthetic as synthetic_mod
from evformer.data import SyntheticGesture
from evformer.events import (
    EVENT_DTYPE,
    GESTURE_CLASSES,
    make_gesture_events,
    render_gesture,
    to_frames,
)
from evformer.events.core import is_sorted
from evformer.events.gestures import DIRECTION_PAIRS

# Small, fast generator settings for the dataset tests (32 x 32, 0.2 s at 200 fps).
SMALL = dict(height=32, width=32, duration_us=200_000, fps=200.0)


def _rng(*key):
    return np.random.default_rng(list(key))


# --------------------------------------------------------------------------- renderer


def test_render_shapes_range_and_determinism():
    frames, times = render_gesture(4, _rng(0), height=48, width=40, duration_us=500_000, fps=100)
    assert frames.shape == (51, 48, 40) and frames.dtype == np.float32
    assert times.dtype == np.int64 and times[0] == 0 and times[-1] == 500_000
    assert np.all(np.diff(times) > 0)
    assert frames.min() > 0 and frames.max() <= 1.0
    again, _ = render_gesture(4, _rng(0), height=48, width=40, duration_us=500_000, fps=100)
    np.testing.assert_array_equal(frames, again)
    other, _ = render_gesture(4, _rng(1), height=48, width=40, duration_us=500_000, fps=100)
    assert not np.array_equal(frames, other)


@pytest.mark.parametrize("pair", DIRECTION_PAIRS)
def test_direction_pairs_are_exact_time_reversals(pair):
    fwd, bwd = pair
    for seed in range(3):
        a, _ = render_gesture(fwd, _rng(seed), height=40, width=40, fps=100)
        b, _ = render_gesture(bwd, _rng(seed), height=40, width=40, fps=100)
        np.testing.assert_array_equal(b, a[::-1])
        assert not np.array_equal(a, b)  # and the clip really changes over time


def test_shape_moves_as_the_class_says():
    """Brightness centroid of (frame - background) follows the named direction."""

    def centroid_path(label):
        frames, _ = render_gesture(label, _rng(3), height=64, width=64, fps=50)
        fg = np.clip(frames - np.median(frames, axis=(1, 2), keepdims=True), 0, None)
        fg[fg < 0.1] = 0  # keep the shape, drop the faint texture
        ys, xs = np.mgrid[:64, :64]
        mass = fg.sum(axis=(1, 2))
        ok = mass > 0
        cx = (fg * xs).sum(axis=(1, 2))[ok] / mass[ok]
        cy = (fg * ys).sum(axis=(1, 2))[ok] / mass[ok]
        return cx, cy, mass

    cx, cy, _ = centroid_path(0)  # swipe_right
    assert cx[-1] - cx[0] > 30 and abs(cy[-1] - cy[0]) < 15
    cx, cy, _ = centroid_path(3)  # swipe_up
    assert cy[0] - cy[-1] > 30
    cx, cy, _ = centroid_path(4)  # circle_cw: in image coordinates (y down) the signed
    # area swept around the centre is positive for a clockwise turn on screen.
    dx, dy = cx - cx.mean(), cy - cy.mean()
    assert np.sum(dx[:-1] * dy[1:] - dx[1:] * dy[:-1]) > 0
    cx, cy, _ = centroid_path(5)
    dx, dy = cx - cx.mean(), cy - cy.mean()
    assert np.sum(dx[:-1] * dy[1:] - dx[1:] * dy[:-1]) < 0
    _, _, mass = centroid_path(6)  # grow: the shape's brightness mass rises to its peak late
    assert np.argmax(mass) > len(mass) // 2 and mass[5] < 0.2 * mass.max()


def test_bad_arguments():
    with pytest.raises(ValueError, match="label"):
        render_gesture(11, _rng(0))
    with pytest.raises(ValueError, match="height"):
        render_gesture(0, _rng(0), height=8)
    with pytest.raises(TypeError, match="Generator"):
        render_gesture(0, 0)
    with pytest.raises(ValueError, match="noise_rate_hz"):
        make_gesture_events(0, _rng(0), noise_rate_hz=(1.0, 0.5))


def test_events_per_sample_every_class():
    counts = []
    for label in range(len(GESTURE_CLASSES)):
        ev = make_gesture_events(label, _rng(label, 9))
        assert ev.dtype == EVENT_DTYPE and is_sorted(ev["t"])
        assert ev["x"].max() < 128 and ev["y"].max() < 128 and ev["x"].min() >= 0
        assert 0 < ev["t"].min() and ev["t"].max() <= 1_000_000
        assert 0.3 < ev["p"].mean() < 0.7  # ON and OFF both present
        counts.append(len(ev))
    assert min(counts) > 10_000 and max(counts) < 250_000, counts


# --------------------------------------------------------------------------- the linear probe


def _probe_features(pair, n_per_class, size=48, bins=12, n_frames=8):
    x, y = [], []
    for label in pair:
        for i in range(n_per_class):
            ev = make_gesture_events(label, _rng(2024, label, i), height=size, width=size, fps=120)
            cols = {"t": ev["t"], "x": ev["x"] * bins // size, "y": ev["y"] * bins // size}
            cols["p"] = ev["p"]
            fr = to_frames(cols, n_frames=n_frames, split_by="number", height=bins, width=bins)
            fr = fr.astype(np.float64)
            x.append(fr / fr.sum())  # [T, 2, bins, bins], normalised event counts
            y.append(label)
    return np.asarray(x), np.asarray(y)


@pytest.mark.slow
@pytest.mark.parametrize("pair", [(4, 5), (0, 1)], ids=["circle_cw-ccw", "swipe_right-left"])
def test_time_summed_frames_cannot_separate_a_direction_pair(pair):
    x, y = _probe_features(pair, n_per_class=40)

    def cv_accuracy(features):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        return cross_val_score(clf, features, y, cv=folds).mean()

    summed = cv_accuracy(x.sum(axis=1).reshape(len(x), -1))
    sequence = cv_accuracy(x.reshape(len(x), -1))
    assert summed < 0.65, f"time-summed frames separate {pair}: accuracy {summed:.3f}"
    assert sequence >= 0.85, f"per-frame sequence fails on {pair}: accuracy {sequence:.3f}"


# --------------------------------------------------------------------------- the dataset


def test_dataset_length_balance_frames_and_splits(tmp_path):
    ds = SyntheticGesture(
        tmp_path, "train", n_frames=4, n_train_per_class=2, num_workers=0, progress=False, **SMALL
    )
    assert len(ds) == 22 and ds.classes == GESTURE_CLASSES
    assert np.bincount(ds.labels, minlength=11).tolist() == [2] * 11
    assert ds.labels[:11].tolist() == list(range(11))
    frames, label = ds[5]
    assert isinstance(frames, torch.Tensor) and frames.dtype == torch.float32
    assert frames.shape == (4, 2, 32, 32) and label == 5
    assert frames.sum().item() == len(ds.cache.events(5))  # every event binned once
    small = SyntheticGesture(
        tmp_path, "train", n_frames=4, n_train_per_class=2, resize=16, num_workers=0,
        progress=False, **SMALL,
    )  # fmt: skip
    assert small[5][0].shape == (4, 2, 16, 16) and small[5][0].sum() == frames.sum()
    test = SyntheticGesture(
        tmp_path, "test", n_test_per_class=1, num_workers=0, progress=False, **SMALL
    )
    assert len(test) == 11
    assert (tmp_path / "synthetic_gesture" / "synthetic-gesture-test.h5").is_file()
    for i in range(11):  # disjoint seed streams: no test sample equals its train twin
        assert not np.array_equal(test.cache.events(i), ds.cache.events(i))


def test_cache_is_reused_and_rebuilt_when_parameters_change(tmp_path, monkeypatch):
    calls = []
    real = synthetic_mod.synthetic_gesture_sample

    def counting(index, **kw):
        calls.append(index)
        return real(index, **kw)

    monkeypatch.setattr(synthetic_mod, "synthetic_gesture_sample", counting)
    kw = dict(n_train_per_class=1, num_workers=0, progress=False, **SMALL)
    first = SyntheticGesture(tmp_path, **kw)
    path = first.cache.path
    assert sorted(set(calls)) == list(range(11))
    stat = os.stat(path)
    events = [first.cache.events(i) for i in range(11)]

    calls.clear()
    second = SyntheticGesture(tmp_path, **kw)
    assert calls == []  # nothing generated
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    np.testing.assert_array_equal(second.cache.events(3), events[3])

    third = SyntheticGesture(tmp_path, **{**kw, "threshold": 0.3})  # a generator parameter
    assert sorted(set(calls)) == list(range(11))
    assert third.cache.path == path and os.stat(path).st_mtime_ns != stat.st_mtime_ns
    assert third.cache.meta["threshold"] == 0.3
    assert len(third.cache.events(3)) < len(events[3])  # higher threshold, fewer events

    calls.clear()
    SyntheticGesture(tmp_path, **{**kw, "seed": 1})
    assert len(calls) > 0


def test_sample_depends_only_on_seed_split_and_index(tmp_path):
    one = SyntheticGesture(
        tmp_path / "a", n_train_per_class=1, num_workers=0, progress=False, **SMALL
    )
    # More samples, generated in two worker processes: the first 11 are the same.
    two = SyntheticGesture(
        tmp_path / "b", n_train_per_class=2, num_workers=2, progress=False, **SMALL
    )
    for i in range(11):
        np.testing.assert_array_equal(one.cache.events(i), two.cache.events(i))
    direct = synthetic_mod.synthetic_gesture_sample(
        7, split="train", seed=0, threshold=0.2, threshold_sigma=0.03, refractory_us=100,
        noise_rate_hz=(0.05, 0.3), **SMALL,
    )  # fmt: skip
    np.testing.assert_array_equal(direct[0][0], one.cache.events(7))
    assert direct[0][1] == 7


def test_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        SyntheticGesture(tmp_path, "val", progress=False)
    with pytest.raises(ValueError, match="n_train_per_class"):
        SyntheticGesture(tmp_path, n_train_per_class=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        SyntheticGesture(tmp_path, seed=-1, progress=False)
    with pytest.raises(ValueError, match="height"):  # from the generator, in this process
        SyntheticGesture(tmp_path, n_train_per_class=1, height=8, progress=False)
