"""DVSGesture and CIFAR10DVS on tiny raw folders written in the real file formats."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from evformer.data import neuromorphic as nm
from evformer.data.cache import CachePreparationError
from evformer.data.neuromorphic import (
    CIFAR10_DVS_CLASSES,
    CIFAR10DVS,
    DatasetNotFoundError,
    DVSGesture,
    cifar10dvs_split,
)
from evformer.events import from_columns, to_frames, write_aedat2, write_aedat31

sj_utils = pytest.importorskip("spikingjelly.datasets.utils")
sj_cifar = pytest.importorskip("spikingjelly.datasets.cifar10_dvs")

QUIET = dict(num_workers=0, progress=False)


def _stream(rng, n, t0, t1, w=128, h=128):
    t = np.sort(rng.integers(t0, t1, n))
    return from_columns(t, rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n))


# ----------------------------------------------------------------- DVS128 Gesture fixture

# recording -> (time offset µs, labels rows (class, start, end) relative to the offset)
_REC = {
    "train": {
        "user01_fluorescent": (
            0,
            [(1, 100_000, 400_000), (2, 400_000, 900_000), (8, 950_000, 1_200_000)],
        ),
        # starts near 2**31 µs: exercises eventTSOverflow and int64 rebasing
        "user02_lab": (2**31 - 300_000, [(11, 50_000, 600_000), (3, 600_000, 700_000)]),
    },
    "test": {"user24_led": (5_000, [(5, 0, 500_000), (5, 500_000, 1_400_000)])},
}


def make_dvsgesture(root: Path, seed: int = 0) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Write a DvsGesture/ folder; return the expected samples of each split."""
    rng = np.random.default_rng(seed)
    folder = root / "DvsGesture"
    folder.mkdir(parents=True)
    expected = {}
    for split, recs in _REC.items():
        expected[split] = []
        for name, (off, rows) in recs.items():
            ev = _stream(rng, 4000, off, off + 1_500_000)
            write_aedat31(folder / f"{name}.aedat", ev, events_per_packet=700, extra_packets=True)
            lines = ["class,startTime_usec,endTime_usec"]
            lines += [f"{c},{s + off},{e + off}" for c, s, e in rows]
            (folder / f"{name}_labels.csv").write_text("\n".join(lines) + "\n")
            for c, s, e in rows:
                keep = (ev["t"] >= s + off) & (ev["t"] < e + off)  # the rule, written plainly
                sample = ev[keep].copy()
                sample["t"] -= s + off
                expected[split].append((sample, c - 1))
        (folder / f"trials_to_{split}.txt").write_text("".join(f"{n}.aedat\n" for n in recs) + "\n")
    return expected


@pytest.fixture
def gesture_root(tmp_path):
    return tmp_path, make_dvsgesture(tmp_path)


def test_dvsgesture_samples_labels_and_exact_events(gesture_root):
    root, expected = gesture_root
    for split in ("train", "test"):
        ds = DVSGesture(root, split, n_frames=4, **QUIET)
        exp = expected[split]
        assert len(ds) == len(exp) == {"train": 5, "test": 2}[split]
        assert ds.targets == [lab for _, lab in exp]
        for i, (ev, lab) in enumerate(exp):
            np.testing.assert_array_equal(ds.events(i), ev)
            frames, y = ds[i]
            assert y == lab and frames.dtype == torch.float32
            assert frames.shape == (4, 2, 128, 128)
            np.testing.assert_array_equal(frames.numpy(), to_frames(ev, 4, "number", 128, 128))
            if len(ev):  # spikingjelly's own integration of the same events
                sj = sj_utils.integrate_events_by_fixed_frames_number(
                    {f: ev[f] for f in "txyp"}, "number", 4, 128, 128
                )
                np.testing.assert_array_equal(frames.numpy(), sj)
            else:
                assert frames.sum() == 0  # (3, 600000, 600000): an empty sample is kept
    assert ds.classes[0] == "hand_clapping" and len(ds.classes) == 11


