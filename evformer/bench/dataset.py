"""Dataset preparation and loading: evformer against spikingjelly and tonic, in one run.

``python -m evformer.bench dataset [--recordings 4] [--gesture-events 200000] ...``

Raw folders are generated in a temporary directory in the real formats: a DVS128
Gesture folder (``userNN_<lighting>.aedat`` AEDAT 3.1 recordings of 11 gestures each,
``_labels.csv``, ``trials_to_train.txt`` / ``trials_to_test.txt``; the last recording is
the test split) and a CIFAR10-DVS folder (10 class folders of AEDAT 2.0 files). Then:

- preparation, once each, from raw files to data a training loop can read:
  evformer (event cache; event cache + cached frames), spikingjelly 2.0
  (``create_raw_from_extracted`` to its ``events_np`` folder, then ``DVS128Gesture`` /
  ``CIFAR10DVS(data_type='frame', frames_number=T, split_by='number')``, which writes
  one float64 ``.npz`` per sample), and tonic 1.7 (its AEDAT reader, the same cut,
  ``ToFrame(n_event_bins=T)``, ``DiskCachedDataset``: one HDF5 file per sample, written
  during the first pass);
- loading throughput of the DVS Gesture train split: samples/s through
  ``DataLoader(num_workers=2, batch_size=16, shuffle=True)``, T frames of 128 x 128,
  best of ``--epochs`` epochs after a warm-up epoch (persistent workers);
- on-disk size of each cache against the raw recordings.

Timings are wall-clock on whatever else the machine is doing: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from evformer.bench._util import machine_summary, print_table
from evformer.data.neuromorphic import CIFAR10_DVS_CLASSES as _CLASSES
from evformer.events.aedat import write_aedat2, write_aedat31
from evformer.events.core import EVENT_DTYPE

_LIGHTING = ("fluorescent", "fluorescent_led", "lab", "led", "natural")


def _stream(rng: np.random.Generator, n: int, t0: int, span: int) -> np.ndarray:
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(t0, t0 + span, n))
    ev["x"] = rng.integers(0, 128, n)
    ev["y"] = rng.integers(0, 128, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


def make_gesture_folder(
    root: Path, recordings: int, events_per_sample: int, rng: np.random.Generator
) -> Path:
    """``root/DvsGesture`` with ``recordings`` recordings of 11 x 6 s gestures (+ gaps)."""
    folder = root / "DvsGesture"
    folder.mkdir(parents=True)
    names = []
    for r in range(recordings):
        user = 1 + r if r < recordings - 1 else 24  # the last one is a test user
        name = f"user{user:02d}_{_LIGHTING[r % len(_LIGHTING)]}"
        rows, parts = [], []
        t = 2_000_000
        for c in range(1, 12):
            span = 6_000_000
            parts.append(_stream(rng, events_per_sample, t, span))
            rows.append(f"{c},{t},{t + span}")
            # events between gestures belong to no sample
            parts.append(_stream(rng, events_per_sample // 20, t + span, 500_000))
            t += span + 500_000
        write_aedat31(folder / f"{name}.aedat", np.concatenate(parts))
        (folder / f"{name}_labels.csv").write_text(
            "class,startTime_usec,endTime_usec\r\n" + "\r\n".join(rows) + "\r\n"
        )
        names.append(name)
    (folder / "trials_to_train.txt").write_text("".join(f"{n}.aedat\n" for n in names[:-1]))
    (folder / "trials_to_test.txt").write_text(f"{names[-1]}.aedat\n")
    return folder


def make_cifar_folder(root: Path, per_class: int, events: int, rng: np.random.Generator) -> Path:
    """``root/CIFAR10-DVS/<class>/cifar10_<class>_<i>.aedat`` (1.3 s recordings)."""
    folder = root / "CIFAR10-DVS"
    for cls in _CLASSES:
        d = folder / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            write_aedat2(d / f"cifar10_{cls}_{i}.aedat", _stream(rng, events, 0, 1_300_000))
    return folder


def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def throughput(dataset, *, batch_size: int, workers: int, epochs: int) -> float:
    """Samples/s of the best of ``epochs`` epochs, after one warm-up epoch."""
    import torch

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    best = float("inf")
    for e in range(epochs + 1):
        t0 = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        if e:
            best = min(best, time.perf_counter() - t0)
    return n / best


# --------------------------------------------------------------------------- spikingjelly


def _sj_prepare(kind: str, raw_folder: Path, sj_root: Path, n_frames: int):
    """spikingjelly's own preparation from the extracted files: events_np, then frames."""
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS as SJCifar
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture as SJGesture

    extract = sj_root / "extract"
    extract.mkdir(parents=True)
    raw = sj_root / "events_np"
    raw.mkdir()
    if kind == "gesture":
        (extract / "DvsGesture").symlink_to(raw_folder)
        SJGesture.create_raw_from_extracted(extract, raw)
        kw = dict(train=True, data_type="frame", frames_number=n_frames, split_by="number")
        train = SJGesture(str(sj_root), **kw)
        return train
    for cls in _CLASSES:
        (extract / cls).symlink_to(raw_folder / cls)
    SJCifar.create_raw_from_extracted(extract, raw)
    return SJCifar(str(sj_root), data_type="frame", frames_number=n_frames, split_by="number")


