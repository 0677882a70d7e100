"""Spikformer layers: conv/linear + BN + LIF units, SPS and SCS stems, spiking self-attention
(and the Table I variants), MLP and the encoder block.

Every layer is time first. Parameters live in standard ``nn.Conv2d`` / ``nn.Linear`` /
``nn.BatchNorm`` submodules (so state dicts are plain), and each unit runs either the
reference path (those modules + :class:`~evformer.models.neurons.LIFNode`, plain autograd;
``backend="torch"`` and the single-step mode) or the fused, memory-lean path of
:mod:`evformer.kernels.fused` (``backend="numba"`` on CPU, ``"triton"`` on CUDA).
Both compute the same function; tests hold them to each other.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from evformer.kernels.fused import (
    GatherTaps,
    SynapseSpec,
    iand,
    kv_first_is_cheaper,
    ssa_attention,
    ssa_product,
    synapse_bn_lif,
)
from evformer.kernels.interface import check_backend, resolve_backend
from evformer.kernels.types import SPIKFORMER_LIF, LIFParams
from evformer.models import energy as _energy
from evformer.models.neurons import LIFNode, in_step_mode

__all__ = [
    "ATTENTIONS",
    "RESIDUALS",
    "SCS",
    "SPS",
    "ConvBNLIF",
    "EncoderBlock",
    "LinearBNLIF",
    "MLP",
    "SCSStage",
    "SpikingSelfAttention",
    "combine_residual",
    "sparse_batch_norm",
]

#: attention variants of Table I: spiking SSA, float q k^T (A_I), ReLU / LeakyReLU of float
#: q and k, softmax attention on spike V (A_softmax = VSA), softmax attention with float V.
ATTENTIONS = ("ssa", "identity", "relu", "leaky_relu", "softmax", "vsa")
#: residual connections: spike addition (Spikformer) or SEW ResNet's IAND ``(1 - a) * s``.
RESIDUALS = ("add", "iand")


def _fused_backend(backend: str, x: torch.Tensor) -> str | None:
    """The fused kernel set to use for ``x``, or None for the reference path."""
    if in_step_mode():
        return None
    b = resolve_backend(backend, x.device)
    return None if b == "torch" else b


def combine_residual(branch: torch.Tensor, shortcut: torch.Tensor, mode: str, backend: str):
    """``shortcut + branch`` (``"add"``) or ``(1 - branch) * shortcut`` (``"iand"``)."""
    if mode == "add":
        return shortcut + branch
    if mode == "iand":
        return iand(branch, shortcut, backend=_fused_backend(backend, branch) or "torch")
    raise ValueError(f"residual must be one of {RESIDUALS} (or 'none' in the stem), got {mode!r}")


def _visible_index(visible: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Validate a visible map ``[B, H', W']`` against an output ``[T*B, C, H', W']`` ->
    bool ``[B, H', W']`` (1 / True = visible)."""
    TB, _, Ho, Wo = shape
    if visible.dim() != 3 or visible.shape[1:] != (Ho, Wo) or TB % visible.shape[0]:
        raise ValueError(
            f"visible must be [B, H', W'] at the output resolution {Ho}x{Wo} of a "
            f"[T*B={TB}, C, {Ho}, {Wo}] conv output, got shape {tuple(visible.shape)}"
        )
    return visible if visible.dtype == torch.bool else visible != 0


