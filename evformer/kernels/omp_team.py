"""Run the CPU kernels' chunks on torch's own OpenMP thread team.

Why: between its ops, torch's OpenMP worker threads keep spinning for a while (libgomp's
default wait policy). A Numba ``prange`` kernel launched in that window runs its second
thread on a core that a spinning torch worker still holds, and the fused BatchNorm+LIF
kernels measured 1.4-2.3x slower inside a training step than alone. Handing the same
chunks to torch's team instead (``GOMP_parallel`` of the OpenMP runtime torch loaded) puts
them on the threads that are spinning anyway: no competition, no wake-up.

How: a kernel is split into ``chunk(i, nchunks, ...)`` functions (Numba) and a trampoline
compiled as a C callback (``numba.cfunc``) that decodes one int64 argument block --
array addresses, sizes, scalars as float64 bits, declared once per kernel
(:mod:`evformer.kernels.blocks`) -- and takes chunk indices from an atomic counter in that
block until none is left; ``GOMP_parallel(trampoline, block, threads, 0)``
runs it on every thread of the team, the calling thread included. Results do not depend
on which thread runs which chunk (each chunk writes only its own rows).

Where: Linux with torch built on OpenMP (the PyPI wheels: ``torch/lib/libgomp.so.1``;
Intel's and LLVM's runtimes export the same ``GOMP_parallel`` entry point). Elsewhere, or
with ``EVFORMER_OMP_TEAM=0``, :func:`team` returns None and the kernels run as Numba
``prange`` loops, with identical results.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["Team", "address", "next_chunk", "team", "team_for"]

_LIB_NAMES = ("libgomp", "libiomp5", "libomp")


@intrinsic
def address(typingctx, addr):
    """``voidptr`` from an int64 address (Numba only; for ``numba.carray``)."""
    if addr != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


@intrinsic
def next_chunk(typingctx, counter):
    """Atomically ``counter[0] += 1`` and return the old value (``counter``: int64 array)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", ary.data, one, "monotonic")

    return types.int64(counter), codegen


class Team:
    """torch's OpenMP runtime, reached through ctypes (see the module docstring)."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        self._parallel = lib.GOMP_parallel
        self._parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None

    def run(self, trampoline_address: int, block: np.ndarray) -> None:
        """Run the trampoline on torch's current number of threads (the GIL is released)."""
        if block.dtype != np.int64 or not block.flags.c_contiguous:
            raise ValueError("the argument block must be a C-contiguous int64 array")
        self._parallel(trampoline_address, block.ctypes.data, torch.get_num_threads(), 0)


def _loaded_openmp_libraries() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process, torch's own first."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    found = [p for p in paths if os.path.basename(p).startswith(_LIB_NAMES)]
    torch_dir = os.path.dirname(torch.__file__)
    return sorted(found, key=lambda p: (not p.startswith(torch_dir), p))


@lru_cache(maxsize=1)
def team() -> Team | None:
    """torch's OpenMP team, or None where it cannot be used (then kernels use ``prange``)."""
    if os.environ.get("EVFORMER_OMP_TEAM", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return None
    noload = getattr(os, "RTLD_NOLOAD", 0)
    for path in _loaded_openmp_libraries():
        try:
            # RTLD_NOLOAD: only a library already loaded (by torch), never a second copy
            lib = ctypes.CDLL(path, mode=noload | os.RTLD_LAZY)
            lib.GOMP_parallel  # noqa: B018 - raises AttributeError when missing
        except (OSError, AttributeError):
            continue
        return Team(lib, path)
    return None


def team_for(dtype: torch.dtype, *tensors: torch.Tensor) -> Team | None:
    """torch's OpenMP team when it can run a kernel on ``tensors`` (all C-contiguous, the
    floating ones all of ``dtype``, float32 or float64: the trampolines read raw memory),
    else None: the kernel then runs as a Numba ``prange`` loop."""
    t = team()
    if t is None or dtype not in (torch.float32, torch.float64):
        return None
    for x in tensors:
        if not x.is_contiguous() or (x.is_floating_point() and x.dtype != dtype):
            return None
    return t
