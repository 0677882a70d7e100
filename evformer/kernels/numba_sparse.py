"""Numba CPU kernels for event-driven synaptic products: conv / linear fed by sparse spikes.

Why: the inputs of most Spikformer convs and linears are spike counts, and many layers fire
rarely (a few percent of the inputs are non-zero). A dense product spends its multiply-adds
on zeros; here each non-zero input adds its weight rows into the outputs it reaches, so the
work scales with the number of spikes. Two of a layer's three products profit: the forward
product ``Y = X * W`` and the weight gradient ``dW = X^T * dY``; the input gradient
``dX = dY * W^T`` is dense in ``dY`` and stays with oneDNN.

Layout: the input is channels-last, ``[N, H, W, Cin]`` (a linear layer is the 1x1 case with
``H = W = 1`` and ``N`` rows), stored by positions (CSR): ``indptr [N*H*W + 1]`` (int64),
``idx [nnz]`` (int32 input channels, ascending within a position) and, unless every
non-zero count is 1, ``vals [nnz]`` (uint8 counts). Weights are ``wr [KH, KW, Cin, Cout]``
(contiguous rows of ``Cout`` outputs per input channel and tap); outputs are
``[N, Ho, Wo, Cout]``. Sums run in the array dtype (float32 or float64), taps in
``(kh, kw, channel)`` order (a few terms at a time), so results equal a dense conv to
rounding.

Parallel work is split into ``_*_chunk(i, nchunks, ...)`` functions that run either as Numba
``prange`` loops or on torch's OpenMP team through trampolines, like
:mod:`evformer.kernels.numba_lif` (argument blocks: :mod:`evformer.kernels.blocks`). A chunk
writes only its own outputs; the weight gradient gives each chunk its own slot of partial
sums (``gw_slots [nchunks, KH, KW, Cin, Cout]``), summed by the caller,
so results never depend on which thread ran which chunk.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import carray, cfunc, njit, prange, types

from evformer.kernels.blocks import FLOAT, ArgBlock
from evformer.kernels.numba_lif import _chunk
from evformer.kernels.omp_team import address, next_chunk

__all__ = [
    "scan_counts",
    "fill_rows",
    "sparse_conv_forward",
    "sparse_conv_weight_grad",
    "gather_conv_forward",
    "gather_conv_weight_grad",
    "team_trampolines",
]


@njit(cache=True, error_model="numpy")
def _scan_counts_chunk(i, nchunks, x, packed, counts, flags):
    M, C = x.shape
    m0, m1 = _chunk(i, M, nchunks)
    zero = x.dtype.type(0)
    top = x.dtype.type(255)
    nbad = 0
    nbig = 0
    for m in range(m0, m1):
        xr = x[m]
        pr = packed[m]
        cnt = 0
        for c in range(C):
            v = xr[c]
            # clamp before converting (float -> uint8 of an out-of-range value is undefined);
            # NaN fails ``v > 0`` and becomes 0, then fails the round-trip test
            vc = v if v > zero else zero
            vc = vc if vc < top else top
            u = np.uint8(vc)
            pr[c] = u
            nbad += np.int64(x.dtype.type(u) != v)
            cnt += np.int64(u != 0)
            nbig += np.int64(u > 1)
        counts[m] = cnt
    flags[i, 0] = nbad
    flags[i, 1] = nbig


@njit(parallel=True, cache=True, error_model="numpy")
def scan_counts(x, packed, counts, flags, nchunks):
    """Pack ``x [M, C]`` (float spike counts) into ``packed [M, C]`` (uint8), count the
    non-zeros of each row into ``counts [M]`` (int64) and, per chunk, into
    ``flags [nchunks, 2]``: the number of values that are not integers in [0, 255] (the
    copy is lossless iff the total is 0; NaN counts as bad) and the number of counts > 1."""
    for i in prange(nchunks):
        _scan_counts_chunk(i, nchunks, x, packed, counts, flags)


@njit(cache=True, error_model="numpy")
def _fill_rows_chunk(i, nchunks, packed, indptr, idx, vals, want_vals):
    M, C = packed.shape
    m0, m1 = _chunk(i, M, nchunks)
    for m in range(m0, m1):
        pr = packed[m]
        j = indptr[m]
        for c in range(C):
            u = pr[c]
            if u != 0:
                idx[j] = c
                if want_vals:
                    vals[j] = u
                j += 1


@njit(parallel=True, cache=True, error_model="numpy")
def fill_rows(packed, indptr, idx, vals, want_vals, nchunks):
    """CSR of ``packed [M, C]`` (uint8): with ``indptr`` (the prefix sums of the row counts)
    given, write each row's non-zero columns (ascending) to ``idx`` and, when
    ``want_vals``, their counts to ``vals``."""
    for i in prange(nchunks):
        _fill_rows_chunk(i, nchunks, packed, indptr, idx, vals, want_vals)


@njit(cache=True, error_model="numpy")
def _add_weight_rows(acc, wrows, sel, vv, cnt, binary):
    """``acc [Cout] += sum_j vv[j] * wrows[sel[j]]`` over the ``cnt`` selected weight rows
    (``vv`` not read when ``binary``), four rows per pass over ``acc`` (fewer loads and
    stores of it than one row at a time)."""
    Cout = acc.shape[0]
    j = 0
    # 1-D row views: indexing them vectorises, offset arithmetic into one flat array
    # measured ~10x slower
    if binary:
        while j + 4 <= cnt:
            w0, w1, wc, w3 = wrows[sel[j]], wrows[sel[j + 1]], wrows[sel[j + 2]], wrows[sel[j + 3]]
            for k in range(Cout):
                acc[k] += (w0[k] + w1[k]) + (wc[k] + w3[k])
            j += 4
        while j < cnt:
            w0 = wrows[sel[j]]
            for k in range(Cout):
                acc[k] += w0[k]
            j += 1
    else:
        while j + 4 <= cnt:
            w0, w1, wc, w3 = wrows[sel[j]], wrows[sel[j + 1]], wrows[sel[j + 2]], wrows[sel[j + 3]]
            v0, v1, v2, v3 = vv[j], vv[j + 1], vv[j + 2], vv[j + 3]
            for k in range(Cout):
                acc[k] += (v0 * w0[k] + v1 * w1[k]) + (v2 * wc[k] + v3 * w3[k])
            j += 4
        while j < cnt:
            w0 = wrows[sel[j]]
            v0 = vv[j]
            for k in range(Cout):
                acc[k] += v0 * w0[k]
            j += 1


@njit(cache=True, error_model="numpy")
def _output_row(acc, bias, has_bias, wrows, sel, vv, cnt, binary):
    """One output row ``acc [Cout]``: the bias (or 0) plus the selected weight rows."""
    if has_bias:
        acc[:] = bias
    else:
        acc[:] = 0
    _add_weight_rows(acc, wrows, sel, vv, cnt, binary)


@njit(cache=True, error_model="numpy")
def _add_to_weight_rows(grows, g, sel, vv, cnt, binary, o0, o1):
    """Each selected spike adds the output gradient ``g[o0:o1]`` (times its count unless
    ``binary``) to columns ``o0:o1`` of its own weight-gradient row ``grows[sel[j]]``."""
    gs = g[o0:o1]  # 1-D views from 0: the loops below vectorise as over whole rows
    n = o1 - o0
    if binary:
        for j in range(cnt):
            grow = grows[sel[j]][o0:o1]
            for k in range(n):
                grow[k] += gs[k]
    else:
        for j in range(cnt):
            grow = grows[sel[j]][o0:o1]
            v = vv[j]
            for k in range(n):
                grow[k] += v * gs[k]


@njit(cache=True, error_model="numpy")
def _select_rows(q, Ho, Wo, indptr, idx, vals, binary, H, W, KW, Cin, sh, sw, ph, pw, sel, vv):
    """The spikes output position ``q`` (flat over ``[N, Ho, Wo]``) sees through a
    ``KH x KW`` window: their weight-row indices ``(kh*KW + kw)*Cin + c`` into ``sel`` and,
    unless ``binary``, their counts into ``vv``, in ``(kh, kw, c)`` order; returns
    ``(count, n, oh, ow)``."""
    KH = sel.shape[0] // (KW * Cin)
    n = q // (Ho * Wo)
    r = q - n * (Ho * Wo)
    oh = r // Wo
    ow = r - oh * Wo
    cnt = 0
    for kh in range(KH):
        ih = oh * sh - ph + kh
        if ih < 0 or ih >= H:
            continue
        for kw in range(KW):
            iw = ow * sw - pw + kw
            if iw < 0 or iw >= W:
                continue
            pos = (n * H + ih) * W + iw
            tap = (kh * KW + kw) * Cin
            for j in range(indptr[pos], indptr[pos + 1]):
                sel[cnt] = tap + idx[j]
                if not binary:
                    vv[cnt] = vals[j]
                cnt += 1
    return cnt, n, oh, ow


@njit(cache=True, error_model="numpy")
def _sparse_conv_forward_chunk(
    i, nchunks, indptr, idx, vals, binary, H, W, wr, bias, has_bias, sh, sw, ph, pw, out
):
    KH, KW, Cin, Cout = wr.shape
    N, Ho, Wo, _ = out.shape
    wrows = wr.reshape(KH * KW * Cin, Cout)
    # per output position: the weight rows its spikes select, then their sum
    sel = np.empty(KH * KW * Cin, dtype=np.int64)
    vv = np.empty(KH * KW * Cin, dtype=wr.dtype)
    P = N * Ho * Wo
    q0, q1 = _chunk(i, P, nchunks)
    for q in range(q0, q1):
        cnt, n, oh, ow = _select_rows(
            q, Ho, Wo, indptr, idx, vals, binary, H, W, KW, Cin, sh, sw, ph, pw, sel, vv
        )
        _output_row(out[n, oh, ow], bias, has_bias, wrows, sel, vv, cnt, binary)


@njit(parallel=True, cache=True, error_model="numpy")
def sparse_conv_forward(
    indptr, idx, vals, binary, H, W, wr, bias, has_bias, sh, sw, ph, pw, out, nchunks
):
    """``out [N, Ho, Wo, Cout] = conv(X, W) (+ bias)`` for the spike counts ``X`` given by
    rows (module docstring) over an ``H x W`` input; stride ``(sh, sw)``, zero padding
    ``(ph, pw)``. ``binary``: every count is 1 (``vals`` is not read)."""
    for i in prange(nchunks):
        _sparse_conv_forward_chunk(
            i, nchunks, indptr, idx, vals, binary, H, W, wr, bias, has_bias, sh, sw, ph, pw, out
        )


@njit(cache=True, error_model="numpy")
def _sparse_conv_weight_grad_chunk(
    i, nchunks, indptr, idx, vals, binary, H, W, gy, sh, sw, ph, pw, gw_slots
):
    _, KH, KW, Cin, Cout = gw_slots.shape
    N, Ho, Wo, _ = gy.shape
    gw = gw_slots[i]
    gw[:] = 0
    grows = gw.reshape(KH * KW * Cin, Cout)
    sel = np.empty(KH * KW * Cin, dtype=np.int64)
    vv = np.empty(KH * KW * Cin, dtype=gy.dtype)
    P = N * Ho * Wo
    q0, q1 = _chunk(i, P, nchunks)
    for q in range(q0, q1):
        cnt, n, oh, ow = _select_rows(
            q, Ho, Wo, indptr, idx, vals, binary, H, W, KW, Cin, sh, sw, ph, pw, sel, vv
        )
        _add_to_weight_rows(grows, gy[n, oh, ow], sel, vv, cnt, binary, 0, Cout)


@njit(parallel=True, cache=True, error_model="numpy")
def sparse_conv_weight_grad(indptr, idx, vals, binary, H, W, gy, sh, sw, ph, pw, gw_slots):
    """Partial weight gradients ``gw_slots[i] = sum over chunk i's output positions of
    X^T * gy`` (``[KH, KW, Cin, Cout]`` each; ``gy [N, Ho, Wo, Cout]``); the weight
    gradient is ``gw_slots.sum(0)``. One chunk per slot."""
    nchunks = gw_slots.shape[0]
    for i in prange(nchunks):
        _sparse_conv_weight_grad_chunk(
            i, nchunks, indptr, idx, vals, binary, H, W, gy, sh, sw, ph, pw, gw_slots
        )


# ---- masked convs on compact rows: each output row reads the input rows of a gather table


@njit(cache=True, error_model="numpy")
def _select_table_rows(q, table, indptr, idx, vals, binary, Cin, sel, vv):
    """The spikes output row ``q`` reads through the gather table ``table [K, P]`` (input
    row per tap, -1: none): their weight-row indices ``k*Cin + c`` into ``sel`` and, unless
    ``binary``, their counts into ``vv``, in ``(k, c)`` order; returns their count."""
    cnt = 0
    for k in range(table.shape[0]):
        pos = table[k, q]
        if pos < 0:
            continue
        tap = k * Cin
        for j in range(indptr[pos], indptr[pos + 1]):
            sel[cnt] = tap + idx[j]
            if not binary:
                vv[cnt] = vals[j]
            cnt += 1
    return cnt


@njit(cache=True, error_model="numpy")
def _gather_conv_forward_chunk(
    i, nchunks, indptr, idx, vals, binary, table, wr, bias, has_bias, out
):
    K, Cin, Cout = wr.shape
    wrows = wr.reshape(K * Cin, Cout)
    sel = np.empty(K * Cin, dtype=np.int64)
    vv = np.empty(K * Cin, dtype=wr.dtype)
    q0, q1 = _chunk(i, out.shape[0], nchunks)
    for q in range(q0, q1):
        cnt = _select_table_rows(q, table, indptr, idx, vals, binary, Cin, sel, vv)
        _output_row(out[q], bias, has_bias, wrows, sel, vv, cnt, binary)


@njit(parallel=True, cache=True, error_model="numpy")
def gather_conv_forward(indptr, idx, vals, binary, table, wr, bias, has_bias, out, nchunks):
    """``out [P, Cout]``: output row ``q`` is ``sum_k X[table[k, q]] @ wr[k] (+ bias)`` over
    the spike-count rows ``X`` (CSR; ``table [K, P]`` int64, -1: a zero row), with
    ``wr [K, Cin, Cout]``: a conv whose reads are listed rather than computed from a grid
    (a masked conv on the visible rows only)."""
    for i in prange(nchunks):
        _gather_conv_forward_chunk(
            i, nchunks, indptr, idx, vals, binary, table, wr, bias, has_bias, out
        )


@njit(cache=True, error_model="numpy")
def _gather_conv_weight_grad_chunk(
    i, nchunks, col_chunks, indptr, idx, vals, binary, table, gy, gw_slots
):
    _, K, Cin, Cout = gw_slots.shape
    r, c = i // col_chunks, i % col_chunks  # this chunk's rows part (its slot) and columns
    q0, q1 = _chunk(r, gy.shape[0], nchunks // col_chunks)
    o0, o1 = _chunk(c, Cout, col_chunks)
    grows = gw_slots[r].reshape(K * Cin, Cout)
    grows[:, o0:o1] = 0
    sel = np.empty(K * Cin, dtype=np.int64)
    vv = np.empty(K * Cin, dtype=gy.dtype)
    for q in range(q0, q1):
        cnt = _select_table_rows(q, table, indptr, idx, vals, binary, Cin, sel, vv)
        _add_to_weight_rows(grows, gy[q], sel, vv, cnt, binary, o0, o1)


@njit(parallel=True, cache=True, error_model="numpy")
def gather_conv_weight_grad(indptr, idx, vals, binary, table, gy, gw_slots, col_chunks):
    """Partial weight gradients of :func:`gather_conv_forward`: ``gw_slots[s]``
    ``[K, Cin, Cout]`` sums ``X^T gy`` over the ``s``-th part of the output rows
    (``gy [P, Cout]``); the weight gradient is ``gw_slots.sum(0)``. The chunks are the
    ``len(gw_slots) x col_chunks`` (rows part, output columns) pairs: splitting the rows
    costs a weight-sized slot per part, splitting the columns makes every chunk read every
    row's spikes (one slot, ``col_chunks`` chunks: for weights large enough that their
    temporaries would set a masked step's peak memory)."""
    nchunks = gw_slots.shape[0] * col_chunks
    for i in prange(nchunks):
        _gather_conv_weight_grad_chunk(
            i, nchunks, col_chunks, indptr, idx, vals, binary, table, gy, gw_slots
        )


