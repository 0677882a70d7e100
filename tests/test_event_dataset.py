"""The event-dataset base: a new dataset in one short class (the README's N-MNIST-like
example, run on generated AEDAT 2.0 files), and per-sample randomness that does not depend
on the DataLoader's worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evformer.data import RecordingDataset, sample_generators
from evformer.engine import SeededTransformDataset, epoch_generator
from evformer.events import DropEvent, from_columns, read_aedat2, to_frames, write_aedat2

QUIET = dict(num_workers=0, progress=False)


# ------------------------------------------------------- the README example, verbatim


def load_nmnist(source):
    """One recording -> [(events, label)]; top level so worker processes can run it."""
    path, label = source
    return [(read_aedat2(path), label)]


class NMNIST(RecordingDataset):
    """N-MNIST-like recordings: <root>/NMNIST/<split>/<digit>/*.aedat (AEDAT 2.0)."""

    sensor_size = (34, 34)
    classes = tuple(str(d) for d in range(10))
    cache_name = "nmnist"

    def sources(self):
        folder = self.root / "NMNIST" / self.split
        return [(f, int(f.parent.name)) for f in sorted(folder.glob("*/*.aedat"))]

    def loader(self):
        return load_nmnist


# ------------------------------------------------------------------------ fixtures


def make_nmnist(root, seed=0, per_class=2):
    """Write NMNIST/<split>/<digit>/<k>.aedat; return {split: [(events, label)]} in file order."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split in ("train", "test"):
        expected[split] = []
        for digit in range(10):
            folder = root / "NMNIST" / split / str(digit)
            folder.mkdir(parents=True)
            for k in range(per_class):
                n = int(rng.integers(20, 200))
                t = np.sort(rng.integers(0, 300_000, n))
                ev = from_columns(
                    t, rng.integers(0, 34, n), rng.integers(0, 34, n), rng.integers(0, 2, n)
                )
                write_aedat2(folder / f"{k}.aedat", ev)
                expected[split].append((ev, digit))
    return expected


@pytest.fixture
def nmnist_root(tmp_path):
    return tmp_path, make_nmnist(tmp_path)


# ------------------------------------------------------------------------ the base


def test_a_new_dataset_in_one_short_class(nmnist_root):
    root, expected = nmnist_root
    for split in ("train", "test"):
        ds = NMNIST(root, split, n_frames=4, **QUIET)
        exp = expected[split]
        assert len(ds) == len(exp) == 20 and ds.targets == [lab for _, lab in exp]
        for i, (ev, lab) in enumerate(exp):
            np.testing.assert_array_equal(ds.events(i), ev)
            frames, y = ds[i]
            assert frames.dtype == torch.float32 and frames.shape == (4, 2, 34, 34) and y == lab
            np.testing.assert_array_equal(frames.numpy(), to_frames(ev, 4, "number", 34, 34))
    cache = root / ".evformer" / "nmnist-train.h5"
    assert cache.is_file()
    assert NMNIST(root, "train", **QUIET).cache.meta["dataset"] == "NMNIST"
    # reused as is; rebuilt when a recording changes
    mtime = cache.stat().st_mtime_ns
    NMNIST(root, "train", num_workers=2, progress=False)
    assert cache.stat().st_mtime_ns == mtime
    new = from_columns([5, 9], [1, 2], [3, 4], [1, 0])
    write_aedat2(root / "NMNIST" / "train" / "0" / "0.aedat", new)
    ds = NMNIST(root, "train", num_workers=2, progress=False)
    assert cache.stat().st_mtime_ns != mtime
    np.testing.assert_array_equal(ds.events(0), new)
    # the shared arguments all work: resize, cached frames, split names
    small = NMNIST(root, "test", n_frames=2, resize=17, cache_frames=True, **QUIET)
    assert small[0][0].shape == (2, 2, 17, 17) and small[0][0].sum() == len(expected["test"][0][0])
    with pytest.raises(ValueError, match="split"):
        NMNIST(root, "val", **QUIET)


def test_out_of_sensor_recording_is_named(tmp_path):
    folder = tmp_path / "NMNIST" / "train" / "3"
    folder.mkdir(parents=True)
    write_aedat2(folder / "wide.aedat", from_columns([1, 2], [0, 60], [0, 0], [1, 0]))
    with pytest.raises(Exception, match="wide.aedat"):
        NMNIST(tmp_path, "train", **QUIET)


# ------------------------------------------------------------- per-sample randomness


def test_sample_generators_derive_from_seed_epoch_index():
    g, rng = sample_generators(3, 1, 7)
    # the torch stream is the one frame transforms always got: unchanged results
    assert torch.equal(
        torch.rand(5, generator=g), torch.rand(5, generator=epoch_generator(3, 1, 7))
    )
    assert isinstance(rng, np.random.Generator)
    again = sample_generators(3, 1, 7)[1].random(4)
    np.testing.assert_array_equal(rng.random(4), again)
    for other in ((3, 1, 8), (3, 2, 7), (4, 1, 7)):
        assert not np.array_equal(sample_generators(*other)[1].random(4), again)


def test_event_augmentation_is_per_sample_not_per_worker(nmnist_root):
    root, _ = nmnist_root
    ds = NMNIST(root, "train", n_frames=2, event_transform=DropEvent(0.5), **QUIET)
    seeded = SeededTransformDataset(ds, seed=5)

    def run(workers):
        loader = torch.utils.data.DataLoader(seeded, batch_size=3, num_workers=workers)
        return torch.cat([x for x, _ in loader])

    ref = run(0)
    torch.testing.assert_close(run(2), ref, rtol=0, atol=0)  # same with any worker count
    full = torch.stack([NMNIST(root, "train", n_frames=2, **QUIET)[i][0] for i in range(20)])
    kept, total = ref.sum(dim=(1, 2, 3, 4)), full.sum(dim=(1, 2, 3, 4))
    assert (kept <= total).all() and kept.sum() < 0.7 * total.sum()  # events were dropped
    seeded.set_epoch(1)
    assert not torch.equal(run(0), ref)  # and differently in the next epoch
