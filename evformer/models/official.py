"""Load checkpoints saved by the official Spikformer code (ZK-Zhou/spikformer) into evformer.

The official repository has three model files that drifted apart; a state dict tells them
apart by its key names and shapes:

=============  ==================================  ===========  ==========================
file           q/k/v, proj, MLP                    SPS pools    quirks
=============  ==================================  ===========  ==========================
imagenet       Conv1d (no bias), Conv1d+b, Conv2d  stages 1-4   T = 4 hard-coded
cifar          Linear + bias everywhere            stages 3-4   ``(q k^T) v`` order
cifar10dvs     Conv1d (no bias), Conv1d+b, Conv1d  stages 1-4   scale 0.25; unused
                                                                ``pos_embed`` and ``norm``
=============  ==================================  ===========  ==========================

All three create LayerNorms ``norm1``/``norm2`` per block that are never used. Unused
parameters are accepted and dropped; any other missing or unexpected key is an error that
lists them. q, k and v (each with its own BatchNorm) become evformer's fused ``qkv`` linear
and BatchNorm by concatenation along the output channels, which computes the same function.
Conv1d/Conv2d 1x1 weights ``[out, in, 1(, 1)]`` become Linear weights ``[out, in]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "OFFICIAL_FILES",
    "convert_official_state_dict",
    "detect_official_file",
    "load_official_checkpoint",
    "official_keys",
]

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: what each official file fixes in evformer's configuration
OFFICIAL_FILES: dict[str, dict] = {
    "imagenet": dict(
        pool_stages=(True, True, True, True),
        attn_scale=0.125,
        qkv_bias=False,
        proj_bias=True,
        mlp_bias=True,
        synapse="conv",
        unused_top=(),
    ),
    "cifar": dict(
        pool_stages=(False, False, True, True),
        attn_scale=0.125,
        qkv_bias=True,
        proj_bias=True,
        mlp_bias=True,
        synapse="linear",
        unused_top=(),
    ),
    "cifar10dvs": dict(
        pool_stages=(True, True, True, True),
        attn_scale=0.25,
        qkv_bias=False,
        proj_bias=True,
        mlp_bias=True,
        synapse="conv",
        unused_top=("pos_embed", "norm.weight", "norm.bias"),
    ),
}


def _unwrap(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Accept ``{"model": sd}`` / ``{"state_dict": sd}`` wrappers and DDP ``module.`` prefixes."""
    sd = state_dict
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a state dict (mapping of tensors), got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def detect_official_file(state_dict: Mapping) -> str:
    """Which official model file saved ``state_dict``: "imagenet", "cifar" or "cifar10dvs"."""
    sd = _unwrap(state_dict)
    if "block.0.attn.q_linear.weight" in sd:
        return "cifar"
    if "block.0.attn.q_conv.weight" in sd:
        fc1 = sd.get("block.0.mlp.fc1_conv.weight")
        if fc1 is not None and fc1.dim() == 4:
            return "imagenet"
        if fc1 is not None and fc1.dim() == 3:
            return "cifar10dvs"
    raise ValueError(
        "state dict does not look like an official Spikformer checkpoint: expected keys "
        "'block.0.attn.q_linear.weight' (CIFAR file) or 'block.0.attn.q_conv.weight' with "
        f"'block.0.mlp.fc1_conv.weight' (ImageNet / CIFAR10-DVS files); first keys: "
        f"{list(sd)[:5]}"
    )


def _depth_of(sd: Mapping) -> int:
    idx = {int(k.split(".")[1]) for k in sd if k.startswith("block.")}
    return max(idx) + 1 if idx else 0


def official_keys(file: str, depth: int) -> tuple[set[str], set[str]]:
    """``(required, unused)`` key sets of an official state dict with ``depth`` blocks."""
    if file not in OFFICIAL_FILES:
        raise ValueError(f"unknown official file {file!r}; choose from {sorted(OFFICIAL_FILES)}")
    lin = "linear" if OFFICIAL_FILES[file]["synapse"] == "linear" else "conv"
    req: set[str] = set()
    stems = ["proj", "proj1", "proj2", "proj3", "rpe"]
    for s in stems:
        conv = "proj_conv" + s[4:] if s.startswith("proj") else "rpe_conv"
        bn = "proj_bn" + s[4:] if s.startswith("proj") else "rpe_bn"
        req.add(f"patch_embed.{conv}.weight")
        req |= {f"patch_embed.{bn}.{b}" for b in _BN}
    unused = set(OFFICIAL_FILES[file]["unused_top"])
    for i in range(depth):
        p = f"block.{i}."
        for n in ("q", "k", "v"):
            req.add(f"{p}attn.{n}_{lin}.weight")
            if OFFICIAL_FILES[file]["qkv_bias"]:
                req.add(f"{p}attn.{n}_{lin}.bias")
            req |= {f"{p}attn.{n}_bn.{b}" for b in _BN}
        for n in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            req |= {f"{p}{n}_{lin}.weight", f"{p}{n}_{lin}.bias"}
            req |= {f"{p}{n}_bn.{b}" for b in _BN}
        unused |= {f"{p}norm{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
    req |= {"head.weight", "head.bias"}
    return req, unused


def _as_linear(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])