# ---- trampolines for torch's OpenMP team

# Argument blocks, declared once (see :mod:`evformer.kernels.blocks`); the two conv blocks
# share the sizes, the spike rows and ``binary``, read by _conv_block_args.
_CONV_SLOTS = ("N", "H", "W", "Cin", "Cout", "KH", "KW", "Ho", "Wo", "nnz", "binary")
_ROWS = {"indptr": np.int64, "idx": np.int32, "vals": np.uint8}
SCAN = ArgBlock(
    "scan",
    ints=("M", "C"),
    arrays={"x": FLOAT, "packed": np.uint8, "counts": np.int64, "flags": np.int64},
)
FILL = ArgBlock("fill", ints=("M", "C", "nnz", "want_vals"), arrays={"packed": np.uint8, **_ROWS})
CONV_FORWARD = ArgBlock(
    "conv_forward",
    ints=(*_CONV_SLOTS, "has_bias", "sh", "sw", "ph", "pw"),
    arrays={**_ROWS, "wr": FLOAT, "bias": FLOAT, "out": FLOAT},
)
CONV_WEIGHT_GRAD = ArgBlock(
    "conv_weight_grad",
    ints=(*_CONV_SLOTS, "sh", "sw", "ph", "pw"),
    arrays={**_ROWS, "gy": FLOAT, "gw_slots": FLOAT},
)
_GATHER_SLOTS = ("P", "K", "Cin", "Cout", "nrows", "nnz", "binary")
GATHER_FORWARD = ArgBlock(
    "gather_forward",
    ints=(*_GATHER_SLOTS, "has_bias"),
    arrays={**_ROWS, "table": np.int64, "wr": FLOAT, "bias": FLOAT, "out": FLOAT},
)
GATHER_WEIGHT_GRAD = ArgBlock(
    "gather_weight_grad",
    ints=(*_GATHER_SLOTS, "col_chunks"),
    arrays={**_ROWS, "table": np.int64, "gy": FLOAT, "gw_slots": FLOAT},
)
BLOCKS = (SCAN, FILL, CONV_FORWARD, CONV_WEIGHT_GRAD, GATHER_FORWARD, GATHER_WEIGHT_GRAD)


