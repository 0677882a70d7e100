"""Event-to-frame binning speed: evformer against tonic and spikingjelly, in one run.

``python -m evformer.bench binning [--sizes 1e5,1e6,5e6] [--frames 16] [--repeat 7]``

For each size, one random DVS128 stream (t sorted over ~6 s, x, y in 0..127,
p in {0, 1}) is binned into T frames of 128x128 by

- evformer ``to_frames(split_by="number" | "time")``, from contiguous columns
  (a mapping of field arrays, the dataset cache's layout) and from the structured
  array (its records read in place, no copy);
- tonic 1.7 ``ToFrame(n_time_bins=T)`` on the structured array;
- spikingjelly 2.0 ``integrate_events_by_fixed_frames_number`` ``'number'`` and
  ``'time'`` on the columns.

Before timing, evformer's frames are checked equal to spikingjelly's (both modes),
so the columns measure the same work. Throughput is events / best wall time,
including the allocation of the output frames. The one-pass limit is the measured
single-thread read bandwidth divided by 13 bytes per event (t, x, y, p).

A second table bins ``--batch-streams`` streams of ``--batch-events`` events into one
``[B, T, 2, H, W]`` array: a Python loop over ``to_frames`` + ``np.stack`` against
``to_frames_batch`` (Numba ``prange`` over streams), from a list of streams (which it
concatenates first) and from concatenated columns + offsets (the cache's layout).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from evformer.bench._util import machine_summary, memory_bandwidth_gbs, print_table
from evformer.events.core import FIELDS, from_columns
from evformer.events.frames import to_frames, to_frames_batch

BYTES_PER_EVENT = 13  # int64 t + int16 x + int16 y + int8 p
SENSOR = 128
# what the task set for 1e6 events from columns: ratio to the competitor
TARGETS = (
    ("number", "sj number", 3.0),
    ("number", "tonic", 30.0),
    ("time", "sj time", 10.0),
)


def make_columns(n: int, rng: np.random.Generator, *, seconds: float = 6.0) -> dict:
    """Contiguous columns of a sorted random DVS128 stream of ``n`` events over ``seconds``."""
    return {
        "t": np.sort(rng.integers(0, int(seconds * 1e6), n)).astype(np.int64),
        "x": rng.integers(0, SENSOR, n).astype(np.int16),
        "y": rng.integers(0, SENSOR, n).astype(np.int16),
        "p": rng.integers(0, 2, n).astype(np.int8),
    }


def interleaved_best(calls: dict, *, repeat: int, fewer: dict | None = None) -> dict[str, float]:
    """Best wall time (s) of each call, measured round-robin after one warm-up call each.

    On a shared machine the load drifts within seconds; timing the contenders in turns
    exposes them to the same conditions (``best_time`` times one call in a block).
    ``fewer`` caps the rounds of slow calls.
    """
    fewer = fewer or {}
    for fn in calls.values():
        fn()
    best = {k: float("inf") for k in calls}
    for r in range(repeat):
        for k, fn in calls.items():
            if r >= fewer.get(k, repeat):
                continue
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _parse_sizes(text: str) -> list[int]:
    try:
        return [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: expected e.g. 1e5,1e6, got {text!r}") from None


def _competitors():
    """The competitors' binning calls, or None where the package is missing."""
    try:
        from tonic.transforms import ToFrame
    except ImportError:  # pragma: no cover - tonic is a dependency
        ToFrame = None
    try:
        from spikingjelly.datasets.utils import integrate_events_by_fixed_frames_number as sj
    except ImportError:  # pragma: no cover - spikingjelly is a dependency
        sj = None
    return ToFrame, sj


def bench_sizes(sizes, n_frames, repeat, rng) -> tuple[list[str], list[list], dict]:
    ToFrame, sj = _competitors()
    headers = [
        "events",
        "evformer number",
        "number (struct)",
        "evformer time",
        "time (struct)",
        "tonic n_time_bins",
        "sj number",
        "sj time",
    ]
    rows, by_size = [], {}
    for n in sizes:
        cols = make_columns(n, rng)
        events = from_columns(*(cols[f] for f in FIELDS))
        if sj is not None:  # same work: evformer == spikingjelly on this stream
            for mode in ("number", "time"):
                ours = to_frames(cols, n_frames, mode)
                if not np.array_equal(ours, sj(cols, mode, n_frames, SENSOR, SENSOR)):
                    raise AssertionError(f"evformer {mode!r} differs from spikingjelly at {n}")
        calls = {}
        for mode in ("number", "time"):
            calls[mode] = lambda m=mode, c=cols: to_frames(c, n_frames, m)
            calls[f"{mode} (struct)"] = lambda m=mode, e=events: to_frames(e, n_frames, m)
            if sj is not None:
                calls[f"sj {mode}"] = lambda m=mode, c=cols: sj(c, m, n_frames, SENSOR, SENSOR)
        if ToFrame is not None:
            tonic = ToFrame(sensor_size=(SENSOR, SENSOR, 2), n_time_bins=n_frames)
            calls["tonic"] = lambda e=events, f=tonic: f(e)
        # tonic is ~100x slower: fewer calls keep the run short (its margin is large)
        seconds = interleaved_best(calls, repeat=repeat, fewer={"tonic": max(1, min(repeat, 3))})
        rate = {
            k: n / seconds.get(k, float("nan")) for k in (*calls, "tonic", "sj number", "sj time")
        }
        mev = {k: v / 1e6 for k, v in rate.items()}
        by_size[n] = mev
        rows.append(
            [
                f"{n:.0e}",
                mev["number"],
                mev["number (struct)"],
                mev["time"],
                mev["time (struct)"],
                mev["tonic"],
                mev["sj number"],
                mev["sj time"],
            ]
        )
    return headers, rows, by_size


