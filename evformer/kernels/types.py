"""The plain parameter types the kernels take: surrogate gradients, LIF hyper-parameters
and spike rows.

Imports no other module of evformer (only torch), so every kernel module and every model
module can depend on it without a cycle. ``evformer.models`` re-exports the public ones
(:class:`LIFParams`, the surrogates).

Each surrogate is a small frozen dataclass with an integer ``kind`` that the fused CPU/GPU
kernels switch on, so a kernel and the plain-torch reference compute the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["ATan", "LIFParams", "SPIKFORMER_LIF", "Sigmoid", "SpikeRows", "Surrogate"]


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


@dataclass(frozen=True)
class LIFParams:
    """Hyper-parameters of the multi-step LIF (defaults: Spikformer's neuron).

    ``tau`` membrane time constant (> 1), ``v_threshold`` firing threshold, ``v_reset`` hard
    reset potential (also the initial potential), ``detach_reset`` drops the spike's gradient
    through the reset, ``surrogate`` the surrogate gradient of the spike function.
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float = 0.0
    detach_reset: bool = True
    surrogate: Surrogate = Sigmoid(4.0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 1.0):
            raise ValueError(f"LIF tau must be a finite number > 1, got {self.tau!r}")
        if not math.isfinite(self.v_threshold) or not math.isfinite(self.v_reset):
            raise ValueError("LIF v_threshold and v_reset must be finite")
        if self.v_reset >= self.v_threshold:
            raise ValueError(
                f"LIF v_reset ({self.v_reset}) must be below v_threshold ({self.v_threshold})"
            )
        if not isinstance(self.surrogate, Surrogate):
            raise TypeError(f"LIF surrogate must be a Surrogate, got {type(self.surrogate)}")


#: Spikformer's neuron: tau 2, threshold 1, hard reset to 0, detached reset, sigmoid(4)
SPIKFORMER_LIF = LIFParams()


@dataclass(frozen=True)
class SpikeRows:
    """Spike counts ``[M, C]`` stored by rows (CSR), as the event-driven products read them
    (:mod:`evformer.kernels.numba_sparse`): ``indptr [M + 1]`` int64, ``idx [nnz]`` int32
    columns ascending within a row, ``vals [nnz]`` uint8 counts or None when all are 1."""

    indptr: torch.Tensor
    idx: torch.Tensor
    vals: torch.Tensor | None
    num_cols: int

    @property
    def nnz(self) -> int:
        return self.idx.numel()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What ``save_for_backward`` keeps (see :meth:`from_tensors`)."""
        return (self.indptr, self.idx) if self.vals is None else (self.indptr, self.idx, self.vals)

    @classmethod
    def from_tensors(cls, tensors, num_cols: int) -> SpikeRows:
        vals = tensors[2] if len(tensors) > 2 else None
        return cls(tensors[0], tensors[1], vals, num_cols)