@njit(cache=True)
def _conv_block_args(a, ix):
    """The slots both conv blocks have (``ix``: the block's slot indices): sizes, the spike
    rows and ``binary``."""
    N, H, W, Cin, Cout = a[ix.N], a[ix.H], a[ix.W], a[ix.Cin], a[ix.Cout]
    KH, KW, Ho, Wo, nnz = a[ix.KH], a[ix.KW], a[ix.Ho], a[ix.Wo], a[ix.nnz]
    indptr = carray(address(a[ix.indptr]), (N * H * W + 1,), np.int64)
    idx = carray(address(a[ix.idx]), (max(nnz, 1),), np.int32)
    vals = carray(address(a[ix.vals]), (max(nnz, 1),), np.uint8)
    return N, H, W, Cin, Cout, KH, KW, Ho, Wo, indptr, idx, vals, a[ix.binary] != 0


@njit(cache=True)
def _gather_block_args(a, ix):
    """The slots both gather blocks have: sizes, the spike rows, ``binary`` and the table."""
    P, K, Cin, Cout, nrows, nnz = a[ix.P], a[ix.K], a[ix.Cin], a[ix.Cout], a[ix.nrows], a[ix.nnz]
    indptr = carray(address(a[ix.indptr]), (nrows + 1,), np.int64)
    idx = carray(address(a[ix.idx]), (max(nnz, 1),), np.int32)
    vals = carray(address(a[ix.vals]), (max(nnz, 1),), np.uint8)
    table = carray(address(a[ix.table]), (K, P), np.int64)
    return P, K, Cin, Cout, indptr, idx, vals, a[ix.binary] != 0, table


