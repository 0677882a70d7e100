"""Triton (CUDA) versions of the two LIF passes of :mod:`evformer.kernels.numba_lif`.

Same math, same ``[T, R, C]`` layout. One program owns a ``BLOCK_R x BLOCK_C`` tile of rows x
channels and walks time sequentially. The backward pass parks the recomputed ``H[t]`` in the
output buffer ``grad_z`` during its forward sweep and overwrites it with ``dL/dZ[t]`` on the
way back, so it needs no scratch memory; its per-channel sums are accumulated per tile and
added with one atomic per channel and tile (their order, hence their last bits, is not
deterministic).

The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the test suite
checks them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evformer.kernels.types import LIFParams


@triton.jit
def _bn_lif_fwd_kernel(
    y_ptr,
    scale_ptr,
    shift_ptr,
    s_ptr,
    p_ptr,
    T,
    R,
    C,
    tau,
    v_th,
    v_reset,
    WRITE_PACKED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows[:, None] < R) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)[None, :]
    v = tl.zeros([BLOCK_R, BLOCK_C], dtype=y_ptr.dtype.element_ty) + v_reset
    step = R.to(tl.int64) * C
    for t in range(T):
        base = t * step
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0)
        z = y * sc + sh
        h = v + (z - (v - v_reset)) / tau
        fire = h >= v_th
        tl.store(s_ptr + base + offs, fire.to(y.dtype), mask=mask)
        if WRITE_PACKED:
            tl.store(p_ptr + base + offs, fire.to(tl.uint8), mask=mask)
        v = tl.where(fire, v_reset, h)


@triton.jit
def _bn_lif_bwd_kernel(
    y_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    gs_ptr,
    gz_ptr,
    sum_g_ptr,
    sum_gy_ptr,
    T,
    R,
    C,
    tau,
    v_th,
    v_reset,
    alpha,
    KIND: tl.constexpr,
    DETACH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows[:, None] < R) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)[None, :]
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    v = tl.zeros([BLOCK_R, BLOCK_C], dtype=y_ptr.dtype.element_ty) + v_reset
    step = R.to(tl.int64) * C
    for t in range(T):
        base = t * step
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0)
        h = v + (y * sc + sh - (v - v_reset)) / tau
        tl.store(gz_ptr + base + offs, h, mask=mask)
        v = tl.where(h >= v_th, v_reset, h)
    carry = tl.zeros([BLOCK_R, BLOCK_C], dtype=y_ptr.dtype.element_ty)
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=y_ptr.dtype.element_ty)
    acc_gy = tl.zeros([BLOCK_R, BLOCK_C], dtype=y_ptr.dtype.element_ty)
    for tt in range(T):
        base = (T - 1 - tt) * step
        h = tl.load(gz_ptr + base + offs, mask=mask, other=0.0)
        x = h - v_th
        if KIND == 0:
            s = 1.0 / (1.0 + tl.exp(-(alpha * x)))
            sg = (1.0 - s) * s * alpha
        else:
            zz = x * (alpha * 1.5707963267948966)  # pi / 2
            sg = (alpha * 0.5) / (1.0 + zz * zz)
        rg = tl.where(h >= v_th, 0.0, 1.0)
        if not DETACH:
            rg = rg + (v_reset - h) * sg
        gs = tl.load(gs_ptr + base + offs, mask=mask, other=0.0)
        g = gs * sg + carry * rg
        gz = g / tau
        carry = g - gz
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0)
        gz = tl.where(mask, gz, 0.0)
        acc_g += gz
        acc_gy += gz * (y - mu)
        tl.store(gz_ptr + base + offs, gz, mask=mask)
    tl.atomic_add(sum_g_ptr + cols, tl.sum(acc_g, axis=0), mask=cmask)
    tl.atomic_add(sum_gy_ptr + cols, tl.sum(acc_gy, axis=0), mask=cmask)


def _blocks(R: int, C: int) -> tuple[int, int, tuple[int, int]]:
    block_c = min(64, triton.next_power_of_2(C))
    block_r = max(1, 1024 // block_c)
    return block_r, block_c, (triton.cdiv(R, block_r), triton.cdiv(C, block_c))


def bn_lif_forward(y3: torch.Tensor, scale, shift, p: LIFParams, want_packed: bool):
    """Triton twin of :func:`evformer.kernels.numba_lif.bn_lif_forward`."""
    T, R, C = y3.shape
    y3 = y3.contiguous()
    spikes = torch.empty_like(y3)
    packed = torch.empty(y3.shape if want_packed else (1,), dtype=torch.uint8, device=y3.device)
    br, bc, grid = _blocks(R, C)
    _bn_lif_fwd_kernel[grid](
        y3,
        scale.to(y3.dtype).contiguous(),
        shift.to(y3.dtype).contiguous(),
        spikes,
        packed,
        T,
        R,
        C,
        float(p.tau),
        float(p.v_threshold),
        float(p.v_reset),
        WRITE_PACKED=want_packed,
        BLOCK_R=br,
        BLOCK_C=bc,
    )
    return spikes, (packed if want_packed else None)


def bn_lif_backward(y3: torch.Tensor, scale, shift, mean, gs3, p: LIFParams):
    """Triton twin of :func:`evformer.kernels.numba_lif.bn_lif_backward`; returns
    ``(grad_z, sum_g, sum_gy)`` with the sums in float64."""
    T, R, C = y3.shape
    y3 = y3.contiguous()
    gs3 = gs3.contiguous()
    gz = torch.empty_like(y3)
    sum_g = torch.zeros(C, dtype=y3.dtype, device=y3.device)
    sum_gy = torch.zeros(C, dtype=y3.dtype, device=y3.device)
    br, bc, grid = _blocks(R, C)
    _bn_lif_bwd_kernel[grid](
        y3,
        scale.to(y3.dtype).contiguous(),
        shift.to(y3.dtype).contiguous(),
        mean.to(y3.dtype).contiguous(),
        gs3,
        gz,
        sum_g,
        sum_gy,
        T,
        R,
        C,
        float(p.tau),
        float(p.v_threshold),
        float(p.v_reset),
        float(p.surrogate.alpha),
        KIND=p.surrogate.kind,
        DETACH=p.detach_reset,
        BLOCK_R=br,
        BLOCK_C=bc,
    )
    return gz, sum_g.double(), sum_gy.double()
