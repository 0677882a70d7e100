"""Masked-pretraining figures (evformer.viz.reconstruction): the mask figure shows exactly the
model's mask (read back from the artists, against the mask upsampled with np.kron), the stem
outputs recorded by hooks are exactly 0 at masked positions and are what the model computes
(its own forward_stem, the stage residual, the LIF rule at T = 1), the stem figure shows
those arrays, event-frame triplets from a real model use the two event colours, and bad
arguments raise errors that name them. Tiny models (2 SCS stages, a 4x6 token grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evformer.models import create_model
from evformer.models.mae import num_visible, random_masking
from evformer.viz import (
    StemActivity,
    StemOutput,
    mask_figure,
    plot_mae_reconstructions,
    stem_activity_figure,
    stem_stage_outputs,
)

H, W = 16, 24  # two SCS stages: patch 4, a non-square 4x6 token grid catches row/column swaps
P = 4
GH, GW = H // P, W // P
L = GH * GW


def _mae(*, C: int = 2, T: int = 2, backend: str = "torch", lively: bool = True):
    """A tiny SpikformerMAE in eval mode. ``lively``: stem BatchNorms with gamma 3, beta 2.5,
    so that many stem neurons fire, and a dense BatchNorm would make the masked positions
    (input 0 -> output 2.5 >= 2, the firing current) fire too: "exactly 0 at masked
    positions" is then the sparse BatchNorm's doing, not silence."""
    torch.manual_seed(0)
    mae = create_model(
        "mae_spikformer_v2_8_384",
        img_size=(H, W),
        in_channels=C,
        stem_stages=2,
        stem_ratio=1,
        embed_dim=16,
        depth=1,
        num_heads=2,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
        T=T,
        backend=backend,
    ).eval()
    if lively:
        with torch.no_grad():
            for m in mae.encoder.patch_embed.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.fill_(3.0)
                    m.bias.fill_(2.5)
    return mae


def _frames(B: int = 3, T: int = 2, C: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(2.0 * torch.rand(B, T, C, H, W, generator=g), generator=g)


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kron(token_mask: np.ndarray, f: int) -> np.ndarray:
    """``[h*w]`` token mask (row-major) -> ``[h*f, w*f]`` bool, with np.kron."""
    return np.kron(np.asarray(token_mask).reshape(GH, GW), np.ones((f, f))) > 0


# ----------------------------------------------------------------- mask figure


def test_mask_figure_shows_the_models_mask_over_the_frames():
    mae = _mae()
    x = _frames()
    _, _, mask = mae(x, generator=_gen())
    mask = mask.numpy()
    fig = mask_figure(mask, images=x)
    assert len(fig.axes) == x.shape[0]
    n_masked = L - num_visible(L, 0.75)
    for i, ax in enumerate(fig.axes):
        assert len(ax.images) == 2  # the frame, then the mask layer
        layer = np.asarray(ax.images[-1].get_array())
        assert layer.shape == (H, W, 4)
        expected = _kron(mask[i], P)
        assert np.array_equal(layer[..., 3] > 0, expected)
        assert np.all(layer[..., 3][expected] == 0.8)  # the frame shows through a little
        assert expected.sum() == n_masked * P * P
        assert ax.get_title().startswith(f"{n_masked} of {L} tokens masked")


def test_mask_figure_without_images_draws_the_token_grid_row_major():
    g = _gen(3)
    ratios = (0.5, 0.6, 0.75, 0.9)
    masks = np.stack([random_masking(1, L, r, generator=g).mask[0].numpy() for r in ratios])
    fig = mask_figure(masks, grid=(GH, GW), titles=[f"ratio {r}" for r in ratios], max_cols=3)
    assert len(fig.axes) == len(ratios)  # 2 x 3 panels, the unused two removed
    for ax, m, r in zip(fig.axes, masks, ratios):
        assert len(ax.images) == 1
        alpha = np.asarray(ax.images[0].get_array())[..., 3]
        # token r * w + q at row r, column q: a plain reshape of the row-major order
        assert np.array_equal(alpha, m.reshape(GH, GW))  # opaque 1 / transparent 0
        k = L - num_visible(L, r)
        assert int(m.sum()) == k
        assert ax.get_title() == f"ratio {r}\n{k} of {L} tokens masked ({100 * k / L:.0f} %)"


def test_mask_figure_draws_rgb_images_as_they_are_and_one_image_under_every_mask():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, H, W, generator=g)
    masks = random_masking(2, L, 0.5, generator=g).mask
    fig = mask_figure(masks, images=img)  # grid inferred: square patches of 4 px tile 16x24
    for ax, m in zip(fig.axes, masks.numpy()):
        shown = np.asarray(ax.images[0].get_array())
        np.testing.assert_allclose(shown, img.permute(1, 2, 0).numpy(), atol=1e-7)
        assert np.array_equal(np.asarray(ax.images[1].get_array())[..., 3] > 0, _kron(m, P))


