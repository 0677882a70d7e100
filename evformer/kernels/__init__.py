"""Compute backends of the spiking layers: one kernel-set interface, one module per backend.

Modules, in import order (each imports only those above it; no cycle):

* ``types``        plain parameter types (surrogates, :class:`LIFParams`, :class:`SpikeRows`)
* ``blocks``       argument blocks of the team trampolines, each declared once by slot name
* ``omp_team``     running Numba chunks on torch's own OpenMP threads
* ``numba_lif``    Numba BatchNorm + LIF, max-pool, pack kernels (with NumPy references)
* ``numba_sparse`` Numba event-driven conv / linear products
* ``triton_lif``   Triton LIF passes (CUDA)
* ``cpu``, ``cuda`` the kernel sets (``NumbaKernels``, ``TritonKernels``)
* ``interface``    the :class:`KernelSet` protocol and the backend dispatch
* ``fused``        the memory-lean autograd functions the layers call

Names below are imported lazily on first use.
"""

from __future__ import annotations

from evformer._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "LIFParams": "types",
    "SPIKFORMER_LIF": "types",
    "SpikeRows": "types",
    "Surrogate": "types",
    "Sigmoid": "types",
    "ATan": "types",
    "BACKENDS": "interface",
    "KernelSet": "interface",
    "EventDrivenKernels": "interface",
    "available_backends": "interface",
    "check_backend": "interface",
    "get_kernels": "interface",
    "resolve_backend": "interface",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
