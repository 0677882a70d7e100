"""DVS128 Gesture and CIFAR10-DVS as PyTorch datasets of count frames [T, 2, H, W].

Both read the raw recordings exactly as their authors ship them (no conversion
step by hand), prepare an HDF5 event cache per split once and bin each sample on
access (``evformer.data.event_dataset.RecordingDataset``: each class here only says
where its recordings are and how one becomes samples). Expected layouts, and
where to get the data, are in ``datasets/README.md``; a missing folder raises
``DatasetNotFoundError`` saying both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from evformer.data.event_dataset import FrameTransform, RecordingDataset
from evformer.events.core import sort_events

__all__ = [
    "CIFAR10DVS",
    "CIFAR10_DVS_CLASSES",
    "DVSGesture",
    "DVS_GESTURE_CLASSES",
    "DatasetNotFoundError",
    "cifar10dvs_split",
    "load_cifar10dvs_recording",
    "load_dvsgesture_recording",
]

#: label k = class k + 1 of the labels CSVs (IBM's gesture_mapping.csv)
DVS_GESTURE_CLASSES = (
    "hand_clapping",
    "right_hand_wave",
    "left_hand_wave",
    "right_arm_clockwise",
    "right_arm_counter_clockwise",
    "left_arm_clockwise",
    "left_arm_counter_clockwise",
    "arm_roll",
    "air_drums",
    "air_guitar",
    "other_gestures",
)
#: label k = k-th class folder (alphabetical, which is also CIFAR-10's order)
CIFAR10_DVS_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
ORIENTATIONS = ("spikingjelly", "sensor")

_DVS_GESTURE_URL = "https://research.ibm.com/interactive/dvsgesture/"
_DVS_GESTURE_BOX = "https://ibm.ent.box.com/s/3hiq58ww1pbbjrinh367ykfdf60xsfm8/folder/50167556794"
_CIFAR10_DVS_URL = "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671"

# Bump when the cutting rule or anything else that changes stored samples changes.
_DVS_GESTURE_RULE = "csv rows: start <= t < end, label = class - 1, t -= start (v1)"
_CIFAR10_DVS_RULE = "one sample per file, sensor coordinates (v1)"


class DatasetNotFoundError(FileNotFoundError):
    """The raw data is not where the dataset looks; the message says where to get it
    and where to put it."""


def _missing(what: str, expected: Path, root: Path, how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{what} not found: expected {expected}.\n{how}\n"
        f"Put it under the data root {root.resolve()} (the `root` argument); "
        "datasets/README.md shows every expected layout."
    )


# --------------------------------------------------------------------------- DVS128 Gesture


def _read_labels_csv(path: Path) -> np.ndarray:
    """Rows (class 1..11, start µs, end µs) of a DVS Gesture labels CSV, int64 [K, 3]."""
    with open(path, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh.read().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].lower().startswith("class"):
        raise ValueError(
            f"{path}: expected the header 'class,startTime_usec,endTime_usec' on line 1"
        )
    if len(lines) == 1:
        raise ValueError(
            f"{path}: no label rows (only the header): the recording would give no samples"
        )
    rows = []
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    for k, ln in enumerate(lines[1:], start=2):
        parts = [s.strip() for s in ln.split(",")]
        try:
            if len(parts) != 3:
                raise ValueError
            values = [int(v) for v in parts]
        except ValueError:
            raise ValueError(
                f"{path}: line {k}: expected 'class,startTime_usec,endTime_usec' integers, "
                f"got {ln!r}"
            ) from None
        if not all(lo <= v <= hi for v in values):
            raise ValueError(f"{path}: line {k}: a value of {ln!r} exceeds the int64 range")
        rows.append(values)
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    for k, (c, s, e) in enumerate(arr, start=2):
        if not 1 <= c <= len(DVS_GESTURE_CLASSES):
            raise ValueError(f"{path}: line {k}: class {c} outside 1..{len(DVS_GESTURE_CLASSES)}")
        if e <= s:
            raise ValueError(
                f"{path}: line {k}: endTime_usec {e} <= startTime_usec {s} (an empty sample)"
            )
    return arr


def load_dvsgesture_recording(source: tuple[str | os.PathLike, str | os.PathLike]):
    """Cut one DVS Gesture recording into samples: ``source = (aedat file, labels csv)``.

    One sample per CSV row ``class,startTime_usec,endTime_usec``: the events with
    ``start <= t < end`` (AEDAT clock, µs), timestamps rebased so the sample starts at
    ``t = start`` -> 0, label ``class - 1``. Returns ``[(events, label), ...]`` in CSV row
    order, events as contiguous columns ``{"t": int64 µs, "x", "y": int16, "p": int8}``.
    Raises ``AedatError`` / ``ValueError`` naming the file (and the rows): a labels file
    without rows, a row with ``end <= start`` or one that selects no events (beyond the
    recording, wrong units) makes the recording unusable, so ``skip_bad`` may skip it.
    """
    from evformer.events import read_aedat31

    aedat, csv = Path(source[0]), Path(source[1])
    rows = _read_labels_csv(csv)
    events = sort_events(read_aedat31(aedat))
    t = events["t"]
    lo = np.searchsorted(t, rows[:, 1], side="left")
    hi = np.searchsorted(t, rows[:, 2], side="left")
    empty = np.flatnonzero(hi <= lo)
    if empty.size:
        span = f"[{t[0]}, {t[-1]}] µs" if t.size else "no events"
        lines = ", ".join(f"line {k + 2} ({rows[k, 1]}..{rows[k, 2]})" for k in empty[:5]) + (
            " ..." if empty.size > 5 else ""
        )
        raise ValueError(
            f"{csv}: {empty.size} of {len(rows)} label rows select no events of "
            f"{aedat.name} (recording spans {span}): {lines}. Check the file pairing and "
            "the units (µs on the recording's clock)"
        )
    out = []
    for (c, start, _end), a, b in zip(rows, lo, hi):
        # Contiguous columns (what the cache stores): one copy of 13 B/event, no
        # intermediate structured copy; t rebased to the sample start.
        sample = {
            "t": t[a:b] - start,
            "x": np.ascontiguousarray(events["x"][a:b]),
            "y": np.ascontiguousarray(events["y"][a:b]),
            "p": np.ascontiguousarray(events["p"][a:b]),
        }
        out.append((sample, int(c) - 1))
    return out


def _read_trials(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh.read().splitlines() if ln.strip()]


class DVSGesture(RecordingDataset):
    """DVS128 Gesture (IBM): 11 gestures, 128 x 128; ``ds[i] -> (frames, label)``.

    ``root`` holds the extracted ``DvsGesture/`` folder (or is that folder):
    ``userNN_<lighting>.aedat`` (AEDAT 3.1), ``userNN_<lighting>_labels.csv``,
    ``trials_to_train.txt`` and ``trials_to_test.txt``, which list the recordings of
    each split. One sample per labels-CSV row: events with ``start <= t < end``,
    timestamps rebased to the sample start (t = 0 at ``start``; binning does not
    depend on it), label ``class - 1``. The real data gives 1176 train / 288 test
    samples (spikingjelly's count, the one the Spikformer results use).

    ``frames``: float32 [T, 2, H, W] event counts (channel 0 = OFF, 1 = ON),
    T = ``n_frames``, binned ``split_by="number"`` (equal event counts, spikingjelly's
    rule) or ``"time"``; H = W = 128, or ``resize``. The first use of a split parses
    its recordings in ``num_workers`` processes into ``<cache_dir>/dvsgesture-<split>.h5``
    (``cache_dir`` defaults to ``<root>/.evformer``); later uses open it directly,
    unless a recording changed. See ``RecordingDataset`` for ``transform``,
    ``event_transform``, ``resize``, ``cache_frames`` and ``skip_bad`` (skips unreadable
    recordings, reported and listed in ``self.skipped``).
    """

    sensor_size = (128, 128)
    classes = DVS_GESTURE_CLASSES
    folder_name = "DvsGesture"
    cache_name = "dvsgesture"

    def sources(self) -> list[tuple[Path, Path]]:
        """``(userNN_<lighting>.aedat, its labels csv)`` of every trial of the split."""
        folder = self.locate(self.root)
        trials_file = folder / f"trials_to_{self.split}.txt"
        if not trials_file.is_file():
            raise _missing("DVS128 Gesture split list", trials_file, self.root, self._how_to_get())
        sources: list[tuple[Path, Path]] = []
        missing = []
        for name in _read_trials(trials_file):
            aedat = folder / name
            csv = folder / f"{Path(name).stem}_labels.csv"
            missing += [f.name for f in (aedat, csv) if not f.is_file()]
            sources.append((aedat, csv))
        if missing:
            raise DatasetNotFoundError(
                f"DVS128 Gesture: {trials_file} lists recordings whose files are missing in "
                f"{folder}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} "
                f"({len(missing)} files). Re-extract DvsGesture.tar.gz ({self._how_to_get()})"
            )
        return sources

    def params(self) -> dict[str, Any]:
        return {"rule": _DVS_GESTURE_RULE}

    def loader(self):
        return load_dvsgesture_recording

    @classmethod
    def locate(cls, root: Path) -> Path:
        """The DvsGesture folder under ``root`` (or ``root`` itself), else DatasetNotFoundError."""
        for folder in (root / cls.folder_name, root):
            if (folder / "trials_to_train.txt").is_file() or (
                folder / "trials_to_test.txt"
            ).is_file():
                return folder
        raise _missing(
            "DVS128 Gesture",
            root / cls.folder_name / "trials_to_train.txt (and trials_to_test.txt, "
            "userNN_<lighting>.aedat, userNN_<lighting>_labels.csv)",
            root,
            cls._how_to_get(),
        )

    @staticmethod
    def _how_to_get() -> str:
        return (
            f"Download DvsGesture.tar.gz from IBM ({_DVS_GESTURE_URL}, files at "
            f"{_DVS_GESTURE_BOX}; the licence must be accepted by hand, so it cannot be "
            "downloaded automatically) and extract it: it creates the DvsGesture/ folder."
        )


# --------------------------------------------------------------------------- CIFAR10-DVS


def load_cifar10dvs_recording(source: tuple[str | os.PathLike, int]):
    """Read one CIFAR10-DVS recording: ``source = (aedat file, label)``.

    Returns ``[(events EVENT_DTYPE in SENSOR coordinates, label)]``; the dataset
    applies the chosen orientation when reading. Raises ``AedatError`` naming the file.
    """
    from evformer.events import read_aedat2

    path, label = source
    return [(sort_events(read_aedat2(path)), int(label))]


def cifar10dvs_split(
    folder: str | os.PathLike, split: str, train_fraction: float = 0.9
) -> list[tuple[Path, int]]:
    """The ``(file, label)`` pairs of one CIFAR10-DVS split, reading no event data.

    Per class folder, the ``*.aedat`` file names in lexicographic (code-point) order;
    the first ``ceil(train_fraction * n)`` are ``"train"``, the rest ``"test"``
    (Spikformer's split through spikingjelly's ``split_to_train_test_set``: 9000 / 1000
    on the real data); ``"all"`` returns every file. Classes in ``CIFAR10_DVS_CLASSES``
    order, label = class index. A class left without a file in the split (e.g. 9 files
    or fewer: none for "test") raises ``ValueError`` naming the split and the class.
    """
    folder = Path(folder)
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    out: list[tuple[Path, int]] = []
    for label, cls in enumerate(CIFAR10_DVS_CLASSES):
        d = folder / cls
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"CIFAR10-DVS: class folder {d} is missing (expected the 10 folders "
                f"{', '.join(CIFAR10_DVS_CLASSES)} in {folder}). Get it from "
                f"{_CIFAR10_DVS_URL}; see datasets/README.md."
            )
        # Plain code-point order ("..._10" < "..._2"), as spikingjelly's folder listing.
        files = sorted(f.name for f in d.iterdir() if f.suffix == ".aedat")
        if not files:
            raise DatasetNotFoundError(
                f"CIFAR10-DVS: class folder {d} holds no .aedat recordings "
                f"(expected cifar10_{cls}_<i>.aedat); re-extract {cls}.zip from {_CIFAR10_DVS_URL}"
            )
        # Same float expression as spikingjelly, so any fraction splits identically.
        n_train = math.ceil(len(files) * train_fraction)
        chosen = {"train": files[:n_train], "test": files[n_train:], "all": files}[split]
        if not chosen:
            raise ValueError(
                f"CIFAR10-DVS: the {split!r} split gets no recording of class {cls!r}: {d} "
                f"holds {len(files)} .aedat files and train_fraction={train_fraction} puts "
                f"ceil({train_fraction} * {len(files)}) = {n_train} of them in 'train'. "
                "Restore the missing recordings (1000 per class) or change train_fraction."
            )
        out.extend((d / name, label) for name in chosen)
    return out


class CIFAR10DVS(RecordingDataset):
    """CIFAR10-DVS: 10 classes x 1000 DVS128 recordings of CIFAR-10 images; ``(frames, label)``.

    ``root`` holds the folder ``CIFAR10-DVS/`` (tonic's name ``CIFAR10DVS/`` is also
    accepted; or ``root`` is that folder) with the 10 class folders ``airplane`` ...
    ``truck`` of ``cifar10_<class>_<i>.aedat`` files (AEDAT 2.0) as extracted from the
    authors' zips. Split: per class, file names in lexicographic order, the first
    ``ceil(train_fraction * n)`` train, the rest test (9000 / 1000 with the default 0.9,
    the split of the published Spikformer results).

    ``orientation``:

    - ``"spikingjelly"`` (default): ``x = 127 - y_sensor``, ``y = 127 - x_sensor``,
      ``p = 1 - p_sensor`` (transposed, both axes flipped, polarity inverted), the
      arrays spikingjelly's ``CIFAR10DVS`` returns, with which the published
      Spikformer numbers were produced; pretrained checkpoints expect it;
    - ``"sensor"``: the recorded coordinates and polarity (1 = ON) unchanged.

    The event cache stores sensor coordinates, so both orientations share it
    (``<cache_dir>/cifar10dvs-<split>.h5``). ``frames``: float32 [T, 2, H, W] counts,
    channel 0 = p 0 after orientation. Other arguments as in ``DVSGesture``
    (``RecordingDataset``).
    """

    sensor_size = (128, 128)
    classes = CIFAR10_DVS_CLASSES
    folder_names = ("CIFAR10-DVS", "CIFAR10DVS")
    cache_name = "cifar10dvs"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        n_frames: int = 16,
        split_by: str = "number",
        transform: FrameTransform | None = None,
        *,
        orientation: str = "spikingjelly",
        train_fraction: float = 0.9,
        **kwargs: Any,
    ) -> None:
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        self.orientation = orientation
        self.train_fraction = train_fraction
        super().__init__(root, split, n_frames, split_by, transform, **kwargs)

    def sources(self) -> list[tuple[Path, int]]:
        return cifar10dvs_split(self.locate(self.root), self.split, self.train_fraction)

    def params(self) -> dict[str, Any]:
        return {"train_fraction": self.train_fraction, "rule": _CIFAR10_DVS_RULE}

    def loader(self):
        return load_cifar10dvs_recording

    def orient_events(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.orientation == "sensor":
            return cols
        h, w = self.sensor_size
        # spikingjelly's convention on a square sensor: transpose + flip both axes.
        return {
            "t": cols["t"],
            "x": (w - 1 - cols["y"]).astype(np.int16),
            "y": (h - 1 - cols["x"]).astype(np.int16),
            "p": (1 - cols["p"]).astype(np.int8),
        }

    def frame_key(self) -> dict[str, Any]:
        return {**super().frame_key(), "orientation": self.orientation}

    @classmethod
    def locate(cls, root: Path) -> Path:
        """The CIFAR10-DVS folder under ``root`` (or ``root`` itself), else DatasetNotFoundError."""
        for folder in (*(root / n for n in cls.folder_names), root):
            if (folder / CIFAR10_DVS_CLASSES[0]).is_dir():
                return folder
        raise _missing(
            "CIFAR10-DVS",
            root / cls.folder_names[0] / "<class>/cifar10_<class>_<i>.aedat for the 10 classes "
            f"{', '.join(CIFAR10_DVS_CLASSES)}",
            root,
            f"Download the 10 class zips (airplane.zip ... truck.zip) from {_CIFAR10_DVS_URL} "
            "and extract each into the CIFAR10-DVS/ folder (one folder per class).",
        )
