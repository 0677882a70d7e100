"""Re-estimating BatchNorm running statistics from data (no weight changes)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from evformer.models.neurons import reset_net

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running mean and variance to the plain average of its batch
    statistics over ``batches`` (model inputs, on the model's device): train-mode forward
    passes without gradients, spiking state reset around each, momenta restored; ``model``
    is left in eval mode even on error. Returns the number of BatchNorm layers (0: nothing
    to do). Used where running statistics would mislead: a randomly initialised model (mean
    0, variance 1 silence its deeper neurons in eval mode) or an encoder pretrained on
    masked inputs, before features are read from it."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches
        model.train()
        for x in batches:
            reset_net(model)
            model(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        reset_net(model)
        model.eval()
    return len(bns)
