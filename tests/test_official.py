"""load_official_checkpoint against independent re-implementations of the official files.

The ``Official*`` modules below re-implement the structure of the three official model files
(ZK-Zhou/spikformer: imagenet/model.py, cifar10/model.py, cifar10dvs/model.py) with their
exact state-dict key names, layouts and product orders, on spikingjelly's multi-step LIF (the
neuron the official code uses). They generalise only the official hard-coded 128x128
reshapes to any size. Their keys are checked against tests/data/official_*_keys.txt at the
full configuration; then random official weights are loaded into evformer and outputs,
BatchNorm running statistics and gradients must agree (float64, so no spike sits on a
rounding boundary).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate
from torch import nn

from evformer.models import create_model, load_official_checkpoint
from evformer.models.official import convert_official_state_dict, detect_official_file

# Key names and shapes of the official files (copied from ../shared/reference/ so the test
# never depends on a checkout layout).
REFERENCE = pathlib.Path(__file__).resolve().parent / "data"


def _lif(v_threshold: float = 1.0) -> nn.Module:
    return sj_neuron.LIFNode(
        tau=2.0,
        v_threshold=v_threshold,
        detach_reset=True,
        step_mode="m",
        surrogate_function=sj_surrogate.Sigmoid(alpha=4.0),
    )


class OfficialSPS(nn.Module):
    def __init__(self, in_channels, dim, pools):
        super().__init__()
        chans = [dim // 8, dim // 4, dim // 2, dim]
        cin = in_channels
        for s, c in zip(("", "1", "2", "3"), chans):
            setattr(self, f"proj_conv{s}", nn.Conv2d(cin, c, 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{s}", nn.BatchNorm2d(c))
            setattr(self, f"proj_lif{s}", _lif())
            cin = c
        self.rpe_conv = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(dim)
        self.rpe_lif = _lif()
        self.pools = pools

    def forward(self, x):  # [T, B, C, H, W] -> [T, B, D, H', W']
        T, B = x.shape[:2]
        x = x.flatten(0, 1)
        for i, s in enumerate(("", "1", "2", "3")):
            x = getattr(self, f"proj_bn{s}")(getattr(self, f"proj_conv{s}")(x))
            x = getattr(self, f"proj_lif{s}")(x.reshape(T, B, *x.shape[1:])).flatten(0, 1)
            if self.pools[i]:
                x = F.max_pool2d(x, 3, 2, 1)
        r = self.rpe_bn(self.rpe_conv(x))
        r = self.rpe_lif(r.reshape(T, B, *r.shape[1:])).flatten(0, 1)
        return (x + r).reshape(T, B, *x.shape[1:])


class OfficialSSA(nn.Module):
    """style "imagenet"/"dvs": Conv1d on [T, B, C, N]; "cifar": Linear on [T, B, N, C]."""

    def __init__(self, dim, heads, style):
        super().__init__()
        self.style, self.heads = style, heads
        self.scale = 0.25 if style == "dvs" else 0.125
        for n in "qkv":
            if style == "cifar":
                setattr(self, f"{n}_linear", nn.Linear(dim, dim))
            else:
                setattr(self, f"{n}_conv", nn.Conv1d(dim, dim, 1, bias=False))
            setattr(self, f"{n}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{n}_lif", _lif())
        self.attn_lif = _lif(0.5)
        if style == "cifar":
            self.proj_linear = nn.Linear(dim, dim)
        else:
            self.proj_conv = nn.Conv1d(dim, dim, 1)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = _lif()

    def _project(self, name, x, T, B):
        if self.style == "cifar":  # x [TB, N, C]
            y = getattr(self, f"{name}_linear")(x)
            y = getattr(self, f"{name}_bn")(y.transpose(-1, -2)).transpose(-1, -2)
            return getattr(self, f"{name}_lif")(y.reshape(T, B, *y.shape[1:]))  # [T, B, N, C]
        y = getattr(self, f"{name}_bn")(getattr(self, f"{name}_conv")(x))  # [TB, C, N]
        return getattr(self, f"{name}_lif")(y.reshape(T, B, *y.shape[1:]))  # [T, B, C, N]

    def forward(self, x):
        T, B = x.shape[:2]
        h = self.heads
        qkv = [self._project(n, x.flatten(0, 1), T, B) for n in "qkv"]
        if self.style == "cifar":
            N, C = qkv[0].shape[2:]
            q, k, v = (t.reshape(T, B, N, h, C // h).permute(0, 1, 3, 2, 4) for t in qkv)
            y = ((q @ k.transpose(-2, -1)) * self.scale) @ v
            y = self.attn_lif(y.transpose(2, 3).reshape(T, B, N, C))
            return self._project("proj", y.flatten(0, 1), T, B)
        C, N = qkv[0].shape[2:]
        q, k, v = (
            t.transpose(-1, -2).reshape(T, B, N, h, C // h).permute(0, 1, 3, 2, 4) for t in qkv
        )
        if self.style == "imagenet":
            y = (q @ (k.transpose(-2, -1) @ v)) * self.scale
        else:
            y = ((q @ k.transpose(-2, -1)) @ v) * self.scale
        y = self.attn_lif(y.transpose(3, 4).reshape(T, B, C, N))
        return self._project("proj", y.flatten(0, 1), T, B)


class OfficialMLP(nn.Module):
    def __init__(self, dim, style):
        super().__init__()
        self.style = style
        for n, (i, o) in (("fc1", (dim, 4 * dim)), ("fc2", (4 * dim, dim))):
            if style == "cifar":
                setattr(self, f"{n}_linear", nn.Linear(i, o))
                setattr(self, f"{n}_bn", nn.BatchNorm1d(o))
            elif style == "imagenet":
                setattr(self, f"{n}_conv", nn.Conv2d(i, o, 1))
                setattr(self, f"{n}_bn", nn.BatchNorm2d(o))
            else:
                setattr(self, f"{n}_conv", nn.Conv1d(i, o, 1))
                setattr(self, f"{n}_bn", nn.BatchNorm1d(o))
            setattr(self, f"{n}_lif", _lif())

    def forward(self, x):
        T, B = x.shape[:2]
        for n in ("fc1", "fc2"):
            x = x.flatten(0, 1)
            if self.style == "cifar":
                y = getattr(self, f"{n}_linear")(x)
                y = getattr(self, f"{n}_bn")(y.transpose(-1, -2)).transpose(-1, -2)
            else:
                y = getattr(self, f"{n}_bn")(getattr(self, f"{n}_conv")(x))
            x = getattr(self, f"{n}_lif")(y.reshape(T, B, *y.shape[1:]))
        return x


class OfficialBlock(nn.Module):
    def __init__(self, dim, heads, style):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # created but never used, as in the official files
        self.attn = OfficialSSA(dim, heads, style)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = OfficialMLP(dim, style)
        self.style = style

    def forward(self, x):
        if self.style == "imagenet":  # blocks see [T, B, C, H, W]; SSA works on [T, B, C, N]
            T, B, C, H, W = x.shape
            x = x + self.attn(x.flatten(3)).reshape(T, B, C, H, W)
        else:
            x = x + self.attn(x)
        return x + self.mlp(x)


class OfficialSpikformer(nn.Module):
    def __init__(self, style, *, in_channels, dim, depth, heads, classes, T, num_patches):
        super().__init__()
        self.style, self.T = style, T
        pools = (False, False, True, True) if style == "cifar" else (True,) * 4
        if style == "dvs":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))  # never used
        self.patch_embed = OfficialSPS(in_channels, dim, pools)
        self.block = nn.ModuleList(OfficialBlock(dim, heads, style) for _ in range(depth))
        if style == "dvs":
            self.norm = nn.LayerNorm(dim)  # never used
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        if self.style == "dvs":
            x = x.permute(1, 0, 2, 3, 4)  # [B, T, C, H, W] -> [T, B, C, H, W]
        else:
            x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        x = self.patch_embed(x)  # [T, B, D, H', W']
        if self.style == "cifar":
            x = x.flatten(-2).transpose(-1, -2)  # [T, B, N, D]
        elif self.style == "dvs":
            x = x.flatten(-2)  # [T, B, D, N]
        for blk in self.block:
            x = blk(x)
        if self.style == "cifar":
            feats = x.mean(2)
        else:
            feats = x.flatten(3).mean(3)
        return self.head(feats.mean(0))


FULL = {
    "imagenet": dict(in_channels=3, dim=384, depth=8, heads=8, classes=1000, T=4, num_patches=196),
    "cifar": dict(in_channels=3, dim=384, depth=4, heads=12, classes=10, T=4, num_patches=64),
    "dvs": dict(in_channels=2, dim=256, depth=2, heads=16, classes=10, T=16, num_patches=64),
}
KEYFILES = {
    "imagenet": "official_imagenet_8_384_keys.txt",
    "cifar": "official_cifar10_4_384_keys.txt",
    "dvs": "official_cifar10dvs_2_256_keys.txt",
}


def _read_keys(name):
    out = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.mark.parametrize("style", ["imagenet", "cifar", "dvs"])
def test_reference_modules_have_the_official_keys(style):
    with torch.device("meta"):
        ref = OfficialSpikformer(style, **FULL[style])
    got = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert got == _read_keys(KEYFILES[style])
    assert detect_official_file(ref.state_dict()) == {"dvs": "cifar10dvs"}.get(style, style)


SMALL = {
    # (evformer registry name, official kwargs, input shape)
    "imagenet": (
        "spikformer_8_384",
        dict(in_channels=3, dim=32, depth=2, heads=4, classes=7, T=2, num_patches=4),
        (3, 3, 32, 32),
    ),
    "cifar": (
        "spikformer_cifar_4_384",
        dict(in_channels=3, dim=32, depth=2, heads=4, classes=5, T=2, num_patches=16),
        (3, 3, 16, 16),
    ),
    "dvs": (
        "spikformer_cifar10dvs_2_256",
        dict(in_channels=2, dim=32, depth=2, heads=4, classes=6, T=3, num_patches=4),
        (2, 3, 2, 32, 32),
    ),
}


def _randomise(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BatchNorm affine maps and running statistics (so eval mode is tested)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                m.weight.copy_(0.5 + torch.rand(C, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.3 * torch.randn(C, generator=g, dtype=m.weight.dtype))
                m.running_mean.copy_(0.1 * torch.randn(C, generator=g, dtype=m.weight.dtype))
                m.running_var.copy_(0.5 + torch.rand(C, generator=g, dtype=m.weight.dtype))
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def _grads_as_state_dict(ref: nn.Module) -> dict:
    sd = ref.state_dict()
    for name, p in ref.named_parameters():
        sd[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return sd


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("style", ["imagenet", "cifar", "dvs"])
def test_loaded_model_computes_the_official_function(style, backend):
    name, kw, shape = SMALL[style]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = OfficialSpikformer(style, **kw).double()
    _randomise(ref, g)
    model = create_model(
        name,
        embed_dim=kw["dim"],
        depth=kw["depth"],
        num_heads=kw["heads"],
        num_classes=kw["classes"],
        T=kw["T"],
        img_size=shape[-1],
        backend=backend,
    ).double()
    load_official_checkpoint(model, ref.state_dict())
    if style == "dvs":
        x = torch.poisson(torch.full(shape, 0.8, dtype=torch.float64), generator=g)
    else:
        x = 2 * torch.rand(shape, generator=g, dtype=torch.float64)

    for train in (False, True):
        ref.train(train)
        model.train(train)
        sj_functional.reset_net(ref)
        ref.zero_grad()
        model.zero_grad()
        want = ref(x)
        got = model(x)
        assert want.std() > 0  # the logits depend on the input: spikes do flow
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        want.square().sum().backward()
        got.square().sum().backward()
        # the same conversion maps official gradients (and updated BN statistics) onto ours
        _, conv_grads = convert_official_state_dict(_grads_as_state_dict(ref))
        ours = dict(model.state_dict())
        ours.update({n: p.grad for n, p in model.named_parameters()})
        for key, value in conv_grads.items():
            torch.testing.assert_close(
                ours[key].double(), value.double(), rtol=1e-7, atol=1e-9, msg=key
            )


def test_missing_and_unexpected_keys_are_listed():
    ref = OfficialSpikformer("cifar", **SMALL["cifar"][1])
    sd = ref.state_dict()
    model = create_model(
        "spikformer_cifar_4_384", embed_dim=32, depth=2, num_heads=4, num_classes=5, img_size=16
    )
    del sd["block.1.attn.k_bn.running_var"]
    sd["block.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"block\.1\.attn\.k_bn\.running_var.*block\.0\.attn\.extra"):
        load_official_checkpoint(model, sd)


def test_unused_official_parameters_are_optional_and_dropped():
    ref = OfficialSpikformer("dvs", **SMALL["dvs"][1])
    sd = {k: v for k, v in ref.state_dict().items() if "norm" not in k and k != "pos_embed"}
    model = create_model(
        "spikformer_cifar10dvs_2_256",
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=6,
        img_size=32,
    )
    load_official_checkpoint(model, {"model": {"module." + k: v for k, v in sd.items()}})
    torch.testing.assert_close(model.head.weight, ref.head.weight)


def test_mismatched_model_is_rejected_with_the_reason():
    ref = OfficialSpikformer("dvs", **SMALL["dvs"][1])
    wrong_scale = create_model(
        "spikformer_8_384", in_channels=2, embed_dim=32, depth=2, num_heads=4, num_classes=6
    )
    with pytest.raises(ValueError, match=r"attn_scale=0\.125 \(file needs 0\.25\)"):
        load_official_checkpoint(wrong_scale, ref.state_dict())
    wrong_dim = create_model(
        "spikformer_cifar10dvs_2_256", embed_dim=64, depth=2, num_heads=4, num_classes=6
    )
    with pytest.raises(ValueError, match="does not fit the model"):
        load_official_checkpoint(wrong_dim, ref.state_dict())
    with pytest.raises(ValueError, match="does not look like an official"):
        load_official_checkpoint(wrong_dim, wrong_dim.state_dict())
