"""The CPU kernel set (Numba), with the event-driven products.

Every method takes and returns torch tensors in the ``[T, R, C]`` layout of
:mod:`evformer.kernels.numba_lif`. Each kernel's chunks run on torch's own OpenMP team
where the inputs allow it (:mod:`evformer.kernels.omp_team`; the arguments are packed into
the kernel's declared :class:`~evformer.kernels.blocks.ArgBlock`), else as a Numba
``prange`` loop, with identical results.
"""

from __future__ import annotations

import numpy as np
import torch

from evformer.kernels import numba_lif as K
from evformer.kernels import numba_sparse as SK
from evformer.kernels.blocks import ArgBlock
from evformer.kernels.omp_team import Team, team_for
from evformer.kernels.types import LIFParams, SpikeRows

__all__ = ["NumbaKernels"]

#: upper bound on the bytes of per-thread partial weight gradients (event-driven products)
_MAX_SLOT_BYTES = 256 * 2**20
#: weights from this size on get their gather-conv gradient by output columns, not by rows
#: with a slot of partial sums per thread (faster there too: no slots to clear and add)
_SPLIT_COLUMNS_BYTES = 4 * 2**20


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _may_be_counts(flat: torch.Tensor) -> bool:
    """False when the first values of ``flat`` already show it is not uint8 spike counts: a
    cheap early exit for real-valued inputs (images), before any full pass over them."""
    head = flat[:64]
    return bool(((head >= 0) & (head <= 255) & (head == head.round())).all())


def _run(team: Team, block: ArgBlock, dtype: torch.dtype, nchunks: int, **slots) -> None:
    """Pack ``slots`` into ``block`` (checked first) and run its trampoline for ``dtype``."""
    packed = block.pack(nchunks, dtype, **slots)
    kernels = SK if block in SK.BLOCKS else K
    team.run(kernels.team_trampolines(str(dtype).removeprefix("torch."))[block.name], packed)


