"""evformer.viz.network: recorded spikes against hand-computed layers and against the
features the model itself computes, firing rates against NumPy means, attention maps against
a hand computation of Q K^T (and the attention LIF recomputed from them), the figures read
back from their artists, the energy table and figure against the EnergyReport, and hooks
that never outlive a call."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from evformer.models import ConvBNLIF, LinearBNLIF, create_model, energy_report
from evformer.viz import (
    AttentionMaps,
    SpikeRecord,
    attention_figure,
    attention_maps,
    calibrate_batchnorm,
    energy_figure,
    energy_table,
    firing_rate_figure,
    record_spikes,
    spike_raster_figure,
)

T, B, SIZE = 3, 2, 16
EMBED, HEADS = 32, 4


def _np_lif(z: np.ndarray, tau: float = 2.0, v_th: float = 1.0) -> np.ndarray:
    """Hard-reset LIF over axis 0, written out (decay_input, v_reset = 0)."""
    v = np.zeros_like(z[0])
    out = []
    for zt in z:
        h = v + (zt - v) / tau
        s = (h >= v_th).astype(np.float64)
        v = h * (1 - s)
        out.append(s)
    return np.stack(out)


def _drive(model: nn.Module, bias: float = 1.2) -> nn.Module:
    """BatchNorm shifts that make the neurons of an untrained model fire in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.bias.fill_(bias)
    return model


def _tiny(backend: str = "auto", dtype=torch.float32, **kw) -> nn.Module:
    torch.manual_seed(0)
    args = dict(embed_dim=EMBED, depth=2, num_heads=HEADS, T=T, img_size=SIZE, backend=backend)
    args.update(kw)
    return _drive(create_model("spikformer_cifar_4_384", **args).to(dtype))


