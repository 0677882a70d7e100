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
    "SpikeRows",
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


@dataclass(frozen=True)
class SpikeRows:
    """Spike counts ``[M, C]`` stored by rows (CSR), as the event-driven products read them
    (:mod:`evformer.models._sparse_kernels`): ``indptr [M + 1]`` int64, ``idx [nnz]`` int32
    columns ascending within a row, ``vals [nnz]`` uint8 counts or None when all are 1."""

    indptr: torch.Tensor
    idx: torch.Tensor
    vals: torch.Tensor | None
    num_cols: int

    @property
    def nnz(self) -> int:
        return self.idx.numel()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What ``save_for_backward`` keeps (see :meth:`from_tensors`)."""
        return (self.indptr, self.idx) if self.vals is None else (self.indptr, self.idx, self.vals)

    @classmethod
    def from_tensors(cls, tensors, num_cols: int) -> SpikeRows:
        vals = tensors[2] if len(tensors) > 2 else None
        return cls(tensors[0], tensors[1], vals, num_cols)


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


def _may_be_counts(flat: torch.Tensor) -> bool:
    """False when the first values of ``flat`` already show it is not uint8 spike counts: a
    cheap early exit for real-valued inputs (images), before any full pass over them."""
    head = flat[:64]
    return bool(((head >= 0) & (head <= 255) & (head == head.round())).all())


def _bits(value: float) -> int:
    """A float scalar as the int64 bits of its float64 value (a trampoline reads it back)."""
    return int(np.float64(value).view(np.int64))


def _trampoline(kernel: str, dtype: torch.dtype) -> int:
    from evformer.models import _cpu_kernels as K

    return K.team_trampolines(str(dtype).removeprefix("torch."))[kernel]


def _sparse_trampoline(kernel: str, dtype: torch.dtype) -> int:
    from evformer.models import _sparse_kernels as SK

    return SK.team_trampolines(str(dtype).removeprefix("torch."))[kernel]


#: upper bound on the bytes of per-thread partial weight gradients (event-driven products)
_MAX_SLOT_BYTES = 256 * 2**20


class NumbaKernels:
    """CPU kernel set (Numba): each kernel's chunks run on torch's own OpenMP team where
    possible (:mod:`evformer.models._omp_team`), else as a Numba ``prange`` loop."""

    name = "numba"
    sparse = True  # has the event-driven conv / linear products

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
        if not _may_be_counts(flat):
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

    @staticmethod
    def scan_counts(x2: torch.Tensor):
        """``x2 [M, C]`` float spike counts -> ``(packed [M, C] uint8, counts [M] int64
        numpy, has_counts_above_1)``, or None when ``x2`` is not contiguous or holds a value
        that is not an integer in [0, 255] (then it must be kept as floats)."""
        from evformer.models import _cpu_kernels as K
        from evformer.models import _sparse_kernels as SK

        if not x2.is_contiguous() or x2.dim() != 2 or not _may_be_counts(x2.detach().view(-1)):
            return None
        M, C = x2.shape
        packed = torch.empty((M, C), dtype=torch.uint8)
        counts = np.empty(M, dtype=np.int64)
        nchunks = K.num_chunks(M)
        flags = np.zeros((nchunks, 2), dtype=np.int64)
        team = _team_for(x2.dtype, x2)
        if team is not None:
            block = _block(
                SK._SCN, nchunks, M, C, x2.data_ptr(), packed.data_ptr(), counts.ctypes.data,
                flags.ctypes.data,
            )  # fmt: skip
            team.run(_sparse_trampoline("scan", x2.dtype), block)
        else:
            SK.scan_counts(_np(x2), _np(packed), counts, flags, nchunks)
        if flags[:, 0].sum() != 0:
            return None
        return packed, counts, bool(flags[:, 1].sum() != 0)

    @staticmethod
    def spike_rows(packed: torch.Tensor, counts: np.ndarray, has_big: bool) -> SpikeRows:
        """CSR of ``packed [M, C]`` (uint8) from its row counts (see :meth:`scan_counts`)."""
        from evformer.models import _cpu_kernels as K
        from evformer.models import _sparse_kernels as SK

        M, C = packed.shape
        indptr = torch.zeros(M + 1, dtype=torch.int64)
        np.cumsum(counts, out=_np(indptr)[1:])
        nnz = int(indptr[-1])
        idx = torch.empty(nnz, dtype=torch.int32)
        vals = torch.empty(nnz if has_big else 0, dtype=torch.uint8)
        nchunks = K.num_chunks(M)
        team = _team_for(torch.float32, packed)
        if team is not None and nnz > 0:
            block = _block(
                SK._FIL, nchunks, M, C, packed.data_ptr(), indptr.data_ptr(), nnz,
                idx.data_ptr(), vals.data_ptr() if has_big else idx.data_ptr(), int(has_big),
            )  # fmt: skip
            team.run(_sparse_trampoline("fill", torch.float32), block)
        elif nnz > 0:
            vals_np = _np(vals) if has_big else np.empty(1, dtype=np.uint8)
            SK.fill_rows(_np(packed), _np(indptr), _np(idx), vals_np, has_big, nchunks)
        return SpikeRows(indptr, idx, vals if has_big else None, C)

    @staticmethod
    def sparse_conv_forward(rows: SpikeRows, N, H, W, wr, bias, stride, padding, Ho, Wo):
        """``[N, Ho, Wo, Cout]`` (channels-last memory) conv of the spike counts ``rows``
        (``N*H*W`` positions of ``Cin`` channels) with ``wr [KH, KW, Cin, Cout]``."""
        from evformer.models import _cpu_kernels as K
        from evformer.models import _sparse_kernels as SK

        KH, KW, Cin, Cout = wr.shape
        dtype = wr.dtype
        out = torch.empty((N, Ho, Wo, Cout), dtype=dtype)
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else wr.new_empty(1)
        binary = rows.vals is None
        vals = rows.idx if binary else rows.vals  # any array when binary: never read
        (sh, sw), (ph, pw) = stride, padding
        nchunks = K.num_chunks(N * Ho * Wo)
        team = _team_for(dtype, wr, b)
        with torch.profiler.record_function("evformer::sparse_conv_forward"):
            if team is not None:
                block = _block(
                    SK._SFW, nchunks, N, H, W, Cin, Cout, KH, KW, Ho, Wo, rows.indptr.data_ptr(),
                    rows.nnz, rows.idx.data_ptr(), vals.data_ptr(), int(binary), wr.data_ptr(),
                    b.data_ptr(), int(has_bias), sh, sw, ph, pw, out.data_ptr(),
                )  # fmt: skip
                team.run(_sparse_trampoline("conv_forward", dtype), block)
            else:
                vals_np = np.empty(1, dtype=np.uint8) if binary else _np(rows.vals)
                SK.sparse_conv_forward(
                    _np(rows.indptr), _np(rows.idx), vals_np, binary, H, W, _np(wr), _np(b),
                    has_bias, sh, sw, ph, pw, _np(out), nchunks,
                )  # fmt: skip
        return out

    @staticmethod
    def sparse_conv_weight_grad(rows: SpikeRows, N, H, W, gy, kernel_size, stride, padding):
        """Weight gradient ``[KH, KW, Cin, Cout]`` of :meth:`sparse_conv_forward` for the
        output gradient ``gy [N, Ho, Wo, Cout]`` (contiguous)."""
        from evformer.models import _sparse_kernels as SK

        KH, KW = kernel_size
        _, Ho, Wo, Cout = gy.shape
        Cin = rows.num_cols
        dtype = gy.dtype
        slot_bytes = KH * KW * Cin * Cout * gy.element_size()
        nslots = max(1, min(torch.get_num_threads(), N * Ho * Wo, _MAX_SLOT_BYTES // slot_bytes))
        slots = torch.empty((nslots, KH, KW, Cin, Cout), dtype=dtype)
        binary = rows.vals is None
        vals = rows.idx if binary else rows.vals
        (sh, sw), (ph, pw) = stride, padding
        team = _team_for(dtype, gy)
        with torch.profiler.record_function("evformer::sparse_conv_weight_grad"):
            if team is not None:
                block = _block(
                    SK._SWG, nslots, N, H, W, Cin, Cout, KH, KW, Ho, Wo, rows.indptr.data_ptr(),
                    rows.nnz, rows.idx.data_ptr(), vals.data_ptr(), int(binary), gy.data_ptr(),
                    sh, sw, ph, pw, slots.data_ptr(),
                )  # fmt: skip
                team.run(_sparse_trampoline("conv_weight_grad", dtype), block)
            else:
                vals_np = np.empty(1, dtype=np.uint8) if binary else _np(rows.vals)
                SK.sparse_conv_weight_grad(
                    _np(rows.indptr), _np(rows.idx), vals_np, binary, H, W, _np(gy), sh, sw,
                    ph, pw, _np(slots),
                )  # fmt: skip
        return slots[0] if nslots == 1 else slots.sum(0)


class TritonKernels:
    """CUDA kernel set: Triton for the LIF passes, torch ops for the rest."""

    name = "triton"
    sparse = False

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