class _SJFrames:
    """spikingjelly's frame dataset as float32 tensors (what a training loop feeds a model)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        import torch

        x, y = self.ds[i]
        return torch.from_numpy(np.asarray(x, dtype=np.float32)), y


# --------------------------------------------------------------------------- tonic


class _TonicGesture:
    """DVS Gesture samples via tonic 1.7's AEDAT reader and ToFrame (the cut as evformer's)."""

    def __init__(self, folder: Path, split: str, n_frames: int):
        import tonic

        names = (folder / f"trials_to_{split}.txt").read_text().split()
        self.items = []
        for name in names:
            rows = np.loadtxt(
                folder / f"{Path(name).stem}_labels.csv", delimiter=",", skiprows=1, dtype=np.int64
            ).reshape(-1, 3)
            self.items += [(folder / name, int(c) - 1, int(s), int(e)) for c, s, e in rows]
        self.to_frame = tonic.transforms.ToFrame(sensor_size=(128, 128, 2), n_event_bins=n_frames)
        self._recording: tuple[Path, np.ndarray] | None = None

    def _events(self, path: Path) -> np.ndarray:
        from evformer.bench.readers import _tonic_aedat

        if self._recording is None or self._recording[0] != path:
            self._recording = (path, _tonic_aedat(path, "3.1"))
        return self._recording[1]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, start, end = self.items[i]
        ev = self._events(path)
        sample = ev[(ev["t"] >= start) & (ev["t"] < end)]
        return self.to_frame(sample), label


class _TonicCached:
    """tonic's DiskCachedDataset output as float32 tensors."""

    def __init__(self, cached):
        self.cached = cached

    def __len__(self):
        return len(self.cached)

    def __getitem__(self, i):
        import torch

        x, y = self.cached[i]
        return torch.from_numpy(np.asarray(x, dtype=np.float32)), y