def sparse_batch_norm(
    y: torch.Tensor, visible: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm
) -> torch.Tensor:
    """SparK's sparse BatchNorm: ``y [T*B, C, H', W']`` normalised over its visible positions
    only (``visible [B, H', W']``, 1 = visible, the same map at every time step, in the
    (T, B) order of ``y``'s first axis); masked positions come out exactly 0.

    The visible positions are gathered as ``[T*B*n_vis, C]`` rows and run through ``bn``
    itself, so training uses (and running statistics are updated with, momentum and unbiased
    variance) the visible positions' statistics, and eval uses the running statistics,
    exactly as ``nn.BatchNorm`` on those rows.
    """
    keep = _visible_index(visible, tuple(y.shape))
    TB, C = y.shape[:2]
    idx = keep.expand(TB // keep.shape[0], *keep.shape).reshape(TB, *keep.shape[1:])
    y_nhwc = y.permute(0, 2, 3, 1)
    rows = y_nhwc[idx]  # [n, C] in (T, B, h, w) order
    z = bn(rows.view(*rows.shape, 1, 1)).view(rows.shape)
    return torch.zeros_like(y_nhwc).index_put((idx,), z).permute(0, 3, 1, 2)


class _SynapseBNLIF(nn.Module):
    """Shared forward logic of :class:`ConvBNLIF` and :class:`LinearBNLIF`."""

    kind = ""

    def _fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x)

    def _dispatch(self, x: torch.Tensor, *extra) -> torch.Tensor:
        backend = _fused_backend(self.lif.backend, x)
        out = self._reference(x, *extra) if backend is None else self._fused(x, backend, *extra)
        if _energy.probing():
            _energy.record_synapse(self, x, out)
        return out


