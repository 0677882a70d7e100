"""The kernel-set interface and the backend dispatch.

A kernel set is what the fused autograd functions (:mod:`evformer.kernels.fused`) call,
and all they call: a new device needs only a new kernel set. Every method takes and
returns torch tensors; activations use the ``[T, R, C]`` layout (time, rows, channels
innermost; :mod:`evformer.kernels.numba_lif`), per-channel vectors are ``[C]``.

Backends: ``"torch"`` is the reference path of the layers (plain autograd, no kernel set);
``"numba"`` (CPU, :class:`~evformer.kernels.cpu.NumbaKernels`) and ``"triton"`` (CUDA,
:class:`~evformer.kernels.cuda.TritonKernels`) are fused kernel sets; ``"auto"`` picks the
device's fused set. The event-driven products are an optional part of the interface
(:class:`EventDrivenKernels`), declared by ``event_driven = True``.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import torch

from evformer.kernels.types import LIFParams, SpikeRows

__all__ = [
    "BACKENDS",
    "EventDrivenKernels",
    "KernelSet",
    "available_backends",
    "check_backend",
    "get_kernels",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "numba", "triton")


class KernelSet(Protocol):
    """The kernels every fused backend implements (static methods of a class)."""

    #: backend name ("numba", "triton")
    name: ClassVar[str]
    #: True when the set also implements :class:`EventDrivenKernels`
    event_driven: ClassVar[bool]

    @staticmethod
    def bn_lif_forward(
        y3: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, p: LIFParams, want_packed: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``Z = scale * y3 + shift`` then the LIF over ``y3 [T, R, C]``: float spikes
        ``[T, R, C]`` and, when ``want_packed``, the same spikes as uint8 (else None)."""

    @staticmethod
    def bn_lif_backward(
        y3: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        mean: torch.Tensor,
        gs3: torch.Tensor,
        p: LIFParams,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dL/dZ [T, R, C], sum of dL/dZ [C], sum of dL/dZ * (y3 - mean) [C])`` (sums in
        float64) for the spike gradient ``gs3``, recomputing the LIF from ``y3``; ``out`` a
        buffer the set may write ``dL/dZ`` into (it may alias ``gs3``)."""

    @staticmethod
    def affine_backward_apply(
        y2: torch.Tensor,
        gz2: torch.Tensor,
        mean: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        d: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``out = a * gz2 + b * (y2 - mean) + d`` on ``[M, C]`` (BatchNorm's ``dL/dY``)."""

    @staticmethod
    def channel_stats(y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance (float64, ``[C]``) of ``y2 [M, C]``."""

    @staticmethod
    def maxpool_backward(
        s_nhwc: torch.Tensor, g_nhwc: torch.Tensor, kernel: int, stride: int, pad: int
    ) -> torch.Tensor:
        """Max-pool input gradient ``[N, H, W, C]`` from the uint8 spikes ``s_nhwc`` and the
        output gradient ``g_nhwc [N, Ho, Wo, C]``, routed as ``F.max_pool2d`` routes it."""

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor | None:
        """``x`` as uint8 (same shape) when it is contiguous spike counts in [0, 255], else
        None (then it must be kept as it is)."""

    @staticmethod
    def unpack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 spike counts -> ``dtype`` (same shape)."""


class EventDrivenKernels(KernelSet, Protocol):
    """The optional event-driven products (``event_driven = True``): a conv / linear over
    sparse spike counts whose work scales with the number of spikes."""

    @staticmethod
    def scan_counts(x2: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, bool] | None:
        """``x2 [M, C]`` -> ``(packed uint8 [M, C], non-zeros per row [M], any count > 1)``,
        or None when ``x2`` is not contiguous spike counts."""

    @staticmethod
    def spike_rows(packed: torch.Tensor, counts: np.ndarray, has_big: bool) -> SpikeRows:
        """The rows (CSR) of ``packed [M, C]`` from :meth:`scan_counts`' results."""

    @staticmethod
    def sparse_conv_forward(
        rows: SpikeRows,
        N: int,
        H: int,
        W: int,
        wr: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        Ho: int,
        Wo: int,
    ) -> torch.Tensor:
        """Conv of the spike counts ``rows`` (``N*H*W`` positions) with
        ``wr [KH, KW, Cin, Cout]``: ``[N, Ho, Wo, Cout]``."""

    @staticmethod
    def sparse_conv_weight_grad(
        rows: SpikeRows,
        N: int,
        H: int,
        W: int,
        gy: torch.Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        """Weight gradient ``[KH, KW, Cin, Cout]`` of :meth:`sparse_conv_forward` for the
        output gradient ``gy [N, Ho, Wo, Cout]``."""

    @staticmethod
    def gather_conv_forward(
        rows: SpikeRows, table: torch.Tensor, wr: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """A conv whose reads are listed (a masked conv on compact rows): ``[P, Cout]``,
        output row ``q`` = ``sum_k X[table[k, q]] @ wr[k]`` (+ bias) over the spike counts
        ``rows`` (``table [K, P]`` int64, -1: a zero row; ``wr [K, Cin, Cout]``)."""

    @staticmethod
    def gather_conv_weight_grad(
        rows: SpikeRows, table: torch.Tensor, gy: torch.Tensor
    ) -> torch.Tensor:
        """Weight gradient ``[K, Cin, Cout]`` of :meth:`gather_conv_forward` for the output
        gradient ``gy [P, Cout]``."""


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def available_backends(device: torch.device | str) -> list[str]:
    """Kernel backends usable on ``device`` (``"torch"``, the reference, always is)."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu":
        out.append("numba")
    elif device.type == "cuda" and _triton_available():
        out.append("triton")
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> the fused kernel set of ``device`` (Numba on CPU, Triton on CUDA) or
    ``"torch"`` where none exists; an explicit choice the device cannot run raises."""
    check_backend(backend)
    avail = available_backends(device)
    if backend == "auto":
        return avail[-1]
    if backend not in avail:
        raise RuntimeError(
            f"backend {backend!r} cannot run on device {device}: available here are {avail}; "
            "use backend='auto' to pick the best one"
        )
    return backend


def check_backend(backend: str) -> str:
    """Validate a backend name (before any device is known)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def get_kernels(backend: str) -> KernelSet:
    """The kernel set of a resolved fused backend (``"numba"`` or ``"triton"``)."""
    if backend == "numba":
        from evformer.kernels.cpu import NumbaKernels

        return NumbaKernels
    if backend == "triton":
        from evformer.kernels.cuda import TritonKernels

        return TritonKernels
    raise ValueError(f"no fused kernel set for backend {backend!r}")