@cache
def team_trampolines(dtype_name: str) -> dict[str, int]:
    """Addresses of the trampolines of every kernel here for ``float32`` / ``float64``,
    keyed by the name of their :class:`~evformer.kernels.blocks.ArgBlock`."""
    dt = getattr(np, dtype_name)
    i64 = np.int64
    i32 = np.int32
    u8 = np.uint8
    sig = types.void(types.voidptr)
    opts = {"error_model": "numpy", "cache": True}
    sc, fl, cf, cw, gf, gw = (blk.ix for blk in BLOCKS)

    @cfunc(sig, **opts)
    def scan(block):
        a = carray(block, (sc.n_slots,), i64)
        counter = carray(block, (1,), i64)
        nch, M, C = a[sc.nchunks], a[sc.M], a[sc.C]
        x = carray(address(a[sc.x]), (M, C), dt)
        packed = carray(address(a[sc.packed]), (M, C), u8)
        counts = carray(address(a[sc.counts]), (M,), i64)
        flags = carray(address(a[sc.flags]), (nch, 2), i64)
        i = next_chunk(counter)
        while i < nch:
            _scan_counts_chunk(i, nch, x, packed, counts, flags)
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def fill(block):
        a = carray(block, (fl.n_slots,), i64)
        counter = carray(block, (1,), i64)
        nch, M, C, nnz = a[fl.nchunks], a[fl.M], a[fl.C], a[fl.nnz]
        packed = carray(address(a[fl.packed]), (M, C), u8)
        indptr = carray(address(a[fl.indptr]), (M + 1,), i64)
        idx = carray(address(a[fl.idx]), (max(nnz, 1),), i32)
        vals = carray(address(a[fl.vals]), (max(nnz, 1),), u8)
        want_vals = a[fl.want_vals] != 0
        i = next_chunk(counter)
        while i < nch:
            _fill_rows_chunk(i, nch, packed, indptr, idx, vals, want_vals)
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def conv_forward(block):
        a = carray(block, (cf.n_slots,), i64)
        counter = carray(block, (1,), i64)
        N, H, W, Cin, Cout, KH, KW, Ho, Wo, indptr, idx, vals, binary = _conv_block_args(a, cf)
        nch = a[cf.nchunks]
        wr = carray(address(a[cf.wr]), (KH, KW, Cin, Cout), dt)
        bias = carray(address(a[cf.bias]), (Cout,), dt)
        out = carray(address(a[cf.out]), (N, Ho, Wo, Cout), dt)
        i = next_chunk(counter)
        while i < nch:
            _sparse_conv_forward_chunk(
                i, nch, indptr, idx, vals, binary, H, W, wr, bias, a[cf.has_bias] != 0,
                a[cf.sh], a[cf.sw], a[cf.ph], a[cf.pw], out,
            )  # fmt: skip
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def conv_weight_grad(block):
        a = carray(block, (cw.n_slots,), i64)
        counter = carray(block, (1,), i64)
        N, H, W, Cin, Cout, KH, KW, Ho, Wo, indptr, idx, vals, binary = _conv_block_args(a, cw)
        nch = a[cw.nchunks]
        gy = carray(address(a[cw.gy]), (N, Ho, Wo, Cout), dt)
        gw_slots = carray(address(a[cw.gw_slots]), (nch, KH, KW, Cin, Cout), dt)
        i = next_chunk(counter)
        while i < nch:
            _sparse_conv_weight_grad_chunk(
                i, nch, indptr, idx, vals, binary, H, W, gy, a[cw.sh], a[cw.sw], a[cw.ph],
                a[cw.pw], gw_slots,
            )  # fmt: skip
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def gather_forward(block):
        a = carray(block, (gf.n_slots,), i64)
        counter = carray(block, (1,), i64)
        P, K, Cin, Cout, indptr, idx, vals, binary, table = _gather_block_args(a, gf)
        nch = a[gf.nchunks]
        wr = carray(address(a[gf.wr]), (K, Cin, Cout), dt)
        bias = carray(address(a[gf.bias]), (Cout,), dt)
        out = carray(address(a[gf.out]), (P, Cout), dt)
        i = next_chunk(counter)
        while i < nch:
            _gather_conv_forward_chunk(
                i, nch, indptr, idx, vals, binary, table, wr, bias, a[gf.has_bias] != 0, out
            )
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def gather_weight_grad(block):
        a = carray(block, (gw.n_slots,), i64)
        counter = carray(block, (1,), i64)
        P, K, Cin, Cout, indptr, idx, vals, binary, table = _gather_block_args(a, gw)
        nch = a[gw.nchunks]
        gy = carray(address(a[gw.gy]), (P, Cout), dt)
        cc = a[gw.col_chunks]
        gw_slots = carray(address(a[gw.gw_slots]), (nch // cc, K, Cin, Cout), dt)
        i = next_chunk(counter)
        while i < nch:
            _gather_conv_weight_grad_chunk(
                i, nch, cc, indptr, idx, vals, binary, table, gy, gw_slots
            )
            i = next_chunk(counter)

    trampolines = (scan, fill, conv_forward, conv_weight_grad, gather_forward, gather_weight_grad)
    return {blk.name: t.address for blk, t in zip(BLOCKS, trampolines, strict=True)}