class ConvBNLIF(_SynapseBNLIF):
    """``Conv2d -> BatchNorm2d -> LIF [-> MaxPool 3x3/2]``: ``[T, B, Cin, H, W]`` ->
    ``[T, B, Cout, H', W']`` spikes. BatchNorm normalises over T*B*H'*W' per channel.

    ``recompute`` (default: when a conv output element costs at most 64 multiply-adds, i.e.
    a first layer on 2-3 input channels) recomputes the conv in the backward pass instead
    of storing its output.

    ``forward(x, visible=None)``: with ``visible [B, H', W']`` (1 = visible, at the output
    resolution, the same map at every time step) the unit is a sparse conv + sparse
    BatchNorm (masked pretraining): BatchNorm statistics and running statistics come from
    the visible positions only (:func:`sparse_batch_norm`), and every masked position gets
    BatchNorm output 0, membrane potential 0 and no spike. Not with ``pool``.
    """

    kind = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        bias: bool = False,
        pool: bool = False,
        lif: LIFParams = SPIKFORMER_LIF,
        backend: str = "auto",
        recompute: bool | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        # the fused kernels read the weight as [KH, KW, Cin, Cout] (an input spike adds one
        # contiguous Cout row per tap) and write its gradient in that order: the parameter
        # keeps that memory order, so neither the products nor the gradient accumulation
        # transpose it (tens of ms per step for the large stem weights); its shape and values
        # stay nn.Conv2d's, and load_state_dict copies into it
        self.conv.weight = nn.Parameter(kernel_major(self.conv.weight.detach()))
        self.bn = nn.BatchNorm2d(out_channels)
        self.lif = LIFNode.from_params(lif, backend=check_backend(backend))
        self.pool = bool(pool)
        self.recompute = (
            in_channels * kernel_size * kernel_size <= 64 if recompute is None else recompute
        )

    def extra_repr(self) -> str:
        return f"pool={self.pool}, recompute={self.recompute}"

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        if visible is None:
            return self._dispatch(x)
        if self.pool:
            raise ValueError(
                "ConvBNLIF: a visible map (sparse conv + BatchNorm) cannot be combined with "
                "max-pool (pool=True); masked pretraining uses the SCS stem"
            )
        if visible.dim() != 3 or visible.shape[0] != x.shape[1]:
            raise ValueError(
                f"ConvBNLIF: visible must be [B, H', W'] with B = {x.shape[1]} (input "
                f"{tuple(x.shape)}), got shape {tuple(visible.shape)}"
            )
        return self._dispatch(x, visible)

    def _reference(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        T, B = x.shape[:2]
        y = self.conv(x.flatten(0, 1))
        y = self.bn(y) if visible is None else sparse_batch_norm(y, visible, self.bn)
        s = self.lif(y.unflatten(0, (T, B)))
        if self.pool:
            s = F.max_pool2d(s.flatten(0, 1), 3, 2, 1).unflatten(0, (T, B))
        return s

    def _fused(
        self, x: torch.Tensor, backend: str, visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        if visible is None:
            return self._fused_unit(x, backend, None)
        # the visible rows (row-major) read from the dense input, then scattered back
        T, B, _, H, W = x.shape
        Ho, Wo = _conv_out(H, self.conv, 0), _conv_out(W, self.conv, 1)
        keep = _visible_index(visible, (T * B, 0, Ho, Wo))
        b, ho, wo = keep.nonzero(as_tuple=True)
        in_rows = torch.arange(B * H * W, device=x.device).view(B, H, W)
        taps = GatherTaps.build(
            in_rows, b, ho, wo, self.conv.kernel_size, self.conv.stride[0],
            self.conv.padding[0], B * H * W,
        )  # fmt: skip
        s = self._fused_unit(x, backend, taps)  # [T, Rv, C]
        full = s.new_zeros(T, B * Ho * Wo, s.shape[-1])
        full = full.index_copy(1, keep.reshape(-1).nonzero().squeeze(1), s)
        return full.view(T, B, Ho, Wo, -1).permute(0, 1, 4, 2, 3)

    def _fused_unit(self, x: torch.Tensor, backend: str, taps: GatherTaps | None):
        spec = SynapseSpec(
            kind="conv",
            bn=self.bn,
            lif=self.lif.params,
            backend=backend,
            stride=self.conv.stride[0],
            padding=self.conv.padding[0],
            pool=self.pool,
            recompute=self.recompute,
            taps=taps,
        )
        return synapse_bn_lif(x, self.conv.weight, self.conv.bias, self.bn, spec)

    def forward_rows(self, x: torch.Tensor, taps: GatherTaps) -> torch.Tensor:
        """The masked unit on compact rows (fused kernel sets only): the input rows
        ``[T, n_in, Cin]`` (or a dense ``[T, B, Cin, H, W]``) -> spikes of the visible output
        rows ``[T, Rv, Cout]``, as :meth:`forward` with a visible map computes them
        (``taps``: :class:`~evformer.kernels.fused.GatherTaps`, the visible rows' reads)."""
        backend = _fused_backend(self.lif.backend, x)
        if backend is None:
            raise ValueError(
                "ConvBNLIF.forward_rows needs a fused kernel set (backend 'numba' or "
                "'triton', not the reference path or the single-step mode)"
            )
        if self.pool:
            raise ValueError("ConvBNLIF.forward_rows: not with max-pool (pool=True)")
        return self._fused_unit(x, backend, taps)

    def macs(self, x_shape: torch.Size, out_shape: torch.Size) -> int:
        """Multiply-accumulates of the conv for one call (all T, B), input ``x_shape``."""
        T, B = x_shape[:2]
        k = self.conv.kernel_size[0] * self.conv.kernel_size[1]
        Ho, Wo = _conv_out(x_shape[3], self.conv, 0), _conv_out(x_shape[4], self.conv, 1)
        return T * B * self.conv.out_channels * self.conv.in_channels * k * Ho * Wo


def kernel_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight [Cout, Cin, KH, KW]`` with the same values in ``[KH, KW, Cin, Cout]`` memory
    order (``weight.permute(2, 3, 1, 0)`` is contiguous), the order the fused kernels read."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight [Cout, Cin]`` with the same values in ``[Cin, Cout]`` memory order
    (``weight.t()`` is contiguous), the order the event-driven linear product reads."""
    return weight.t().contiguous().t()


def _conv_out(size: int, conv: nn.Conv2d, axis: int) -> int:
    k, s, p = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis]
    return (size + 2 * p - k) // s + 1


class LinearBNLIF(_SynapseBNLIF):
    """``Linear -> BatchNorm1d -> LIF`` on tokens: ``[T, ..., Cin]`` -> ``[T, ..., Cout]``
    spikes. (A 1x1 Conv1d/Conv2d of the official code is the same map.) BatchNorm normalises
    over all T * batch * token positions per channel."""

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        lif: LIFParams = SPIKFORMER_LIF,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        # [Cin, Cout] memory (the event-driven product adds one contiguous Cout row per input
        # spike and writes its weight gradient in that order): no per-call transpose of the
        # weight or its gradient, as ConvBNLIF's kernel_major; oneDNN reorders it itself
        self.linear.weight = nn.Parameter(input_major(self.linear.weight.detach()))
        self.bn = nn.BatchNorm1d(out_features)
        self.lif = LIFNode.from_params(lif, backend=check_backend(backend))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``BN(Linear(x))`` with plain autograd (used by the float-attention variants)."""
        y = self.linear(x)
        return self.bn(y.reshape(-1, y.shape[-1])).view(y.shape)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.lif(self.pre_activation(x))

    def _fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        spec = SynapseSpec(kind="linear", bn=self.bn, lif=self.lif.params, backend=backend)
        return synapse_bn_lif(x, self.linear.weight, self.linear.bias, self.bn, spec)

    def macs(self, x_shape: torch.Size, out_shape: torch.Size) -> int:
        return math.prod(x_shape[:-1]) * self.linear.in_features * self.linear.out_features


class SPS(nn.Module):
    """Spiking Patch Splitting (Spikformer V1 stem).

    Stages ``Conv3x3 -> BN -> LIF [-> MaxPool 3x3/2]`` with channels ``D/2^(n-1) .. D/2, D``
    (D/8, D/4, D/2, D for four stages); ``pool_stages[i]`` says whether stage i pools, so
    the patch size is ``2 ** sum(pool_stages)``. The RPE ``Conv3x3 -> BN -> LIF`` spikes are
    added to the last stage's spikes (values 0..2). Input ``[T, B, C, H, W]`` with H, W
    divisible by the patch size; output tokens ``[T, B, N, D]`` (row-major patches).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        embed_dim: int,
        pool_stages: tuple[bool, ...] = (True, True, True, True),
        rpe: bool = True,
        lif: LIFParams = SPIKFORMER_LIF,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        n = len(pool_stages)
        if n < 1 or embed_dim % 2 ** (n - 1):
            raise ValueError(
                f"SPS: embed_dim {embed_dim} must be divisible by 2**(stages-1) = {2 ** (n - 1)}"
            )
        chans = [embed_dim // 2 ** (n - 1 - i) for i in range(n)]
        cins = [in_channels, *chans[:-1]]
        self.stages = nn.ModuleList(
            ConvBNLIF(ci, co, pool=bool(p), lif=lif, backend=backend)
            for ci, co, p in zip(cins, chans, pool_stages)
        )
        self.rpe = ConvBNLIF(embed_dim, embed_dim, lif=lif, backend=backend) if rpe else None
        self.patch_size = 2 ** sum(bool(p) for p in pool_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        if self.rpe is not None:
            x = x + self.rpe(x)
        return x.flatten(3).transpose(-1, -2)  # [T, B, N, D]; free for channels-last memory


class SCSStage(nn.Module):
    """One Spiking Convolutional Stem stage (Spikformer V2).

    ``s = LIF(BN(Conv k2 s2 (x)))`` halves the resolution; the MLP-like pair
    ``r = LIF(BN(Conv3x3 4C->C (LIF(BN(Conv3x3 C->4C (s))))))`` follows, and the stage returns
    ``s + r`` (``residual="add"``), ``(1 - r) * s`` (``"iand"``, stays binary) or ``r``
    (``"none"``). Every conv after the first sees spikes; no conv has a bias.

    ``forward(x, visible=None)``: ``visible [B, H/2, W/2]`` (1 = visible, the stage's output
    resolution) makes all three units sparse (:class:`ConvBNLIF`); the residual of zeros
    stays zero, so the stage output is 0 at every masked position.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        ratio: int = 4,
        residual: str = "add",
        lif: LIFParams = SPIKFORMER_LIF,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if residual not in (*RESIDUALS, "none"):
            raise ValueError(f"SCS residual must be 'add', 'iand' or 'none', got {residual!r}")
        self.down = ConvBNLIF(
            in_channels, out_channels, kernel_size=2, stride=2, padding=0, lif=lif, backend=backend
        )
        self.fc1 = ConvBNLIF(out_channels, ratio * out_channels, lif=lif, backend=backend)
        self.fc2 = ConvBNLIF(ratio * out_channels, out_channels, lif=lif, backend=backend)
        self.residual = residual
        self.backend = backend

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        s = self.down(x, visible)
        r = self.fc2(self.fc1(s, visible), visible)
        if self.residual == "none":
            return r
        return combine_residual(r, s, self.residual, self.backend)

    def forward_rows(self, x: torch.Tensor, down: GatherTaps, conv: GatherTaps) -> torch.Tensor:
        """The masked stage on compact rows (fused kernel sets only,
        :meth:`ConvBNLIF.forward_rows`): input rows (or a dense map) -> the visible output
        rows ``[T, Rv, C]``; ``down`` the 2x2/2 conv's reads, ``conv`` the two 3x3 convs'."""
        s = self.down.forward_rows(x, down)
        r = self.fc2.forward_rows(self.fc1.forward_rows(s, conv), conv)
        if self.residual == "none":
            return r
        return combine_residual(r, s, self.residual, self.backend)


class SCS(nn.Module):
    """Spiking Convolutional Stem: ``num_stages`` :class:`SCSStage` with channels
    ``D/2^(n-1) .. D`` (224 -> 112 -> 56 -> 28 -> 14 for four stages), patch size
    ``2 ** num_stages``, no RPE. ``[T, B, C, H, W]`` -> tokens ``[T, B, N, D]``."""

    def __init__(
        self,
        *,
        in_channels: int,
        embed_dim: int,
        num_stages: int = 4,
        ratio: int = 4,
        residual: str = "add",
        lif: LIFParams = SPIKFORMER_LIF,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_stages < 1 or embed_dim % 2 ** (num_stages - 1):
            raise ValueError(
                f"SCS: embed_dim {embed_dim} must be divisible by 2**(num_stages-1) = "
                f"{2 ** (num_stages - 1)}"
            )
        chans = [embed_dim // 2 ** (num_stages - 1 - i) for i in range(num_stages)]
        cins = [in_channels, *chans[:-1]]
        self.stages = nn.ModuleList(
            SCSStage(ci, co, ratio=ratio, residual=residual, lif=lif, backend=backend)
            for ci, co in zip(cins, chans)
        )
        self.patch_size = 2**num_stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x.flatten(3).transpose(-1, -2)


class SpikingSelfAttention(nn.Module):
    """Spiking self-attention (SSA) and the attention variants of Table I.

    ``qkv = BN(Linear(x))`` (one fused D -> 3D projection; q | k | v, each head-major), then
    per head, with ``d = D / num_heads``:

    * ``"ssa"``: ``LIF_attn(scale * Q K^T V)`` with spike Q, K, V -- computed as
      ``Q (K^T V)`` when ``N > d`` (cost ``2 N d^2``) else ``(Q K^T) V`` (``2 N^2 d``);
    * ``"identity"`` (A_I) / ``"relu"`` / ``"leaky_relu"``: ``LIF_attn(scale * f(Q_F) f(K_F)^T V)``
      on float ``Q_F, K_F`` and spike V;
    * ``"softmax"`` (A_softmax, VSA on spike V): ``LIF_attn(softmax(Q_F K_F^T / sqrt d) V)``;
    * ``"vsa"`` (VSA with float V): ``LIF_attn(softmax(Q_F K_F^T / sqrt d) V_F)``;

    followed by ``proj = LIF(BN(Linear))``. ``LIF_attn`` has threshold ``attn_v_threshold``
    (0.5). Input/output ``[T, B, N, D]``.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        attention: str = "ssa",
        scale: float = 0.125,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        lif: LIFParams = SPIKFORMER_LIF,
        attn_v_threshold: float = 0.5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads {num_heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.dim, self.num_heads, self.attention, self.scale = dim, num_heads, attention, scale
        self.qkv = LinearBNLIF(dim, 3 * dim, bias=qkv_bias, lif=lif, backend=backend)
        self.attn_lif = LIFNode.from_params(
            replace(lif, v_threshold=attn_v_threshold), backend=backend
        )
        self.proj = LinearBNLIF(dim, dim, bias=proj_bias, lif=lif, backend=backend)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention={self.attention!r}, scale={self.scale}"

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        T, B, N, D = t.shape
        return t.view(T, B, N, self.num_heads, D // self.num_heads).transpose(2, 3)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        T, B, h, N, d = t.shape
        return t.transpose(2, 3).reshape(T, B, N, h * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, N, D = x.shape
        d = D // self.num_heads
        probing = _energy.probing()
        if self.attention == "ssa":
            qkv = self.qkv(x)
            backend = _fused_backend(self.attn_lif.backend, qkv)
            if probing:
                q, k, v = (self._heads(t) for t in qkv.split(D, dim=-1))
                _energy.record_attention(self, q, k, v, kv_first_is_cheaper(N, d))
            if backend is not None:
                a = ssa_attention(
                    qkv,
                    num_heads=self.num_heads,
                    scale=self.scale,
                    lif=self.attn_lif.params,
                    backend=backend,
                )
            else:
                q, k, v = (self._heads(t) for t in qkv.split(D, dim=-1))
                y = ssa_product(q, k, v, kv_first_is_cheaper(N, d)) * self.scale
                a = self.attn_lif(self._merge(y))
        else:
            if probing:
                _energy.record_synapse(self.qkv, x, None)
            qf, kf, vf = self.qkv.pre_activation(x).split(D, dim=-1)
            v = vf if self.attention == "vsa" else self.qkv.lif(vf)
            q, k, v = self._heads(qf), self._heads(kf), self._heads(v)
            if self.attention in ("softmax", "vsa"):
                attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d), dim=-1)
                if probing:
                    _energy.record_attention(self, q, k, v, False)
                y = attn @ v
            else:
                if self.attention == "relu":
                    q, k = F.relu(q), F.relu(k)
                elif self.attention == "leaky_relu":
                    q, k = F.leaky_relu(q), F.leaky_relu(k)
                kv_first = kv_first_is_cheaper(N, d)
                if probing:
                    _energy.record_attention(self, q, k, v, kv_first)
                y = ssa_product(q, k, v, kv_first) * self.scale
            a = self.attn_lif(self._merge(y))
        return self.proj(a)


class MLP(nn.Module):
    """Spiking MLP: ``LinearBNLIF(D -> hidden) -> LinearBNLIF(hidden -> D)`` on ``[T, B, N, D]``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        bias: bool = True,
        lif: LIFParams = SPIKFORMER_LIF,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.fc1 = LinearBNLIF(dim, hidden, bias=bias, lif=lif, backend=backend)
        self.fc2 = LinearBNLIF(hidden, dim, bias=bias, lif=lif, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class EncoderBlock(nn.Module):
    """``x = res(SSA(x), x); x = res(MLP(x), x)`` with ``res`` spike addition (``"add"``)
    or IAND (``"iand"``). No LayerNorm, no drop path (as in the official code)."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention: str = "ssa",
        attn_scale: float = 0.125,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        mlp_bias: bool = True,
        residual: str = "add",
        lif: LIFParams = SPIKFORMER_LIF,
        attn_v_threshold: float = 0.5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.attn = SpikingSelfAttention(
            dim,
            num_heads=num_heads,
            attention=attention,
            scale=attn_scale,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            lif=lif,
            attn_v_threshold=attn_v_threshold,
            backend=backend,
        )
        self.mlp = MLP(dim, int(dim * mlp_ratio), bias=mlp_bias, lif=lif, backend=backend)
        self.residual = residual
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = combine_residual(self.attn(x), x, self.residual, self.backend)
        return combine_residual(self.mlp(x), x, self.residual, self.backend)