# ----------------------------------------------------------------- the masked stem


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("what", ["stage", "unit", "bn"])
@pytest.mark.parametrize("T", [1, 2])
def test_stem_outputs_are_exactly_zero_at_masked_positions(backend, what, T):
    mae = _mae(T=T, backend=backend)
    x = _frames(T=T)
    act = stem_stage_outputs(mae, x, generator=_gen(), what=what)
    assert isinstance(act, StemActivity) and act.what == what
    assert act.grid == (GH, GW) and act.patch_size == P
    names = [o.name for o in act.outputs]
    per_stage = ["stage 1", "stage 2"]
    if what != "stage":
        per_stage = [f"{s} {u}" for s in per_stage for u in ("down", "fc1", "fc2")]
    assert names == per_stage
    for o in act.outputs:
        f = 2 if o.name.startswith("stage 1") else 1  # stage 1 at 8x12, stage 2 on the grid
        Tn, B, C, Hs, Ws = o.output.shape
        assert (Tn, B, Hs, Ws) == (T, x.shape[0], GH * f, GW * f) and o.factor == f
        for b in range(B):
            masked = _kron(act.mask[b], f)
            assert np.array_equal(o.masked[b], masked)
            assert np.count_nonzero(o.output[:, b][..., masked]) == 0, (o.name, b)
            # the test can fail: the visible positions are active
            assert np.count_nonzero(o.output[:, b][..., ~masked]) > 0, (o.name, b)
        assert o.masked_nonzeros() == 0
    assert act.masked_nonzeros() == 0


def test_stem_outputs_are_what_the_model_computes():
    mae = _mae(T=2, backend="torch")
    x = _frames(T=2)
    act = stem_stage_outputs(mae, x, generator=_gen())
    loss, pred, mask = mae(x, generator=_gen())
    # the same forward: same mask (the generator alone), same prediction and loss
    assert np.array_equal(act.mask, mask.numpy())
    assert np.array_equal(act.mask, random_masking(3, L, 0.75, generator=_gen()).mask.numpy())
    np.testing.assert_allclose(act.pred, pred.detach().numpy(), atol=1e-5)
    assert act.loss == pytest.approx(float(loss.detach()), abs=1e-5)
    # the last stage's map at the visible tokens is the model's own forward_stem output
    x_seq = mae.encoder.to_sequence(x)
    masking = mae.random_masking(x_seq, _gen())
    with torch.no_grad():
        tokens = mae.forward_stem(x_seq, masking)  # [T, B, len_keep, D]
    last = torch.as_tensor(act.outputs[-1].output).flatten(3).transpose(-1, -2)  # [T, B, L, D]
    assert torch.equal(masking.gather(last), tokens)


def test_fused_model_gives_the_same_mask_and_prediction():
    """On a fused backend the recorded forward is the reference path; it must agree with the
    model's own (fused) forward."""
    mae = _mae(T=2, backend="auto")
    x = _frames(T=2)
    act = stem_stage_outputs(mae, x, generator=_gen())
    loss, pred, mask = mae(x, generator=_gen())
    assert np.array_equal(act.mask, mask.numpy())
    np.testing.assert_allclose(act.pred, pred.detach().numpy(), atol=1e-4)
    assert act.loss == pytest.approx(float(loss.detach()), abs=1e-4)


def test_units_compose_to_the_stage_and_spike_where_the_bn_output_crosses_threshold():
    mae = _mae(T=1)
    x = _frames(T=1)

    def record(what: str) -> dict[str, np.ndarray]:
        act = stem_stage_outputs(mae, x, generator=_gen(), what=what)
        return {o.name: o.output for o in act.outputs}

    stage, unit, bn = record("stage"), record("unit"), record("bn")
    for s in ("stage 1", "stage 2"):
        # residual "add": the stage output is the down unit's spikes plus fc2's
        assert np.array_equal(stage[s], unit[f"{s} down"] + unit[f"{s} fc2"])
    for name, spikes in unit.items():
        # one LIF step from rest (tau 2, threshold 1, reset 0): h = I / 2, spike iff h >= 1
        assert np.array_equal(spikes, (bn[name] / 2.0 - 1.0 >= 0).astype(np.float32)), name
        assert np.any(bn[name] != 0)


def test_stem_activity_figure_shows_the_recorded_maps_and_counts():
    mae = _mae(T=2)
    act = stem_stage_outputs(mae, _frames(T=2), generator=_gen())
    fig = stem_activity_figure(act, sample=1)
    n = len(act.outputs)
    top, bottom = fig.axes[:n], fig.axes[n : 2 * n]  # subplots row-major, colorbars after
    for o, ax_a, ax_m in zip(act.outputs, top, bottom):
        shown = np.asarray(ax_a.images[0].get_array())
        np.testing.assert_allclose(shown, np.abs(o.output[:, 1]).mean(axis=(0, 1)), rtol=1e-6)
        assert np.array_equal(
            np.asarray(ax_m.images[0].get_array()) > 0, _kron(act.mask[1], o.factor)
        )
        assert ax_m.get_xlabel().startswith("0 non-zeros")
    assert fig._suptitle.get_text().startswith("sample 1: 0 non-zeros at masked positions")


