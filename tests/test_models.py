"""Spikformer V1/V2 models, layers and the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evformer.kernels.fused import kv_first_is_cheaper, ssa_product
from evformer.models import (
    SPS,
    Spikformer,
    SpikformerV2,
    SpikingSelfAttention,
    create_model,
    list_models,
    model_config,
)

# "official used" parameter counts of SPEC-models.md (never-used official parameters
# excluded) and the V2 counts the paper prints
EXPECTED_PARAMS = {
    "spikformer_8_384": 16.816e6,
    "spikformer_6_512": 23.373e6,
    "spikformer_8_512": 29.689e6,
    "spikformer_10_512": 36.005e6,
    "spikformer_8_768": 66.339e6,
    "spikformer_cifar_4_384": 9.325e6,
    "spikformer_cifar_4_256": 4.155e6,
    "spikformer_cifar_2_384": 5.765e6,
    "spikformer_cifar10dvs_2_256": 2.567e6,
    "spikformer_v2_8_384": 29.11e6,
    "spikformer_v2_8_512": 51.55e6,
    "spikformer_v2_12_512": 64.18e6,
    "spikformer_v2_12_768": 143.89e6,
    "spikformer_v2_16_768": 172.28e6,
}
REQUIRED = [
    "spikformer_8_384", "spikformer_6_512", "spikformer_8_512", "spikformer_10_512",
    "spikformer_8_768", "spikformer_cifar_4_384", "spikformer_cifar_4_256",
    "spikformer_cifar_2_384", "spikformer_cifar10dvs_2_256", "spikformer_gesture_2_256",
    "spikformer_v2_8_384", "spikformer_v2_8_512", "spikformer_v2_12_512",
    "spikformer_v2_12_768", "spikformer_v2_16_768",
]  # fmt: skip


def _count(name: str, **overrides) -> int:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def test_registry_has_the_paper_models():
    assert set(REQUIRED) <= set(list_models())
    assert list_models("spikformer_v2_*") == sorted(n for n in REQUIRED if "_v2_" in n)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_match_the_paper_within_0_1_percent(name):
    assert abs(_count(name) / EXPECTED_PARAMS[name] - 1) < 1e-3


def test_dataset_defaults_are_constructor_arguments():
    cifar, dvs = model_config("spikformer_cifar_4_384"), model_config("spikformer_cifar10dvs_2_256")
    gesture = model_config("spikformer_gesture_2_256")
    assert (cifar.num_classes, cifar.num_heads, cifar.qkv_bias) == (10, 12, True)
    assert cifar.pool_stages == (False, False, True, True) and cifar.patch_size == 4
    assert (dvs.in_channels, dvs.num_classes, dvs.num_heads, dvs.attn_scale) == (2, 10, 16, 0.25)
    assert (gesture.num_classes, gesture.num_heads, gesture.T) == (11, 8, 16)
    assert model_config("spikformer_8_512").patch_size == 16


def test_create_model_overrides():
    m = create_model("spikformer_cifar_2_384", num_classes=100, T=2, depth=None, embed_dim=None)
    assert m.config.num_classes == 100 and m.T == 2 and m.config.depth == 2
    assert m.config.embed_dim == 384  # None overrides are ignored
    with pytest.raises(ValueError, match="unknown override"):
        create_model("spikformer_cifar_2_384", dept=3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("spikformer_9_999")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_model("spikformer_8_384", num_heads=5)
    with pytest.raises(ValueError, match="attention must be one of"):
        create_model("spikformer_8_384", attention="linear")


def _tiny(name: str, **extra):
    """A small variant of a registered model: same structure, small width/depth/size."""
    cfg = model_config(name)
    size = 2 * cfg.patch_size
    kw = dict(embed_dim=32, depth=1, num_heads=4, T=2, img_size=size)
    kw.update(extra)
    return create_model(name, **kw), size


def _input(model, size, batch=2, seed=0, events=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    C = model.config.in_channels
    if events:
        return torch.poisson(
            torch.full((batch, model.T, C, size, size), 0.8, dtype=dtype), generator=g
        )
    return 2 * torch.rand(batch, C, size, size, generator=g, dtype=dtype)


def _mae_contract(name: str) -> None:
    """A masked autoencoder's own contract: ``loss, pred, mask = model(x, generator=g)``."""
    model, size = _tiny(name, num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = _input(model, size)
    model.train()
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    p, C = model.patch_size, model.config.in_channels
    L = (size // p) ** 2
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert pred.shape == (2, L, p * p * C) and torch.isfinite(pred).all()
    assert mask.shape == (2, L) and set(mask.unique().tolist()) == {0.0, 1.0}
    loss.backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()
    ]
    assert not no_grad, f"parameters without a gradient: {no_grad}"


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward_and_step_modes(name):
    torch.manual_seed(0)
    if name.startswith("mae_"):
        return _mae_contract(name)
    model, size = _tiny(name)
    events = model.config.in_channels == 2
    x = _input(model, size, events=events)
    model.train()
    out = model(x)
    assert out.shape == (2, model.config.num_classes)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()
    ]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    # single-step loop (state carried across steps) == multi-step, with running statistics
    model.eval()
    model.zero_grad()
    m_out = model(x)
    m_out.square().sum().backward()
    m_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.step_mode = "s"
    s_out = model(x)
    torch.testing.assert_close(s_out, m_out, rtol=1e-5, atol=1e-6)
    s_out.square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, m_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("spikformer_cifar_4_384", {}),
        ("spikformer_8_384", {"residual": "iand"}),
        ("spikformer_v2_8_384", {}),
        ("spikformer_v2_8_384", {"residual": "iand"}),
        ("spikformer_cifar10dvs_2_256", {"depth": 2}),
    ],
)
def test_fused_backend_equals_reference_backend(name, extra):
    """Numba fused path vs plain-autograd reference, float64, training then eval."""
    torch.manual_seed(0)
    ref, size = _tiny(name, backend="torch", **extra)
    fused, _ = _tiny(name, backend="numba", **extra)
    ref, fused = ref.double(), fused.double()
    fused.load_state_dict(ref.state_dict())
    x = _input(ref, size, events=ref.config.in_channels == 2, dtype=torch.float64)
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        a, b = ref(x), fused(x)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        a.square().sum().backward()
        b.square().sum().backward()
        scale = max(float(p.grad.abs().max()) for p in ref.parameters())
        for (n, pa), pb in zip(ref.named_parameters(), fused.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-8, atol=1e-12 * scale, msg=n)
            pa.grad = pb.grad = None
        for (n, ba), bb in zip(ref.named_buffers(), fused.buffers()):
            torch.testing.assert_close(bb, ba, msg=n)