def test_dvsgesture_root_may_be_the_folder_itself_and_time_split(gesture_root):
    root, expected = gesture_root
    ds = DVSGesture(root / "DvsGesture", "train", n_frames=3, split_by="time", **QUIET)
    ev = expected["train"][0][0]
    np.testing.assert_array_equal(ds[0][0].numpy(), to_frames(ev, 3, "time", 128, 128))
    sj = sj_utils.integrate_events_by_fixed_frames_number(
        {f: ev[f] for f in "txyp"}, "time", 3, 128, 128
    )
    np.testing.assert_array_equal(ds[0][0].numpy(), sj)


def test_dvsgesture_cache_reuse_and_rebuild_on_change(gesture_root, monkeypatch):
    root, expected = gesture_root
    DVSGesture(root, "train", **QUIET)
    cache_file = root / ".evformer" / "dvsgesture-train.h5"
    mtime = cache_file.stat().st_mtime_ns

    def must_not_parse(source):
        raise AssertionError(f"re-parsed {source}")

    monkeypatch.setattr(nm, "load_dvsgesture_recording", must_not_parse)
    ds = DVSGesture(root, "train", **QUIET)  # reused: no parsing
    assert len(ds) == 5 and cache_file.stat().st_mtime_ns == mtime
    # a changed recording invalidates the cache: preparation runs again
    rng = np.random.default_rng(9)
    new = _stream(rng, 500, 0, 1_300_000)
    write_aedat31(root / "DvsGesture" / "user01_fluorescent.aedat", new)
    with pytest.raises(AssertionError, match="re-parsed"):
        DVSGesture(root, "train", **QUIET)
    monkeypatch.undo()
    ds = DVSGesture(root, "train", **QUIET)
    keep = (new["t"] >= 100_000) & (new["t"] < 400_000)
    np.testing.assert_array_equal(ds.events(0)["x"], new["x"][keep])
    # so does an edited labels file (different rows -> different samples)
    csv = root / "DvsGesture" / "user24_led_labels.csv"
    csv.write_text("class,startTime_usec,endTime_usec\n7,5000,505000\n")
    test = DVSGesture(root, "test", **QUIET)
    assert len(test) == 1 and test.targets == [6]


def test_dvsgesture_parallel_preparation_and_dataloader_workers(gesture_root):
    root, expected = gesture_root
    ds = DVSGesture(root, "train", n_frames=2, num_workers=2, progress=False)
    ref = [ds[i] for i in range(len(ds))]
    for (ev, _), i in zip(expected["train"], range(len(ds))):
        np.testing.assert_array_equal(ds.events(i), ev)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    xs, ys = zip(*loader)
    torch.testing.assert_close(torch.cat(xs), torch.stack([x for x, _ in ref]))
    assert torch.cat(ys).tolist() == [y for _, y in ref]


def test_dvsgesture_resize_and_cached_frames(gesture_root):
    root, _ = gesture_root
    full = DVSGesture(root, "test", n_frames=4, **QUIET)
    small = DVSGesture(root, "test", n_frames=4, resize=64, cache_frames=True, **QUIET)
    for i in range(len(full)):
        pooled = full[i][0].reshape(4, 2, 64, 2, 64, 2).sum(dim=(3, 5))
        torch.testing.assert_close(small[i][0], pooled)
    assert len(list((root / ".evformer").glob("dvsgesture-test-frames-*.h5"))) == 1


def test_dvsgesture_frame_transform_is_applied(gesture_root):
    root, _ = gesture_root
    ds = DVSGesture(root, "test", n_frames=2, transform=lambda f: f[:, 1:], **QUIET)
    assert ds[0][0].shape == (2, 1, 128, 128)


def test_dvsgesture_missing_data_says_where_to_get_and_put_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        DVSGesture(tmp_path / "data", "train", **QUIET)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "data" / "DvsGesture") in msg
    assert "research.ibm.com" in msg and "datasets/README.md" in msg
    # a split list naming a recording that is not there
    make_dvsgesture(tmp_path / "d2")
    os.remove(tmp_path / "d2" / "DvsGesture" / "user02_lab_labels.csv")
    with pytest.raises(DatasetNotFoundError, match="user02_lab_labels.csv"):
        DVSGesture(tmp_path / "d2", "train", **QUIET)
    with pytest.raises(ValueError, match="split"):
        DVSGesture(tmp_path / "d2", "val", **QUIET)


