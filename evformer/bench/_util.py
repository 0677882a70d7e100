"""Timing, memory-bandwidth and table helpers shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np


def best_time(fn: Callable[[], object], *, repeat: int = 5, min_seconds: float = 0.0) -> float:
    """Best wall time in seconds of ``fn()`` over ``repeat`` calls (after one warm-up call).

    The minimum is the least noisy estimate on a shared machine. When ``min_seconds``
    is set, calls continue past ``repeat`` until that much time has been spent.
    """
    fn()
    best = float("inf")
    spent = 0.0
    i = 0
    while i < repeat or spent < min_seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        i += 1
    return best


def memory_bandwidth_gbs(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    """Single-thread read bandwidth in GB/s: best time of one ``sum`` pass over ``nbytes``.

    This is the ceiling for any one-pass kernel over data of that size.
    """
    a = np.ones(nbytes // 8, dtype=np.float64)
    t = best_time(lambda: a.sum(), repeat=repeat)
    return a.nbytes / t / 1e9


def machine_summary() -> str:
    """One line describing the machine the benchmark ran on."""
    import os

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cpus, Python {platform.python_version()}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (so results paste straight into the README)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c != c:  # NaN: not measured
            return "n/a"
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def run_worker(module: str, worker_args: Sequence[str], *, memory: bool, threads: int) -> dict:
    """Run ``python -m module --worker ...`` in a fresh process and return the JSON object
    printed on its last line. Each measurement gets its own process so that one library's
    allocator state, thread pools and compiled kernels never colour another's figures;
    ``memory`` lowers glibc's mmap threshold so freed blocks leave the resident set (the
    peak is read from it), ``threads`` (0: all cores) caps OpenMP and Numba threads."""
    env = dict(os.environ)
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", module, "--worker", *worker_args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {' '.join(worker_args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _rss(key: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def step_peak_bytes(step: Callable[[], object], device: str) -> int:
    """Peak memory of one ``step()`` above what was in use before it, in bytes: on CUDA
    ``torch.cuda.max_memory_allocated``, on CPU the resident high-water mark (reset through
    ``/proc/self/clear_refs``) minus the resident set before the step."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    base = _rss("VmRSS")
    step()
    return _rss("VmHWM") - base