def test_a_leak_is_counted_and_shown():
    """Hand-made outputs: one value at a masked position must be counted, per sample."""
    masked = np.zeros((2, 2, 2), dtype=bool)
    masked[1, 0, 1] = True
    out = np.zeros((1, 2, 3, 2, 2), dtype=np.float32)
    out[0, 1, 2, 0, 1] = 0.5  # sample 1, a masked position
    out[0, 0, 0, 0, 1] = 1.0  # sample 0, visible there
    o = StemOutput("stage 1", out, masked, 1)
    mask = masked.reshape(2, 4).astype(float)
    act = StemActivity((o,), "stage", 0.0, np.zeros((2, 4, 1)), mask, (2, 2), 1)
    assert o.masked_nonzeros() == 1 and o.masked_nonzeros(0) == 0 and act.masked_nonzeros(1) == 1
    fig = stem_activity_figure(act, sample=1)
    assert fig.axes[1].get_xlabel().startswith("1 non-zeros")


def test_event_frame_triplets_use_the_two_event_colours():
    mae = _mae(T=2)
    x = _frames(B=2, T=2)
    _, pred, mask = mae(x, generator=_gen())
    fig = plot_mae_reconstructions(x, mask, pred.detach(), patch_size=P)
    mean = x.mean(1).numpy()  # [B, 2, H, W]: the target is the frames averaged over T
    for b in range(2):
        orig = np.asarray(fig.axes[3 * b].images[0].get_array())
        hi = mean[b].max()
        off, on = mean[b, 0] / hi, mean[b, 1] / hi
        # OFF (channel 0) in blue, ON (channel 1) in red, nothing in green
        np.testing.assert_allclose(orig, np.stack([on, np.zeros_like(on), off], -1), atol=1e-6)
        assert np.any((orig[..., 0] > 0) & (orig[..., 2] == 0))  # ON only
        assert np.any((orig[..., 2] > 0) & (orig[..., 0] == 0))  # OFF only
        masked = np.asarray(fig.axes[3 * b + 1].images[0].get_array())
        hidden = _kron(mask[b].numpy(), P)
        assert np.allclose(masked[hidden], [0.5, 0.5, 0.5])
        np.testing.assert_allclose(masked[~hidden], orig[~hidden])


# ----------------------------------------------------------------- bad arguments


def test_bad_arguments_name_the_argument():
    mae = _mae(lively=False)
    x = _frames()
    masks = random_masking(2, L, 0.75, generator=_gen()).mask
    with pytest.raises(ValueError, match="masks must hold 0"):
        mask_figure(masks * 2)
    with pytest.raises(ValueError, match=r"masks must be \[N, L\]"):
        mask_figure(masks.view(2, GH, GW))
    with pytest.raises(ValueError, match="grid"):
        mask_figure(masks, grid=(5, 5))
    with pytest.raises(TypeError, match="grid must be a pair"):
        mask_figure(masks, grid=4)
    with pytest.raises(ValueError, match="give grid"):
        mask_figure(masks)  # 24 tokens are no square grid
    with pytest.raises(ValueError, match="images"):
        mask_figure(masks, images=torch.zeros(3, 2, H, W))  # 3 images for 2 masks
    with pytest.raises(ValueError, match="images of 16x20 pixels"):
        mask_figure(masks, grid=(GH, GW), images=torch.zeros(2, H, 20))
    with pytest.raises(ValueError, match="titles"):
        mask_figure(masks, grid=(GH, GW), titles=["one"])
    with pytest.raises(ValueError, match="mask_alpha"):
        mask_figure(masks, grid=(GH, GW), mask_alpha=0.0)
    with pytest.raises(TypeError, match="mae must be a SpikformerMAE"):
        stem_stage_outputs(mae.encoder, x, generator=_gen())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        stem_stage_outputs(mae, x.numpy(), generator=_gen())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        stem_stage_outputs(mae, x, generator=None)
    with pytest.raises(ValueError, match="what must be one of"):
        stem_stage_outputs(mae, x, generator=_gen(), what="membrane")
    act = stem_stage_outputs(mae, x, generator=_gen())
    with pytest.raises(ValueError, match=r"sample must be an index in \[0, 3\)"):
        stem_activity_figure(act, sample=3)
    with pytest.raises(TypeError, match="activity must be a StemActivity"):
        stem_activity_figure(act.outputs)