class NumbaKernels:
    """CPU kernel set (Numba); implements
    :class:`~evformer.kernels.interface.EventDrivenKernels`."""

    name = "numba"
    event_driven = True

    @staticmethod
    def bn_lif_forward(y3, scale, shift, p: LIFParams, want_packed: bool):
        dt = _np(y3).dtype.type
        spikes = torch.empty_like(y3)
        packed = torch.empty(y3.shape if want_packed else (1, 1), dtype=torch.uint8)
        T, R, C = y3.shape
        nchunks = K.num_chunks(R)
        team = team_for(y3.dtype, y3, scale, shift)
        if team is not None:
            prow, pcol = (T, R * C) if want_packed else (1, 1)
            _run(
                team, K.FORWARD, y3.dtype, nchunks, T=T, R=R, C=C, y=y3, scale=scale,
                shift=shift, spikes=spikes, packed=packed, prow=prow, pcol=pcol,
                write_packed=want_packed, tau=p.tau, v_th=p.v_threshold, v_reset=p.v_reset,
            )  # fmt: skip
        else:
            K.bn_lif_forward(
                _np(y3), _np(scale), _np(shift), dt(p.tau), dt(p.v_threshold),
                dt(p.v_reset), _np(spikes), _np(packed), want_packed, nchunks,
            )  # fmt: skip
        return spikes, (packed if want_packed else None)

    @staticmethod
    def bn_lif_backward(y3, scale, shift, mean, gs3, p: LIFParams, out=None):
        dt = _np(y3).dtype.type
        gz = torch.empty_like(y3) if out is None else out
        T, R, C = y3.shape
        nchunks = K.num_chunks(R)
        psum_g = np.zeros((nchunks, C))
        psum_gy = np.zeros((nchunks, C))
        team = team_for(y3.dtype, y3, scale, shift, mean, gs3, gz)
        if team is not None:
            _run(
                team, K.BACKWARD, y3.dtype, nchunks, T=T, R=R, C=C, y=y3, scale=scale,
                shift=shift, mean=mean, grad_s=gs3, grad_z=gz, psum_g=psum_g, psum_gy=psum_gy,
                kind=p.surrogate.kind, detach_reset=p.detach_reset, tau=p.tau,
                v_th=p.v_threshold, v_reset=p.v_reset, alpha=p.surrogate.alpha,
            )  # fmt: skip
        else:
            K.bn_lif_backward(
                _np(y3), _np(scale), _np(shift), _np(mean), _np(gs3), dt(p.tau),
                dt(p.v_threshold), dt(p.v_reset), dt(p.surrogate.alpha), p.surrogate.kind,
                p.detach_reset, _np(gz), psum_g, psum_gy, nchunks,
            )  # fmt: skip
        return gz, torch.from_numpy(psum_g.sum(0)), torch.from_numpy(psum_gy.sum(0))

    @staticmethod
    def affine_backward_apply(y2, gz2, mean, a, b, d, out):
        M, C = y2.shape
        nchunks = K.num_chunks(M)
        team = team_for(y2.dtype, y2, gz2, out, mean, a, b, d)
        if team is not None:
            _run(
                team, K.AFFINE, y2.dtype, nchunks, M=M, C=C, y=y2, gz=gz2, mean=mean, a=a, b=b,
                d=d, out=out,
            )  # fmt: skip
        else:
            K.affine_backward_apply(
                _np(y2), _np(gz2), _np(mean), _np(a), _np(b), _np(d), _np(out), nchunks
            )
        return out

    @staticmethod
    def channel_stats(y2):
        M, C = y2.shape
        mean = np.empty(C)
        var = np.empty(C)
        nchunks = K.num_chunks(M)
        team = team_for(y2.dtype, y2)
        if team is not None:
            ref = np.empty(C)
            s1 = np.zeros((nchunks, C))
            s2 = np.zeros((nchunks, C))
            K.channel_stats_ref_row(_np(y2), ref)
            _run(team, K.STATS, y2.dtype, nchunks, M=M, C=C, y=y2, ref=ref, s1=s1, s2=s2)
            K.channel_stats_finish(M, ref, s1, s2, mean, var)
        else:
            K.channel_stats(_np(y2), mean, var, nchunks)
        return torch.from_numpy(mean), torch.from_numpy(var)

    @staticmethod
    def maxpool_backward(s_nhwc, g_nhwc, kernel: int, stride: int, pad: int):
        gin = torch.empty(s_nhwc.shape, dtype=g_nhwc.dtype)
        N, H, W, C = s_nhwc.shape
        Ho, Wo = g_nhwc.shape[1:3]
        nchunks = K.num_chunks(N)
        team = team_for(g_nhwc.dtype, s_nhwc, g_nhwc)
        if team is not None:
            _run(
                team, K.MAXPOOL, g_nhwc.dtype, nchunks, N=N, H=H, W=W, C=C, Ho=Ho, Wo=Wo,
                s=s_nhwc, g=g_nhwc, gin=gin, kernel=kernel, stride=stride, pad=pad,
            )  # fmt: skip
        else:
            K.maxpool_backward(_np(s_nhwc), _np(g_nhwc), _np(gin), kernel, stride, pad, nchunks)
        return gin

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor | None:
        if not x.is_contiguous():
            return None
        flat = x.detach().reshape(-1)
        if not _may_be_counts(flat):
            return None
        out = torch.empty(flat.shape, dtype=torch.uint8)
        nchunks = K.num_chunks(flat.numel() // 4096 + 1)
        team = team_for(flat.dtype, flat)
        if team is not None:
            bad = np.zeros(nchunks, dtype=np.int64)
            _run(team, K.PACK, flat.dtype, nchunks, n=flat.numel(), x=flat, out=out, bad=bad)
            ok = bad.sum() == 0
        else:
            ok = K.pack_uint8(_np(flat), _np(out), nchunks)
        return out.view(x.shape) if ok else None

    @staticmethod
    def unpack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 spike counts -> ``dtype`` (same shape and memory order)."""
        if dtype not in (torch.float32, torch.float64):  # e.g. bfloat16 under autocast
            return x.to(dtype)
        out = torch.empty(x.shape, dtype=dtype)
        n = x.numel()
        nchunks = K.num_chunks(n // 4096 + 1)
        team = team_for(dtype, x)
        if team is not None:
            _run(team, K.UNPACK, dtype, nchunks, n=n, x=x, out=out)
        else:
            K.unpack_uint8(_np(x).reshape(-1), _np(out).reshape(-1), nchunks)
        return out

    # -- event-driven products

    @staticmethod
    def scan_counts(x2: torch.Tensor):
        """``x2 [M, C]`` float spike counts -> ``(packed [M, C] uint8, counts [M] int64
        numpy, has_counts_above_1)``, or None when ``x2`` is not contiguous or holds a value
        that is not an integer in [0, 255] (then it must be kept as floats)."""
        if not x2.is_contiguous() or x2.dim() != 2 or not _may_be_counts(x2.detach().view(-1)):
            return None
        M, C = x2.shape
        packed = torch.empty((M, C), dtype=torch.uint8)
        counts = np.empty(M, dtype=np.int64)
        nchunks = K.num_chunks(M)
        flags = np.zeros((nchunks, 2), dtype=np.int64)
        team = team_for(x2.dtype, x2)
        if team is not None:
            _run(
                team, SK.SCAN, x2.dtype, nchunks, M=M, C=C, x=x2, packed=packed, counts=counts,
                flags=flags,
            )  # fmt: skip
        else:
            SK.scan_counts(_np(x2), _np(packed), counts, flags, nchunks)
        if flags[:, 0].sum() != 0:
            return None
        return packed, counts, bool(flags[:, 1].sum() != 0)

    @staticmethod
    def spike_rows(packed: torch.Tensor, counts: np.ndarray, has_big: bool) -> SpikeRows:
        """CSR of ``packed [M, C]`` (uint8) from its row counts (see :meth:`scan_counts`)."""
        M, C = packed.shape
        indptr = torch.zeros(M + 1, dtype=torch.int64)
        np.cumsum(counts, out=_np(indptr)[1:])
        nnz = int(indptr[-1])
        idx = torch.empty(nnz, dtype=torch.int32)
        vals = torch.empty(nnz if has_big else 0, dtype=torch.uint8)
        nchunks = K.num_chunks(M)
        team = team_for(torch.float32, packed)
        if team is not None and nnz > 0:
            _run(
                team, SK.FILL, torch.float32, nchunks, M=M, C=C, packed=packed, indptr=indptr,
                nnz=nnz, idx=idx, vals=vals, want_vals=has_big,
            )  # fmt: skip
        elif nnz > 0:
            vals_np = _np(vals) if has_big else np.empty(1, dtype=np.uint8)
            SK.fill_rows(_np(packed), _np(indptr), _np(idx), vals_np, has_big, nchunks)
        return SpikeRows(indptr, idx, vals if has_big else None, C)

    @staticmethod
    def sparse_conv_forward(rows: SpikeRows, N, H, W, wr, bias, stride, padding, Ho, Wo):
        """``[N, Ho, Wo, Cout]`` (channels-last memory) conv of the spike counts ``rows``
        (``N*H*W`` positions of ``Cin`` channels) with ``wr [KH, KW, Cin, Cout]``."""
        KH, KW, Cin, Cout = wr.shape
        dtype = wr.dtype
        out = torch.empty((N, Ho, Wo, Cout), dtype=dtype)
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else wr.new_empty(1)
        binary = rows.vals is None
        (sh, sw), (ph, pw) = stride, padding
        nchunks = K.num_chunks(N * Ho * Wo)
        team = team_for(dtype, wr, b)
        with torch.profiler.record_function("evformer::sparse_conv_forward"):
            if team is not None:
                _run(
                    team, SK.CONV_FORWARD, dtype, nchunks, N=N, H=H, W=W, Cin=Cin, Cout=Cout,
                    KH=KH, KW=KW, Ho=Ho, Wo=Wo, indptr=rows.indptr, nnz=rows.nnz, idx=rows.idx,
                    vals=_vals(rows), binary=binary, wr=wr, bias=b, has_bias=has_bias, sh=sh,
                    sw=sw, ph=ph, pw=pw, out=out,
                )  # fmt: skip
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
        KH, KW = kernel_size
        _, Ho, Wo, Cout = gy.shape
        Cin = rows.num_cols
        dtype = gy.dtype
        slot_bytes = KH * KW * Cin * Cout * gy.element_size()
        nslots = max(1, min(torch.get_num_threads(), N * Ho * Wo, _MAX_SLOT_BYTES // slot_bytes))
        slots = torch.empty((nslots, KH, KW, Cin, Cout), dtype=dtype)
        binary = rows.vals is None
        (sh, sw), (ph, pw) = stride, padding
        team = team_for(dtype, gy)
        with torch.profiler.record_function("evformer::sparse_conv_weight_grad"):
            if team is not None:
                _run(
                    team, SK.CONV_WEIGHT_GRAD, dtype, nslots, N=N, H=H, W=W, Cin=Cin,
                    Cout=Cout, KH=KH, KW=KW, Ho=Ho, Wo=Wo, indptr=rows.indptr, nnz=rows.nnz,
                    idx=rows.idx, vals=_vals(rows), binary=binary, gy=gy, sh=sh, sw=sw, ph=ph,
                    pw=pw, gw_slots=slots,
                )  # fmt: skip
            else:
                vals_np = np.empty(1, dtype=np.uint8) if binary else _np(rows.vals)
                SK.sparse_conv_weight_grad(
                    _np(rows.indptr), _np(rows.idx), vals_np, binary, H, W, _np(gy), sh, sw,
                    ph, pw, _np(slots),
                )  # fmt: skip
        return _sum_slots(slots)

    @staticmethod
    def gather_conv_forward(rows: SpikeRows, table, wr, bias):
        """``[P, Cout]``: output row ``q`` sums ``X[table[k, q]] @ wr[k]`` over the taps
        ``k`` (``table [K, P]`` int64 rows of the spike counts ``rows``, -1: none;
        ``wr [K, Cin, Cout]``), plus ``bias``."""
        Kt, Cin, Cout = wr.shape
        P = table.shape[1]
        dtype = wr.dtype
        out = torch.empty((P, Cout), dtype=dtype)
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else wr.new_empty(1)
        binary = rows.vals is None
        nchunks = K.num_chunks(P)
        team = team_for(dtype, wr, b)
        with torch.profiler.record_function("evformer::gather_conv_forward"):
            if team is not None:
                _run(
                    team, SK.GATHER_FORWARD, dtype, nchunks, P=P, K=Kt, Cin=Cin, Cout=Cout,
                    nrows=rows.indptr.numel() - 1, nnz=rows.nnz, indptr=rows.indptr,
                    idx=rows.idx, vals=_vals(rows), binary=binary, table=table, wr=wr, bias=b,
                    has_bias=has_bias, out=out,
                )  # fmt: skip
            else:
                SK.gather_conv_forward(
                    _np(rows.indptr), _np(rows.idx), _np(_vals(rows)), binary, _np(table),
                    _np(wr), _np(b), has_bias, _np(out), nchunks,
                )  # fmt: skip
        return out

    @staticmethod
    def gather_conv_weight_grad(rows: SpikeRows, table, gy):
        """Weight gradient ``[K, Cin, Cout]`` of :meth:`gather_conv_forward` for the output
        gradient ``gy [P, Cout]`` (contiguous)."""
        Kt, P = table.shape
        Cout, Cin = gy.shape[1], rows.num_cols
        dtype = gy.dtype
        threads = torch.get_num_threads()
        wbytes = Kt * Cin * Cout * gy.element_size()
        if wbytes >= _SPLIT_COLUMNS_BYTES and Cout >= 32:
            # a large weight: chunks split the output columns, one weight-sized buffer
            nslots, col_chunks = 1, max(1, min(threads, Cout // 16))
        else:  # chunks split the rows, each into its own slot of partial sums
            nslots = max(1, min(threads, P, _MAX_SLOT_BYTES // wbytes))
            col_chunks = 1
        slots = torch.empty((nslots, Kt, Cin, Cout), dtype=dtype)
        binary = rows.vals is None
        team = team_for(dtype, gy)
        with torch.profiler.record_function("evformer::gather_conv_weight_grad"):
            if team is not None:
                _run(
                    team, SK.GATHER_WEIGHT_GRAD, dtype, nslots * col_chunks, P=P, K=Kt,
                    Cin=Cin, Cout=Cout, nrows=rows.indptr.numel() - 1, nnz=rows.nnz,
                    indptr=rows.indptr, idx=rows.idx, vals=_vals(rows), binary=binary,
                    table=table, gy=gy, gw_slots=slots, col_chunks=col_chunks,
                )  # fmt: skip
            else:
                SK.gather_conv_weight_grad(
                    _np(rows.indptr), _np(rows.idx), _np(_vals(rows)), binary, _np(table),
                    _np(gy), _np(slots), col_chunks,
                )  # fmt: skip
        return _sum_slots(slots)


def _sum_slots(slots: torch.Tensor) -> torch.Tensor:
    """The sum of the per-chunk partial weight gradients ``slots [n, ...]``, added into
    ``slots[0]`` in slot order (no weight-sized temporary: at 5 M weights each is 21 MB)."""
    out = slots[0]
    for i in range(1, slots.shape[0]):
        out.add_(slots[i])
    return out


def _vals(rows: SpikeRows) -> torch.Tensor:
    """The counts of ``rows``; a one-byte stand-in when all are 1 (then never read)."""
    return rows.vals if rows.vals is not None else torch.empty(1, dtype=torch.uint8)