def test_inputs_time_steps_sizes_and_dtypes():
    torch.manual_seed(0)
    model, size = _tiny("spikformer_cifar10dvs_2_256")  # patch 16
    model.eval()
    ev = _input(model, size, events=True)  # [B, T, 2, H, W]
    assert model(ev).shape == (2, 10)
    # event input brings its own T; the model's T applies to static input
    ev5 = torch.cat([ev, ev], dim=1)
    assert model.forward_features(ev5).shape[0] == 4
    model.T = 3
    assert model.forward_features(ev[:, 0]).shape == (3, 2, 4, 32)
    # any size divisible by the patch size, non-square too
    x = torch.rand(1, 2, 48, 80)
    assert model.forward_features(x).shape == (3, 1, 15, 32)
    # float64 end to end
    assert model.double()(x.double()).dtype == torch.float64
    assert model.forward_head(model.forward_features(x.double()), pre_logits=True).shape == (1, 32)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        model(torch.rand(1, 2, 40, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="has 3 channels"):
        model(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expects \[B, C, H, W\]"):
        model(torch.rand(2, 32, 32, dtype=torch.float64))


def test_static_input_is_repeated_over_T():
    torch.manual_seed(0)
    model, size = _tiny("spikformer_cifar_4_384", T=3)
    model.eval()
    x = _input(model, size)
    seq = x.unsqueeze(1).expand(2, 3, *x.shape[1:])
    torch.testing.assert_close(model(x), model(seq))


def test_train_at_T1_evaluate_at_T4():
    torch.manual_seed(0)
    model, size = _tiny("spikformer_8_384", T=1)
    x = _input(model, size)
    model(x).sum().backward()
    model.eval()
    model.T = 4
    with torch.no_grad():
        feats = model.forward_features(x)
    assert feats.shape[0] == 4
    # T = 1 features are the first step of the T = 4 run (causal dynamics, eval-mode BN)
    model.T = 1
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[0], feats[0])


def test_ssa_product_orders_agree_and_cheaper_is_chosen():
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.rand(2, 3, 4, 20, 8, generator=g) > 0.7).double() for _ in range(3))
    torch.testing.assert_close(ssa_product(q, k, v, True), ssa_product(q, k, v, False))
    assert kv_first_is_cheaper(64, 32) and not kv_first_is_cheaper(16, 32)


