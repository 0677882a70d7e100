"""Numba CPU kernels behind the fused spiking layers, each with a plain NumPy reference.

Layout convention: every kernel sees activations as ``[T, R, C]`` C-contiguous arrays -- time
first, then "rows" (batch x spatial positions or batch x tokens), channels innermost -- which
is the physical layout of channels-last conv outputs and of token matrices alike. Per-channel
parameters (``scale``, ``shift``, ``mean``, ...) have shape ``[C]``.

The LIF is spikingjelly's multi-step LIF with ``decay_input=True`` and a hard reset:

    H[t] = V[t-1] + (Z[t] - (V[t-1] - v_reset)) / tau
    S[t] = H[t] >= v_th
    V[t] = v_reset if S[t] else H[t]          (V[-1] = v_reset)

with ``Z = scale * Y + shift`` (a BatchNorm folded into an affine map; identity for a bare
LIF). The backward kernel recomputes ``H`` from ``Y`` instead of storing it -- that is where
the memory saving comes from -- and follows spikingjelly's recurrence term for term
(``carry = g - g / tau``), so gradients agree to rounding.

Scalars are passed typed as the array dtype so float32 arithmetic stays float32 (matching
torch); per-channel reductions accumulate in float64. All kernels use NumPy's error model
(IEEE division, no ZeroDivisionError check): the check's branch stops LLVM from vectorising
the divisions (by tau > 1 and by 1 + exp(.) > 0, never zero).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import carray, cfunc, get_num_threads, njit, prange, types
from numba.extending import overload

from evformer.kernels.blocks import FLOAT, ArgBlock
from evformer.kernels.omp_team import address, next_chunk

SIGMOID = 0
ATAN = 1

# Work split: rows are cut into a few parallel chunks per thread (scratch buffers are
# allocated per chunk, partial sums kept per chunk); each chunk walks its rows in tiles of
# about _TILE_ELEMS elements. A tile of
# whole rows is a contiguous run of ``rows * C`` elements of ``y[t]``, so every inner loop is
# a flat, branch-free loop that LLVM vectorises (per-channel parameters are pre-expanded to
# tile length once), and the backward pass's H history for one tile stays in L2.
_CHUNKS_PER_THREAD = 4
_TILE_ELEMS = 4096

# exp for the sigmoid surrogate: libm's scalar exp blocks vectorisation and dominated the
# backward pass, so ``exp(x) = p(r) * 2**m`` with ``x = m ln2 + r``, ``|r| <= ln2/2``, a
# Taylor polynomial in the array dtype (degree 7 for float32: < 1 ulp error; degree 13 for
# float64: < 1e-16 relative) and ``2**m`` built from its exponent bits. Arguments are clamped
# to the normal range ([-87, 88] / [-708, 709]); the surrogate is 0 or 1 to working
# precision there anyway.
_LOG2E = 1.4426950408889634


def _exp_tile(x, n, bits):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(
    _exp_tile,
    jit_options={"fastmath": {"nnan", "ninf", "nsz"}, "cache": True, "error_model": "numpy"},
)
def _exp_tile_impl(x, n, bits):
    """``x[:n] = exp(x[:n])`` in place; ``bits`` is int32 (float32 x) / int64 (float64 x)."""
    if x.dtype == types.float32:
        f = np.float32
        l2e, hi, lo = f(_LOG2E), f(0.693359375), f(-2.12194440e-4)
        one, half, c3, c4, c5, c6, c7 = (
            f(v) for v in (1, 0.5, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040)
        )
        xmin, xmax = f(-87.0), f(88.0)

        def impl32(x, n, bits):
            for k in range(n):
                xv = min(max(x[k], xmin), xmax)
                m = np.floor(xv * l2e + half)
                r = (xv - m * hi) - m * lo
                x[k] = one + r * (
                    one + r * (half + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7)))))
                )
                bits[k] = (np.int32(m) + 127) << 23
            scale = bits.view(np.float32)
            for k in range(n):
                x[k] *= scale[k]

        return impl32
    c = [1.0 / math.factorial(k) for k in range(14)]
    c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = c[2:]
    hi64, lo64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # Cody-Waite ln 2

    def impl64(x, n, bits):
        for k in range(n):
            xv = min(max(x[k], -708.0), 709.0)
            m = np.floor(xv * _LOG2E + 0.5)
            r = (xv - m * hi64) - m * lo64
            p = c12 + r * c13
            p = c11 + r * p
            p = c10 + r * p
            p = c9 + r * p
            p = c8 + r * p
            p = c7 + r * p
            p = c6 + r * p
            p = c5 + r * p
            p = c4 + r * p
            p = c3 + r * p
            p = c2 + r * p
            x[k] = 1.0 + r * (1.0 + r * p)
            bits[k] = (np.int64(m) + 1023) << 52
        scale = bits.view(np.float64)
        for k in range(n):
            x[k] *= scale[k]

    return impl64


def _bits_like(x, n):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_bits_like, jit_options={"cache": True})
def _bits_like_impl(x, n):
    """Integer scratch of the width :func:`_exp_tile` needs for ``x``'s dtype."""
    if x.dtype == types.float32:
        return lambda x, n: np.empty(n, dtype=np.int32)
    return lambda x, n: np.empty(n, dtype=np.int64)


