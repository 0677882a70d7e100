"""Masked autoencoder (evformer.models.mae) against SPEC-ssl.md's invariants 1-10 (11, the
layer-decay groups, belongs to the recipe), checked on small shapes against plain loops and
hand-computed values; the model on tiny encoders, train and eval mode, T = 1 and 2, the
reference ("torch") and the fused ("numba") paths."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evformer.kernels.types import SPIKFORMER_LIF
from evformer.models import ConvBNLIF, SpikformerMAE, create_model, list_models, model_config
from evformer.models.mae import (
    MAEDecoder,
    Masking,
    mae_loss,
    num_visible,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
    upsample_mask,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- invariant 1: masks -------------------------------------------------------------------


@pytest.mark.parametrize("L, ratio", [(196, 0.75), (64, 0.5), (16, 0.6), (10, 0.0)])
def test_every_mask_row_hides_exactly_L_minus_len_keep(L, ratio):
    m = random_masking(5, L, ratio, generator=_gen(0))
    keep = int(L * (1 - ratio))
    assert m.len_keep == keep
    assert m.mask.shape == (5, L)
    assert torch.equal(m.mask.sum(1), torch.full((5,), float(L - keep)))
    # ids_keep are exactly the visible positions
    for b in range(5):
        assert sorted(m.ids_keep[b].tolist()) == torch.nonzero(m.mask[b] == 0).flatten().tolist()


def test_196_tokens_at_075_keep_49():
    assert num_visible(196, 0.75) == 49


def test_masks_reproducible_from_seed_and_differ_per_rank_and_batch():
    a = random_masking(4, 196, 0.75, generator=_gen(7))
    b = random_masking(4, 196, 0.75, generator=_gen(7))
    c = random_masking(4, 196, 0.75, generator=_gen(8))  # another rank's seed
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_restore, b.ids_restore)
    assert not torch.equal(a.mask, c.mask)
    assert not torch.equal(a.mask[0], a.mask[1])  # per-sample masks


def test_mask_ratio_refused_when_it_keeps_nothing_or_is_out_of_range():
    with pytest.raises(ValueError, match="keeps no token"):
        random_masking(1, 4, 0.9, generator=_gen(0))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="mask_ratio"):
            random_masking(1, 16, bad, generator=_gen(0))
    with pytest.raises(TypeError, match="generator"):
        random_masking(1, 16, 0.5, generator=0)  # type: ignore[arg-type]


def test_mask_rate_is_uniform_over_positions():
    # every position is masked with probability ratio (uniform noise, no position bias)
    m = random_masking(4000, 16, 0.75, generator=_gen(1))
    rate = m.mask.mean(0)
    assert torch.all((rate - 0.75).abs() < 0.03), rate


# -- invariant 2: shuffle / restore ---------------------------------------------------------


def test_gather_by_shuffle_then_restore_is_identity():
    m = random_masking(3, 20, 0.5, generator=_gen(2))
    x = torch.randn(3, 20, 6)
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 6))
    back = torch.gather(shuffled, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, 6))
    assert torch.equal(back, x)
    assert torch.equal(shuffled[:, : m.len_keep], m.gather(x))


def test_gather_keeps_the_same_tokens_at_every_time_step():
    m = random_masking(2, 12, 0.5, generator=_gen(3))
    x = torch.randn(3, 2, 12, 4)  # [T, B, L, D]
    g = m.gather(x)
    assert g.shape == (3, 2, 6, 4)
    for t in range(3):
        assert torch.equal(g[t], m.gather(x[t]))
        for b in range(2):
            assert torch.equal(g[t, b], x[t, b, m.ids_keep[b]])


# -- invariant 3: patchify ------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 2, 3])
def test_unpatchify_inverts_patchify_for_any_channel_count(C):
    x = torch.randn(2, C, 12, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 16 * C)
    assert torch.equal(unpatchify(p, 4, C, 3, 2), x)


def test_patchify_layout_is_maes():
    # pixel (c, r*p + i, q*p + j) -> token r*w + q, feature (i*p + j)*C + c
    B, C, H, W, p = 1, 2, 6, 9, 3
    x = torch.arange(B * C * H * W, dtype=torch.float64).reshape(B, C, H, W)
    out = patchify(x, p)
    w = W // p
    for c in range(C):
        for r in range(H // p):
            for q in range(w):
                for i in range(p):
                    for j in range(p):
                        pixel = x[0, c, r * p + i, q * p + j]
                        assert out[0, r * w + q, (i * p + j) * C + c] == pixel


def test_patchify_refuses_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="unpatchify"):
        unpatchify(torch.zeros(1, 6, 10), 2, 3, 2, 3)


# -- invariant 4: loss ----------------------------------------------------------------------


def test_loss_is_zero_when_prediction_equals_normalised_target():
    t = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.float32)
    mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
    assert mae_loss((t - mean) / (var + 1e-6).sqrt(), t, mask).item() == pytest.approx(0, abs=1e-7)
    assert mae_loss(t, t, mask, norm_pix=False).item() == 0.0


def test_single_masked_patch_gives_its_own_normalised_mse_by_hand():
    target = torch.zeros(1, 3, 4)
    target[0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pred = torch.zeros(1, 3, 4)
    mask = torch.tensor([[0.0, 1.0, 0.0]])
    # mean 2.5, unbiased var 5/3; normalised target (v - 2.5)/sqrt(5/3 + 1e-6); pred 0
    z = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3 + 1e-6)
    assert mae_loss(pred, target, mask).item() == pytest.approx(float(np.mean(z**2)), rel=1e-6)
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(7.5)


def test_visible_patches_get_zero_gradient():
    pred = torch.randn(2, 6, 8, requires_grad=True)
    target = torch.randn(2, 6, 8)
    mask = random_masking(2, 6, 0.5, generator=_gen(4)).mask
    mae_loss(pred, target, mask).backward()
    g = pred.grad.abs().sum(-1)
    assert torch.all(g[mask == 0] == 0)
    assert torch.all(g[mask == 1] > 0)


def test_loss_refuses_mismatched_shapes_and_empty_mask():
    with pytest.raises(ValueError, match="do not match"):
        mae_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="hides no patch"):
        mae_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3))


# -- invariant 9: upsampled masks -------------------------------------------------------------


@pytest.mark.parametrize("s", [2, 4, 8])
def test_avg_pool_of_upsampled_mask_gives_back_the_token_mask(s):
    m = random_masking(3, 14 * 14, 0.75, generator=_gen(5))
    grid = m.grid(14, 14)
    up = upsample_mask(grid, s)
    assert up.shape == (3, 14 * s, 14 * s)
    assert torch.equal(F.avg_pool2d(up.unsqueeze(1), s).squeeze(1), grid)
    # every s x s block is constant
    assert torch.equal(up[:, ::s, ::s], grid)


# -- position embeddings and decoder (invariant 10) ------------------------------------------


def test_sincos_pos_embed_values_by_hand():
    pe = sincos_pos_embed_2d(8, 2, 3)  # dim/4 = 2 frequencies: 1 and 1/100
    assert pe.shape == (6, 8)
    token = 1 * 3 + 2  # row 1, column 2
    col = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    row = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    assert pe[token].tolist() == pytest.approx(col + row, abs=1e-7)
    assert len({tuple(r) for r in pe.tolist()}) == 6  # every position distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


def test_decoder_input_is_mask_token_plus_pos_embed_at_masked_positions():
    torch.manual_seed(0)
    dec = MAEDecoder(
        encoder_dim=12, grid_size=(4, 4), patch_dim=2 * 4 * 4, dim=16, depth=2, num_heads=4
    )
    m = random_masking(3, 16, 0.75, generator=_gen(6))
    latent = torch.randn(3, m.len_keep, 12)
    x = dec.tokens(latent, m.ids_restore)
    assert x.shape == (3, 16, 16)
    pe = dec.pos_embed[0]
    emb = dec.embed(latent)
    for b in range(3):
        for k, pos in enumerate(m.ids_keep[b].tolist()):  # visible: embedded token + pos
            torch.testing.assert_close(x[b, pos], emb[b, k] + pe[pos], rtol=0, atol=0)
        for pos in torch.nonzero(m.mask[b]).flatten().tolist():
            torch.testing.assert_close(x[b, pos], dec.mask_token[0, 0] + pe[pos], rtol=0, atol=0)
    out = dec(latent, m.ids_restore)
    assert out.shape == (3, 16, 32) and torch.isfinite(out).all()
    out.sum().backward()
    for name, prm in dec.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_decoder_uses_torch_transformer_layers_with_the_papers_defaults():
    dec = MAEDecoder(encoder_dim=384, grid_size=(14, 14), patch_dim=768)
    layers = dec.blocks.layers
    assert len(layers) == 4
    assert all(isinstance(layer, torch.nn.TransformerEncoderLayer) for layer in layers)
    assert layers[0].self_attn.num_heads == 4 and layers[0].self_attn.embed_dim == 256
    assert not dec.pos_embed.requires_grad
    with pytest.raises(ValueError, match="grid"):
        dec.tokens(torch.zeros(1, 4, 384), torch.arange(16).unsqueeze(0))


# -- the model: SpikformerMAE (invariants 5-8, 10) --------------------------------------------

BACKENDS = ("torch", "numba")  # the reference path and the fused CPU kernels


def _mae(backend="torch", T=1, stem_stages=3, in_channels=3, **kw) -> SpikformerMAE:
    """A tiny MAE: 32x32 input (64x64 for four stem stages), a 4x4 token grid."""
    torch.manual_seed(0)
    img = 64 if stem_stages == 4 else 32
    cfg = dict(
        img_size=img, stem_stages=stem_stages, embed_dim=32, depth=1, num_heads=2, T=T,
        in_channels=in_channels, decoder_dim=16, decoder_depth=1, decoder_heads=2,
        backend=backend,
    )  # fmt: skip
    cfg.update(kw)
    return SpikformerMAE(**cfg)


def _image(model: SpikformerMAE, batch=2, seed=0, events=False, dtype=torch.float32):
    g = _gen(seed)
    size, C = model.config.img_size, model.config.in_channels
    if events:  # [B, T, C, H, W] event counts
        return torch.poisson(
            torch.full((batch, model.T, C, size, size), 0.8, dtype=dtype), generator=g
        )
    return 2 * torch.rand(batch, C, size, size, generator=g, dtype=dtype)


def _calibrate(model: SpikformerMAE, x: torch.Tensor) -> SpikformerMAE:
    """Running statistics of one training batch (momentum 1), so that eval mode spikes."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    training = model.training
    with torch.no_grad():
        model.train()(x, generator=_gen(123))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    return model.train(training)