def _images(dtype=torch.float32, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.rand(B, 3, h, w, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.fixture(scope="module")
def tiny():
    model, x = _tiny(), _images()
    return model, x, record_spikes(model, x)


# -- record_spikes ------------------------------------------------------------------------


def test_linear_unit_spikes_equal_a_numpy_forward():
    torch.manual_seed(0)
    unit = LinearBNLIF(6, 5).double()  # default backend: the fused kernel
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        unit.bn.running_mean.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        unit.bn.running_var.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
        unit.bn.weight.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
        unit.bn.bias.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
    x = 2 * torch.randn(4, 3, 7, 6, generator=g, dtype=torch.float64)  # [T, B, N, C]
    rec = record_spikes(unit, x)
    assert rec.names == ("LinearBNLIF",)
    W, b = unit.linear.weight.detach().numpy(), unit.linear.bias.detach().numpy()
    bn = unit.bn
    y = x.numpy() @ W.T + b
    z = (y - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps)
    z = z * bn.weight.detach().numpy() + bn.bias.detach().numpy()
    want = _np_lif(z)
    assert 0.1 < want.mean() < 0.9
    assert rec.spikes[0].dtype == np.uint8 and rec.spikes[0].shape == (4, 3, 7, 5)
    np.testing.assert_array_equal(rec.spikes[0], want)
    np.testing.assert_array_equal(rec.output.numpy(), want)


def test_pooling_conv_unit_records_the_pooled_spikes():
    torch.manual_seed(0)
    unit = _drive(ConvBNLIF(2, 3, pool=True), bias=1.0).double()
    g = torch.Generator().manual_seed(2)
    x = 2 * torch.rand(3, 1, 2, 6, 6, generator=g, dtype=torch.float64)  # [T, B, C, H, W]
    rec = record_spikes(unit, x)
    w = unit.conv.weight.detach().numpy()  # [3, 2, 3, 3]
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((3, 1, 3, 6, 6))
    for i in range(3):
        for j in range(3):  # 3x3 conv, stride 1, padding 1, tap by tap
            y += np.einsum("oc,tbchw->tbohw", w[:, :, i, j], xp[..., i : i + 6, j : j + 6])
    s = _np_lif(y * unit.bn.weight.detach().numpy()[:, None, None] / math.sqrt(1 + 1e-5) + 1.0)
    sp = np.pad(s, ((0, 0), (0, 0), (0, 0), (1, 1), (1, 1)))
    pooled = np.zeros((3, 1, 3, 3, 3))
    for r in range(3):
        for c in range(3):  # max-pool 3x3, stride 2, padding 1
            pooled[..., r, c] = sp[..., 2 * r : 2 * r + 3, 2 * c : 2 * c + 3].max(axis=(-1, -2))
    assert 0 < s.mean() < 1
    np.testing.assert_array_equal(rec["ConvBNLIF"], pooled)


def test_recorded_spikes_rebuild_the_features_that_feed_the_head(tiny):
    model, x, rec = tiny  # default (fused) path, float32
    assert model.training  # record_spikes ran it in eval mode and restored the flag
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x).numpy()  # [T, B, N, D]
        logits = model(x)
    model.train()
    r = {n: a.astype(np.float64) for n, a in zip(rec.names, rec.spikes)}
    stem = r["patch_embed.stages.3"] + r["patch_embed.rpe"]  # [T, B, D, h, w]
    tokens = stem.reshape(T, B, EMBED, -1).transpose(0, 1, 3, 2)  # [T, B, N, D]
    for i in range(2):  # residual stream: x + SSA(x), then + MLP(x)
        tokens = tokens + r[f"blocks.{i}.attn.proj"] + r[f"blocks.{i}.mlp.fc2"]
    np.testing.assert_array_equal(tokens, feats)
    torch.testing.assert_close(rec.output, logits)


def test_reference_fused_and_single_step_paths_record_the_same_spikes():
    x = _images(torch.float64)
    fused = _tiny("numba", torch.float64)
    ref = _tiny("torch", torch.float64)
    ref.load_state_dict(fused.state_dict())
    a, b = record_spikes(fused, x), record_spikes(ref, x)
    ref.step_mode = "s"  # one call per time step, concatenated along T
    c = record_spikes(ref, x)
    assert a.names == b.names == c.names
    assert "blocks.1.attn.attn_lif" in a.names and len(a.names) == 15  # no LIFNode twice
    for n, sa, sb, sc in zip(a.names, a.spikes, b.spikes, c.spikes):
        np.testing.assert_array_equal(sa, sb, err_msg=n)
        np.testing.assert_array_equal(sa, sc, err_msg=n)


def test_layer_patterns_select_layers(tiny):
    model, x, rec = tiny
    sub = record_spikes(model, x, layers=["blocks.*.mlp.*", "patch_embed.rpe"])
    assert sub.names == (
        "patch_embed.rpe",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    )
    np.testing.assert_array_equal(sub["blocks.1.mlp.fc1"], rec["blocks.1.mlp.fc1"])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_afterwards_and_after_an_exception(tiny):
    model, x, _ = tiny
    before = _hook_count(model)
    record_spikes(model, x)
    attention_maps(model, x)
    assert _hook_count(model) == before

    def boom(module, args, out):
        raise RuntimeError("boom in block 1")

    own = model.blocks[1].register_forward_hook(boom)
    try:
        n = _hook_count(model)
        with pytest.raises(RuntimeError, match="boom"):
            record_spikes(model, x)
        with pytest.raises(RuntimeError, match="boom"):
            attention_maps(model, x, block=1)
        assert _hook_count(model) == n
        assert model.training
    finally:
        own.remove()
    assert _hook_count(model) == before


def test_calibrate_batchnorm_sets_the_batch_statistics_and_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(LinearBNLIF(6, 5), LinearBNLIF(5, 4)).double()
    model[1].bn.momentum = 0.3
    x = 3 * torch.randn(4, 3, 7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    calibrate_batchnorm(model, x)
    assert not model.training and model[0].bn.momentum == 0.1 and model[1].bn.momentum == 0.3
    lin = model[0].linear
    y = x.numpy() @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
    y = y.reshape(-1, 5)  # the first BatchNorm's input, every (T, B, N) row
    np.testing.assert_allclose(model[0].bn.running_mean.numpy(), y.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(model[0].bn.running_var.numpy(), y.var(axis=0, ddof=1), rtol=1e-10)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if "num_batches" not in k)
    assert model[1].bn.running_var.sum() > 0 and not torch.equal(
        model[1].bn.running_var, torch.ones(4, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="model: Linear has no BatchNorm"):
        calibrate_batchnorm(nn.Linear(2, 2), torch.zeros(1, 2))


# -- firing rates and their figures --------------------------------------------------------


def test_firing_rates_equal_a_numpy_mean(tiny):
    _, _, rec = tiny
    rates = rec.firing_rates()
    assert rates.shape == (len(rec.names), T)
    for i, a in enumerate(rec.spikes):
        per_neuron = a.reshape(T, -1).astype(np.float64)  # [T, B * neurons]
        np.testing.assert_allclose(rates[i], per_neuron.sum(1) / per_neuron.shape[1])
        np.testing.assert_allclose(rec.firing_rates(sample=1)[i], a[:, 1].reshape(T, -1).mean(1))
    assert 0.05 < rates.mean() < 0.6


def test_firing_rate_figure_shows_the_rates(tiny):
    _, _, rec = tiny
    other = SpikeRecord(rec.names, tuple(np.zeros_like(a) for a in rec.spikes))
    fig = firing_rate_figure({"driven": rec, "silent": other})
    assert isinstance(fig, Figure)
    heat = [ax for ax in fig.axes if ax.images]
    assert len(heat) == 2
    np.testing.assert_allclose(heat[0].images[0].get_array(), rec.firing_rates())
    assert not np.asarray(heat[1].images[0].get_array()).any()
    assert [t.get_text() for t in heat[0].get_yticklabels()] == list(rec.names)
    prof = fig.axes[2]
    np.testing.assert_allclose(prof.lines[0].get_xdata(), rec.firing_rates().mean(axis=1))
    np.testing.assert_allclose(prof.lines[1].get_xdata(), 0.0)
    one = firing_rate_figure(rec, sample=0)
    np.testing.assert_allclose(one.axes[0].images[0].get_array(), rec.firing_rates(sample=0))


def test_spike_raster_figure_plots_exactly_the_chosen_neurons_spikes(tiny):
    _, _, rec = tiny
    layer = "blocks.0.mlp.fc1"
    a = rec[layer][:, 1].reshape(T, -1)  # sample 1, [T, M]
    idx = [5, 0, 77, 300]
    fig = spike_raster_figure(rec, layer, neurons=idx, sample=1)
    got = fig.axes[1].collections[0].get_offsets()
    want = sorted((t, row) for row, j in enumerate(idx) for t in range(T) if a[t, j])
    assert want and sorted(map(tuple, np.asarray(got).tolist())) == want
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, a.mean(axis=1))
    # a count: evenly spaced without a generator, a reproducible random subset with one
    fig = spike_raster_figure(rec, layer, neurons=8)
    assert [int(t.get_text()) for t in fig.axes[1].get_yticklabels()] == list(
        np.round(np.linspace(0, a.shape[1] - 1, 8)).astype(int)
    )
    f1 = spike_raster_figure(rec, 3, neurons=16, rng=np.random.default_rng(7))
    f2 = spike_raster_figure(rec, 3, neurons=16, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(
        f1.axes[1].collections[0].get_offsets(), f2.axes[1].collections[0].get_offsets()
    )


# -- attention -----------------------------------------------------------------------------


def test_attention_maps_equal_q_k_transpose_of_the_recorded_spikes():
    x = _images(torch.float64, w=24)  # a 4 x 6 token grid: rows and columns cannot swap
    model = _tiny("numba", torch.float64)
    rec = record_spikes(model, x)
    maps = attention_maps(model, x, block=1)
    assert maps.name == "blocks.1.attn" and maps.grid == (4, 6)
    assert maps.scale == 0.125 and maps.head_dim == EMBED // HEADS
    qkv = rec["blocks.1.attn.qkv"].astype(np.float64)  # [T, B, N, 3D], q | k | v head-major
    N, d, D = 24, EMBED // HEADS, EMBED
    assert maps.maps.shape == (T, B, HEADS, N, N)
    h = 2
    q, k = qkv[..., h * d : (h + 1) * d], qkv[..., D + h * d : D + (h + 1) * d]
    hand = np.zeros((T, B, N, N))
    for t in range(T):
        for b in range(B):
            for i in range(N):
                for j in range(N):
                    hand[t, b, i, j] = sum(q[t, b, i, c] * k[t, b, j, c] for c in range(d))
    assert hand.max() > 0
    np.testing.assert_array_equal(maps.maps[:, :, h], hand)
    # the attention LIF recomputed from these Q K^T and V gives the recorded attention spikes
    v = qkv[..., 2 * D :].reshape(T, B, N, HEADS, d)
    y = np.einsum("tbhij,tbjhc->tbihc", maps.maps, v).reshape(T, B, N, D)
    np.testing.assert_array_equal(_np_lif(maps.scale * y, v_th=0.5), rec["blocks.1.attn.attn_lif"])


def test_attention_figure_shows_the_maps():
    maps = AttentionMaps(
        "attn",
        np.random.default_rng(0).integers(0, 5, size=(3, 2, 3, 6, 6)).astype(float),
        0.25,
        4,
        (2, 3),
    )
    fig = attention_figure(maps, sample=1)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    for h, ax in enumerate(panels):
        np.testing.assert_allclose(ax.images[0].get_array(), maps.maps[:, 1, h].mean(axis=0))
    fig = attention_figure(maps, time=2, token=4, heads=[1], scaled=True)
    (ax,) = [ax for ax in fig.axes if ax.images]
    np.testing.assert_allclose(ax.images[0].get_array(), 0.25 * maps.maps[2, 0, 1, 4].reshape(2, 3))
    assert (ax.lines[0].get_xdata()[0], ax.lines[0].get_ydata()[0]) == (1, 1)  # token 4 -> (1, 1)
    fig = attention_figure(maps, token=4, direction="to")
    got = [ax for ax in fig.axes if ax.images][0].images[0].get_array()
    np.testing.assert_allclose(got, maps.maps[:, 0, 0, :, 4].mean(axis=0).reshape(2, 3))


# -- energy --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tiny):
    model, x, _ = tiny
    return energy_report(model, x)


def test_energy_table_rows_and_totals_match_the_report(report):
    rows = energy_table(report)
    assert len(rows) == len(report.layers) + 1 and rows[-1]["layer"] == "total"
    for row, layer in zip(rows, report.layers):
        assert row["layer"] == layer.name and row["sops"] == layer.sops
        assert row["energy_ac_uj"] == pytest.approx(layer.sops * 0.9e-6)
        assert row["energy_mac_uj"] == pytest.approx(layer.mac_ops * 4.6e-6)
        assert row["energy_uj"] == pytest.approx(row["energy_ac_uj"] + row["energy_mac_uj"])
    layers = rows[:-1]
    assert sum(r["energy_uj"] for r in layers) == pytest.approx(report.energy_mj * 1e3)
    assert rows[-1]["energy_uj"] == pytest.approx(report.energy_mj * 1e3)
    assert rows[-1]["sops"] == pytest.approx(sum(r["sops"] for r in layers))
    assert rows[-1]["mac_ops"] == pytest.approx(report.total_mac_ops)
    assert len(energy_table(report, total=False)) == len(report.layers)


def test_energy_figure_bars_are_the_report_numbers(report):
    fig = energy_figure(report)
    ax, ax_rate = fig.axes[:2]
    ac, mac = ax.containers[0], ax.containers[1]
    np.testing.assert_allclose(
        [p.get_width() for p in ac], [r.sops * 0.9e-6 for r in report.layers]
    )
    np.testing.assert_allclose(
        [p.get_width() for p in mac], [r.mac_ops * 4.6e-6 for r in report.layers]
    )
    np.testing.assert_allclose([p.get_x() for p in mac], [p.get_width() for p in ac])  # stacked
    np.testing.assert_allclose(
        [p.get_width() for p in ax_rate.patches], [r.rate for r in report.layers]
    )
    first = report.layers[0]  # the conv on real-valued images: MACs only
    assert first.sops == 0 and mac[0].get_width() > 0 and ac[0].get_width() == 0
    assert [t.get_text() for t in ax.get_yticklabels()] == [r.name for r in report.layers]


# -- bad arguments -------------------------------------------------------------------------


def test_bad_arguments_raise_naming_the_argument(tiny, report):
    model, x, rec = tiny
    with pytest.raises(TypeError, match="model"):
        record_spikes("not a model", x)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        record_spikes(model, x.numpy())
    with pytest.raises(TypeError, match="layers"):
        record_spikes(model, x, layers=[3])
    with pytest.raises(ValueError, match="layer: 'nope' was not recorded"):
        spike_raster_figure(rec, "nope")
    with pytest.raises(ValueError, match="sample"):
        spike_raster_figure(rec, 0, sample=B)
    with pytest.raises(ValueError, match="neurons"):
        spike_raster_figure(rec, 0, neurons=0)
    with pytest.raises(ValueError, match="neurons"):
        spike_raster_figure(rec, 0, neurons=[10**9])
    with pytest.raises(TypeError, match="rng"):
        spike_raster_figure(rec, 0, rng=7)
    with pytest.raises(TypeError, match="record"):
        firing_rate_figure([rec])
    with pytest.raises(ValueError, match="sample"):
        rec.firing_rates(sample=-1)
    with pytest.raises(ValueError, match="block"):
        attention_maps(model, x, block=2)
    with pytest.raises(ValueError, match="block"):
        attention_maps(model, x, block="blocks.0.mlp")
    with pytest.raises(ValueError, match="model"):
        attention_maps(nn.Linear(2, 2), torch.zeros(1, 2))
    float_attn = create_model(
        "spikformer_cifar_4_384", embed_dim=16, depth=1, num_heads=2, T=1, attention="relu"
    )
    with pytest.raises(ValueError, match="block: 'blocks.0.attn' uses attention='relu'"):
        attention_maps(float_attn, torch.zeros(1, 3, 32, 32))
    maps = AttentionMaps("a", np.zeros((2, 1, 2, 5, 5)), 0.125, 4)
    with pytest.raises(ValueError, match="time"):
        attention_figure(maps, time=2)
    with pytest.raises(ValueError, match="heads"):
        attention_figure(maps, heads=[2])
    with pytest.raises(ValueError, match="direction"):
        attention_figure(maps, token=0, direction="both")
    with pytest.raises(ValueError, match="token: the token grid"):
        attention_figure(maps, token=0)  # N = 5 is not square and no grid is known
    with pytest.raises(TypeError, match="report"):
        energy_table(rec)
    with pytest.raises(TypeError, match="report"):
        energy_figure(None)
