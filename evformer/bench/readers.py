"""AEDAT 3.1 / 2.0 parsing speed: evformer against tonic and spikingjelly, in one run.

``python -m evformer.bench readers [--events 1e6 ...] [--repeat 5]``

For each size, random DVS128 streams are written as AEDAT 3.1 (DVS128 Gesture)
and AEDAT 2.0 (CIFAR10-DVS) files in a temporary directory and parsed by

- evformer: ``read_aedat31`` / ``read_aedat2`` (Numba, the default backend) and
  the NumPy reference backend;
- tonic 1.7: its AEDAT pipeline, ``read_aedat_header_from_file`` +
  ``get_aer_events_from_file`` + the bit decoding of ``read_dvs_ibm`` /
  ``read_dvs_128`` (those two wrappers raise in tonic 1.7 because they unpack
  the header function's three return values into two, so the stages are
  called directly). tonic's 3.1 path reads one NumPy chunk per packet and does
  not check packet types;
- spikingjelly 2.0: ``datasets.utils.load_aedat_v3`` (a per-event Python loop,
  so it is timed on a file holding only the first ``--sj-events`` events) and
  the CIFAR10-DVS reader ``datasets.cifar10_dvs._load_origin_data`` (NumPy).

Every parser's output is checked against the generated events before timing,
so all columns measure the same work. Throughput is events / best wall time
(file read + decode + building the output, page cache warm).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from evformer.bench._util import best_time, machine_summary, memory_bandwidth_gbs, print_table
from evformer.events.aedat import read_aedat2, read_aedat31, write_aedat2, write_aedat31
from evformer.events.core import EVENT_DTYPE


def make_events(n: int, rng: np.random.Generator) -> np.ndarray:
    """A sorted DVS128 stream of ``n`` events; mean gap 10 µs, so 1e6 events span ~10 s."""
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["t"] = np.cumsum(rng.integers(0, 21, n))
    ev["x"] = rng.integers(0, 128, n)
    ev["y"] = rng.integers(0, 128, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


def _tonic_aedat(path: Path, layout: str) -> np.ndarray:
    """tonic's AEDAT reading as ``read_dvs_ibm`` (3.1) / ``read_dvs_128`` (2.0) do it."""
    import tonic.io as tio

    version, start, _ = tio.read_aedat_header_from_file(str(path))
    raw = tio.get_aer_events_from_file(str(path), version, start)
    a, t = raw["address"], raw["timeStamp"]
    if layout == "3.1":
        return tio.make_structured_array((a >> 17) & 0x1FFF, (a >> 2) & 0x1FFF, t, (a >> 1) & 1)
    return tio.make_structured_array((a >> 8) & 0x7F, (a >> 1) & 0x7F, t, a & 1)


def _check(name: str, got_t, got_x, got_y, got_p, ev: np.ndarray) -> None:
    for field, got in zip("txyp", (got_t, got_x, got_y, got_p)):
        if not np.array_equal(np.asarray(got).astype(np.int64), ev[field].astype(np.int64)):
            raise AssertionError(f"{name} decoded field {field!r} differently from the source")


def _mevs(n: int, seconds: float) -> float:
    return n / seconds / 1e6


