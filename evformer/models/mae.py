"""Masked-autoencoder pieces for Spikformer V2 pretraining (paper section 4.2).

Split as MAE splits its model (masking, encoder, decoder, loss): :class:`SpikformerMAE`
wraps any Spikformer V2 encoder (registered as ``mae_spikformer_v2_*``). The parts that do
not depend on the spiking encoder:

- :func:`random_masking`: MAE's per-sample random masking of the ``L`` tokens, drawn from a
  generator you pass (never from the input values);
- :func:`upsample_mask`: the token mask repeated ``s x s`` to an SCS stage's resolution
  (ConvMAE / SparK), and :func:`patchify` / :func:`unpatchify` for any channel count;
- :func:`sincos_pos_embed_2d`: fixed 2-D sin-cos position embeddings;
- :class:`MAEDecoder`: the light non-spiking Transformer decoder (``torch.nn`` layers);
- :func:`mae_loss`: mean squared error on per-patch normalised pixels, masked patches only.

Token order everywhere is row-major over the ``h x w`` token grid (token ``r * w + c``),
the order of ``SCS`` output tokens (``flatten(3)`` of ``[..., D, h, w]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from evformer.kernels.fused import GatherTaps
from evformer.models.energy import probing
from evformer.models.layers import _fused_backend
from evformer.models.spikformer import SpikformerV2, SpikformerV2Config

__all__ = [
    "Masking",
    "MAEDecoder",
    "SpikformerMAE",
    "SpikformerMAEConfig",
    "mae_loss",
    "num_visible",
    "patchify",
    "random_masking",
    "sincos_pos_embed_2d",
    "unpatchify",
    "upsample_mask",
]


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept out of ``num_tokens`` at ``mask_ratio``: ``int(L * (1 - ratio))``, MAE's
    truncation (224 px, patch 16, ratio 0.75: 196 -> 49). At least one token must stay."""
    if not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    keep = int(num_tokens * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no token of {num_tokens}: lower the ratio or use "
            "a larger input"
        )
    return keep