def _visible_maps(model: SpikformerMAE, masking: Masking, H: int, W: int) -> list[torch.Tensor]:
    """The visible map ``[B, h, w]`` at each SCS stage's output resolution (x8, x4, x2, x1)."""
    p, n = model.patch_size, len(model.encoder.patch_embed.stages)
    grid = masking.grid(H // p, W // p)
    return [upsample_mask(grid, 2 ** (n - 1 - i)) for i in range(n)]


def _stem_units(model: SpikformerMAE) -> list[tuple[int, str, ConvBNLIF]]:
    return [
        (i, name, getattr(stage, name))
        for i, stage in enumerate(model.encoder.patch_embed.stages)
        for name in ("down", "fc1", "fc2")
    ]


def _encode(model: SpikformerMAE, x: torch.Tensor, seed: int):
    """(masking, visible encoder tokens ``[T, B, len_keep, D]``) for the mask of ``seed``."""
    x_seq = model.encoder.to_sequence(x)
    masking = model.random_masking(x_seq, _gen(seed))
    return masking, model.forward_encoder(x_seq, masking)


def test_registered_mae_models_and_their_defaults():
    names = list_models("mae_spikformer_v2_*")
    assert names == sorted(
        f"mae_spikformer_v2_{d}" for d in ("8_384", "8_512", "12_512", "12_768", "16_768")
    )
    cfg = model_config("mae_spikformer_v2_8_384")
    assert (cfg.img_size, cfg.patch_size, cfg.T, cfg.num_classes) == (224, 16, 1, 0)
    assert (cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (
        0.75, 256, 4, 4
    )  # fmt: skip
    assert cfg.norm_pix_loss
    # the encoder of each MAE is the supervised model's encoder (same fields but the head)
    for name in names:
        enc, sup = model_config(name).encoder_config(), model_config(name[len("mae_") :])
        assert dataclasses.replace(enc, num_classes=sup.num_classes, T=sup.T) == sup, name
    m = create_model(
        "mae_spikformer_v2_8_384", img_size=32, stem_stages=2, embed_dim=32, depth=1,
        num_heads=2, mask_ratio=0.5, decoder_dim=16, decoder_depth=2, decoder_heads=2,
        norm_pix_loss=False, T=None,
    )  # fmt: skip
    assert isinstance(m, SpikformerMAE) and m.T == 1 and m.mask_ratio == 0.5
    assert len(m.decoder.blocks.layers) == 2 and not m.norm_pix_loss
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("mae_spikformer_v2_8_384", mask_ratio=1.0)


def test_decoder_parameter_count_matches_the_paper_within_2_percent():
    # paper: a 3.41 M decoder for V2 pretraining; 4 torch.nn pre-norm layers of width 256
    # (4 heads, MLP 1024) plus Linear(384 -> 256), the mask token, LayerNorm and
    # Linear(256 -> 16*16*3) count 3,455,744 (+1.3 %); the fixed sin-cos positions are a
    # buffer, not a parameter
    with torch.device("meta"):
        m = create_model("mae_spikformer_v2_8_384")
    n = sum(p.numel() for p in m.decoder.parameters())
    assert n == 3_455_744
    assert abs(n / 3.41e6 - 1) < 0.02


def test_encoder_state_dict_loads_into_the_supervised_model_without_the_head():
    tiny = dict(img_size=32, stem_stages=3, embed_dim=32, depth=2, num_heads=2)
    mae = create_model("mae_spikformer_v2_8_384", decoder_dim=16, decoder_heads=2, **tiny)
    sup = create_model("spikformer_v2_8_384", **tiny)
    sd = mae.encoder_state_dict()
    assert not any(k.startswith("decoder") for k in sd)
    result = sup.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []
    for k, v in sd.items():
        assert torch.equal(sup.state_dict()[k], v), k


@pytest.mark.parametrize("in_channels, events", [(3, False), (2, True)])
def test_call_contract_shapes_and_mask_from_the_generator_only(in_channels, events):
    model = _mae(in_channels=in_channels, T=2)
    x = _image(model, events=events)
    loss, pred, mask = model(x, generator=_gen(3))
    L, F_ = 16, 8 * 8 * in_channels
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert pred.shape == (2, L, F_) and mask.shape == (2, L)
    assert torch.equal(mask.sum(1), torch.full((2,), 12.0))
    # the mask depends on the generator and the shape, never on the input values
    _, _, mask2 = model(torch.rand_like(x) * 5, generator=_gen(3))
    assert torch.equal(mask, mask2)
    _, _, mask3 = model(x, generator=_gen(4))
    assert not torch.equal(mask, mask3)
    # public patchify / unpatchify, any channel count
    img = x.mean(1) if events else x
    assert model.patchify(img).shape == (2, L, F_)
    assert torch.equal(model.unpatchify(model.patchify(img), 4, 4), img)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2])
