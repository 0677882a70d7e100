"""Layer-wise lr decay for fine-tuning (SPEC-ssl.md "Layer-wise decay (MAE)", invariant 11):
the groups of :func:`evformer.engine.optim.param_groups` on tiny Spikformer V1 and V2
classifiers, checked parameter by parameter (by identity) against the MAE rule
``scale = decay ** (L + 1 - layer_id)``: stem layer 0, block k layer k + 1, head L + 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evformer.engine.optim import build_optimizer, count_layers, param_groups
from evformer.models import create_model

DECAY = 0.7
DEPTH = 3


def _tiny(name: str) -> nn.Module:
    kw = dict(img_size=32, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=5)
    if name.startswith("spikformer_v2"):
        kw.update(stem_stages=2)
    return create_model(name, **kw)


MODELS = ["spikformer_v2_8_384", "spikformer_cifar_4_384"]


def _expected_scale(name: str) -> float:
    """The MAE rule written out independently of optim.py's regexes."""
    if name.startswith("head."):
        return 1.0
    if name.startswith("blocks."):
        k = int(name.split(".")[1])
        return DECAY ** (DEPTH - k)
    assert name.startswith("patch_embed."), name  # nothing else holds parameters
    return DECAY ** (DEPTH + 1)


def _owner(groups: list[dict]) -> dict[int, dict]:
    """id(param) -> its group, failing on a parameter listed twice."""
    owner: dict[int, dict] = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for p in g["params"]:
            assert id(p) not in owner, "a parameter sits in two groups (or twice in one)"
            owner[id(p)] = g
    return owner


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_in_exactly_one_group(name):
    model = _tiny(name)
    groups = param_groups(model, weight_decay=0.05, layer_decay=DECAY)
    owner = _owner(groups)
    params = dict(model.named_parameters())
    assert set(owner) == {id(p) for p in params.values()}  # none missing, none foreign
    # the recorded names point at the very tensors they name
    for g in groups:
        for n, p in zip(g["param_names"], g["params"]):
            assert params[n] is p


@pytest.mark.parametrize("name", MODELS)
def test_scales_stem_smallest_block_k_and_head_at_one(name):
    model = _tiny(name)
    assert count_layers(model) == DEPTH
    owner = _owner(param_groups(model, weight_decay=0.05, layer_decay=DECAY))
    seen = {"patch_embed": 0, "blocks": 0, "head": 0}
    for n, p in model.named_parameters():
        g = owner[id(p)]
        assert g["lr_scale"] == pytest.approx(_expected_scale(n), rel=1e-12), n
        seen[n.split(".")[0]] += 1
    assert all(seen.values()), seen  # the model really has stem, block and head parameters
    scales = [g["lr_scale"] for g in owner.values()]
    stem = [owner[id(p)]["lr_scale"] for n, p in model.named_parameters() if "patch_embed" in n]
    assert min(scales) == pytest.approx(DECAY ** (DEPTH + 1)) and set(stem) == {min(scales)}
    assert max(scales) == 1.0
    assert {owner[id(model.head.weight)]["lr_scale"], owner[id(model.head.bias)]["lr_scale"]} == {
        1.0
    }
    # scales strictly increase with depth: block k+1 trains faster than block k
    per_block = [owner[id(next(model.blocks[k].parameters()))]["lr_scale"] for k in range(DEPTH)]
    assert per_block == sorted(per_block) and len(set(per_block)) == DEPTH


@pytest.mark.parametrize("name", MODELS)
def test_one_dim_params_and_biases_get_no_weight_decay(name):
    model = _tiny(name)
    owner = _owner(param_groups(model, weight_decay=0.05, layer_decay=DECAY))
    for n, p in model.named_parameters():
        want = 0.0 if (p.ndim <= 1 or n.endswith(".bias")) else 0.05
        assert owner[id(p)]["weight_decay"] == want, n
    # both kinds occur at every level, so the split is really exercised
    wds = {(g["layer_id"], g["weight_decay"]) for g in owner.values()}
    for layer in range(DEPTH + 2):
        assert (layer, 0.0) in wds and (layer, 0.05) in wds, (layer, wds)


@pytest.mark.parametrize("name", MODELS)
def test_without_layer_decay_every_scale_is_one(name):
    model = _tiny(name)
    groups = param_groups(model, weight_decay=0.05)
    assert len(_owner(groups)) == len(list(model.parameters()))
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_frozen_parameters_are_left_out():
    model = _tiny("spikformer_v2_8_384")
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    owner = _owner(param_groups(model, weight_decay=0.05, layer_decay=DECAY))
    assert set(owner) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in owner for p in model.patch_embed.parameters())


def test_ddp_prefix_and_pretrained_encoder_keep_the_same_groups():
    """A DDP-style ``module.`` prefix does not move the head or the blocks, and an encoder
    initialised from a masked-pretraining checkpoint (``encoder_state_dict``) gets the same
    grouping as a fresh one (loading changes values, never names)."""
    model = _tiny("spikformer_v2_8_384")
    mae = create_model(
        "mae_spikformer_v2_8_384",
        img_size=32,
        embed_dim=32,
        depth=DEPTH,
        num_heads=2,
        stem_stages=2,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    missing, unexpected = model.load_state_dict(mae.encoder_state_dict(), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    plain = _owner(param_groups(model, weight_decay=0.05, layer_decay=DECAY))
    wrapped = _owner(param_groups(Wrapper(model), weight_decay=0.05, layer_decay=DECAY))
    assert set(plain) == set(wrapped)
    for pid, g in plain.items():
        assert wrapped[pid]["lr_scale"] == g["lr_scale"]
        assert wrapped[pid]["weight_decay"] == g["weight_decay"]


def test_build_optimizer_starts_each_group_at_lr_times_scale():
    model = _tiny("spikformer_cifar_4_384")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=DECAY)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    owner = _owner(opt.param_groups)
    assert owner[id(model.head.weight)]["lr"] == pytest.approx(1e-3)
    stem_w = model.patch_embed.stages[0].conv.weight
    assert owner[id(stem_w)]["lr"] == pytest.approx(1e-3 * DECAY ** (DEPTH + 1))
