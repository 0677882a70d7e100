"""Energy / operation counting against independent counts."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from evformer.models import SpikingSelfAttention, create_model, energy_report
from evformer.models.energy import EnergyReport, LayerEnergy


def _hook_counts(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(rate, dense MACs) per conv/linear from forward hooks on the reference path."""
    out = {}

    def hook(name):
        def fn(mod, inp, outp):
            (xi,) = inp
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                macs = outp.numel() * mod.in_channels * k
            else:
                macs = outp.numel() * mod.in_features
            out[name] = (float(xi.double().mean()), float(macs))

        return fn

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()
        model(x)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_layer_counts_match_hooks_and_paper_formula(backend):
    torch.manual_seed(0)
    model = create_model(
        "spikformer_cifar_4_384", embed_dim=32, depth=2, num_heads=4, T=3, img_size=16,
        backend=backend,
    )  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.bias.fill_(0.7)  # a drive that makes the neurons fire in eval mode
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    rep = energy_report(model, x)
    ref = create_model(
        "spikformer_cifar_4_384", embed_dim=32, depth=2, num_heads=4, T=3, img_size=16,
        backend="torch",
    )  # fmt: skip
    ref.load_state_dict(model.state_dict())
    hooks = _hook_counts(ref, x)
    rows = {r.name: r for r in rep.layers}
    assert rep.samples == 2
    for name, (rate, macs) in hooks.items():
        unit = name.rsplit(".", 1)[0] if name != "head" else name
        r = rows[unit]
        assert r.macs == pytest.approx(macs / 2)  # per sample
        assert r.rate == pytest.approx(rate, rel=1e-6)
        if name == "patch_embed.stages.0.conv":  # real image: MACs, counted once over T
            assert r.sops == 0 and r.mac_ops == pytest.approx(macs / 2 / 3)
        elif name == "head":
            assert r.sops == 0 and r.mac_ops == pytest.approx(macs / 2)
        else:  # spike-fed: SOPs = rate x MACs
            assert r.mac_ops == 0 and r.sops == pytest.approx(rate * macs / 2, rel=1e-6)
    assert 0 < rep.layers[1].rate < 1
    total = sum(r.sops for r in rep.layers) * 0.9e-9 + sum(r.mac_ops for r in rep.layers) * 4.6e-9
    assert rep.energy_mj == pytest.approx(total)
    assert "| total |" in rep.table()


def test_attention_products_count_exact_and_rate_operations():
    torch.manual_seed(0)
    layer = SpikingSelfAttention(16, num_heads=2, backend="torch")
    with torch.no_grad():
        layer.qkv.bn.bias.fill_(0.8)
    x = torch.randint(0, 2, (2, 1, 6, 16)).float()  # [T, B, N, D]; N = 6 < d = 8: (q k^T) v
    rep = energy_report(layer, x, batch_dim=1)
    rows = {r.name.split(" ", 1)[1]: r for r in rep.layers if "[" in r.name}
    with torch.no_grad():
        layer.eval()
        q, k, v = (t.view(2, 1, 6, 2, 8).transpose(2, 3) for t in layer.qkv(x).split(16, -1))
    # (q k^T): one accumulate per (i, j, c) with q_ic = k_jc = 1, counted by brute force
    brute = sum(
        int(q[t, 0, h, i, c]) * int(k[t, 0, h, j, c])
        for t, h, i, j, c in itertools.product(range(2), range(2), range(6), range(6), range(8))
    )
    assert brute > 0
    assert rows["[q k^T]"].sops == pytest.approx(brute)
    assert rows["[q k^T]"].macs == 2 * 2 * 6 * 8 * 6
    # (q k^T) v: integer attention map times spike v: rate(v) x MACs
    assert rows["[(q k^T) v]"].sops == pytest.approx(float(v.mean()) * 2 * 2 * 6 * 6 * 8)


def test_float_attention_variant_counts_macs():
    torch.manual_seed(0)
    layer = SpikingSelfAttention(16, num_heads=2, attention="vsa", backend="torch")
    rep = energy_report(layer, torch.randint(0, 2, (2, 1, 6, 16)).float(), batch_dim=1)
    first = next(r for r in rep.layers if "q k^T" in r.name)
    assert first.sops == 0 and first.mac_ops == first.macs > 0


def test_paper_constants():
    row = LayerEnergy("x", "linear", 0.1, 0.0, 3.15e9, 0.0, 0.0)
    rep = EnergyReport((row,), 1, 0.9, 4.6)
    assert rep.energy_sop_mj == pytest.approx(2.835)  # V2-8-512, T = 1 (Table II)
    with pytest.raises(ValueError, match="no samples"):
        energy_report(nn.Identity(), [])
