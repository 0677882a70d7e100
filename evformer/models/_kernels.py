"""Kernel sets behind the fused layers: Numba on CPU, Triton on CUDA, one interface.

Every function takes and returns torch tensors. Activations use the ``[T, R, C]`` layout
described in :mod:`evformer.models._cpu_kernels` (channels innermost); per-channel vectors
are ``[C]``. The fused autograd functions in :mod:`evformer.models.functional` call only
this interface, so a new device needs only a new kernel set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evformer.models.surrogate import Sigmoid, Surrogate

__all__ = [
    "BACKENDS",
    "SPIKFORMER_LIF",
    "LIFParams",
    "available_backends",
    "get_kernels",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "numba", "triton")


@dataclass(frozen=True)
class LIFParams:
    """Hyper-parameters of the multi-step LIF (defaults: Spikformer's neuron).

    ``tau`` membrane time constant (> 1), ``v_threshold`` firing threshold, ``v_reset`` hard
    reset potential (also the initial potential), ``detach_reset`` drops the spike's gradient
    through the reset, ``surrogate`` the surrogate gradient of the spike function.
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float = 0.0
    detach_reset: bool = True
    surrogate: Surrogate = Sigmoid(4.0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 1.0):
            raise ValueError(f"LIF tau must be a finite number > 1, got {self.tau!r}")
        if not math.isfinite(self.v_threshold) or not math.isfinite(self.v_reset):
            raise ValueError("LIF v_threshold and v_reset must be finite")
        if self.v_reset >= self.v_threshold:
            raise ValueError(
                f"LIF v_reset ({self.v_reset}) must be below v_threshold ({self.v_threshold})"
            )
        if not isinstance(self.surrogate, Surrogate):
            raise TypeError(f"LIF surrogate must be a Surrogate, got {type(self.surrogate)}")


#: Spikformer's neuron: tau 2, threshold 1, hard reset to 0, detached reset, sigmoid(4)
SPIKFORMER_LIF = LIFParams()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _team_for(dtype: torch.dtype, *tensors: torch.Tensor):
    """torch's OpenMP team when it can run a kernel on ``tensors`` (all C-contiguous, the
    floating ones all of ``dtype``, float32 or float64: the trampolines read raw memory),
    else None: the kernel then runs as a Numba ``prange`` loop."""
    from evformer.models._omp_team import team

    t = team()
    if t is None or dtype not in (torch.float32, torch.float64):
        return None
    for x in tensors:
        if not x.is_contiguous() or (x.is_floating_point() and x.dtype != dtype):
            return None
    return t


def _block(size: int, nchunks: int, *slots: int) -> np.ndarray:
    """A trampoline's int64 argument block: counter 0, ``nchunks``, then ``slots``."""
    block = np.zeros(size, dtype=np.int64)
    block[1] = nchunks
    block[2 : 2 + len(slots)] = slots
    return block


def _bits(value: float) -> int:
    """A float scalar as the int64 bits of its float64 value (a trampoline reads it back)."""
    return int(np.float64(value).view(np.int64))


def _trampoline(kernel: str, dtype: torch.dtype) -> int:
    from evformer.models import _cpu_kernels as K

    return K.team_trampolines(str(dtype).removeprefix("torch."))[kernel]


class NumbaKernels:
    """CPU kernel set (Numba): each kernel's chunks run on torch's own OpenMP team where
    possible (:mod:`evformer.models._omp_team`), else as a Numba ``prange`` loop."""

    name = "numba"

    @staticmethod
    def bn_lif_forward(y3, scale, shift, p: LIFParams, want_packed: bool):
        from evformer.models import _cpu_kernels as K

        dt = _np(y3).dtype.type
        spikes = torch.empty_like(y3)
        packed = torch.empty(y3.shape if want_packed else (1, 1), dtype=torch.uint8)
        T, R, C = y3.shape
        nchunks = K.num_chunks(R)
        team = _team_for(y3.dtype, y3, scale, shift)
        if team is not None:
            prow, pcol = (T, R * C) if want_packed else (1, 1)
            block = _block(
                K._FWD, nchunks, T, R, C, y3.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                spikes.data_ptr(), packed.data_ptr(), prow, pcol, int(want_packed),
                _bits(dt(p.tau)), _bits(dt(p.v_threshold)), _bits(dt(p.v_reset)),
            )  # fmt: skip
            team.run(_trampoline("forward", y3.dtype), block)
        else:
            K.bn_lif_forward(
                _np(y3), _np(scale), _np(shift), dt(p.tau), dt(p.v_threshold),
                dt(p.v_reset), _np(spikes), _np(packed), want_packed, nchunks,
            )  # fmt: skip
        return spikes, (packed if want_packed else None)

    @staticmethod
    def bn_lif_backward(y3, scale, shift, mean, gs3, p: LIFParams, out=None):
        from evformer.models import _cpu_kernels as K

        dt = _np(y3).dtype.type
        gz = torch.empty_like(y3) if out is None else out
        T, R, C = y3.shape
        nchunks = K.num_chunks(R)
        psum_g = np.zeros((nchunks, C))
        psum_gy = np.zeros((nchunks, C))
        team = _team_for(y3.dtype, y3, scale, shift, mean, gs3, gz)
        if team is not None:
            block = _block(
                K._BWD, nchunks, T, R, C, y3.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                mean.data_ptr(), gs3.data_ptr(), gz.data_ptr(), psum_g.ctypes.data,
                psum_gy.ctypes.data, p.surrogate.kind, int(p.detach_reset), _bits(dt(p.tau)),
                _bits(dt(p.v_threshold)), _bits(dt(p.v_reset)), _bits(dt(p.surrogate.alpha)),
            )  # fmt: skip
            team.run(_trampoline("backward", y3.dtype), block)
        else:
            K.bn_lif_backward(
                _np(y3), _np(scale), _np(shift), _np(mean), _np(gs3), dt(p.tau),
                dt(p.v_threshold), dt(p.v_reset), dt(p.surrogate.alpha), p.surrogate.kind,
                p.detach_reset, _np(gz), psum_g, psum_gy, nchunks,
            )  # fmt: skip
        return gz, torch.from_numpy(psum_g.sum(0)), torch.from_numpy(psum_gy.sum(0))

    @staticmethod
    def affine_backward_apply(y2, gz2, mean, a, b, d, out):
        from evformer.models import _cpu_kernels as K

        M, C = y2.shape
        nchunks = K.num_chunks(M)
        coeffs = (mean, a, b, d)
        team = _team_for(y2.dtype, y2, gz2, out, *coeffs)
        if team is not None:
            block = _block(
                K._AFF, nchunks, M, C, y2.data_ptr(), gz2.data_ptr(),
                *(c.data_ptr() for c in coeffs), out.data_ptr(),
            )  # fmt: skip
            team.run(_trampoline("affine", y2.dtype), block)
        else:
            K.affine_backward_apply(
                _np(y2), _np(gz2), _np(mean), _np(a), _np(b), _np(d), _np(out), nchunks
            )
        return out

    @staticmethod
    def channel_stats(y2):
        from evformer.models import _cpu_kernels as K

        M, C = y2.shape
        mean = np.empty(C)
        var = np.empty(C)
        nchunks = K.num_chunks(M)
        team = _team_for(y2.dtype, y2)
        if team is not None:
            y = _np(y2)
            ref = np.empty(C)
            s1 = np.zeros((nchunks, C))
            s2 = np.zeros((nchunks, C))
            K.channel_stats_ref_row(y, ref)
            block = _block(
                K._STA, nchunks, M, C, y2.data_ptr(), ref.ctypes.data, s1.ctypes.data,
                s2.ctypes.data,
            )  # fmt: skip
            team.run(_trampoline("stats", y2.dtype), block)
            K.channel_stats_finish(M, ref, s1, s2, mean, var)
        else:
            K.channel_stats(_np(y2), mean, var, nchunks)
        return torch.from_numpy(mean), torch.from_numpy(var)

    @staticmethod
    def maxpool_backward(s_nhwc, g_nhwc, kernel: int, stride: int, pad: int):
        from evformer.models import _cpu_kernels as K

        gin = torch.empty(s_nhwc.shape, dtype=g_nhwc.dtype)
        N, H, W, C = s_nhwc.shape
        Ho, Wo = g_nhwc.shape[1:3]
        nchunks = K.num_chunks(N)
        team = _team_for(g_nhwc.dtype, s_nhwc, g_nhwc)
        if team is not None:
            block = _block(
                K._MPB, nchunks, N, H, W, C, Ho, Wo, s_nhwc.data_ptr(), g_nhwc.data_ptr(),
                gin.data_ptr(), kernel, stride, pad,
            )  # fmt: skip
            team.run(_trampoline("maxpool", g_nhwc.dtype), block)
        else:
            K.maxpool_backward(_np(s_nhwc), _np(g_nhwc), _np(gin), kernel, stride, pad, nchunks)
        return gin

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor | None:
        from evformer.models import _cpu_kernels as K

        if not x.is_contiguous():
            return None
        flat = x.detach().reshape(-1)
        head = flat[:64]
        # cheap early exit for real-valued inputs (images): no full pass over them
        if not bool(((head >= 0) & (head <= 255) & (head == head.round())).all()):
            return None
        out = torch.empty(flat.shape, dtype=torch.uint8)
        nchunks = K.num_chunks(flat.numel() // 4096 + 1)
        team = _team_for(flat.dtype, flat)
        if team is not None:
            bad = np.zeros(nchunks, dtype=np.int64)
            block = _block(
                K._PCK, nchunks, flat.numel(), flat.data_ptr(), out.data_ptr(), bad.ctypes.data
            )
            team.run(_trampoline("pack", flat.dtype), block)
            ok = bad.sum() == 0
        else:
            ok = K.pack_uint8(_np(flat), _np(out), nchunks)
        return out.view(x.shape) if ok else None

    @staticmethod
    def unpack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 spike counts -> ``dtype`` (same shape and memory order)."""
        from evformer.models import _cpu_kernels as K

        if dtype not in (torch.float32, torch.float64):  # e.g. bfloat16 under autocast
            return x.to(dtype)
        out = torch.empty(x.shape, dtype=dtype)
        n = x.numel()
        nchunks = K.num_chunks(n // 4096 + 1)
        team = _team_for(dtype, x)
        if team is not None:
            block = _block(K._UPK, nchunks, n, x.data_ptr(), out.data_ptr())
            team.run(_trampoline("unpack", dtype), block)
        else:
            K.unpack_uint8(_np(x).reshape(-1), _np(out).reshape(-1), nchunks)
        return out


class TritonKernels:
    """CUDA kernel set: Triton for the LIF passes, torch ops for the rest."""

    name = "triton"

    @staticmethod
    def bn_lif_forward(y3, scale, shift, p: LIFParams, want_packed: bool):
        from evformer.models import _triton_kernels as TK

        return TK.bn_lif_forward(y3, scale, shift, p, want_packed)

    @staticmethod
    def bn_lif_backward(y3, scale, shift, mean, gs3, p: LIFParams, out=None):
        from evformer.models import _triton_kernels as TK

        # the Triton kernel parks H in the output buffer, so it must not alias grad_s
        return TK.bn_lif_backward(y3, scale, shift, mean, gs3, p)

    @staticmethod
    def affine_backward_apply(y2, gz2, mean, a, b, d, out):
        torch.addcmul(d.to(y2.dtype), gz2, a.to(y2.dtype), out=out)
        out.add_((y2 - mean.to(y2.dtype)) * b.to(y2.dtype))
        return out

    @staticmethod
    def channel_stats(y2):
        var, mean = torch.var_mean(y2.double(), dim=0, correction=0)
        return mean, var

    @staticmethod
    def maxpool_backward(s_nhwc, g_nhwc, kernel: int, stride: int, pad: int):
        s = s_nhwc.permute(0, 3, 1, 2).to(g_nhwc.dtype)
        g = g_nhwc.permute(0, 3, 1, 2)
        _, idx = F.max_pool2d(s, kernel, stride, pad, return_indices=True)
        gin = torch.ops.aten.max_pool2d_with_indices_backward(
            g, s, [kernel, kernel], [stride, stride], [pad, pad], [1, 1], False, idx
        )
        return gin.permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor | None:
        if not x.is_contiguous():
            return None
        u = x.detach().clamp(0, 255).to(torch.uint8)
        if not torch.equal(u.to(x.dtype), x.detach()):
            return None
        return u

    @staticmethod
    def unpack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)


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


def get_kernels(backend: str):
    """The kernel set of a resolved fused backend (``"numba"`` or ``"triton"``)."""
    if backend == "numba":
        return NumbaKernels
    if backend == "triton":
        return TritonKernels
    raise ValueError(f"no fused kernel set for backend {backend!r}")
