"""Surrogate gradients for the Heaviside spike function.

The forward pass of a spiking neuron fires ``S = H(x)`` with ``x = membrane - threshold``
(``H(x) = 1`` for ``x >= 0``); the backward pass replaces the Dirac delta ``H'(x)`` by the
derivative of a smooth primitive. Each surrogate is a small frozen dataclass with an integer
``kind`` that the fused CPU/GPU kernels switch on, so a kernel and the plain-torch reference
compute the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["ATan", "Sigmoid", "Surrogate", "get_surrogate", "spike"]


@dataclass(frozen=True)
class Surrogate:
    """Base class: ``grad(x)`` is the surrogate of ``dS/dx``; ``kind`` picks the kernel formula."""

    alpha: float
    kind: ClassVar[int] = -1
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(
                f"{type(self).__name__}: alpha must be a finite positive number, got {self.alpha!r}"
            )

    def grad(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def primitive(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Sigmoid(Surrogate):
    """``g(x) = sigmoid(alpha x)``, ``g'(x) = alpha sigmoid(alpha x) (1 - sigmoid(alpha x))``.

    ``alpha = 4`` is spikingjelly's default and the one every Spikformer file uses.
    """

    alpha: float = 4.0
    kind: ClassVar[int] = 0
    name: ClassVar[str] = "sigmoid"

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.alpha * x)
        return (1 - s) * s * self.alpha

    def primitive(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.alpha * x)


@dataclass(frozen=True)
class ATan(Surrogate):
    """``g(x) = atan(pi/2 alpha x) / pi + 1/2``, ``g'(x) = alpha / 2 / (1 + (pi/2 alpha x)^2)``."""

    alpha: float = 2.0
    kind: ClassVar[int] = 1
    name: ClassVar[str] = "atan"

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        z = x * (math.pi / 2 * self.alpha)
        return (self.alpha / 2) / (1 + z * z)

    def primitive(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atan(x * (math.pi / 2 * self.alpha)) / math.pi + 0.5


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