def test_dvsgesture_bad_labels_csv_names_the_file(gesture_root):
    root, _ = gesture_root
    csv = root / "DvsGesture" / "user24_led_labels.csv"
    csv.write_text("class,startTime_usec,endTime_usec\n12,0,10\n")
    with pytest.raises(CachePreparationError, match=r"user24_led_labels.csv: line 2: class 12"):
        DVSGesture(root, "test", **QUIET)


def test_dvsgesture_corrupt_recording_stops_or_is_skipped(gesture_root):
    root, expected = gesture_root
    bad = root / "DvsGesture" / "user02_lab.aedat"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 100])  # truncated mid-packet
    with pytest.raises(CachePreparationError) as info:
        DVSGesture(root, "train", **QUIET)
    assert "user02_lab.aedat" in str(info.value) and "skip_bad=True" in str(info.value)
    assert not (root / ".evformer" / "dvsgesture-train.h5").exists()
    with pytest.warns(UserWarning, match="user02_lab.aedat"):
        ds = DVSGesture(root, "train", skip_bad=True, **QUIET)
    assert len(ds) == 3  # user01's three samples
    assert [Path(n).name for n, _ in ds.skipped] == ["user02_lab.aedat"]
    # a cache that skipped files is not used silently by a strict caller
    with pytest.raises(CachePreparationError, match="skip_bad=True"):
        DVSGesture(root, "train", **QUIET)


# ----------------------------------------------------------------- CIFAR10-DVS fixture


def make_cifar10dvs(root: Path, n_per_class: dict[str, int] | None = None, seed: int = 0):
    """Write CIFAR10-DVS/<class>/cifar10_<class>_<i>.aedat; return {path: sensor events}."""
    rng = np.random.default_rng(seed)
    counts = n_per_class or {c: (12 if c == "airplane" else 10) for c in CIFAR10_DVS_CLASSES}
    written = {}
    for cls, n in counts.items():
        d = root / "CIFAR10-DVS" / cls
        d.mkdir(parents=True)
        for i in range(n):
            ev = _stream(rng, int(rng.integers(50, 300)), 0, 1_000_000)
            path = d / f"cifar10_{cls}_{i}.aedat"
            write_aedat2(path, ev)
            written[path] = ev
        (d / "notes.txt").write_text("not a recording")  # ignored: not *.aedat
    return written


@pytest.fixture
def cifar_root(tmp_path):
    return tmp_path, make_cifar10dvs(tmp_path)


def test_cifar10dvs_split_is_lexicographic_ceil_nine_tenths(cifar_root):
    root, _ = cifar_root
    folder = root / "CIFAR10-DVS"
    train = cifar10dvs_split(folder, "train")
    test = cifar10dvs_split(folder, "test")
    assert len(train) == 11 + 9 * 9 and len(test) == 1 + 9 * 1
    # airplane: 12 files; code-point order is 0, 1, 10, 11, 2, ..., 9 -> "_9" is the test file
    assert [p.name for p, lab in test if lab == 0] == ["cifar10_airplane_9.aedat"]
    assert [p.name for p, lab in train if lab == 0][:4] == [
        "cifar10_airplane_0.aedat",
        "cifar10_airplane_1.aedat",
        "cifar10_airplane_10.aedat",
        "cifar10_airplane_11.aedat",
    ]
    assert [p.name for p, lab in test if lab == 9] == ["cifar10_truck_9.aedat"]
    assert sorted({lab for _, lab in train}) == list(range(10))
    # the same rule as spikingjelly's split_to_train_test_set (ceil of n * ratio, in order)
    from spikingjelly.datasets.utils import _split_class_indices

    idx = [list(range(12))] + [list(range(10))] * 9
    sj_train, sj_test = _split_class_indices(idx, 0.9, False)
    assert len(sj_train) == len(train) and len(sj_test) == len(test)


