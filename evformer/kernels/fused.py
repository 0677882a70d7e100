"""Memory-lean fused autograd functions for the Spikformer building blocks: the LIF, the
``conv|linear -> BatchNorm -> LIF [-> max-pool]`` unit, the spiking self-attention core and
the IAND residual, each calling one kernel set (:mod:`evformer.kernels.interface`).

Why: a plain autograd graph of ``conv -> BatchNorm -> LIF`` keeps, per element, the float
spikes feeding the conv, the conv output for BatchNorm, and the membrane potential ``H`` of
every time step (12 bytes, more with max-pool indices). The functions here keep

* the layer input as **uint8** when it is a spike count (0/1, or small integers after a
  residual add) -- checked exactly at pack time, else the float tensor is kept;
* the conv/linear output ``Y`` (needed by BatchNorm's backward) -- or nothing at all for a
  cheap first layer (``recompute=True``: ``Y`` is recomputed from the input);
* uint8 spikes where a max-pool or an attention product needs them;

and recompute BatchNorm's affine map and the LIF recurrence in the backward pass (one fused
kernel pass, :mod:`evformer.kernels.numba_lif`). BatchNorm statistics and running-stat
updates follow ``torch.nn.BatchNorm`` (batch statistics over T*B*positions in training,
running statistics in eval). The gradient of a bias in front of a training-mode BatchNorm
is computed in closed form (it is zero up to rounding; the reference path returns rounding
noise of ~1e-9 relative).

On CPU the token-wise linear layers run as 1x1 oneDNN convolutions (same arithmetic,
measurably faster than the BLAS gemm behind ``F.linear``); weight gradients use the gemm.

Event-driven products (CPU): when a unit's input is spike counts and at most
:func:`sparse_density_limit` of them are non-zero (:data:`SPARSE_MAX_DENSITY`, lower for
layers with large weights), the forward product and the weight
gradient run over the spikes only (:mod:`evformer.kernels.numba_sparse`; the work scales
with the spike count) and the input is kept for the backward pass by rows (CSR), which is
smaller than uint8 at such densities. The input gradient stays a dense oneDNN product.

Sparse convolution and sparse BatchNorm (masked pretraining, SparK / ConvMAE): a conv unit
may be given a :class:`GatherTaps` table, the input row each kernel tap reads for each
*visible* output row (the same rows at every time step; masked and out-of-image neighbours
read nothing). It then works on compact rows only: its input is ``[T, n_in, Cin]`` rows (or
a dense ``[T, B, Cin, H, W]`` map, read as ``B*H*W`` rows) and its output the spikes of the
visible rows, ``[T, Rv, Cout]``, never a full-resolution map. The forward product and the
weight gradient are event-driven over the input rows' spikes through the table when they
are sparse enough (:func:`~evformer.kernels.numba_sparse.gather_conv_forward`), else a
gather of the input rows and matrix products; the input gradient is a gather too: for one
tap, different output rows read different input rows, so each input row gathers the
output gradients of the rows that read it and one ``[K*Cout, Cin]`` product gives its
gradient (no scatter-add). BatchNorm statistics, running statistics and the LIF run on the
visible rows. Time and memory scale with the visible fraction. The kernel sets need no mask
argument beyond the table, so every fused backend takes the mask.

Shapes: conv units take ``[T, B, C, H, W]`` and compute in channels-last memory; linear
units take ``[T, ..., C]``; everything is time first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from evformer.kernels.interface import get_kernels
from evformer.kernels.types import LIFParams, SpikeRows

__all__ = [
    "SPARSE_MAX_DENSITY",
    "SPARSE_WEIGHT_BYTES",
    "GatherTaps",
    "SynapseSpec",
    "iand",
    "lif_fused",
    "sparse_density_limit",
    "ssa_attention",
    "synapse_bn_lif",
]


def _density_from_env() -> float:
    raw = os.environ.get("EVFORMER_SPARSE_DENSITY", "0.12")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"EVFORMER_SPARSE_DENSITY must be a number in [0, 1] (0 turns the event-driven "
            f"products off), got {raw!r}"
        )
    return value


#: Largest fraction of non-zero inputs at which a CPU conv/linear unit computes its forward
#: product and weight gradient event-driven (per call, from the actual input). Measured
#: break-even against oneDNN (forward plus weight gradient, 2-core AVX-512 machine): about
#: 0.25 while a layer's weights fit the L2 cache, about 0.17 inside a training step for a
#: 3x3 384->384 conv (5 MB of weight rows for the gradient's scatter); 0 turns it off.
#: Set it with the environment variable ``EVFORMER_SPARSE_DENSITY`` or assign it.
SPARSE_MAX_DENSITY = _density_from_env()

#: weight size above which the density limit shrinks in proportion: the event-driven
#: products gather (forward) and scatter into (weight gradient) rows of the weights, which
#: then no longer stay in cache; measured break-even for 3x3 convs on 14x14: 0.16 at
#: 10.6 MB of weights (384->768), 0.085 at 21 MB (768->768)
SPARSE_WEIGHT_BYTES = 8 * 2**20


def sparse_density_limit(weight: torch.Tensor) -> float:
    """The largest input density at which a unit with ``weight`` runs event-driven:
    :data:`SPARSE_MAX_DENSITY`, scaled by ``SPARSE_WEIGHT_BYTES / weight bytes`` when the
    weights are larger than that."""
    nbytes = weight.numel() * weight.element_size()
    return SPARSE_MAX_DENSITY * min(1.0, SPARSE_WEIGHT_BYTES / max(nbytes, 1))


class _LIFFunction(torch.autograd.Function):
    """Fused multi-step LIF over ``[T, R, C]``: saves the input only, recomputes ``H``."""

    @staticmethod
    def forward(ctx, x3: torch.Tensor, params: LIFParams, backend: str):
        kernels = get_kernels(backend)
        C = x3.shape[-1]
        one = torch.ones(C, dtype=x3.dtype, device=x3.device)
        zero = torch.zeros(C, dtype=x3.dtype, device=x3.device)
        spikes, _ = kernels.bn_lif_forward(x3, one, zero, params, False)
        ctx.save_for_backward(x3)
        ctx.params, ctx.kernels = params, kernels
        return spikes

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s):
        (x3,) = ctx.saved_tensors
        C = x3.shape[-1]
        one = torch.ones(C, dtype=x3.dtype, device=x3.device)
        zero = torch.zeros(C, dtype=x3.dtype, device=x3.device)
        gz, _, _ = ctx.kernels.bn_lif_backward(x3, one, zero, zero, grad_s.contiguous(), ctx.params)
        return gz, None, None


def lif_fused(x_seq: torch.Tensor, params: LIFParams, backend: str) -> torch.Tensor:
    """Multi-step LIF through a fused kernel set (``backend`` "numba" or "triton")."""
    T = x_seq.shape[0]
    # a bare LIF has no channels: one "channel" and many rows tiles and parallelises best
    x3 = x_seq.contiguous().view(T, -1, 1)
    return _LIFFunction.apply(x3, params, backend).view(x_seq.shape)


@dataclass
class SynapseSpec:
    """Static description of one ``conv|linear -> BatchNorm -> LIF [-> max-pool]`` unit."""

    kind: str  # "conv" or "linear"
    bn: nn.modules.batchnorm._BatchNorm
    lif: LIFParams
    backend: str
    stride: int = 1
    padding: int = 0
    pool: bool = False  # 3x3 / stride 2 / pad 1 max-pool on the spikes (SPS)
    recompute: bool = False  # recompute Y in backward instead of storing it
    # masked conv (conv units without pool only): the visible output rows' reads, compact
    # rows in and out (:class:`GatherTaps`), sparse BatchNorm + LIF on those rows only
    taps: GatherTaps | None = None


def _conv_view(t2: torch.Tensor, groups: int) -> torch.Tensor:
    """``[M, C]`` -> channels-last ``[G, C, M/G, 1]`` view (same memory)."""
    M, C = t2.shape
    return t2.view(groups, M // groups, 1, C).permute(0, 3, 1, 2)


def _linear(x2: torch.Tensor, weight, bias, groups: int) -> torch.Tensor:
    """``x2 [M, Cin] @ weight^T + bias`` -> ``[M, Cout]``. On CPU this runs as a 1x1 oneDNN
    convolution over a channels-last ``[G, Cin, M/G, 1]`` view (``G`` = T*B, which keeps
    PyTorch on its oneDNN path): the same arithmetic, about 1.2x faster than the BLAS gemm
    behind ``F.linear`` on the machines we measured, also for :class:`LinearBNLIF`'s
    ``[Cin, Cout]``-memory weight, which oneDNN reorders itself."""
    if x2.device.type != "cpu":
        return F.linear(x2, weight, bias)
    y4 = F.conv2d(_conv_view(x2, groups), weight.view(*weight.shape, 1, 1), bias)
    return y4.permute(0, 2, 3, 1).reshape(x2.shape[0], weight.shape[0])


def _linear_grad_input(gy2: torch.Tensor, x2: torch.Tensor, weight, groups: int):
    """``dL/dx = gy2 @ weight`` (``[M, Cin]``), through oneDNN on CPU like :func:`_linear`."""
    if gy2.device.type != "cpu":
        return gy2.mm(weight)
    gx4, _, _ = torch.ops.aten.convolution_backward(
        _conv_view(gy2, groups), _conv_view(x2, groups), weight.view(*weight.shape, 1, 1),
        None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False],
    )  # fmt: skip
    return gx4.permute(0, 2, 3, 1).reshape(x2.shape)


def _bn_forward(y2: torch.Tensor, bn, kernels):
    """Per-channel (mean, invstd) in float64 for normalising ``y2 [M, C]``, updating running
    statistics exactly like ``nn.BatchNorm`` does in training mode."""
    if bn.training:
        M = y2.shape[0]
        if M <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input of {M} "
                f"position(s) for {bn}"
            )
        mean, var = kernels.channel_stats(y2)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                f = (
                    1.0 / float(bn.num_batches_tracked)
                    if bn.momentum is None
                    else float(bn.momentum)
                )
                rm, rv = bn.running_mean, bn.running_var
                rm.mul_(1 - f).add_(mean.to(rm), alpha=f)
                rv.mul_(1 - f).add_((var * (M / (M - 1))).to(rv), alpha=f)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    invstd = torch.rsqrt(var + bn.eps)
    return mean, invstd


def _sparse_ok(kernels, x: torch.Tensor, cdt: torch.dtype) -> bool:
    """May this call run its products event-driven? (CPU kernels, no autocast narrowing.)"""
    return (
        kernels.event_driven
        and SPARSE_MAX_DENSITY > 0
        and x.device.type == "cpu"
        and cdt == x.dtype
        and x.dtype in (torch.float32, torch.float64)
    )


def _conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


#: fewest input channels at which a masked conv runs one matrix product per kernel tap
#: (below, the taps' rows are gathered side by side into one ``[K*Cin, Cout]`` product: per
#: tap products of inner size 2-3 are slow)
_TAPS_MIN_CHANNELS = 16


@dataclass
class GatherTaps:
    """Where a masked conv reads: ``index[k, i]`` is the input row (of one time step) that
    kernel tap ``k = kh*KW + kw`` reads for visible output row ``i``, in ``[0, n_in]``, where
    row ``n_in`` is a shared zero row (a masked or out-of-image neighbour). The same rows at
    every time step; build once per batch and layout, share between units reading the same
    rows (the two 3x3 convs of an SCS stage)."""

    index: torch.Tensor  # [K, Rv] int64
    n_in: int
    kernel: tuple[int, int]
    _steps: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, in_rows, b, ho, wo, kernel, stride: int, padding: int, n_in: int):
        """The table of a ``kernel`` conv (``stride``, ``padding``) whose input position
        ``(b, h, w)`` is row ``in_rows[b, h, w]`` (``[B, H, W]`` int64, -1: masked) of ``n_in``
        rows, for the visible output positions ``(b[i], ho[i], wo[i])`` in row order."""
        KH, KW = kernel
        _, H, W = in_rows.shape
        dev = in_rows.device
        dh = torch.arange(KH, device=dev).repeat_interleave(KW).view(-1, 1)
        dw = torch.arange(KW, device=dev).repeat(KH).view(-1, 1)
        hi = ho.view(1, -1) * stride - padding + dh  # [K, Rv]
        wi = wo.view(1, -1) * stride - padding + dw
        inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        idx = in_rows[b.view(1, -1), hi.clamp(0, H - 1), wi.clamp(0, W - 1)]
        idx = torch.where(inside & (idx >= 0), idx, torch.full_like(idx, n_in))
        return cls(idx.contiguous(), int(n_in), (KH, KW))

    @property
    def rows(self) -> int:
        """Visible output rows per time step."""
        return self.index.shape[1]

    def _cached(self, key, make):
        if key not in self._steps:
            self._steps[key] = make()
        return self._steps[key]

    def steps(self, T: int) -> torch.Tensor:
        """``[K, T*Rv]`` rows into the ``T*(n_in + 1)`` rows of :meth:`input_rows`."""
        if T == 1:
            return self.index

        def make():
            t = torch.arange(T, device=self.index.device).view(1, T, 1) * (self.n_in + 1)
            return (self.index.unsqueeze(1) + t).reshape(self.index.shape[0], -1)

        return self._cached(("steps", T), make)

    def spike_table(self, T: int) -> torch.Tensor:
        """``[K, T*Rv]`` rows into the ``T*n_in`` input rows themselves (the spike rows of
        the event-driven products), -1 for the zero row."""

        def make():
            t = torch.arange(T, device=self.index.device).view(1, T, 1) * self.n_in
            idx = self.index.unsqueeze(1).expand(-1, T, -1)
            return torch.where(idx < self.n_in, idx + t, -1).reshape(idx.shape[0], -1)

        return self._cached(("spikes", T), make)

    def reverse(self, T: int) -> torch.Tensor:
        """``[K, T*n_in]``: the output row (into the ``T*(Rv + 1)`` rows of the output
        gradient with a zero row after each step's ``Rv``) that reads input row ``j`` through
        tap ``k``, or that step's zero row. For one tap the reads of different output rows
        are different input rows (a tap is a fixed offset), so the input gradient is a
        gather, never a scatter-add."""

        def make():
            K, Rv = self.index.shape
            rev = torch.full((K, self.n_in + 1), Rv, dtype=torch.long, device=self.index.device)
            rev.scatter_(1, self.index, torch.arange(Rv, device=rev.device).expand(K, -1))
            rev = rev[:, : self.n_in]  # the zero row's own entry is meaningless: dropped
            t = torch.arange(T, device=rev.device).view(1, T, 1) * (Rv + 1)
            return (rev.unsqueeze(1) + t).reshape(K, -1)

        return self._cached(("reverse", T), make)

    def input_rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Input rows ``[T, n_in, Cin]`` (float, or uint8 spike counts) plus the zero row of
        each step, as ``[T*(n_in + 1), Cin]`` in ``dtype``."""
        T, _, Cin = x.shape
        xr = torch.zeros(T, self.n_in + 1, Cin, dtype=dtype, device=x.device)
        xr[:, : self.n_in].copy_(x)
        return xr.view(-1, Cin)

    def _gathered(self, xr: torch.Tensor, T: int) -> torch.Tensor:
        """All taps' rows side by side: ``[T*Rv, K*Cin]``."""
        idx = self.steps(T)
        return xr.index_select(0, idx.t().reshape(-1)).view(idx.shape[1], -1)

    def forward(self, xr: torch.Tensor, weight: torch.Tensor, bias, T: int) -> torch.Tensor:
        """The conv at the visible output rows, ``[T*Rv, Cout]``, from :meth:`input_rows`
        (dense products: a gather and a matrix product per tap)."""
        Cout, Cin = weight.shape[:2]
        wt = weight.permute(2, 3, 1, 0).reshape(-1, Cin, Cout)  # a view if kernel-major
        idx = self.steps(T)
        if bias is None:
            y = xr.new_zeros(idx.shape[1], Cout)
        else:
            y = bias.to(xr.dtype).expand(idx.shape[1], -1).clone()
        if Cin < _TAPS_MIN_CHANNELS:
            return y.addmm_(self._gathered(xr, T), wt.reshape(-1, Cout))
        for k in range(idx.shape[0]):
            y.addmm_(xr.index_select(0, idx[k]), wt[k])
        return y

    def product(self, kernels, rows, xr, weight: torch.Tensor, bias, T: int) -> torch.Tensor:
        """The conv at the visible output rows, ``[T*Rv, Cout]``: event-driven over the
        input spike ``rows`` through :meth:`spike_table` when given, else :meth:`forward`
        on the dense input rows ``xr`` (:meth:`input_rows`). The weight's ``[K, Cin, Cout]``
        copy lives only during the call."""
        if rows is None:
            return self.forward(xr, weight, bias, T)
        wr = weight.permute(2, 3, 1, 0).reshape(-1, *weight.shape[1::-1]).contiguous()
        return kernels.gather_conv_forward(rows, self.spike_table(T), wr, bias)

    def weight_grad(self, xr: torch.Tensor, gy: torch.Tensor, T: int) -> torch.Tensor:
        """``[K, Cin, Cout]`` weight gradient of :meth:`forward` for ``gy [T*Rv, Cout]``."""
        idx = self.steps(T)
        if xr.shape[1] < _TAPS_MIN_CHANNELS:
            return self._gathered(xr, T).t().mm(gy).view(idx.shape[0], xr.shape[1], -1)
        return torch.stack([xr.index_select(0, i).t().mm(gy) for i in idx])

    def input_grad(self, gy: torch.Tensor, weight: torch.Tensor, T: int) -> torch.Tensor:
        """Input gradient ``[T, n_in, Cin]`` for the output gradient ``gy [T*Rv, Cout]``.

        For one tap, different output rows read different input rows, so each input row
        gathers, never scatter-adds. Whichever side is narrower is gathered:

        * ``Cin < Cout``: the products first, ``Z = gy W_k^T`` (``[T*Rv, Cin]`` per tap, taps
          in groups whose products stay below :data:`_GATHER_BLOCK_BYTES`), then each input
          row sums the rows of ``Z`` that read it, one per tap;
        * else: each input row gathers the output gradients of the rows that read it, all
          taps side by side, and takes one ``[K*Cout, Cin]`` product, in blocks of rows below
          :data:`_GATHER_BLOCK_BYTES`; a weight of that size or more takes one product per
          tap instead (a weight-sized ``[K*Cout, Cin]`` copy would set a masked step's peak
          memory; those products are large enough to run at full speed)."""
        Cout, Cin = weight.shape[:2]
        K = weight.shape[2] * weight.shape[3]
        wk = weight.permute(2, 3, 1, 0).reshape(K, Cin, Cout)  # a view for kernel-major weights
        rev = self.reverse(T)
        n = rev.shape[1]
        esize = gy.element_size()
        if Cin < Cout:
            Rv = gy.shape[0] // T
            out = gy.new_zeros(n, Cin)
            g = max(1, min(K, _GATHER_BLOCK_BYTES // max(1, T * (Rv + 1) * Cin * esize)))
            for k0 in range(0, K, g):
                k1 = min(K, k0 + g)
                z = gy.new_empty(T, Rv + 1, (k1 - k0) * Cin)
                z[:, Rv].zero_()  # each step's zero row: masked and out-of-image reads
                wg = wk[k0:k1].reshape((k1 - k0) * Cin, Cout)
                for t in range(T):
                    torch.mm(gy[t * Rv : (t + 1) * Rv], wg.t(), out=z[t, :Rv])
                z = z.view(-1, k1 - k0, Cin)
                for k in range(k0, k1):
                    out.add_(z[:, k - k0].index_select(0, rev[k]))
            return out.view(T, self.n_in, Cin)
        gye = torch.cat([gy.view(T, -1, Cout), gy.new_zeros(T, 1, Cout)], 1).view(-1, Cout)
        if weight.numel() * weight.element_size() >= _GATHER_BLOCK_BYTES:
            out = gy.new_zeros(n, Cin)
            for k in range(K):
                out.addmm_(gye.index_select(0, rev[k]), wk[k].t())
            return out.view(T, self.n_in, Cin)
        wt = wk.transpose(1, 2).reshape(K * Cout, Cin)  # [(k, o), c]
        out = gy.new_empty(n, Cin)
        step = max(1, _GATHER_BLOCK_BYTES // (K * Cout * esize))
        for j0 in range(0, n, step):
            j1 = min(n, j0 + step)
            g = gye.index_select(0, rev[:, j0:j1].t().reshape(-1)).view(j1 - j0, K * Cout)
            torch.mm(g, wt, out=out[j0:j1])
        return out.view(T, self.n_in, Cin)


#: largest block of gathered output gradients in a masked conv's input gradient
_GATHER_BLOCK_BYTES = 16 * 2**20


def _product(
    spec: SynapseSpec, kernels, x_phys, rows, phys_shape, w_c, b_c, groups: int
) -> torch.Tensor:
    """The unit's conv/linear output: ``[M, Cout]`` (linear) or ``[TB, Cout, Ho, Wo]`` in
    channels-last memory (conv), from the input ``x_phys`` (``phys_shape``: ``[M, Cin]`` /
    ``[TB, H, W, Cin]``) or, when ``rows`` is given, event-driven from its spikes."""
    if spec.kind == "linear":
        if rows is None:
            return _linear(x_phys, w_c, b_c, groups)
        M = rows.indptr.numel() - 1
        wr = w_c.t().contiguous().view(1, 1, *w_c.shape[::-1])
        out = kernels.sparse_conv_forward(rows, M, 1, 1, wr, b_c, (1, 1), (0, 0), 1, 1)
        return out.view(M, w_c.shape[0])
    if rows is None:
        y4 = F.conv2d(x_phys.permute(0, 3, 1, 2), w_c, b_c, spec.stride, spec.padding)
        return y4.contiguous(memory_format=torch.channels_last)
    TB, H, W, _ = phys_shape
    KH, KW = w_c.shape[2:]
    Ho = _conv_out_size(H, KH, spec.stride, spec.padding)
    Wo = _conv_out_size(W, KW, spec.stride, spec.padding)
    wr = w_c.permute(2, 3, 1, 0).contiguous()
    s, p = (spec.stride, spec.stride), (spec.padding, spec.padding)
    out = kernels.sparse_conv_forward(rows, TB, H, W, wr, b_c, s, p, Ho, Wo)
    return out.permute(0, 3, 1, 2)


class _SynapseBNLIF(torch.autograd.Function):
    """Under autocast the conv/linear products (forward and backward) run in the autocast
    dtype, as autocast would run them, while BatchNorm statistics and the LIF kernels work in
    float32 on the upcast products; ``Y`` is stored in the autocast dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, spec: SynapseSpec, needs_grad, amp):
        kernels = get_kernels(spec.backend)
        with torch.autocast(x.device.type, enabled=False):
            cdt = amp if amp is not None else x.dtype  # dtype of the matrix products
            kdt = torch.float32 if amp is not None else x.dtype  # dtype of BN + LIF
            w_c = weight.to(cdt)
            b_c = None if bias is None else bias.to(cdt)
            groups = 1
            taps = spec.taps
            if taps is not None:  # compact rows [T, n_in, Cin], or a dense [T, B, Cin, H, W]
                T = x.shape[0]
                x_phys = x.permute(0, 1, 3, 4, 2) if x.dim() == 5 else x
                x_phys = x_phys.reshape(T, taps.n_in, x.shape[-3 if x.dim() == 5 else -1])
                x_phys = x_phys.contiguous()
            elif spec.kind == "linear":
                lead = x.shape[:-1]
                x_phys = x.reshape(-1, x.shape[-1])  # [M, Cin]
                groups = x.shape[0] * x.shape[1] if x.dim() >= 3 else 1
            else:
                T, B = x.shape[:2]
                x4 = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
                x_phys = x4.permute(0, 2, 3, 1)  # [TB, H, W, Cin], contiguous
            # keep the input for backward as spike rows (sparse), uint8 counts, or floats
            rows = packed_x = None
            if _sparse_ok(kernels, x, cdt):
                scan = kernels.scan_counts(x_phys.reshape(-1, x_phys.shape[-1]))
                if scan is not None:
                    packed2, counts, has_big = scan
                    if counts.sum() <= sparse_density_limit(w_c) * packed2.numel():
                        rows = kernels.spike_rows(packed2, counts, has_big)
                    else:
                        packed_x = packed2.view(x_phys.shape)
            elif needs_grad:
                packed_x = kernels.pack(x_phys)
            if taps is not None:
                C = w_c.shape[0]
                xr = None if rows is not None else taps.input_rows(x_phys, cdt)
                y3 = taps.product(kernels, rows, xr, w_c, b_c, T).view(T, -1, C)
                del xr
            else:
                y = _product(spec, kernels, x_phys.to(cdt), rows, x_phys.shape, w_c, b_c, groups)
                if spec.kind == "linear":
                    C = y.shape[1]
                    y3 = y.view(x.shape[0], -1, C)
                else:
                    TB, C, Ho, Wo = y.shape
                    y3 = y.permute(0, 2, 3, 1).reshape(T, -1, C)  # a view: NHWC memory order
            y3k = y3.to(kdt)
            mean64, invstd64 = _bn_forward(y3k.view(-1, C), spec.bn, kernels)
            mean = mean64.to(kdt)
            scale = (bn_weight.detach().to(kdt) * invstd64.to(kdt)).contiguous()
            shift = (bn_bias.detach().to(kdt) - mean * scale).contiguous()
            want_packed = needs_grad and spec.pool
            spikes3, packed3 = kernels.bn_lif_forward(y3k, scale, shift, spec.lif, want_packed)
            if taps is not None:  # the visible rows' spikes, compact
                out = spikes3
            elif spec.kind == "linear":
                out = spikes3.view(*lead, C)
            else:
                out4 = spikes3.view(TB, Ho, Wo, C).permute(0, 3, 1, 2)
                if spec.pool:
                    out4 = F.max_pool2d(out4, 3, 2, 1)
                    out4 = out4.contiguous(memory_format=torch.channels_last)
                out = out4.unflatten(0, (T, B))
        if needs_grad:
            if rows is not None:
                x_saved = rows.tensors()
            else:
                x_saved = (packed_x if packed_x is not None else x_phys,)
            # a masked unit whose product ran event-driven recomputes it in backward (a few
            # ms over the visible rows' spikes) rather than keeping Y: the stem's largest
            # saved tensors, which would otherwise sit under the decoder's peak
            recompute = spec.recompute or (taps is not None and rows is not None)
            y_saved = y3.new_empty(0) if recompute else y3
            ctx.save_for_backward(
                weight,
                bias if bias is not None else weight.new_empty(0),
                bn_weight,
                scale,
                shift,
                mean,
                invstd64,
                y_saved,
                packed3 if packed3 is not None else weight.new_empty(0, dtype=torch.uint8),
                *x_saved,
            )
            ctx.spec, ctx.kernels = spec, kernels
            ctx.dtypes = (x.dtype, cdt, kdt)
            ctx.has_bias = bias is not None
            ctx.x_rows = rows is not None
            ctx.shapes = (tuple(x.shape), tuple(x_phys.shape), tuple(spikes3.shape))
            ctx.taps = taps
            ctx.recompute = recompute
            ctx.groups = groups
            if spec.kind == "conv" and taps is None:
                ctx.conv_shape = (T, B, TB, C, Ho, Wo)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _SynapseBNLIF._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        (weight, bias, bn_weight, scale, shift, mean, invstd64, y_saved, packed3, *x_saved) = (
            ctx.saved_tensors
        )
        spec, kernels = ctx.spec, ctx.kernels
        x_dtype, cdt, kdt = ctx.dtypes
        x_shape, phys_shape, s_shape = ctx.shapes
        w_c = weight.to(cdt)
        b_c = bias.to(cdt) if ctx.has_bias else None
        # the layer input: spike rows, or a tensor in the products' dtype (uint8 spike counts
        # are exact in any); a shape-only stand-in where only oneDNN's data gradient needs it
        rows = x_phys = None
        if ctx.x_rows:
            rows = SpikeRows.from_tensors(x_saved, phys_shape[-1])
        elif ctx.taps is not None:  # read straight into the gather rows (uint8 counts exact)
            x_phys = x_saved[0]
        else:
            x_phys = x_saved[0]
            x_phys = kernels.unpack(x_phys, cdt) if x_phys.dtype == torch.uint8 else x_phys
            x_phys = x_phys.to(cdt)
        own_buffer = False  # may the LIF backward overwrite grad-spikes in place?
        grad_out = grad_out.to(kdt)
        taps = ctx.taps
        if taps is not None or spec.kind == "linear":
            gs3 = grad_out.contiguous().view(s_shape)
        else:
            Tt, B, TB, C, Ho, Wo = ctx.conv_shape
            g4 = grad_out.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            if spec.pool:
                s_nhwc = packed3.view(TB, Ho, Wo, C)
                gin = kernels.maxpool_backward(s_nhwc, g4.permute(0, 2, 3, 1), 3, 2, 1)
                gs3 = gin.view(s_shape)
                own_buffer = True
            else:
                gs3 = g4.permute(0, 2, 3, 1).reshape(s_shape)
        xr = None  # a masked conv's dense input rows, when its products are not event-driven
        if taps is not None and rows is None and (ctx.recompute or ctx.needs_input_grad[1]):
            xr = taps.input_rows(x_phys, cdt)
        if ctx.recompute and taps is not None:
            y3 = taps.product(kernels, rows, xr, w_c, b_c, s_shape[0]).view(s_shape)
        elif ctx.recompute:
            y = _product(spec, kernels, x_phys, rows, phys_shape, w_c, b_c, ctx.groups)
            y3 = (y if spec.kind == "linear" else y.permute(0, 2, 3, 1)).reshape(s_shape)
        else:
            y3 = y_saved
        y3 = y3.to(kdt)
        C = s_shape[-1]
        gz3, sum_g, sum_gy = kernels.bn_lif_backward(
            y3, scale, shift, mean, gs3, spec.lif, out=gs3 if own_buffer else None
        )
        # BatchNorm backward from the two per-channel sums (float64): dL/dY = a*gz + b*(Y-mean) + d
        w64 = bn_weight.detach().double()
        grad_bn_w = (invstd64 * sum_gy).to(bn_weight.dtype)
        grad_bn_b = sum_g.to(bn_weight.dtype)
        a = w64 * invstd64
        M = y3.shape[0] * y3.shape[1]
        if spec.bn.training:
            b = -a * invstd64 * invstd64 * sum_gy / M
            d = -a * sum_g / M
        else:
            b = torch.zeros_like(a)
            d = torch.zeros_like(a)
        dev = y3.device
        y2 = y3.reshape(-1, C)
        gz2 = gz3.view(-1, C)
        gy2 = kernels.affine_backward_apply(
            y2, gz2, mean, a.to(kdt).to(dev), b.to(kdt).to(dev), d.to(kdt).to(dev), gz2
        )
        gy2 = gy2.to(cdt)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias
        grad_x = grad_w = grad_b = None
        if need_b:
            # sum over rows of dL/dY = a*sum_g + b*sum(Y - mean) + M*d, and sum(Y - mean) = 0
            # for the batch mean (training) while b = d = 0 in eval: no pass over dL/dY needed
            grad_b = (a * sum_g + M * d).to(weight.dtype).to(dev)
        x_like = x_phys
        if x_like is None and need_x and taps is None:  # oneDNN reads only shape and layout
            x_like = torch.empty(phys_shape, dtype=cdt, device=dev)
        if taps is not None:  # dL/dY at the visible rows only
            T_ = s_shape[0]
            if need_w:
                if rows is not None:  # event-driven, over the input spikes
                    gw = kernels.gather_conv_weight_grad(rows, taps.spike_table(T_), gy2)
                else:
                    gw = taps.weight_grad(xr, gy2, T_)
                KH, KW = taps.kernel
                grad_w = gw.view(KH, KW, *gw.shape[1:]).permute(3, 2, 0, 1)  # a view
            if need_x:
                grad_x = taps.input_grad(gy2, w_c, T_)
                if len(x_shape) == 5:  # a dense input map
                    _, B_, Cin, H, W = x_shape
                    grad_x = grad_x.view(T_, B_, H, W, Cin).permute(0, 1, 4, 2, 3)
        elif spec.kind == "linear":
            if need_w:
                if rows is None and weight.t().is_contiguous():  # in the weight's order
                    grad_w = x_phys.t().mm(gy2).t()
                elif rows is None:
                    grad_w = gy2.t().mm(x_phys)
                else:
                    M2 = rows.indptr.numel() - 1
                    gw = kernels.sparse_conv_weight_grad(
                        rows, M2, 1, 1, gy2.view(M2, 1, 1, -1), (1, 1), (1, 1), (0, 0)
                    )
                    grad_w = gw.view(gw.shape[2], gw.shape[3]).t()  # a view: laid out once
            if need_x:
                grad_x = _linear_grad_input(gy2, x_like, w_c, ctx.groups).view(x_shape)
        else:
            gy4 = gy2.view(TB, Ho, Wo, C).permute(0, 3, 1, 2)
            dense_w = need_w and rows is None
            if need_x or dense_w:
                gx4, grad_w, _ = torch.ops.aten.convolution_backward(
                    gy4,
                    (x_like if x_like is not None else x_phys).permute(0, 3, 1, 2),
                    w_c,
                    None,
                    [spec.stride, spec.stride],
                    [spec.padding, spec.padding],
                    [1, 1],
                    False,
                    [0, 0],
                    1,
                    [need_x, dense_w, False],
                )
                if need_x:
                    grad_x = gx4.unflatten(0, (Tt, B))
            if need_w and rows is not None:
                H, W = phys_shape[1:3]
                s, p = (spec.stride, spec.stride), (spec.padding, spec.padding)
                gw = kernels.sparse_conv_weight_grad(
                    rows, TB, H, W, gy2.view(TB, Ho, Wo, C), tuple(w_c.shape[2:]), s, p
                )
                grad_w = gw.permute(3, 2, 0, 1)  # a view: autograd lays it out once
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            grad_b if ctx.has_bias else None,
            grad_bn_w.to(bn_weight.device),
            grad_bn_b.to(bn_weight.device),
            None,
            None,
            None,
        )


def _amp_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for ``x``'s device, or None."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def synapse_bn_lif(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: nn.modules.batchnorm._BatchNorm,
    spec: SynapseSpec,
) -> torch.Tensor:
    """Fused ``conv|linear -> BatchNorm -> LIF [-> max-pool]`` (see module docstring).

    ``x``: ``[T, B, Cin, H, W]`` (conv) or ``[T, ..., Cin]`` (linear); returns spikes
    ``[T, B, C, H', W']`` (a channels-last view) or ``[T, ..., C]``. With ``spec.taps``
    (conv, no pool) the unit is a sparse conv + sparse BatchNorm on compact rows: ``x``
    ``[T, n_in, Cin]`` rows (or a dense ``[T, B, Cin, H, W]``), spikes ``[T, Rv, C]`` of the
    visible rows out (:class:`GatherTaps`).
    """
    if spec.taps is not None:
        if spec.kind != "conv" or spec.pool:
            raise ValueError(
                "visible rows (sparse conv + BatchNorm) need a conv unit without max-pool, got "
                f"kind={spec.kind!r}, pool={spec.pool}"
            )
        if tuple(weight.shape[2:]) != spec.taps.kernel:
            raise ValueError(
                f"gather table of a {spec.taps.kernel} kernel for a {tuple(weight.shape[2:])} conv"
            )
    params = (x, weight) if bias is None else (x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*params, bn.weight, bn.bias)
    )
    return _SynapseBNLIF.apply(x, weight, bias, bn.weight, bn.bias, spec, needs_grad, _amp_dtype(x))


def ssa_product(q, k, v, kv_first: bool) -> torch.Tensor:
    """``q k^T v`` per head (``[T, B, h, N, d]`` each), in the cheaper association order."""
    if kv_first:
        return q @ (k.transpose(-2, -1) @ v)
    return (q @ k.transpose(-2, -1)) @ v


def kv_first_is_cheaper(N: int, d: int) -> bool:
    """``q (k^T v)`` costs ``2 N d^2`` multiply-adds per head, ``(q k^T) v`` costs ``2 N^2 d``."""
    return N > d


def _heads_first(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[T, B, N, 3D]`` -> contiguous ``[3, T, B, h, N, d]`` (one copy; any dtype in, ``qkv``'s
    dtype out)."""
    T, B, N, D3 = qkv.shape
    d = D3 // 3 // num_heads
    return qkv.view(T, B, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5).contiguous()


def _ssa_forward_products(qh: torch.Tensor, kv_first: bool):
    """``qh [3, T, B, h, N, d]`` -> (y = q k^T v ``[T, B, h, N, d]``, the middle product)."""
    q, k, v = qh[0], qh[1], qh[2]
    T, B, h, N, d = q.shape
    q3, k3, v3 = q.view(-1, N, d), k.view(-1, N, d), v.view(-1, N, d)
    if kv_first:
        mid = torch.bmm(k3.transpose(1, 2), v3)  # [TBh, d, d]
        y = torch.bmm(q3, mid)
    else:
        mid = torch.bmm(q3, k3.transpose(1, 2))  # [TBh, N, N]
        y = torch.bmm(mid, v3)
    return y.view(T, B, h, N, d), mid


class _SSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads: int, scale: float, lif: LIFParams, backend: str, needs_grad):
        # spike products are exact in the input dtype: never let autocast narrow them
        with torch.autocast(qkv.device.type, enabled=False):
            return _SSAFunction._forward(ctx, qkv, num_heads, scale, lif, backend, needs_grad)

    @staticmethod
    def _forward(ctx, qkv, num_heads, scale, lif, backend, needs_grad):
        kernels = get_kernels(backend)
        T, B, N, D3 = qkv.shape
        D = D3 // 3
        qh = _heads_first(qkv, num_heads)
        kv_first = kv_first_is_cheaper(N, D // num_heads)
        y, mid = _ssa_forward_products(qh, kv_first)
        y3 = y.permute(0, 1, 3, 2, 4).reshape(T, B * N, D)
        sc = torch.full((D,), scale, dtype=qkv.dtype, device=qkv.device)
        sh = torch.zeros(D, dtype=qkv.dtype, device=qkv.device)
        spikes3, _ = kernels.bn_lif_forward(y3, sc, sh, lif, False)
        if needs_grad:
            # uint8 q, k, v plus the small middle product (d x d or N x N per head)
            packed = kernels.pack(qh)
            ctx.save_for_backward(packed if packed is not None else qh, mid)
            ctx.cfg = (num_heads, scale, lif, kernels, kv_first, qkv.dtype, tuple(qkv.shape))
        return spikes3.view(T, B, N, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _SSAFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        saved, mid = ctx.saved_tensors
        num_heads, scale, lif, kernels, kv_first, dtype, shape = ctx.cfg
        T, B, N, D3 = shape
        D = D3 // 3
        d = D // num_heads
        qh = kernels.unpack(saved, dtype) if saved.dtype == torch.uint8 else saved
        q3, k3, v3 = (t.view(-1, N, d) for t in (qh[0], qh[1], qh[2]))
        y = torch.bmm(q3, mid) if kv_first else torch.bmm(mid, v3)
        y3 = y.view(T, B, num_heads, N, d).permute(0, 1, 3, 2, 4).reshape(T, B * N, D)
        sc = torch.full((D,), scale, dtype=dtype, device=qh.device)
        zero = torch.zeros(D, dtype=dtype, device=qh.device)
        g3 = grad_out.to(dtype).contiguous().view_as(y3)
        gz3, _, _ = kernels.bn_lif_backward(y3, sc, zero, zero, g3, lif)
        # dL/dy (y = q k^T v) in head-first layout; z = scale * y
        gy = gz3.view(T, B, N, num_heads, d).permute(0, 1, 3, 2, 4).mul(scale).contiguous()
        gy3 = gy.view(-1, N, d)
        grads = torch.empty((3, T * B * num_heads, N, d), dtype=dtype, device=qh.device)
        if kv_first:  # y = q (k^T v)
            torch.bmm(gy3, mid.transpose(1, 2), out=grads[0])
            gmid = torch.bmm(q3.transpose(1, 2), gy3)  # dL/d(k^T v) [TBh, d, d]
            torch.bmm(v3, gmid.transpose(1, 2), out=grads[1])
            torch.bmm(k3, gmid, out=grads[2])
        else:  # y = (q k^T) v
            gmid = torch.bmm(gy3, v3.transpose(1, 2))  # dL/d(q k^T) [TBh, N, N]
            torch.bmm(gmid, k3, out=grads[0])
            torch.bmm(gmid.transpose(1, 2), q3, out=grads[1])
            torch.bmm(mid.transpose(1, 2), gy3, out=grads[2])
        g = grads.view(3, T, B, num_heads, N, d).permute(1, 2, 4, 0, 3, 5).reshape(T, B, N, D3)
        return g, None, None, None, None, None


def ssa_attention(
    qkv: torch.Tensor, *, num_heads: int, scale: float, lif: LIFParams, backend: str
) -> torch.Tensor:
    """Fused spiking self-attention core: ``LIF(scale * q k^T v)`` per head.

    ``qkv [T, B, N, 3D]`` spikes (q | k | v along the last axis, head-major within each);
    returns spikes ``[T, B, N, D]``. Keeps only uint8 q, k, v for the backward pass.
    """
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    return _SSAFunction.apply(qkv.contiguous(), num_heads, scale, lif, backend, needs_grad)


class _IAND(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, s, backend: str, needs_grad: bool):
        out = (1 - a) * s
        if needs_grad:
            kernels = get_kernels(backend)
            pa, ps = kernels.pack(a), kernels.pack(s)
            ctx.save_for_backward(pa if pa is not None else a, ps if ps is not None else s)
            ctx.dtype = a.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, s = (t.to(ctx.dtype) for t in ctx.saved_tensors)
        return -g * s, g * (1 - a), None, None


def iand(a: torch.Tensor, s: torch.Tensor, *, backend: str) -> torch.Tensor:
    """SEW-ResNet IAND residual ``(1 - a) * s`` (``a`` the branch, ``s`` the shortcut); with a
    fused backend it keeps uint8 copies of its binary operands for the backward pass."""
    if backend == "torch":
        return (1 - a) * s
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or s.requires_grad)
    return _IAND.apply(a.contiguous(), s.contiguous(), backend, needs_grad)
