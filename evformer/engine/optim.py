"""AdamW with parameter groups: no weight decay on 1-D parameters and biases, optional
layer-wise learning-rate decay for fine-tuning (MAE / BEiT convention)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

# "block.3.attn.q_conv.weight", "blocks.3....", "encoder.layers.3...." -> 3
_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks?|layers)\.(\d+)\.")
# the classifier: "head.weight", "head.bias", "fc.weight", "classifier.weight"
_HEAD_RE = re.compile(r"^(?:module\.)?(?:head|fc|classifier)\.")


def count_layers(model: nn.Module) -> int:
    """Number of transformer blocks: 1 + the largest ``block(s).<k>.`` index in the parameter
    names (0 when the model has no such blocks)."""
    ids = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK_RE.search(n))]
    return max(ids) + 1 if ids else 0


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer index of a parameter for layer-wise decay (MAE convention).

    Stem, patch embedding and position things are layer 0, block ``k`` is layer ``k + 1``
    and the classifier head is layer ``num_layers + 1``.
    """
    if _HEAD_RE.search(name):
        return num_layers + 1
    m = _BLOCK_RE.search(name)
    if m is not None:
        return int(m.group(1)) + 1
    return 0


def _no_weight_decay(name: str, param: torch.Tensor, extra: Iterable[str]) -> bool:
    # 1-D tensors are norm scales/shifts and biases; 0-D are scalars such as a learnable
    # attention scale or a neuron's tau: decaying them towards 0 changes the model's dynamics.
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in extra)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id_fn: Callable[[str, int], int] = vit_layer_id,
    no_decay_keys: Iterable[str] = ("pos_embed", "cls_token", "mask_token"),
) -> list[dict]:
    """Split the trainable parameters of ``model`` into AdamW parameter groups.

    Every trainable parameter lands in exactly one group. 1-D parameters, biases and names
    containing one of ``no_decay_keys`` get weight decay 0, the rest ``weight_decay``.
    With ``layer_decay`` (e.g. 0.7 for Spikformer V2 fine-tuning) each group carries
    ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``: the head trains at the full
    rate, block ``k`` at ``layer_decay ** (num_layers - k)``, the stem at
    ``layer_decay ** (num_layers + 1)``. Without it every ``lr_scale`` is 1.

    ``num_layers`` defaults to :func:`count_layers`. Groups hold plain ``str``/``float``
    metadata (``group_name``, ``lr_scale``, ``layer_id``) so an optimizer state dict loads
    with ``torch.load(weights_only=True)``.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    extra = tuple(no_decay_keys)
    if layer_decay is not None and num_layers is None:
        num_layers = count_layers(model)
        if num_layers == 0:
            raise ValueError(
                "layer_decay needs the number of blocks, but no parameter name matches "
                "'block.<k>.' / 'blocks.<k>.'; pass num_layers= and layer_id_fn= for this model"
            )
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not _no_weight_decay(name, param, extra)
        if layer_decay is None:
            layer_id, scale = 0, 1.0
        else:
            layer_id = layer_id_fn(name, num_layers)
            scale = float(layer_decay ** (num_layers + 1 - layer_id))
        key = f"layer{layer_id}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": float(weight_decay) if decay else 0.0,
                "lr_scale": scale,
                "layer_id": int(layer_id),
                "group_name": key,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id_fn: Callable[[str, int], int] = vit_layer_id,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; each group starts at ``lr * lr_scale``.

    The learning rate is then driven per iteration by :class:`evformer.engine.CosineSchedule`,
    which keeps every group's ``lr_scale``.
    """
    groups = param_groups(
        model,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        num_layers=num_layers,
        layer_id_fn=layer_id_fn,
    )
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
