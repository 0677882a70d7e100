"""Masked-autoencoder pieces (evformer.models.mae) against SPEC-ssl.md's invariants,
checked on small shapes against plain loops and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evformer.models.mae import (
    MAEDecoder,
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