def bench_size(n: int, *, repeat: int, sj_events: int, events_per_packet: int, tmp: Path):
    """Rows of the results table for one stream size."""
    import spikingjelly.datasets.cifar10_dvs as sj_cifar
    import spikingjelly.datasets.utils as sj_utils

    ev = make_events(n, np.random.default_rng(n))
    p31 = write_aedat31(tmp / f"g{n}.aedat", ev, events_per_packet=events_per_packet)
    p20 = write_aedat2(tmp / f"c{n}.aedat", ev)
    m = min(n, sj_events)
    p31_small = write_aedat31(tmp / f"s{m}.aedat", ev[:m], events_per_packet=events_per_packet)

    # Same work everywhere: every parser must reproduce the source events.
    for backend in ("numba", "numpy"):
        _check(
            f"evformer {backend} 3.1", *(read_aedat31(p31, backend=backend)[f] for f in "txyp"), ev
        )
        _check(
            f"evformer {backend} 2.0", *(read_aedat2(p20, backend=backend)[f] for f in "txyp"), ev
        )
    tn = _tonic_aedat(p31, "3.1")
    _check("tonic 3.1", tn["t"], tn["x"], tn["y"], tn["p"], ev)
    tn = _tonic_aedat(p20, "2.0")
    _check("tonic 2.0", tn["t"], tn["y"], tn["x"], tn["p"], ev)  # tonic names bits 8-14 "x"
    sj = sj_utils.load_aedat_v3(p31_small)
    _check("spikingjelly 3.1", sj["t"], sj["x"], sj["y"], sj["p"], ev[:m])
    sj = sj_cifar._load_origin_data(p20)  # transposed, flipped, polarity inverted
    _check("spikingjelly 2.0", sj["t"], 127 - sj["y"], 127 - sj["x"], 1 - sj["p"], ev)

    rows = []
    for fmt, path, ours, tonic_fn, sj_fn, sj_n in (
        (
            "AEDAT 3.1",
            p31,
            read_aedat31,
            lambda: _tonic_aedat(p31, "3.1"),
            lambda: sj_utils.load_aedat_v3(p31_small),
            m,
        ),
        (
            "AEDAT 2.0",
            p20,
            read_aedat2,
            lambda: _tonic_aedat(p20, "2.0"),
            lambda: sj_cifar._load_origin_data(p20),
            n,
        ),
    ):
        t_ours = best_time(lambda: ours(path), repeat=repeat)  # noqa: B023
        t_ref = best_time(lambda: ours(path, backend="numpy"), repeat=max(1, repeat // 2))  # noqa: B023
        t_tonic = best_time(tonic_fn, repeat=repeat)
        # spikingjelly's 3.1 loop takes seconds per million events: one timed call.
        t_sj = best_time(sj_fn, repeat=1 if fmt == "AEDAT 3.1" else repeat)
        evf, ton, sjr = _mevs(n, t_ours), _mevs(n, t_tonic), _mevs(sj_n, t_sj)
        sj_label = f"{sjr:.3g}" + (f" ({sj_n:.0e} ev)" if sj_n != n else "")
        rows.append([fmt, f"{n:.0e}", evf, _mevs(n, t_ref), ton, sj_label, evf / ton, evf / sjr])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evformer.bench readers", description=__doc__)
    ap.add_argument(
        "--events", type=float, nargs="+", default=[1e6], help="stream sizes (default 1e6)"
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per parser (best kept)")
    ap.add_argument(
        "--sj-events",
        type=float,
        default=1e5,
        help="events in the file given to spikingjelly's slow AEDAT 3.1 loop (default 1e5)",
    )
    ap.add_argument(
        "--events-per-packet", type=int, default=4096, help="AEDAT 3.1 packet size (default 4096)"
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.events]

    print(f"machine: {machine_summary()}, read bandwidth ~{memory_bandwidth_gbs():.1f} GB/s")
    print(
        f"AEDAT 3.1 packets of {args.events_per_packet} events. Throughput in Mev/s "
        f"(million events per second, best of {args.repeat}); ratios are evformer / other.\n"
        f"spikingjelly's AEDAT 3.1 reader is a per-event Python loop: it is timed on a file "
        f"of the first min(N, {int(args.sj_events):.0e}) events (size shown in its column).\n"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="evformer-bench-readers-") as tmp:
        for n in sizes:
            rows += bench_size(
                n,
                repeat=args.repeat,
                sj_events=int(args.sj_events),
                events_per_packet=args.events_per_packet,
                tmp=Path(tmp),
            )
    print_table(
        [
            "format",
            "events",
            "evformer",
            "evformer NumPy ref",
            "tonic",
            "spikingjelly",
            "x tonic",
            "x spikingjelly",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
