"""torchvision v2 transforms with their random draws taken from an explicit generator.

torchvision's random transforms draw from torch's global CPU generator. evformer's
transforms draw from a ``torch.Generator`` handed in per sample (``transform(x,
generator)``), so that an augmentation depends only on that generator. The glue: take one
seed from ``generator``, run the torchvision transform inside ``torch.random.fork_rng``
with the global CPU generator seeded from it; the global state is restored afterwards
(costs ~10 µs a call). Only the CPU generator is touched: torchvision draws its
parameters on the CPU whatever the input's device. The global generator is process-wide,
so two threads must not augment at once (DataLoader workers are processes: fine).

A ``[T, C, H, W]`` tensor is one image to torchvision v2 with leading batch dimensions:
one draw of the parameters applies to every frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["draw_params", "probe", "run_seeded", "seeded_global_rng"]


@contextmanager
def seeded_global_rng(generator: torch.Generator) -> Iterator[None]:
    """Within the block, torch's global CPU generator is seeded from one draw of ``generator``."""
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: leaves CUDA alone
        yield


def run_seeded(transform: v2.Transform, x: Any, generator: torch.Generator) -> Any:
    """``transform(x)`` with its random draws taken from ``generator`` (one seed per call)."""
    with seeded_global_rng(generator):
        return transform(x)


def draw_params(
    transform: v2.Transform, like: torch.Tensor, generator: torch.Generator
) -> dict[str, Any] | None:
    """The parameters ``run_seeded(transform, x, generator)`` uses for an ``x`` shaped like
    ``like``, or None when a transform with probability ``p`` skips (drawn first, as in
    torchvision's ``_RandomApplyTransform.forward``). Tests hold the two in agreement."""
    with seeded_global_rng(generator):
        if hasattr(transform, "p") and torch.rand(1) >= transform.p:
            return None
        make_params = getattr(transform, "make_params", None) or transform._get_params
        return make_params([like])  # public from torchvision 0.21, _get_params before


def probe(height: int, width: int) -> torch.Tensor:
    """A zero-memory ``[1, height, width]`` stand-in for ``draw_params`` (only the size is read)."""
    return torch.zeros(()).expand(1, height, width)