def num_chunks(R: int) -> int:
    """Number of parallel chunks to split ``R`` rows into (the kernels' ``nchunks``)."""
    return max(1, min(int(R), _CHUNKS_PER_THREAD * get_num_threads()))


@njit(cache=True)
def _chunk(i, R, nchunks):
    return (i * R) // nchunks, ((i + 1) * R) // nchunks


@njit(cache=True)
def _tile_rows(C):
    return max(1, _TILE_ELEMS // C)


@njit(cache=True, error_model="numpy")
def _expand(param, C, L):
    out = np.empty(L, dtype=param.dtype)
    for k in range(L):
        out[k] = param[k % C]
    return out


# Each parallel kernel below is a ``_*_chunk(i, nchunks, ...)`` function (the work of
# chunk i: a contiguous range of rows, writing only its own outputs) run two ways with
# identical results: the public ``prange`` loop, and a trampoline (a C callback) that
# torch's OpenMP team runs through :mod:`evformer.kernels.omp_team`. A trampoline reads one
# int64 argument block (:mod:`evformer.kernels.blocks`; declared at the trampolines).


@njit(cache=True, error_model="numpy")
def _bn_lif_forward_chunk(
    i, nchunks, y, scale, shift, tau, v_th, v_reset, spikes, packed, write_packed
):
    T, R, C = y.shape
    y2 = y.reshape(T, R * C)
    s2 = spikes.reshape(T, R * C)
    p2 = packed.reshape(packed.shape[0], -1)
    tr = _tile_rows(C)
    L = tr * C
    sc = _expand(scale, C, L)
    sh = _expand(shift, C, L)
    one = tau / tau
    zero = one - one
    c0, c1 = _chunk(i, R, nchunks)
    v = np.empty(L, dtype=y.dtype)
    for r0 in range(c0, c1, tr):
        n = (min(c1, r0 + tr) - r0) * C
        base = r0 * C
        v[:n] = v_reset
        for t in range(T):
            # 1-D slice views: flat indexing vectorises, 2-D indexing does not
            yt = y2[t, base : base + n]
            st = s2[t, base : base + n]
            for k in range(n):
                z = yt[k] * sc[k] + sh[k]
                vv = v[k]
                h = vv + (z - (vv - v_reset)) / tau
                fire = h >= v_th
                st[k] = one if fire else zero
                v[k] = v_reset if fire else h
            if write_packed:
                pt = p2[t, base : base + n]
                for k in range(n):
                    pt[k] = 1 if st[k] != zero else 0


@njit(parallel=True, cache=True, error_model="numpy")
def bn_lif_forward(y, scale, shift, tau, v_th, v_reset, spikes, packed, write_packed, nchunks):
    """Fused ``Z = scale*Y + shift`` + multi-step LIF over ``y [T, R, C]``.

    Writes float spikes to ``spikes [T, R, C]`` and, when ``write_packed``, the same spikes
    as uint8 to ``packed [T, R, C]`` (what the backward pass keeps).
    """
    for i in prange(nchunks):
        _bn_lif_forward_chunk(
            i, nchunks, y, scale, shift, tau, v_th, v_reset, spikes, packed, write_packed
        )


@njit(cache=True, error_model="numpy")
def _bn_lif_backward_chunk(
    i,
    nchunks,
    y,
    scale,
    shift,
    mean,
    grad_s,
    tau,
    v_th,
    v_reset,
    alpha,
    kind,
    detach_reset,
    grad_z,
    psum_g,
    psum_gy,
):
    T, R, C = y.shape
    y2 = y.reshape(T, R * C)
    gs2 = grad_s.reshape(T, R * C)
    gz2 = grad_z.reshape(T, R * C)
    tr = _tile_rows(C)
    L = tr * C
    sc = _expand(scale, C, L)
    sh = _expand(shift, C, L)
    mn = _expand(mean, C, L)
    one = tau / tau
    zero = one - one
    inv_tau = one / tau
    half_pi_alpha = alpha * y.dtype.type(math.pi / 2)
    half_alpha = alpha / (one + one)
    c0, c1 = _chunk(i, R, nchunks)
    h = np.empty((T, L), dtype=y.dtype)
    v = np.empty(L, dtype=y.dtype)
    carry = np.empty(L, dtype=y.dtype)
    sg = np.empty(L, dtype=y.dtype)
    rg = np.empty(L, dtype=y.dtype)
    bits = _bits_like(y, L)
    tile_g = np.empty(L, dtype=y.dtype)
    tile_gy = np.empty(L, dtype=y.dtype)
    acc_g = np.zeros(L, dtype=np.float64)
    acc_gy = np.zeros(L, dtype=np.float64)
    # Loops touch few arrays each: LLVM vectorises a loop over arrays it cannot prove
    # distinct only behind runtime overlap checks, and gives up (scalar code) when a loop
    # writes several of many arrays -- that cost the fused version ~20 %.
    for r0 in range(c0, c1, tr):
        n = (min(c1, r0 + tr) - r0) * C
        base = r0 * C
        v[:n] = v_reset
        carry[:n] = zero
        tile_g[:n] = zero
        tile_gy[:n] = zero
        # recompute H exactly as the forward kernel did (same operations, same order)
        for t in range(T):
            yt = y2[t, base : base + n]
            ht = h[t]
            for k in range(n):
                vv = v[k]
                ht[k] = vv + ((yt[k] * sc[k] + sh[k]) - (vv - v_reset)) / tau
            for k in range(n):
                hh = ht[k]
                v[k] = v_reset if hh >= v_th else hh
        for t in range(T - 1, -1, -1):
            ht = h[t]
            yt = y2[t, base : base + n]
            gst = gs2[t, base : base + n]
            gzt = gz2[t, base : base + n]
            if kind == 0:
                for k in range(n):
                    sg[k] = -(alpha * (ht[k] - v_th))
                _exp_tile(sg, n, bits)
                for k in range(n):
                    s = one / (one + sg[k])
                    sg[k] = (one - s) * s * alpha
            else:
                for k in range(n):
                    zz = (ht[k] - v_th) * half_pi_alpha
                    sg[k] = half_alpha / (one + zz * zz)
            for k in range(n):
                rg[k] = zero if ht[k] >= v_th else one
            if not detach_reset:
                for k in range(n):
                    rg[k] += (v_reset - ht[k]) * sg[k]
            for k in range(n):
                sg[k] = gst[k] * sg[k] + carry[k] * rg[k]  # dL/dH[t]
            for k in range(n):
                gzk = sg[k] * inv_tau
                carry[k] = sg[k] - gzk
                sg[k] = gzk  # dL/dZ[t]
            for k in range(n):
                gzt[k] = sg[k]
            for k in range(n):
                tile_g[k] += sg[k]
            for k in range(n):
                tile_gy[k] += sg[k] * (yt[k] - mn[k])
        # T terms per lane in the array dtype, then float64 across tiles
        for k in range(n):
            acc_g[k] += tile_g[k]
            acc_gy[k] += tile_gy[k]
    for k in range(L):
        psum_g[i, k % C] += acc_g[k]
        psum_gy[i, k % C] += acc_gy[k]


@njit(parallel=True, cache=True, error_model="numpy")
def bn_lif_backward(
    y,
    scale,
    shift,
    mean,
    grad_s,
    tau,
    v_th,
    v_reset,
    alpha,
    kind,
    detach_reset,
    grad_z,
    psum_g,
    psum_gy,
    nchunks,
):
    """Backward of :func:`bn_lif_forward` with respect to ``Z``, recomputing ``H`` from ``y``.

    ``grad_z [T, R, C]`` receives ``dL/dZ`` (it may alias ``grad_s``: each element is read
    before it is written); ``psum_g`` and ``psum_gy`` (float64, ``[nchunks, C]``,
    zero-initialised) receive per-chunk partial sums of ``dL/dZ`` and ``dL/dZ * (Y - mean)``
    -- the two reductions a BatchNorm backward needs. ``kind`` selects the surrogate
    (0 sigmoid, 1 atan).
    """
    for i in prange(nchunks):
        _bn_lif_backward_chunk(
            i,
            nchunks,
            y,
            scale,
            shift,
            mean,
            grad_s,
            tau,
            v_th,
            v_reset,
            alpha,
            kind,
            detach_reset,
            grad_z,
            psum_g,
            psum_gy,
        )


@njit(cache=True, error_model="numpy")
def _affine_backward_apply_chunk(i, nchunks, y, gz, mean, a, b, d, out):
    M, C = y.shape
    m0, m1 = _chunk(i, M, nchunks)
    for m in range(m0, m1):
        for c in range(C):
            out[m, c] = a[c] * gz[m, c] + b[c] * (y[m, c] - mean[c]) + d[c]


@njit(parallel=True, cache=True, error_model="numpy")
def affine_backward_apply(y, gz, mean, a, b, d, out, nchunks):
    """``out[m, c] = a[c] * gz[m, c] + b[c] * (y[m, c] - mean[c]) + d[c]`` on ``[M, C]`` arrays.

    With the coefficients of a BatchNorm backward this is ``dL/dY``; ``out`` may alias ``gz``.
    """
    for i in prange(nchunks):
        _affine_backward_apply_chunk(i, nchunks, y, gz, mean, a, b, d, out)


@njit(cache=True, error_model="numpy")
def _channel_stats_chunk(i, nchunks, y, ref, s1, s2):
    M, C = y.shape
    m0, m1 = _chunk(i, M, nchunks)
    a1 = np.zeros(C, dtype=np.float64)
    a2 = np.zeros(C, dtype=np.float64)
    for m in range(m0, m1):
        row = y[m]
        for c in range(C):
            dv = row[c] - ref[c]
            a1[c] += dv
            a2[c] += dv * dv
    s1[i, :] = a1
    s2[i, :] = a2


@njit(cache=True, error_model="numpy")
def channel_stats_ref_row(y, ref):
    """``ref[c] = y[0, c]`` in float64 (the shift of :func:`channel_stats`)."""
    for c in range(y.shape[1]):
        ref[c] = y[0, c]


@njit(cache=True, error_model="numpy")
def channel_stats_finish(M, ref, s1, s2, mean, var):
    """Mean and biased variance from the per-chunk shifted sums of :func:`channel_stats`."""
    nchunks, C = s1.shape
    for c in range(C):
        d1 = 0.0
        d2 = 0.0
        for i in range(nchunks):
            d1 += s1[i, c]
            d2 += s2[i, c]
        d1 /= M
        mean[c] = ref[c] + d1
        var[c] = max(d2 / M - d1 * d1, 0.0)


@njit(parallel=True, cache=True, error_model="numpy")
def channel_stats(y, mean, var, nchunks):
    """Per-channel mean and biased variance of ``y [M, C]`` in float64, one pass.

    Sums of ``y - y[0]`` and its square are accumulated in float64 (shifting by a sample of
    the data keeps ``E[d^2] - E[d]^2`` free of cancellation).
    """
    M, C = y.shape
    s1 = np.zeros((nchunks, C), dtype=np.float64)
    s2 = np.zeros((nchunks, C), dtype=np.float64)
    ref = np.empty(C, dtype=np.float64)
    channel_stats_ref_row(y, ref)
    for i in prange(nchunks):
        _channel_stats_chunk(i, nchunks, y, ref, s1, s2)
    channel_stats_finish(M, ref, s1, s2, mean, var)


@njit(cache=True, error_model="numpy")
def _maxpool_backward_chunk(i, nchunks, s, g, gin, kernel, stride, pad):
    N, H, W, C = s.shape
    Ho, Wo = g.shape[1], g.shape[2]
    n0, n1 = _chunk(i, N, nchunks)
    best = np.empty(C, dtype=np.int32)
    bh = np.empty(C, dtype=np.int64)
    bw = np.empty(C, dtype=np.int64)
    for n in range(n0, n1):
        gin[n] = 0
        for oh in range(Ho):
            for ow in range(Wo):
                best[:] = -1
                for kh in range(kernel):
                    ih = oh * stride - pad + kh
                    if ih < 0 or ih >= H:
                        continue
                    for kw in range(kernel):
                        iw = ow * stride - pad + kw
                        if iw < 0 or iw >= W:
                            continue
                        for c in range(C):
                            val = np.int32(s[n, ih, iw, c])
                            if val > best[c]:
                                best[c] = val
                                bh[c] = ih
                                bw[c] = iw
                for c in range(C):
                    gin[n, bh[c], bw[c], c] += g[n, oh, ow, c]


@njit(parallel=True, cache=True, error_model="numpy")
def maxpool_backward(s, g, gin, kernel, stride, pad, nchunks):
    """Max-pool backward on channels-last spikes ``s [N, H, W, C]`` (uint8).

    Writes into ``gin [N, H, W, C]`` the sum of ``g [N, Ho, Wo, C]`` routed to the position
    PyTorch's max-pool picks: the first maximum of the window in row-major order, padding
    excluded -- so the gradient routing equals ``F.max_pool2d``'s exactly.
    """
    for i in prange(nchunks):
        _maxpool_backward_chunk(i, nchunks, s, g, gin, kernel, stride, pad)


@njit(cache=True, error_model="numpy")
def _pack_uint8_chunk(i, nchunks, x, out, bad):
    n = x.size
    i0, i1 = _chunk(i, n, nchunks)
    xs = x[i0:i1]
    os = out[i0:i1]
    nbad = 0
    for j in range(i1 - i0):
        v = xs[j]
        # clamp before converting (float -> uint8 of an out-of-range value is undefined);
        # NaN fails ``v > 0`` and becomes 0, then fails the round-trip test
        vc = v if v > 0 else x.dtype.type(0)
        vc = vc if vc < 255 else x.dtype.type(255)
        u = np.uint8(vc)
        os[j] = u
        nbad += np.int64(x.dtype.type(u) != v)
    bad[i] = nbad


@njit(parallel=True, cache=True, error_model="numpy")
def pack_uint8(x, out, nchunks):
    """Copy ``x`` (flat float) into ``out`` (flat uint8); True iff every value is an exact integer
    in [0, 255] (spike counts), so the copy is lossless. NaN fails the check."""
    bad = np.zeros(nchunks, dtype=np.int64)
    for i in prange(nchunks):
        _pack_uint8_chunk(i, nchunks, x, out, bad)
    return bad.sum() == 0


@njit(cache=True, error_model="numpy")
def _unpack_uint8_chunk(i, nchunks, x, out):
    n = x.size
    i0, i1 = _chunk(i, n, nchunks)
    xs = x[i0:i1]
    os = out[i0:i1]
    for j in range(i1 - i0):
        os[j] = xs[j]


@njit(parallel=True, cache=True, error_model="numpy")
def unpack_uint8(x, out, nchunks):
    """``out[:] = x`` (flat uint8 -> flat float): the inverse of :func:`pack_uint8`."""
    for i in prange(nchunks):
        _unpack_uint8_chunk(i, nchunks, x, out)


# ---- trampolines for torch's OpenMP team (one per kernel and float dtype)

# Argument blocks, declared once: the caller packs them by name (ArgBlock.pack checks every
# slot), the trampolines below read them through the blocks' slot indices.
FORWARD = ArgBlock(
    "forward",
    ints=("T", "R", "C", "prow", "pcol", "write_packed"),
    arrays={"y": FLOAT, "scale": FLOAT, "shift": FLOAT, "spikes": FLOAT, "packed": np.uint8},
    floats=("tau", "v_th", "v_reset"),
)
BACKWARD = ArgBlock(
    "backward",
    ints=("T", "R", "C", "kind", "detach_reset"),
    arrays={
        "y": FLOAT,
        "scale": FLOAT,
        "shift": FLOAT,
        "mean": FLOAT,
        "grad_s": FLOAT,
        "grad_z": FLOAT,
        "psum_g": np.float64,
        "psum_gy": np.float64,
    },
    floats=("tau", "v_th", "v_reset", "alpha"),
)
AFFINE = ArgBlock(
    "affine",
    ints=("M", "C"),
    arrays={"y": FLOAT, "gz": FLOAT, "mean": FLOAT, "a": FLOAT, "b": FLOAT, "d": FLOAT,
            "out": FLOAT},
)  # fmt: skip
STATS = ArgBlock(
    "stats",
    ints=("M", "C"),
    arrays={"y": FLOAT, "ref": np.float64, "s1": np.float64, "s2": np.float64},
)
MAXPOOL = ArgBlock(
    "maxpool",
    ints=("N", "H", "W", "C", "Ho", "Wo", "kernel", "stride", "pad"),
    arrays={"s": np.uint8, "g": FLOAT, "gin": FLOAT},
)
PACK = ArgBlock("pack", ints=("n",), arrays={"x": FLOAT, "out": np.uint8, "bad": np.int64})
UNPACK = ArgBlock("unpack", ints=("n",), arrays={"x": np.uint8, "out": FLOAT})
BLOCKS = (FORWARD, BACKWARD, AFFINE, STATS, MAXPOOL, PACK, UNPACK)


@cache
def team_trampolines(dtype_name: str) -> dict[str, int]:
    """Addresses of the trampolines of every kernel for ``float32`` or ``float64`` arrays,
    keyed by the name of their :class:`~evformer.kernels.blocks.ArgBlock`.

    C callbacks, compiled on first use and cached on disk like the kernels (Numba keys a
    closure's cache entry on its captured values, so each dtype has its own entry).
    """
    dt = getattr(np, dtype_name)
    f64 = np.float64
    i64 = np.int64
    u8 = np.uint8
    sig = types.void(types.voidptr)
    opts = {"error_model": "numpy", "cache": True}
    fw, bw, af, st, mp, pk, up = (blk.ix for blk in BLOCKS)

    @cfunc(sig, **opts)
    def forward(block):
        a = carray(block, (fw.n_slots,), i64)
        fa = carray(block, (fw.n_slots,), f64)
        counter = carray(block, (1,), i64)
        nch, T, R, C = a[fw.nchunks], a[fw.T], a[fw.R], a[fw.C]
        y = carray(address(a[fw.y]), (T, R, C), dt)
        sc = carray(address(a[fw.scale]), (C,), dt)
        sh = carray(address(a[fw.shift]), (C,), dt)
        sp = carray(address(a[fw.spikes]), (T, R, C), dt)
        pkd = carray(address(a[fw.packed]), (a[fw.prow], a[fw.pcol]), u8)
        tau, v_th, v_reset = dt(fa[fw.tau]), dt(fa[fw.v_th]), dt(fa[fw.v_reset])
        i = next_chunk(counter)
        while i < nch:
            _bn_lif_forward_chunk(
                i, nch, y, sc, sh, tau, v_th, v_reset, sp, pkd, a[fw.write_packed] != 0
            )
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def backward(block):
        a = carray(block, (bw.n_slots,), i64)
        fa = carray(block, (bw.n_slots,), f64)
        counter = carray(block, (1,), i64)
        nch, T, R, C = a[bw.nchunks], a[bw.T], a[bw.R], a[bw.C]
        y = carray(address(a[bw.y]), (T, R, C), dt)
        sc = carray(address(a[bw.scale]), (C,), dt)
        sh = carray(address(a[bw.shift]), (C,), dt)
        mn = carray(address(a[bw.mean]), (C,), dt)
        gs = carray(address(a[bw.grad_s]), (T, R, C), dt)
        gz = carray(address(a[bw.grad_z]), (T, R, C), dt)
        pg = carray(address(a[bw.psum_g]), (nch, C), f64)
        pgy = carray(address(a[bw.psum_gy]), (nch, C), f64)
        tau, v_th = dt(fa[bw.tau]), dt(fa[bw.v_th])
        v_reset, alpha = dt(fa[bw.v_reset]), dt(fa[bw.alpha])
        kind, detach = a[bw.kind], a[bw.detach_reset] != 0
        i = next_chunk(counter)
        while i < nch:
            _bn_lif_backward_chunk(
                i, nch, y, sc, sh, mn, gs, tau, v_th, v_reset, alpha, kind, detach, gz, pg, pgy
            )
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def affine(block):
        a = carray(block, (af.n_slots,), i64)
        counter = carray(block, (1,), i64)
        nch, M, C = a[af.nchunks], a[af.M], a[af.C]
        y = carray(address(a[af.y]), (M, C), dt)
        gz = carray(address(a[af.gz]), (M, C), dt)
        mn = carray(address(a[af.mean]), (C,), dt)
        ca = carray(address(a[af.a]), (C,), dt)
        cb = carray(address(a[af.b]), (C,), dt)
        cd = carray(address(a[af.d]), (C,), dt)
        out = carray(address(a[af.out]), (M, C), dt)
        i = next_chunk(counter)
        while i < nch:
            _affine_backward_apply_chunk(i, nch, y, gz, mn, ca, cb, cd, out)
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def stats(block):
        a = carray(block, (st.n_slots,), i64)
        counter = carray(block, (1,), i64)
        nch, M, C = a[st.nchunks], a[st.M], a[st.C]
        y = carray(address(a[st.y]), (M, C), dt)
        ref = carray(address(a[st.ref]), (C,), f64)
        s1 = carray(address(a[st.s1]), (nch, C), f64)
        s2 = carray(address(a[st.s2]), (nch, C), f64)
        i = next_chunk(counter)
        while i < nch:
            _channel_stats_chunk(i, nch, y, ref, s1, s2)
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def maxpool(block):
        a = carray(block, (mp.n_slots,), i64)
        counter = carray(block, (1,), i64)
        nch, N, H, W, C = a[mp.nchunks], a[mp.N], a[mp.H], a[mp.W], a[mp.C]
        Ho, Wo = a[mp.Ho], a[mp.Wo]
        s = carray(address(a[mp.s]), (N, H, W, C), u8)
        g = carray(address(a[mp.g]), (N, Ho, Wo, C), dt)
        gin = carray(address(a[mp.gin]), (N, H, W, C), dt)
        i = next_chunk(counter)
        while i < nch:
            _maxpool_backward_chunk(i, nch, s, g, gin, a[mp.kernel], a[mp.stride], a[mp.pad])
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def pack(block):
        a = carray(block, (pk.n_slots,), i64)
        counter = carray(block, (1,), i64)
        nch, n = a[pk.nchunks], a[pk.n]
        x = carray(address(a[pk.x]), (n,), dt)
        out = carray(address(a[pk.out]), (n,), u8)
        bad = carray(address(a[pk.bad]), (nch,), i64)
        i = next_chunk(counter)
        while i < nch:
            _pack_uint8_chunk(i, nch, x, out, bad)
            i = next_chunk(counter)

    @cfunc(sig, **opts)
    def unpack(block):
        a = carray(block, (up.n_slots,), i64)
        counter = carray(block, (1,), i64)
        nch, n = a[up.nchunks], a[up.n]
        x = carray(address(a[up.x]), (n,), u8)
        out = carray(address(a[up.out]), (n,), dt)
        i = next_chunk(counter)
        while i < nch:
            _unpack_uint8_chunk(i, nch, x, out)
            i = next_chunk(counter)

    trampolines = (forward, backward, affine, stats, maxpool, pack, unpack)
    return {blk.name: t.address for blk, t in zip(BLOCKS, trampolines, strict=True)}


# --------------------------------------------------------------------------------------------
# Plain NumPy references (vectorised over rows and channels, loop over time): what the tests
# compare the kernels against.


def _sg_ref(x, alpha, kind):
    if kind == SIGMOID:
        s = 1 / (1 + np.exp(-(alpha * x)))
        return (1 - s) * s * alpha
    z = x * (alpha * math.pi / 2)
    return (alpha / 2) / (1 + z * z)


def bn_lif_forward_ref(y, scale, shift, tau, v_th, v_reset):
    """NumPy reference of :func:`bn_lif_forward`; returns float spikes ``[T, R, C]``."""
    z = y * scale + shift
    v = np.full(y.shape[1:], v_reset, dtype=y.dtype)
    out = np.empty_like(y)
    for t in range(y.shape[0]):
        h = v + (z[t] - (v - v_reset)) / tau
        fire = h >= v_th
        out[t] = fire
        v = np.where(fire, v_reset, h).astype(y.dtype)
    return out


def bn_lif_backward_ref(y, scale, shift, mean, grad_s, tau, v_th, v_reset, alpha, kind, detach):
    """NumPy reference of :func:`bn_lif_backward`; returns ``(grad_z, sum_g, sum_gy)``."""
    z = y * scale + shift
    v = np.full(y.shape[1:], v_reset, dtype=y.dtype)
    hs = []
    for t in range(y.shape[0]):
        h = v + (z[t] - (v - v_reset)) / tau
        hs.append(h)
        v = np.where(h >= v_th, v_reset, h).astype(y.dtype)
    grad_z = np.empty_like(y)
    carry = np.zeros(y.shape[1:], dtype=y.dtype)
    for t in range(y.shape[0] - 1, -1, -1):
        h = hs[t]
        sg = _sg_ref(h - v_th, alpha, kind).astype(y.dtype)
        rg = (h < v_th).astype(y.dtype)
        if not detach:
            rg = rg + (v_reset - h) * sg
        g = grad_s[t] * sg + carry * rg
        grad_z[t] = g / tau
        carry = g - grad_z[t]
    axes = (0, 1)
    sum_g = grad_z.astype(np.float64).sum(axis=axes)
    sum_gy = (grad_z.astype(np.float64) * (y - mean)).sum(axis=axes)
    return grad_z, sum_g, sum_gy


def maxpool_backward_ref(s, g, kernel, stride, pad):
    """NumPy reference of :func:`maxpool_backward` (explicit window scan)."""
    N, H, W, C = s.shape
    gin = np.zeros(s.shape, dtype=g.dtype)
    for n in range(N):
        for oh in range(g.shape[1]):
            for ow in range(g.shape[2]):
                for c in range(C):
                    best, pos = -1, None
                    for kh in range(kernel):
                        for kw in range(kernel):
                            ih, iw = oh * stride - pad + kh, ow * stride - pad + kw
                            if 0 <= ih < H and 0 <= iw < W and int(s[n, ih, iw, c]) > best:
                                best, pos = int(s[n, ih, iw, c]), (ih, iw)
                    gin[n, pos[0], pos[1], c] += g[n, oh, ow, c]
    return gin
