"""Surrogate gradients for the Heaviside spike function.

The forward pass of a spiking neuron fires ``S = H(x)`` with ``x = membrane - threshold``
(``H(x) = 1`` for ``x >= 0``); the backward pass replaces the Dirac delta ``H'(x)`` by the
derivative of a smooth primitive. Each surrogate is a small frozen dataclass with an integer
``kind`` that the fused CPU/GPU kernels switch on, so a kernel and the plain-torch reference
compute the same formula; the classes are defined beside the other parameter types the
kernels take (:mod:`evformer.kernels.types`) and re-exported here.
"""

from __future__ import annotations

import torch

from evformer.kernels.types import ATan, Sigmoid, Surrogate

__all__ = ["ATan", "Sigmoid", "Surrogate", "get_surrogate", "spike"]


_BY_NAME: dict[str, type[Surrogate]] = {"sigmoid": Sigmoid, "atan": ATan}


def get_surrogate(surrogate: str | Surrogate, alpha: float | None = None) -> Surrogate:
    """Resolve ``"sigmoid"`` / ``"atan"`` (optionally with ``alpha``); pass Surrogates through."""
    if isinstance(surrogate, Surrogate):
        if alpha is not None and alpha != surrogate.alpha:
            raise ValueError(
                f"surrogate {surrogate!r} already fixes alpha; do not pass alpha={alpha!r} as well"
            )
        return surrogate
    cls = _BY_NAME.get(str(surrogate).lower())
    if cls is None:
        raise ValueError(f"unknown surrogate {surrogate!r}; choose one of {sorted(_BY_NAME)}")
    return cls() if alpha is None else cls(alpha=float(alpha))


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: Surrogate) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.surrogate.grad(x), None


def spike(x: torch.Tensor, surrogate: Surrogate) -> torch.Tensor:
    """Heaviside ``(x >= 0)`` in the forward pass, ``surrogate.grad(x)`` in the backward pass."""
    return _Spike.apply(x, surrogate)
