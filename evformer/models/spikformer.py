"""Spikformer V1 and V2: one implementation, dataset differences are constructor arguments.

Shapes: input ``[B, C, H, W]`` (a static image, repeated over ``model.T`` steps) or
``[B, T, C, H, W]`` (event frames; their own T is used); internally time first
``[T, B, ...]``; tokens ``[T, B, N, D]``; logits ``[B, num_classes]`` averaged over time.
H and W may be any multiple of the patch size. ``model.T`` may be changed at any time
(train at T=1, evaluate at T=4, ...). No neuron state persists between forward calls.

``step_mode``: ``"m"`` (default) runs each layer over the whole sequence (fused kernels);
``"s"`` runs the whole network one time step at a time, carrying membrane potentials
between steps inside the call (reference kernels). Both compute the same function when
BatchNorm uses running statistics (eval mode); in training, BatchNorm statistics are then
per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from evformer.kernels.interface import check_backend
from evformer.kernels.types import LIFParams
from evformer.models import energy as _energy
from evformer.models.layers import ATTENTIONS, RESIDUALS, SCS, SPS, EncoderBlock
from evformer.models.neurons import step_states
from evformer.models.surrogate import get_surrogate

__all__ = ["Spikformer", "SpikformerConfig", "SpikformerV2", "SpikformerV2Config"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class _EncoderConfig:
    """Fields shared by V1 and V2 (encoder, head, neuron, backend)."""

    img_size: int | tuple[int, int] = 224  # nominal input size (any multiple of the patch works)
    in_channels: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    T: int = 4
    qkv_bias: bool = False
    proj_bias: bool = True
    mlp_bias: bool = True
    attn_scale: float = 0.125
    attention: str = "ssa"
    residual: str = "add"
    tau: float = 2.0
    v_threshold: float = 1.0
    attn_v_threshold: float = 0.5
    detach_reset: bool = True
    surrogate: str = "sigmoid"
    surrogate_alpha: float = 4.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("in_channels", "embed_dim", "depth", "num_heads", "T"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head), got {self.num_classes}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        check_backend(self.backend)
        h, w = _pair(self.img_size)
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"img_size {self.img_size} must be divisible by the patch size {p}")

    @property
    def patch_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def lif(self) -> LIFParams:
        return LIFParams(
            tau=self.tau,
            v_threshold=self.v_threshold,
            v_reset=0.0,
            detach_reset=self.detach_reset,
            surrogate=get_surrogate(self.surrogate, self.surrogate_alpha),
        )


@dataclass(frozen=True)
class SpikformerConfig(_EncoderConfig):
    """Spikformer V1 (SPS stem). Defaults: the ImageNet file's 8-384 model.

    ``pool_stages``: which of the SPS conv stages end with a max-pool (ImageNet and
    CIFAR10-DVS: all four; CIFAR: the last two); ``rpe``: the relative position embedding.
    """

    pool_stages: tuple[bool, ...] = (True, True, True, True)
    rpe: bool = True

    @property
    def patch_size(self) -> int:
        return 2 ** sum(bool(p) for p in self.pool_stages)


@dataclass(frozen=True)
class SpikformerV2Config(_EncoderConfig):
    """Spikformer V2 (SCS stem). Defaults: V2-8-384 on ImageNet.

    ``stem_stages`` SCS stages (patch size ``2 ** stem_stages``), ``stem_ratio`` the expansion
    of each stage's 3x3 conv pair, ``stem_residual`` the shortcut around that pair
    (``"add"``, ``"iand"``, ``"none"``; None: same as ``residual``).
    """

    stem_stages: int = 4
    stem_ratio: int = 4
    stem_residual: str | None = None

    @property
    def patch_size(self) -> int:
        return 2**self.stem_stages


class _SpikformerBase(nn.Module):
    config_class: type[_EncoderConfig] = _EncoderConfig

    def __init__(self, config: _EncoderConfig | None = None, **overrides) -> None:
        super().__init__()
        base = config if config is not None else self.config_class()
        if not isinstance(base, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        cfg = dataclasses.replace(base, **overrides)
        self.config = cfg
        self.T = int(cfg.T)
        self.step_mode = "m"
        lif = cfg.lif()
        self.patch_embed = self._build_stem(cfg, lif)
        self.blocks = nn.ModuleList(
            EncoderBlock(
                cfg.embed_dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                attention=cfg.attention,
                attn_scale=cfg.attn_scale,
                qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias,
                mlp_bias=cfg.mlp_bias,
                residual=cfg.residual,
                lif=lif,
                attn_v_threshold=cfg.attn_v_threshold,
                backend=cfg.backend,
            )
            for _ in range(cfg.depth)
        )
        self.num_classes = cfg.num_classes
        self.embed_dim = cfg.embed_dim
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(self._init_weights)

    def _build_stem(self, cfg, lif: LIFParams) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as the official code (timm ViT style): Linear weights trunc-normal(0.02), bias 0;
        # convs keep PyTorch's default init; BatchNorm weight 1, bias 0
        if isinstance(m, nn.Linear):
            # drawn in the usual [out, in] order and copied: random fills run in memory
            # order, and LinearBNLIF keeps its weight [in, out] in memory, so drawing in
            # place would give different values for the same seed
            w = torch.empty(m.weight.shape, dtype=m.weight.dtype, device=m.weight.device)
            with torch.no_grad():
                m.weight.copy_(nn.init.trunc_normal_(w, std=0.02))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def extra_repr(self) -> str:
        return f"T={self.T}, step_mode={self.step_mode!r}"

    # -- input handling ---------------------------------------------------------------------
    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[T, B, C, H, W]`` (repeated ``self.T`` times) or
        ``[B, T, C, H, W]`` -> ``[T, B, C, H, W]``; validates channels and size."""
        if x.dim() == 4:
            x_seq = x.unsqueeze(0).expand(self.T, *x.shape)
            _energy.mark_static_input(x_seq, self.T)
        elif x.dim() == 5:
            x_seq = x.transpose(0, 1)
        else:
            raise ValueError(
                f"{type(self).__name__} expects [B, C, H, W] images or [B, T, C, H, W] event "
                f"frames, got shape {tuple(x.shape)}"
            )
        C, H, W = x_seq.shape[2:]
        if C != self.config.in_channels:
            raise ValueError(
                f"input has {C} channels but the model was built with in_channels="
                f"{self.config.in_channels} (shape {tuple(x.shape)})"
            )
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(
                f"input size {H}x{W} is not divisible by the patch size {p}; resize or crop "
                f"to a multiple of {p}"
            )
        if not x_seq.is_floating_point():
            x_seq = x_seq.to(torch.get_default_dtype())
        return x_seq

    # -- forward ----------------------------------------------------------------------------
    def _features_seq(self, x_seq: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x_seq)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input (see :meth:`to_sequence`) -> encoder output tokens ``[T, B, N, D]`` (spike
        counts of the residual stream)."""
        x_seq = self.to_sequence(x)
        if self.step_mode == "m":
            return self._features_seq(x_seq)
        if self.step_mode != "s":
            raise ValueError(f"step_mode must be 'm' or 's', got {self.step_mode!r}")
        with step_states():
            return torch.cat([self._features_seq(x_seq[t : t + 1]) for t in range(len(x_seq))])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[T, B, N, D]`` -> mean over tokens and time ``[B, D]`` -> logits
        ``[B, num_classes]`` (or the pooled features when ``pre_logits``)."""
        feats = x.mean(2).mean(0)
        if pre_logits or isinstance(self.head, nn.Identity):
            return feats
        if _energy.probing():
            _energy.record_head(self.head, feats)
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Spikformer(_SpikformerBase):
    """Spikformer V1: SPS stem + L encoder blocks + linear head.

    ``Spikformer(config=None, **overrides)``: fields of :class:`SpikformerConfig` as keyword
    arguments, e.g. ``Spikformer(img_size=32, pool_stages=(False, False, True, True),
    embed_dim=384, depth=4, num_heads=12, num_classes=10)`` is the CIFAR 4-384 model.
    """

    config_class = SpikformerConfig

    def _build_stem(self, cfg: SpikformerConfig, lif: LIFParams) -> nn.Module:
        return SPS(
            in_channels=cfg.in_channels,
            embed_dim=cfg.embed_dim,
            pool_stages=tuple(bool(p) for p in cfg.pool_stages),
            rpe=cfg.rpe,
            lif=lif,
            backend=cfg.backend,
        )


class SpikformerV2(_SpikformerBase):
    """Spikformer V2: SCS stem (conv k2 s2 + BN + LIF, then a 3x3 conv pair C -> 4C -> C with
    LIF neurons and a shortcut) + V1 ImageNet encoder blocks + linear head. No RPE, no conv
    biases. ``SpikformerV2(config=None, **overrides)`` with :class:`SpikformerV2Config` fields.
    """

    config_class = SpikformerV2Config

    def _build_stem(self, cfg: SpikformerV2Config, lif: LIFParams) -> nn.Module:
        return SCS(
            in_channels=cfg.in_channels,
            embed_dim=cfg.embed_dim,
            num_stages=cfg.stem_stages,
            ratio=cfg.stem_ratio,
            residual=cfg.stem_residual or cfg.residual,
            lif=lif,
            backend=cfg.backend,
        )