@pytest.mark.parametrize("attention", ["identity", "relu", "leaky_relu", "softmax", "vsa", "ssa"])
def test_attention_variants_follow_their_definitions(attention):
    torch.manual_seed(0)
    layer = SpikingSelfAttention(16, num_heads=2, attention=attention, backend="torch").double()
    layer.eval()
    x = torch.randint(0, 2, (2, 3, 5, 16)).double()
    got = layer(x)
    # recompute from the definition with the layer's own weights
    qf, kf, vf = layer.qkv.pre_activation(x).split(16, dim=-1)
    lif = layer.qkv.lif

    def heads(t):
        return t.view(2, 3, 5, 2, 8).transpose(2, 3)

    if attention == "ssa":
        q, k, v = heads(lif(qf)), heads(lif(kf)), heads(lif(vf))
        y = (q @ k.transpose(-2, -1) @ v) * 0.125
    elif attention in ("softmax", "vsa"):
        v = heads(vf if attention == "vsa" else lif(vf))
        a = torch.softmax(heads(qf) @ heads(kf).transpose(-2, -1) / 8**0.5, dim=-1)
        y = a @ v
    else:
        f = {
            "identity": lambda t: t,
            "relu": torch.relu,
            "leaky_relu": torch.nn.functional.leaky_relu,
        }[attention]
        y = (f(heads(qf)) @ f(heads(kf)).transpose(-2, -1) @ heads(lif(vf))) * 0.125
    want = layer.proj(layer.attn_lif(y.transpose(2, 3).reshape(2, 3, 5, 16)))
    torch.testing.assert_close(got, want)


def test_iand_keeps_v2_signals_binary_and_add_counts():
    torch.manual_seed(0)
    for residual, binary in (("iand", True), ("add", False)):
        model, size = _tiny("spikformer_v2_8_384", residual=residual, depth=2)
        x = _input(model, size)
        tokens = model.forward_features(x)
        values = set(tokens.unique().tolist())
        assert values <= {0.0, 1.0} if binary else max(values) >= 2.0


def test_sps_pool_stages_set_the_patch_size_and_token_layout():
    sps = SPS(in_channels=3, embed_dim=32, pool_stages=(False, True, False, True))
    assert sps.patch_size == 4
    assert [s.conv.out_channels for s in sps.stages] == [4, 8, 16, 32]
    tok = sps(torch.rand(2, 1, 3, 12, 20))
    assert tok.shape == (2, 1, 15, 32)


def test_v2_stem_structure():
    m = SpikformerV2(embed_dim=64, depth=1, num_heads=2, img_size=32, num_classes=3)
    stage = m.patch_embed.stages[1]
    assert stage.down.conv.kernel_size == (2, 2) and stage.down.conv.stride == (2, 2)
    assert (stage.fc1.conv.in_channels, stage.fc1.conv.out_channels) == (16, 64)
    assert all(mod.bias is None for mod in m.patch_embed.modules() if isinstance(mod, nn.Conv2d))
    assert isinstance(Spikformer(embed_dim=64, depth=1, num_heads=2).patch_embed, SPS)


def test_fused_path_under_autocast_keeps_float32_state():
    """Under autocast the products run in bfloat16 while BN/LIF and gradients stay float32."""
    torch.manual_seed(0)
    model, size = _tiny("spikformer_cifar_4_384", backend="numba", depth=2)
    x = _input(model, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
    # spikes feed the next layer in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.forward_features(x)
    assert tokens.dtype == torch.float32
    assert torch.equal(tokens, tokens.round()) and tokens.min() >= 0  # spike counts