def test_cifar10dvs_orientation_matches_spikingjelly(cifar_root):
    root, written = cifar_root
    ds = CIFAR10DVS(root, "test", n_frames=4, **QUIET)
    assert ds.orientation == "spikingjelly"  # the documented default
    sensor = CIFAR10DVS(root, "test", n_frames=4, orientation="sensor", **QUIET)
    files = [p for p, _ in cifar10dvs_split(root / "CIFAR10-DVS", "test")]
    assert len(ds) == len(files) == 10
    for i, f in enumerate(files):
        sj = sj_cifar._load_origin_data(f)  # spikingjelly's reader + orientation
        ev = ds.events(i)
        for k in "txyp":
            np.testing.assert_array_equal(ev[k], np.asarray(sj[k]), err_msg=f"{f.name} {k}")
        sj_frames = sj_utils.integrate_events_by_fixed_frames_number(sj, "number", 4, 128, 128)
        np.testing.assert_array_equal(ds[i][0].numpy(), sj_frames)
        np.testing.assert_array_equal(sensor.events(i), written[f])  # raw sensor coordinates
        assert ds[i][1] == sensor[i][1] == i  # one test file per class, in class order


def test_cifar10dvs_train_labels_and_counts(cifar_root):
    root, written = cifar_root
    ds = CIFAR10DVS(root, "train", n_frames=2, orientation="sensor", num_workers=2, progress=False)
    assert len(ds) == 92
    assert ds.targets == [0] * 11 + [c for c in range(1, 10) for _ in range(9)]
    files = [p for p, _ in cifar10dvs_split(root / "CIFAR10-DVS", "train")]
    for i in (0, 3, 50, 91):
        np.testing.assert_array_equal(ds.events(i), written[files[i]])


def test_cifar10dvs_orientations_share_one_event_cache_but_not_frames(cifar_root):
    root, _ = cifar_root
    a = CIFAR10DVS(root, "test", n_frames=2, cache_frames=True, **QUIET)
    b = CIFAR10DVS(root, "test", n_frames=2, orientation="sensor", cache_frames=True, **QUIET)
    cache_dir = root / ".evformer"
    assert [p.name for p in cache_dir.glob("cifar10dvs-test.h5")] == ["cifar10dvs-test.h5"]
    assert len(list(cache_dir.glob("cifar10dvs-test-frames-*.h5"))) == 2
    # sensor -> spikingjelly frames: transpose, flip both axes, swap polarity channels
    fa, fb = a[0][0], b[0][0]
    torch.testing.assert_close(fa, fb.flip(1).transpose(2, 3).flip(2, 3))


def test_cifar10dvs_truncated_file_is_named_or_skipped(cifar_root):
    root, _ = cifar_root
    bad = root / "CIFAR10-DVS" / "dog" / "cifar10_dog_9.aedat"
    bad.write_bytes(bad.read_bytes()[:-3])  # not a whole 8-byte record
    with pytest.raises(CachePreparationError, match="cifar10_dog_9.aedat"):
        CIFAR10DVS(root, "test", **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CIFAR10DVS(root, "test", skip_bad=True, **QUIET)
    assert any("cifar10_dog_9.aedat" in str(w.message) for w in caught)
    assert len(ds) == 9 and 5 not in ds.targets
    assert len(ds.skipped) == 1 and "cifar10_dog_9.aedat" in ds.skipped[0][0]


def test_cifar10dvs_missing_data_messages(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10DVS(tmp_path, "train", **QUIET)
    msg = str(info.value)
    assert "figshare" in msg and str(tmp_path / "CIFAR10-DVS") in msg
    make_cifar10dvs(tmp_path, {c: 2 for c in CIFAR10_DVS_CLASSES if c != "frog"})
    with pytest.raises(DatasetNotFoundError, match=r"frog"):
        CIFAR10DVS(tmp_path, "train", **QUIET)
    with pytest.raises(ValueError, match="orientation"):
        CIFAR10DVS(tmp_path, "train", orientation="flipped", **QUIET)