def convert_official_state_dict(state_dict: Mapping) -> tuple[str, dict[str, torch.Tensor]]:
    """Official state dict -> ``(file, evformer Spikformer state dict)``.

    Raises ``KeyError`` listing missing and unexpected keys (unused official parameters are
    allowed and dropped).
    """
    sd = _unwrap(state_dict)
    file = detect_official_file(sd)
    depth = _depth_of(sd)
    required, unused = official_keys(file, depth)
    missing = sorted(required - set(sd))
    unexpected = sorted(set(sd) - required - unused)
    if missing or unexpected:
        raise KeyError(
            f"official {file} checkpoint with {depth} blocks does not match the official key "
            f"layout: missing keys {missing}; unexpected keys {unexpected}"
        )
    lin = "linear" if OFFICIAL_FILES[file]["synapse"] == "linear" else "conv"
    out: dict[str, torch.Tensor] = {}
    for j, s in enumerate(("", "1", "2", "3")):
        out[f"patch_embed.stages.{j}.conv.weight"] = sd[f"patch_embed.proj_conv{s}.weight"]
        for b in _BN:
            out[f"patch_embed.stages.{j}.bn.{b}"] = sd[f"patch_embed.proj_bn{s}.{b}"]
    out["patch_embed.rpe.conv.weight"] = sd["patch_embed.rpe_conv.weight"]
    for b in _BN:
        out[f"patch_embed.rpe.bn.{b}"] = sd[f"patch_embed.rpe_bn.{b}"]
    for i in range(depth):
        p, q = f"block.{i}.", f"blocks.{i}."
        out[f"{q}attn.qkv.linear.weight"] = torch.cat(
            [_as_linear(sd[f"{p}attn.{n}_{lin}.weight"]) for n in "qkv"]
        )
        if OFFICIAL_FILES[file]["qkv_bias"]:
            out[f"{q}attn.qkv.linear.bias"] = torch.cat(
                [sd[f"{p}attn.{n}_{lin}.bias"] for n in "qkv"]
            )
        for b in _BN[:4]:
            out[f"{q}attn.qkv.bn.{b}"] = torch.cat([sd[f"{p}attn.{n}_bn.{b}"] for n in "qkv"])
        out[f"{q}attn.qkv.bn.num_batches_tracked"] = sd[f"{p}attn.q_bn.num_batches_tracked"]
        for src, dst in (
            ("attn.proj", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            out[f"{q}{dst}.linear.weight"] = _as_linear(sd[f"{p}{src}_{lin}.weight"])
            out[f"{q}{dst}.linear.bias"] = sd[f"{p}{src}_{lin}.bias"]
            for b in _BN:
                out[f"{q}{dst}.bn.{b}"] = sd[f"{p}{src}_bn.{b}"]
    out["head.weight"] = sd["head.weight"]
    out["head.bias"] = sd["head.bias"]
    return file, out


def load_official_checkpoint(model: nn.Module, state_dict: Mapping) -> nn.Module:
    """Load an official Spikformer state dict into the matching evformer ``model``.

    ``model`` must be a :class:`~evformer.models.Spikformer` built like the official file
    (``create_model("spikformer_8_384")`` etc. for ImageNet, ``"spikformer_cifar_*"`` for
    CIFAR, ``"spikformer_cifar10dvs_2_256"`` / ``"spikformer_gesture_2_256"`` for the DVS
    file; embed dim, depth and classes must match). Afterwards the model computes the same
    function as the official model file. Returns ``model``.
    """
    from evformer.models.spikformer import Spikformer

    file, converted = convert_official_state_dict(state_dict)
    if not isinstance(model, Spikformer):
        raise TypeError(
            f"official Spikformer checkpoints load into evformer Spikformer (V1) models, "
            f"got {type(model).__name__}"
        )
    cfg = model.config
    want = OFFICIAL_FILES[file]
    problems = []
    for field in ("attn_scale", "qkv_bias", "proj_bias", "mlp_bias"):
        if getattr(cfg, field) != want[field]:
            problems.append(f"{field}={getattr(cfg, field)!r} (file needs {want[field]!r})")
    if tuple(bool(p) for p in cfg.pool_stages) != want["pool_stages"]:
        problems.append(f"pool_stages={cfg.pool_stages} (file needs {want['pool_stages']})")
    for field, value in (("rpe", True), ("attention", "ssa"), ("residual", "add")):
        if getattr(cfg, field) != value:
            problems.append(f"{field}={getattr(cfg, field)!r} (file needs {value!r})")
    depth = sum(1 for k in converted if k.endswith("attn.qkv.linear.weight"))
    if depth != cfg.depth:
        problems.append(f"depth={cfg.depth} (checkpoint has {depth} blocks)")
    if problems:
        raise ValueError(
            f"checkpoint comes from the official {file} file but the model differs: "
            + "; ".join(problems)
            + ". Build it with create_model(<matching name>, ...) or the matching config."
        )
    own = model.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ValueError(
            "official checkpoint does not fit the model (embed dim / classes / channels "
            "differ?): " + "; ".join(bad[:10])
        )
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"converted checkpoint and model disagree: missing {missing}; unexpected {unexpected}"
        )
    model.load_state_dict(converted, strict=True)
    return model