def bench_batch(n_streams, n_events, n_frames, repeat, rng) -> list[list]:
    streams = [
        from_columns(*(make_columns(n_events, rng)[f] for f in FIELDS)) for _ in range(n_streams)
    ]
    offsets = np.arange(n_streams + 1, dtype=np.int64) * n_events
    concat = {f: np.concatenate([s[f] for s in streams]) for f in FIELDS}
    total = n_streams * n_events
    rows = []
    for mode in ("number", "time"):
        calls = {
            # the same [B, T, 2, H, W] result: stacking is part of the loop's work
            "loop": lambda m=mode: np.stack([to_frames(s, n_frames, m) for s in streams]),
            "list": lambda m=mode: to_frames_batch(streams, n_frames, m),
            "offsets": lambda m=mode: to_frames_batch(concat, n_frames, m, offsets=offsets),
        }
        best = interleaved_best(calls, repeat=repeat)
        rows.append(
            [
                mode,
                total / best["loop"] / 1e6,
                total / best["list"] / 1e6,
                total / best["offsets"] / 1e6,
                best["loop"] / best["offsets"],
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evformer.bench binning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sizes", type=_parse_sizes, default=[10**5, 10**6, 5 * 10**6])
    ap.add_argument("--frames", type=int, default=16, help="T, frames per stream")
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds per measurement")
    ap.add_argument("--batch-streams", type=int, default=32, help="0 skips the batch table")
    ap.add_argument("--batch-events", type=lambda s: int(float(s)), default=10**5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    gbs = memory_bandwidth_gbs()
    limit = gbs * 1e9 / BYTES_PER_EVENT / 1e6
    print(f"machine: {machine_summary()}")
    print(
        f"single-thread read bandwidth {gbs:.1f} GB/s -> one-pass limit {limit:.0f} Mev/s "
        f"({BYTES_PER_EVENT} B/event)\n"
    )
    print(f"### Throughput, Mev/s (T = {args.frames} frames of {SENSOR}x{SENSOR})\n")
    headers, rows, by_size = bench_sizes(args.sizes, args.frames, args.repeat, rng)
    print_table(headers, rows)

    print("\n### Ratios (evformer from columns / competitor) and share of the one-pass limit\n")
    ratio_rows = []
    for n, m in by_size.items():
        ratio_rows.append(
            [
                f"{n:.0e}",
                m["number"] / m["sj number"],
                m["number"] / m["tonic"],
                m["time"] / m["sj time"],
                m["time"] / m["tonic"],
                f"{100 * m['number'] / limit:.0f} %",
                f"{100 * m['time'] / limit:.0f} %",
            ]
        )
    print_table(
        [
            "events",
            "number / sj number",
            "number / tonic",
            "time / sj time",
            "time / tonic",
            "number % of limit",
            "time % of limit",
        ],
        ratio_rows,
    )

    if 10**6 in by_size:
        m = by_size[10**6]
        print("\n### Targets at 1e6 events (column input)\n")
        for ours, theirs, target in TARGETS:
            got = m[ours] / m[theirs]
            verdict = "met" if got >= target else "NOT met"
            print(f"- {ours} >= {target:g}x {theirs}: {got:.1f}x, {verdict}")

    if args.batch_streams > 0:
        print(
            f"\n### Batches: {args.batch_streams} streams of {args.batch_events:.0e} events, "
            "Mev/s\n"
        )
        rows = bench_batch(args.batch_streams, args.batch_events, args.frames, args.repeat, rng)
        print_table(
            [
                "mode",
                "stacked loop of to_frames",
                "to_frames_batch (list)",
                "batch (offsets)",
                "offsets / loop",
            ],
            rows,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