# --------------------------------------------------------------------------- main


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evformer.bench dataset", description=__doc__)
    ap.add_argument("--recordings", type=int, default=4, help="DVS Gesture recordings (>= 2)")
    ap.add_argument("--gesture-events", type=int, default=200_000, help="events per gesture")
    ap.add_argument("--cifar-per-class", type=int, default=4, help="CIFAR10-DVS files per class")
    ap.add_argument("--cifar-events", type=int, default=150_000, help="events per CIFAR file")
    ap.add_argument("--n-frames", type=int, default=16, help="T")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader / preparation processes")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    ap.add_argument("--no-spikingjelly", action="store_true")
    ap.add_argument("--no-tonic", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args(argv)
    if args.recordings < 2:
        ap.error("--recordings must be >= 2 (the last one is the test split)")

    from evformer.data.neuromorphic import CIFAR10DVS, DVSGesture

    print(f"machine: {machine_summary()}")
    rng = np.random.default_rng(args.seed)
    tmp_ctx = tempfile.TemporaryDirectory() if args.keep is None else None
    work = Path(tmp_ctx.name) if tmp_ctx else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = work / "raw"
        g_folder = make_gesture_folder(raw, args.recordings, args.gesture_events, rng)
        c_folder = make_cifar_folder(raw, args.cifar_per_class, args.cifar_events, rng)
        n_g_events = args.recordings * 11 * args.gesture_events
        n_c_events = 10 * args.cifar_per_class * args.cifar_events
        print(
            f"DVS Gesture: {args.recordings} recordings, {args.recordings * 11} samples, "
            f"{n_g_events / 1e6:.1f} M events in samples; CIFAR10-DVS: "
            f"{10 * args.cifar_per_class} files, {n_c_events / 1e6:.1f} M events; "
            f"T = {args.n_frames}, {args.workers} workers\n"
        )
        T, W = args.n_frames, args.workers
        prep_rows, size_rows, load_rows = [], [], []

        # ---- evformer ------------------------------------------------------------------
        ev_dir = work / "evformer"
        kw = dict(n_frames=T, num_workers=W, progress=False)

        def ev_gesture(cache_frames: bool):
            a = DVSGesture(raw, "train", cache_dir=ev_dir, cache_frames=cache_frames, **kw)
            DVSGesture(raw, "test", cache_dir=ev_dir, cache_frames=cache_frames, **kw)
            return a

        t_ev_g, ev_train = _timed(lambda: ev_gesture(False))
        t_ev_gf, ev_train_f = _timed(lambda: ev_gesture(True))  # frames on top of the events
        t_ev_c, _ = _timed(
            # a few files per class: a 3:1 split keeps every class in both splits (9:1 would
            # leave the test split empty, which the dataset refuses); all files are prepared
            lambda: [
                CIFAR10DVS(raw, s, cache_dir=ev_dir, train_fraction=0.75, **kw)
                for s in ("train", "test")
            ]
        )
        ev_events_size = sum(
            p.stat().st_size for p in ev_dir.glob("*.h5") if "-frames-" not in p.name
        )
        ev_gesture_events = sum(
            (ev_dir / f"dvsgesture-{s}.h5").stat().st_size for s in ("train", "test")
        )
        ev_gesture_frames = sum(p.stat().st_size for p in ev_dir.glob("dvsgesture-*-frames-*.h5"))

        # ---- spikingjelly --------------------------------------------------------------
        t_sj_g = t_sj_c = float("nan")
        sj_g_size = float("nan")
        sj_train = None
        if not args.no_spikingjelly:
            sj_g_root, sj_c_root = work / "sj_gesture", work / "sj_cifar"
            t_sj_g, sj_train = _timed(lambda: _sj_prepare("gesture", g_folder, sj_g_root, T))
            t_sj_c, _ = _timed(lambda: _sj_prepare("cifar", c_folder, sj_c_root, T))
            sj_g_size = dir_size(sj_g_root / "events_np") + dir_size(
                sj_g_root / f"frames_number_{T}_split_by_number"
            )

        # ---- tonic ---------------------------------------------------------------------
        t_tonic = float("nan")
        tonic_size = float("nan")
        tonic_train = None
        if not args.no_tonic:
            import tonic

            def tonic_prepare():
                out = {}
                for split in ("train", "test"):
                    cached = tonic.DiskCachedDataset(
                        _TonicGesture(g_folder, split, T), cache_path=str(work / "tonic" / split)
                    )
                    for i in range(len(cached)):  # the first pass writes the cache
                        cached[i]
                    out[split] = cached
                return out["train"]

            t_tonic, tonic_cached = _timed(tonic_prepare)
            tonic_train = _TonicCached(tonic_cached)
            tonic_size = dir_size(work / "tonic")

        prep_rows.append(
            [
                "DVS Gesture",
                "evformer (events)",
                t_ev_g,
                _ratio(t_sj_g, t_ev_g),
                _ratio(t_tonic, t_ev_g),
            ]
        )
        prep_rows.append(
            [
                "DVS Gesture",
                "evformer (events + frames)",
                t_ev_g + t_ev_gf,
                _ratio(t_sj_g, t_ev_g + t_ev_gf),
                _ratio(t_tonic, t_ev_g + t_ev_gf),
            ]
        )
        prep_rows.append(
            ["DVS Gesture", "spikingjelly (npz events + frames)", t_sj_g, 1.0, float("nan")]
        )
        prep_rows.append(
            ["DVS Gesture", "tonic (DiskCachedDataset frames)", t_tonic, float("nan"), 1.0]
        )
        prep_rows.append(
            ["CIFAR10-DVS", "evformer (events)", t_ev_c, _ratio(t_sj_c, t_ev_c), float("nan")]
        )
        prep_rows.append(
            ["CIFAR10-DVS", "spikingjelly (npz events + frames)", t_sj_c, 1.0, float("nan")]
        )

        raw_g = dir_size(g_folder)
        size_rows.append(["raw AEDAT 3.1 recordings", raw_g / 2**20, 1.0])
        size_rows.append(
            ["evformer event cache", ev_gesture_events / 2**20, ev_gesture_events / raw_g]
        )
        size_rows.append(
            ["evformer cached frames (extra)", ev_gesture_frames / 2**20, ev_gesture_frames / raw_g]
        )
        size_rows.append(
            ["spikingjelly events_np + frames npz", sj_g_size / 2**20, sj_g_size / raw_g]
        )
        size_rows.append(["tonic DiskCachedDataset", tonic_size / 2**20, tonic_size / raw_g])

        # ---- loading -------------------------------------------------------------------
        lk = dict(batch_size=args.batch_size, workers=W, epochs=args.epochs)
        r_ev = throughput(ev_train, **lk)
        load_rows.append(["evformer (bin on the fly)", r_ev, 1.0])
        r_evf = throughput(ev_train_f, **lk)
        load_rows.append(["evformer (cached frames)", r_evf, r_evf / r_ev])
        if sj_train is not None:
            r = throughput(_SJFrames(sj_train), **lk)
            load_rows.append(["spikingjelly (npz frames)", r, r / r_ev])
        if tonic_train is not None:
            r = throughput(tonic_train, **lk)
            load_rows.append(["tonic (DiskCachedDataset)", r, r / r_ev])

        print("### Preparation (raw files -> trainable data), seconds\n")
        print_table(
            ["dataset", "pipeline", "seconds", "spikingjelly / this", "tonic / this"], prep_rows
        )
        print(
            f"\n### Loading: DVS Gesture train, DataLoader({W} workers, batch {args.batch_size}), "
            f"T = {T}, 128 x 128\n"
        )
        print_table(["pipeline", "samples/s", "vs evformer on the fly"], load_rows)
        per_batch = args.batch_size / r_ev
        print(
            f"\nevformer on the fly: {per_batch * 1e3:.0f} ms per batch of {args.batch_size} "
            f"with {W} workers."
        )
        print("\n### On-disk size, DVS Gesture (both splits)\n")
        print_table(["what", "MiB", "x raw"], size_rows)
        print(f"\nevformer event caches of both datasets: {ev_events_size / 2**20:.1f} MiB")
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
        elif args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