@dataclass(frozen=True)
class Masking:
    """One batch's random mask (MAE's ``random_masking`` outputs).

    ``ids_keep [B, len_keep]`` int64: original indices of the visible tokens, in the order the
    encoder sees them (ascending noise); ``ids_restore [B, L]`` int64: position of each
    original token in the shuffled order (``argsort(ids_shuffle)``); ``mask [B, L]`` float:
    1 = masked (removed), 0 = visible, in the original token order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def len_keep(self) -> int:
        return self.ids_keep.shape[1]

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The *visible* map ``[B, h, w]`` (1 = visible), as the stem multiplies it in."""
        B, L = self.mask.shape
        if h * w != L:
            raise ValueError(f"a {h}x{w} token grid has {h * w} tokens, the mask has {L}")
        return (1.0 - self.mask).view(B, h, w)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Visible tokens of ``x [..., B, L, D]`` -> ``[..., B, len_keep, D]`` (any leading
        dims, e.g. the time axis of ``[T, B, L, D]``: the same tokens at every step)."""
        idx = self.ids_keep.unsqueeze(-1).expand(*self.ids_keep.shape, x.shape[-1])
        idx = idx.expand(*x.shape[:-3], *idx.shape)
        return torch.gather(x, -2, idx)


def random_masking(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> Masking:
    """MAE's random masking of ``num_tokens`` tokens for ``batch`` samples.

    Per sample, uniform noise ``[L]`` is drawn from ``generator`` (on the generator's
    device) -- or given as ``noise [B, L]`` (e.g. drawn per sample from its own seed, so a
    sample's mask does not depend on the batch it lands in) -- and argsorted; the
    ``len_keep`` tokens with the smallest noise stay visible (:func:`num_visible`). The
    result depends only on the generator's state (or the noise) and the shape, never on
    input values; give each rank its own seeded generator for different masks.
    """
    if (generator is None) == (noise is None):
        raise TypeError("random_masking: pass exactly one of generator= and noise=")
    len_keep = num_visible(num_tokens, mask_ratio)
    if noise is not None:
        if noise.shape != (batch, num_tokens):
            raise ValueError(
                f"noise must be [B, L] = [{batch}, {num_tokens}], got {tuple(noise.shape)}"
            )
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    else:
        noise = torch.rand(batch, num_tokens, generator=generator, device=generator.device)
    if device is not None:
        noise = noise.to(device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, num_tokens, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep, ids_restore, mask)


def upsample_mask(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, h * factor, w * factor]``, each entry repeated ``factor x
    factor`` (``repeat_interleave`` on both axes, as ConvMAE): the mask of an SCS stage
    whose resolution is ``factor`` times the token grid's."""
    if factor < 1:
        raise ValueError(f"upsample factor must be >= 1, got {factor}")
    return grid.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> patches ``[B, L, p*p*C]``, ``L = (H/p)(W/p)``.

    Pixel ``(c, r*p + i, q*p + j)`` goes to token ``r * (W/p) + q``, feature
    ``(i*p + j) * C + c`` (MAE's layout, for any ``C``: 3 for RGB, 2 for ON/OFF frames).
    """
    if x.dim() != 4:
        raise ValueError(f"patchify expects [B, C, H, W], got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible by the patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # B h w i j C
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, h*w, p*p*C]`` -> ``[B, C, h*p, w*p]``."""
    B, L, F = x.shape
    p = patch_size
    if L != h * w or F != p * p * channels:
        raise ValueError(
            f"unpatchify: got {L} tokens of {F} values, expected {h}x{w} tokens of "
            f"{p}*{p}*{channels} = {p * p * channels}"
        )
    x = x.reshape(B, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # B C h i w j
    return x.reshape(B, channels, h * p, w * p)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``[h*w, dim]`` (float32), token order row-major.

    The first ``dim/2`` channels encode the column, the last ``dim/2`` the row; each half is
    ``[sin(pos * omega_k), cos(pos * omega_k)]`` with ``omega_k = 10000^(-k / (dim/4))``,
    ``k = 0 .. dim/4 - 1`` (the 1-D Transformer encoding, as MAE uses per axis).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


class MAEDecoder(nn.Module):
    """The light non-spiking Transformer decoder (paper: 4 layers, 256 wide, 4 heads).

    ``Linear(encoder_dim -> dim)`` of the visible tokens, a shared learnable mask token for
    every removed one, the sequence un-shuffled to the original order with
    ``ids_restore``, fixed 2-D sin-cos position embeddings added to all tokens, ``depth``
    pre-norm ``torch.nn.TransformerEncoderLayer`` blocks (GELU MLP, ``mlp_ratio``), LayerNorm,
    ``Linear(dim -> p*p*C)``. Spikformer has no class token, so neither has the decoder.
    """

    def __init__(
        self,
        *,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_dim: int,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} must be divisible by decoder heads {num_heads}")
        if depth < 1:
            raise ValueError(f"decoder depth must be >= 1, got {depth}")
        h, w = grid_size
        self.grid_size = (int(h), int(w))
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed, not learned (a buffer follows .to(device) and lands in the state dict)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, h, w).unsqueeze(0))
        layer = nn.TransformerEncoderLayer(
            dim,
            num_heads,
            dim_feedforward=int(dim * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE: mask token normal(0.02), Linear xavier-uniform with zero bias, LayerNorm 1/0
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder input ``[B, L, dim]``: embedded visible tokens ``latent [B, len_keep, D]``
        (in the shuffled order) and mask tokens, un-shuffled, plus position embeddings."""
        x = self.embed(latent)
        B, keep, dim = x.shape
        L = ids_restore.shape[1]
        if L != self.grid_size[0] * self.grid_size[1]:
            raise ValueError(
                f"decoder built for a {self.grid_size[0]}x{self.grid_size[1]} grid, got a mask "
                f"of {L} tokens"
            )
        x = torch.cat([x, self.mask_token.expand(B, L - keep, dim).to(x.dtype)], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(B, L, dim))
        return x + self.pos_embed.to(x.dtype)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent [B, len_keep, D]``, ``ids_restore [B, L]`` -> predictions ``[B, L,
        p*p*C]`` in the original token order."""
        x = self.blocks(self.tokens(latent, ids_restore))
        return self.pred(self.norm(x))


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error over masked patches only.

    ``pred``, ``target`` ``[B, L, p*p*C]`` (target from :func:`patchify`), ``mask [B, L]``
    (1 = masked). With ``norm_pix`` each target patch is normalised by its own mean and
    unbiased variance, ``(t - mean) / sqrt(var + 1e-6)`` (MAE). The per-patch mean squared
    error is averaged over the masked patches; visible patches get no gradient.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"mae_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} do not match ([B, L, F], [B, L, F], [B, L])"
        )
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / torch.sqrt(var + 1.0e-6)
    per_patch = (pred - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    n = mask.sum()
    if not bool(n > 0):
        raise ValueError("mae_loss: the mask hides no patch; nothing to reconstruct")
    return (per_patch * mask).sum() / n


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpikformerMAEConfig(SpikformerV2Config):
    """A Spikformer V2 encoder's fields (:class:`SpikformerV2Config`; ``num_classes`` 0: no
    head, ``T`` 1 as in the paper's pretraining) plus the masked-autoencoder settings."""

    num_classes: int = 0
    T: int = 1
    mask_ratio: float = 0.75
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 4
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        num_visible(1_000_000, self.mask_ratio)  # validates the ratio
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim {self.decoder_dim} must be divisible by 4 (sin-cos positions) and "
                f"by decoder_heads {self.decoder_heads}"
            )

    def encoder_config(self) -> SpikformerV2Config:
        """The encoder's own config (no head)."""
        names = {f.name for f in dataclasses.fields(SpikformerV2Config)}
        return SpikformerV2Config(**{n: getattr(self, n) for n in names})


class SpikformerMAE(nn.Module):
    """Spiking masked autoencoder: a :class:`SpikformerV2` encoder that sees only the visible
    tokens, and a :class:`MAEDecoder` that reconstructs the masked patches.

    ``loss, pred, mask = mae(x, generator=g)``: ``x`` ``[B, C, H, W]`` (repeated over
    ``config.T`` steps) or ``[B, T, C, H, W]`` (event frames); ``pred [B, L, p*p*C]`` and
    ``mask [B, L]`` (1 = masked) in the original token order. The reconstruction target is
    the input averaged over time (the image itself for a repeated image).

    Per batch: :func:`random_masking` of the ``h x w`` token grid from ``generator``; masked
    pixels are zeroed; every SCS stage runs as sparse conv + sparse BatchNorm
    (:meth:`ConvBNLIF.forward` with ``visible``) with the visible map upsampled to its
    resolution (x8, x4, x2, x1 for four stages): BatchNorm statistics come from the visible
    positions only, and BatchNorm outputs, membrane potentials and spikes at masked
    positions are exactly 0, so masked pixels never reach a visible token; the same map
    applies at every time step. The encoder blocks see the ``len_keep`` visible tokens only;
    the decoder gets their time average. Both the reference (``backend="torch"``) and the
    fused kernels (Numba, Triton) run the masked stem; the fused one carries the visible
    positions only, as compact rows (:meth:`ConvBNLIF.forward_rows`), so its time and memory
    scale with the visible fraction.
    """

    config_class = SpikformerMAEConfig

    def __init__(self, config: SpikformerMAEConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = config or SpikformerMAEConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        self.encoder = SpikformerV2(cfg.encoder_config())
        h, w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
        p = cfg.patch_size
        self.decoder = MAEDecoder(
            encoder_dim=cfg.embed_dim,
            grid_size=(h // p, w // p),
            patch_dim=p * p * cfg.in_channels,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
        )
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def T(self) -> int:
        return self.encoder.T

    @T.setter
    def T(self, value: int) -> None:
        self.encoder.T = value

    # -- the four pieces, as MAE -------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, L, p*p*C]`` (:func:`patchify`)."""
        return patchify(x, self.patch_size)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[B, h*w, p*p*C]`` -> ``[B, C, h*p, w*p]`` (:func:`unpatchify`)."""
        return unpatchify(x, self.patch_size, self.config.in_channels, h, w)

    def random_masking(
        self,
        x_seq: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
    ) -> Masking:
        """The mask of a batch ``[T, B, C, H, W]`` from ``generator`` or per-sample ``noise
        [B, L]`` (:func:`random_masking`; the shape only, never the values of ``x_seq``)."""
        _, B, _, H, W = x_seq.shape
        p = self.patch_size
        return random_masking(
            B, (H // p) * (W // p), self.mask_ratio, generator=generator, noise=noise,
            device=x_seq.device,
        )  # fmt: skip

    def forward_stem(self, x_seq: torch.Tensor, masking: Masking) -> torch.Tensor:
        """The sparse SCS stem: ``[T, B, C, H, W]`` -> visible tokens ``[T, B, len_keep, D]``
        (spike counts, in the order of ``masking.ids_keep``)."""
        stages = self.encoder.patch_embed.stages
        if _fused_backend(stages[0].down.lif.backend, x_seq) is not None and not probing():
            return self._stem_rows(x_seq, masking)
        T, B, _, H, W = x_seq.shape
        p = self.patch_size
        visible = masking.grid(H // p, W // p).to(x_seq.dtype)  # [B, h, w], 1 = visible
        x = x_seq * upsample_mask(visible, p).unsqueeze(1)  # masked pixels never enter
        stages = self.encoder.patch_embed.stages
        for i, stage in enumerate(stages):  # stage i works at 2^(n-1-i) x the token grid
            x = stage(x, visible=upsample_mask(visible, 2 ** (len(stages) - 1 - i)))
        return masking.gather(x.flatten(3).transpose(-1, -2))  # [T, B, len_keep, D]

    def _stem_rows(self, x_seq: torch.Tensor, masking: Masking) -> torch.Tensor:
        """:meth:`forward_stem` on the fused kernels, carrying only the visible positions:
        every stage's activations are compact rows ``[T, B*n_vis, C]``, never a
        full-resolution map. Stage ``i`` (``f = 2^(n-1-i)`` times the token grid) orders its
        rows by sample, kept token (``ids_keep`` order) and the ``f x f`` positions of the
        token (row-major), so the last stage's rows are the visible tokens in the encoder's
        order. Each visible position's 2x2 children are visible (the mask is upsampled by
        repetition): the first stage reads them from the image, which masked pixels
        therefore never enter; the 3x3 convs read masked neighbours as zero rows."""
        T, B, _, H, W = x_seq.shape
        p, keep = self.patch_size, masking.ids_keep
        h, w = H // p, W // p
        dev = keep.device
        stages = self.encoder.patch_embed.stages
        in_rows = torch.arange(B * H * W, device=dev).view(B, H, W)  # the image, dense
        n_in, x = B * H * W, x_seq
        for i, stage in enumerate(stages):
            f = 2 ** (len(stages) - 1 - i)
            d = torch.arange(f, device=dev)
            b = torch.arange(B, device=dev).view(B, 1, 1, 1).expand(B, keep.shape[1], f, f)
            ho = ((keep // w) * f).view(B, -1, 1, 1) + d.view(1, 1, f, 1)
            wo = ((keep % w) * f).view(B, -1, 1, 1) + d.view(1, 1, 1, f)
            b, ho, wo = b.reshape(-1), ho.expand_as(b).reshape(-1), wo.expand_as(b).reshape(-1)
            down = GatherTaps.build(in_rows, b, ho, wo, (2, 2), 2, 0, n_in)
            in_rows = torch.full((B, h * f, w * f), -1, dtype=torch.long, device=dev)
            in_rows[b, ho, wo] = torch.arange(b.numel(), device=dev)
            n_in = b.numel()
            conv = GatherTaps.build(in_rows, b, ho, wo, (3, 3), 1, 1, n_in)
            x = stage.forward_rows(x, down, conv)
        return x.view(T, B, keep.shape[1], -1)

    def forward_encoder(self, x_seq: torch.Tensor, masking: Masking) -> torch.Tensor:
        """``[T, B, C, H, W]`` -> encoded visible tokens ``[T, B, len_keep, D]`` (spike
        counts): the sparse stem, then the encoder blocks on the visible tokens only."""
        tokens = self.forward_stem(x_seq, masking)
        for blk in self.encoder.blocks:
            tokens = blk(tokens)
        return tokens

    def forward_decoder(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Visible tokens ``[T, B, len_keep, D]`` -> predictions ``[B, L, p*p*C]``."""
        return self.decoder(latent.mean(0), masking.ids_restore)

    def forward_loss(self, x_seq: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """Normalised-pixel MSE on the masked patches of the time-averaged input."""
        return mae_loss(pred, self.patchify(x_seq.mean(0)), mask, norm_pix=self.norm_pix_loss)

    def forward(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ):
        """``x [B, C, H, W]`` or ``[B, T, C, H, W]`` -> ``(loss, pred [B, L, p*p*C], mask
        [B, L])``, the mask (1 = masked, original token order) drawn from ``generator`` or
        argsorted from per-sample ``noise [B, L]`` (exactly one of them)."""
        x_seq = self.encoder.to_sequence(x)
        masking = self.random_masking(x_seq, generator, noise=noise)
        latent = self.forward_encoder(x_seq, masking)
        pred = self.forward_decoder(latent, masking)
        loss = self.forward_loss(x_seq, pred, masking.mask)
        return loss, pred, masking.mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights alone, for ``create_model("spikformer_v2_...")``: every key
        but the classification head's (``load_state_dict(..., strict=False)`` or ``--init``)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