def test_encoder_blocks_receive_len_keep_tokens(backend, T):
    model = _mae(backend, T=T)
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    _, _, mask = model(_image(model), generator=_gen(0))
    assert seen == [(T, 2, 4, 32)]  # 16 tokens, ratio 0.75 -> len_keep 4
    assert mask.shape == (2, 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("events", [False, True])
def test_no_leakage_masked_patches_never_reach_visible_tokens(backend, T, train, events):
    """Invariant 5: inputs equal on visible patches, different on masked ones, give
    bit-identical encoder outputs and identical per-patch loss on the visible tokens."""
    model = _mae(backend, T=T, in_channels=2 if events else 3)
    x1 = _image(model, seed=1, events=events)
    _calibrate(model, x1).train(train)
    masking = model.random_masking(model.encoder.to_sequence(x1), _gen(5))
    p = model.patch_size
    keep = upsample_mask(masking.grid(4, 4), p).bool()  # [B, H, W] visible pixels
    keep = keep.unsqueeze(1).unsqueeze(1) if events else keep.unsqueeze(1)
    x2 = torch.where(keep, x1, _image(model, seed=2, events=events) + 3.0)
    assert not torch.equal(x1, x2)
    outs = []
    for x in (x1, x2):
        m = copy.deepcopy(model)
        mk, latent = _encode(m, x, 5)
        assert torch.equal(mk.mask, masking.mask)
        loss, pred, mask = copy.deepcopy(model)(x, generator=_gen(5))
        target = m.patchify(m.encoder.to_sequence(x).mean(0))
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        per_patch = (pred - (target - mean) / (var + 1e-6).sqrt()).pow(2).mean(-1)
        outs.append((latent, pred, per_patch[mask == 0], loss))
    (lat1, pred1, vis1, loss1), (lat2, pred2, vis2, loss2) = outs
    assert lat1.abs().sum() > 0  # the encoder does produce spikes
    assert torch.equal(lat1, lat2)
    assert torch.equal(pred1, pred2)  # the decoder sees the same tokens too
    assert torch.equal(vis1, vis2)
    assert loss1 != loss2  # the masked patches' targets differ


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_stem_is_exactly_zero_at_masked_positions(T, train):
    """Invariant 6, on the reference path of a 4-stage stem (64 px: the 32, 16, 8 and 4
    resolutions of 224's 112, 56, 28, 14): the input of every conv, the conv output the
    sparse BatchNorm uses, the BatchNorm output, the membrane potential and the spikes are 0
    at masked positions."""
    x = _image(model := _mae("torch", T=T, stem_stages=4))
    _calibrate(model, x).train(train)
    rec: dict = {}

    def keep(key):
        return lambda mod, args, out: rec.__setitem__(key, (args, out))

    for i, name, unit in _stem_units(model):
        unit.register_forward_hook(keep((i, name, "unit")))
        unit.conv.register_forward_hook(keep((i, name, "conv")))
        unit.bn.register_forward_hook(keep((i, name, "bn")))
        unit.lif.register_forward_hook(keep((i, name, "lif")))
    for i, stage in enumerate(model.encoder.patch_embed.stages):
        stage.register_forward_hook(keep((i, "stage", "out")))
    masking, _ = _encode(model, x, 9)
    vis = _visible_maps(model, masking, 64, 64)
    assert [v.shape[-1] for v in vis] == [32, 16, 8, 4]
    tau = model.config.tau
    for i, name, _ in _stem_units(model):
        v_out = vis[i].bool()  # [B, h, w]
        v_in = upsample_mask(vis[i], 2).bool() if name == "down" else v_out
        masked_out = ~v_out.expand(T, *v_out.shape)  # [T, B, h, w]
        (x_in, visible), s = rec[(i, name, "unit")]
        assert torch.equal(visible, vis[i])
        assert torch.all(x_in.permute(0, 1, 3, 4, 2)[~v_in.expand(T, *v_in.shape)] == 0)
        _, y = rec[(i, name, "conv")]
        y = y.unflatten(0, (T, 2)).permute(0, 1, 3, 4, 2)  # [T, B, h, w, C]
        if name == "down":  # a 2x2/2 conv of zeros without bias: exactly 0
            assert torch.all(y[masked_out] == 0)
        # sparse conv: BatchNorm consumes the conv output at the visible positions only
        (bn_in,), bn_out = rec[(i, name, "bn")]
        n_vis = int(v_out.sum())
        assert bn_in.shape == (T * n_vis, y.shape[-1], 1, 1)
        assert torch.equal(bn_in.flatten(1), y[~masked_out])
        (z,), spikes = rec[(i, name, "lif")]  # z: the BatchNorm output, [T, B, C, h, w]
        z, spikes = z.permute(0, 1, 3, 4, 2), spikes.permute(0, 1, 3, 4, 2)
        assert torch.all(z[masked_out] == 0)
        assert torch.equal(z[~masked_out], bn_out.flatten(1))
        # membrane potential H[t] of the LIF dynamics (v_reset 0) from its input
        v = torch.zeros_like(z[0])
        for t in range(T):
            h = v + (z[t] - v) / tau
            assert torch.all(h[masked_out[t]] == 0), (i, name, t)
            fired = (h >= model.config.v_threshold).to(h.dtype)
            assert torch.equal(fired, spikes[t])
            v = h * (1 - fired)
        assert torch.all(spikes[masked_out] == 0)
        assert spikes[~masked_out].sum() > 0, (i, name)  # visible positions do spike
        assert torch.equal(s, spikes.permute(0, 1, 4, 2, 3))
    for i in range(4):
        _, out = rec[(i, "stage", "out")]
        masked = ~vis[i].bool().expand(T, *vis[i].shape)
        assert torch.all(out.permute(0, 1, 3, 4, 2)[masked] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2])
def test_sparse_batch_norm_statistics_are_the_visible_positions(backend, T):
    """Invariant 7: batch and running statistics of a sparse unit equal nn.BatchNorm over the
    visible positions only, and differ from dense BatchNorm of the zero-filled map."""
    torch.manual_seed(0)
    unit = ConvBNLIF(4, 6, backend=backend).double()
    x = torch.randint(0, 2, (T, 2, 4, 8, 8)).double()
    visible = (torch.rand(2, 8, 8, generator=_gen(1)) > 0.6).double()
    out = unit(x, visible)
    y = unit.conv(x.flatten(0, 1)).unflatten(0, (T, 2))  # the dense conv output
    keep = visible.bool().expand(T, 2, 8, 8)
    rows = y.permute(0, 1, 3, 4, 2)[keep]  # [T * n_vis, C]
    want = nn.BatchNorm2d(6).double()
    want(rows.view(*rows.shape, 1, 1))
    torch.testing.assert_close(unit.bn.running_mean, want.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(unit.bn.running_var, want.running_var, rtol=1e-12, atol=1e-14)
    dense = nn.BatchNorm2d(6).double()
    dense((y * visible.unsqueeze(1)).flatten(0, 1))
    assert not torch.allclose(dense.running_mean, want.running_mean)
    assert not torch.allclose(dense.running_var, want.running_var)
    # the BatchNorm output at visible positions uses the visible mean and biased variance
    mean, var = rows.mean(0), rows.var(0, unbiased=False)
    z = (rows - mean) / (var + unit.bn.eps).sqrt()
    s = lif_spikes(z.new_zeros(T, 2, 8, 8, 6).index_put((keep,), z), unit)
    torch.testing.assert_close(out, s.permute(0, 1, 4, 2, 3), rtol=0, atol=0)
    # eval: running statistics
    unit.eval()
    out = unit(x, visible)
    z = (rows - unit.bn.running_mean) / (unit.bn.running_var + unit.bn.eps).sqrt()
    s = lif_spikes(z.new_zeros(T, 2, 8, 8, 6).index_put((keep,), z), unit)
    torch.testing.assert_close(out, s.permute(0, 1, 4, 2, 3), rtol=0, atol=0)


def lif_spikes(z: torch.Tensor, unit: ConvBNLIF) -> torch.Tensor:
    """LIF spikes of ``z [T, ...]`` by the documented dynamics (v_reset 0, hard reset)."""
    p = unit.lif.params
    v, out = torch.zeros_like(z[0]), []
    for t in range(z.shape[0]):
        h = v + (z[t] - v) / p.tau
        s = (h >= p.v_threshold).to(h.dtype)
        v = h * (1 - s)
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_repeats_over_time_steps_in_the_features_t_b_order(backend):
    """Invariant 8: with T > 1 each sample's map applies at every step, in the (T, B) order
    of the features (checked against a per-(t, b) loop)."""
    torch.manual_seed(0)
    T, B = 3, 2
    unit = ConvBNLIF(3, 5, backend=backend).double()
    x = torch.rand(T, B, 3, 6, 6, generator=_gen(2), dtype=torch.float64) * 2
    visible = torch.zeros(B, 6, 6, dtype=torch.float64)
    visible[0, :3] = 1  # sample 0: the top half, sample 1: the left half
    visible[1, :, :3] = 1
    out = unit(x, visible)
    y = unit.conv(x.flatten(0, 1)).unflatten(0, (T, B))
    rows = [y[t, b][:, visible[b].bool()].t() for t in range(T) for b in range(B)]
    allrows = torch.cat(rows)
    mean, var = allrows.mean(0), allrows.var(0, unbiased=False)
    z = torch.zeros(T, B, 6, 6, 5, dtype=torch.float64)
    for t in range(T):
        for b in range(B):
            z[t, b][visible[b].bool()] = (rows[t * B + b] - mean) / (var + unit.bn.eps).sqrt()
    want = lif_spikes(z, unit).permute(0, 1, 4, 2, 3)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for b in range(B):
        assert torch.all(out[:, b][:, :, ~visible[b].bool()] == 0)
        assert out[:, b].sum() > 0


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize(
    "stem_stages, in_channels, events", [(2, 3, False), (3, 3, False), (4, 2, True)]
)
def test_fused_masked_model_equals_reference_in_float64(T, stem_stages, in_channels, events):
    """Numba fused path vs plain autograd: loss, predictions, every parameter gradient and
    the running statistics, in training then eval mode."""
    ref = _mae("torch", T=T, stem_stages=stem_stages, in_channels=in_channels).double()
    fused = _mae("numba", T=T, stem_stages=stem_stages, in_channels=in_channels).double()
    fused.load_state_dict(ref.state_dict())
    x = _image(ref, events=events, dtype=torch.float64)
    _calibrate(ref, x)
    fused.load_state_dict(ref.state_dict())
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        la, pa, ma = ref(x, generator=_gen(11))
        lb, pb, mb = fused(x, generator=_gen(11))
        assert torch.equal(ma, mb)
        torch.testing.assert_close(pb, pa, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lb, la, rtol=1e-10, atol=1e-12)
        la.backward()
        lb.backward()
        scale = max(float(p.grad.abs().max()) for p in ref.parameters())
        for (n, ga), gb in zip(ref.named_parameters(), fused.parameters()):
            assert ga.grad is not None and gb.grad is not None, n
            torch.testing.assert_close(gb.grad, ga.grad, rtol=1e-8, atol=1e-12 * scale, msg=n)
            ga.grad = gb.grad = None
        for (n, ba), bb in zip(ref.named_buffers(), fused.buffers()):
            torch.testing.assert_close(bb, ba, msg=n)


@pytest.mark.parametrize("T", [1, 2])
def test_fused_stem_carries_only_the_visible_rows(monkeypatch, T):
    """The fused masked stem works on compact rows: every unit's input (after the image)
    and output has one row per visible position of its stage, and the stem's tokens equal
    the reference path's visible tokens (in ``ids_keep`` order)."""
    ref = _mae("torch", T=T, stem_stages=3).double()
    fused = _mae("numba", T=T, stem_stages=3).double()
    fused.load_state_dict(ref.state_dict())
    x_seq = ref.encoder.to_sequence(_image(ref, dtype=torch.float64))
    masking = ref.random_masking(x_seq, _gen(4))
    shapes = []
    forward_rows = ConvBNLIF.forward_rows

    def record(unit, x, taps):
        out = forward_rows(unit, x, taps)
        shapes.append((x.shape, out.shape))
        return out

    monkeypatch.setattr(ConvBNLIF, "forward_rows", record)
    want = ref.forward_stem(x_seq, masking)
    got = fused.forward_stem(x_seq, masking)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == (T, 2, masking.len_keep, 32) and got.sum() > 0
    keep = masking.len_keep
    assert len(shapes) == 9  # three units in each of three stages
    for i, (x_shape, out_shape) in enumerate(shapes):
        rows = 2 * keep * 4 ** (2 - i // 3)  # B * visible positions of stage i // 3
        assert out_shape[:2] == (T, rows) and len(out_shape) == 3, (i, out_shape)
        if i:
            assert len(x_shape) == 3 and x_shape[1] in (rows, 4 * rows), (i, x_shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_unit_refuses_pool_and_wrong_maps(backend):
    x = torch.rand(1, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="max-pool"):
        ConvBNLIF(3, 4, pool=True, backend=backend)(x, torch.ones(2, 8, 8))
    unit = ConvBNLIF(3, 4, backend=backend)
    with pytest.raises(ValueError, match="visible"):
        unit(x, torch.ones(2, 4, 4))  # not the output resolution
    with pytest.raises(ValueError, match="visible"):
        unit(x, torch.ones(3, 8, 8))  # not the batch
    # an all-visible map is dense BatchNorm
    unit.double()
    xd = torch.randint(0, 2, (2, 2, 3, 8, 8)).double()
    torch.testing.assert_close(unit(xd, torch.ones(2, 8, 8)), unit(xd), rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.0, 1.0])  # dense gathered products / event-driven
@pytest.mark.parametrize("cin", [5, 16])  # one [K*Cin, Cout] product / one per tap
@pytest.mark.parametrize("kind", ["down", "3x3", "3x3-recompute"])
@pytest.mark.parametrize("T", [1, 2])
def test_fused_sparse_unit_equals_reference_for_both_products(monkeypatch, density, cin, kind, T):
    """A masked fused unit against the reference in float64 (spikes, input / weight /
    BatchNorm gradients, running statistics), its products over the visible rows computed
    from the gathered input rows (density limit 0: one product of all taps side by side for
    few input channels, else one per kernel tap) or event-driven over the input spikes
    through the gather table (limit 1)."""
    import evformer.kernels.fused as fused_mod

    monkeypatch.setattr(fused_mod, "SPARSE_MAX_DENSITY", density)
    calls = []
    kernels = fused_mod.get_kernels("numba")
    for name in ("gather_conv_forward", "gather_conv_weight_grad"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels,
            name,
            staticmethod(lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a)),
        )
    conv = (
        dict(kernel_size=2, stride=2, padding=0, recompute=False)
        if kind == "down"
        else dict(recompute=kind.endswith("recompute"))
    )
    H = 12 if kind == "down" else 6
    units = []
    for backend in ("torch", "numba"):
        torch.manual_seed(0)
        lif = dataclasses.replace(SPIKFORMER_LIF, v_threshold=0.25)  # spikes at T = 1
        units.append(ConvBNLIF(cin, 7, lif=lif, backend=backend, **conv).double())
    units[1].load_state_dict(units[0].state_dict())
    g = _gen(3)
    x = (torch.rand(T, 2, cin, H, H, generator=g, dtype=torch.float64) < 0.3).double()
    visible = (torch.rand(2, 6, 6, generator=g) < 0.4).double()
    keep = upsample_mask(visible, H // 6).bool()[None, :, None].expand_as(x)
    x = torch.where(keep, x, torch.zeros_like(x)) * 2  # spike counts, 0 where masked
    grad = torch.rand(T, 2, 7, 6, 6, generator=g, dtype=torch.float64)
    for train in (True, False):
        res = []
        for unit in units:
            unit.train(train)
            xi = x.clone().requires_grad_(True)
            out = unit(xi, visible)
            out.backward(grad)
            res.append((out, xi.grad, *(p.grad.clone() for p in unit.parameters())))
            unit.zero_grad(set_to_none=True)
        for a, b in zip(*res):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        assert res[0][0].sum() > 0
        for ba, bb in zip(units[0].buffers(), units[1].buffers()):
            torch.testing.assert_close(bb, ba)
    # the event-driven products ran exactly when allowed (forward, recompute, weight grad)
    assert bool(calls) == (density > 0), calls
    if density > 0:
        assert set(calls) == {"gather_conv_forward", "gather_conv_weight_grad"}


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_event_driven_masked_unit_keeps_no_conv_output_for_backward(monkeypatch, density):
    """A masked unit on compact rows whose product runs event-driven saves its input as
    spike rows and recomputes the conv output Y in backward; with dense products it keeps
    Y ``[T, Rv, C]``."""
    import evformer.kernels.fused as fused_mod

    monkeypatch.setattr(fused_mod, "SPARSE_MAX_DENSITY", density)
    unit = ConvBNLIF(16, 24, backend="numba", recompute=False)
    g = _gen(8)
    visible = torch.rand(2, 6, 6, generator=g) < 0.5
    b, ho, wo = visible.nonzero(as_tuple=True)
    rv = b.numel()
    in_rows = torch.full((2, 6, 6), -1, dtype=torch.long)
    in_rows[b, ho, wo] = torch.arange(rv)
    taps = fused_mod.GatherTaps.build(in_rows, b, ho, wo, (3, 3), 1, 1, rv)
    x = (torch.rand(1, rv, 16, generator=g) < 0.2).float().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        out = unit.forward_rows(x, taps)
    assert out.shape == (1, rv, 24)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert ((1, rv, 24) in saved) == (density == 0), saved


def test_masking_from_per_sample_noise_equals_the_generator_draw():
    g = _gen(21)
    noise = torch.rand(3, 16, generator=_gen(21))
    a = random_masking(3, 16, 0.75, generator=g)
    b = random_masking(3, 16, 0.75, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_restore, b.ids_restore)
    with pytest.raises(TypeError, match="exactly one"):
        random_masking(3, 16, 0.75)
    with pytest.raises(TypeError, match="exactly one"):
        random_masking(3, 16, 0.75, generator=_gen(0), noise=noise)
    with pytest.raises(ValueError, match="noise must be"):
        random_masking(3, 16, 0.75, noise=noise[:, :8])
    model = _mae()
    x = _image(model, batch=3)
    la, pa, ma = model(x, generator=_gen(21))
    lb, pb, mb = model(x, noise=noise)
    assert torch.equal(ma, mb) and torch.equal(pa, pb) and torch.equal(la, lb)
