"""Multi-step leaky integrate-and-fire neuron (spikingjelly's ``LIFNode(step_mode="m")``).

Dynamics per element, time first (``x_seq [T, ...]``), decay_input, hard reset::

    H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau
    S[t] = H[t] >= v_threshold                       (surrogate gradient in backward)
    V[t] = H[t] * (1 - S[t]) + v_reset * S[t]         (S detached when detach_reset)

with ``V[-1] = v_reset``. **State lives only inside one forward call**: every call starts
from ``v_reset`` and nothing persists on the module, so no ``reset_net`` is needed between
samples (:func:`reset_net` exists for loops written for spikingjelly). The one exception is
the explicit single-step mode of the models (:func:`step_states`), which carries ``V``
across the per-time-step calls of one forward pass and drops it afterwards.

Backends: ``"torch"`` is the reference (a loop over T of differentiable torch ops);
``"numba"`` (CPU) and ``"triton"`` (CUDA) run a fused kernel that stores only the input and
recomputes ``H`` in the backward pass (:mod:`evformer.kernels.fused`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from evformer.kernels.fused import lif_fused
from evformer.kernels.interface import available_backends, check_backend, resolve_backend
from evformer.kernels.types import LIFParams
from evformer.models.surrogate import Surrogate, get_surrogate, spike

__all__ = [
    "LIFNode",
    "LIFParams",
    "available_backends",
    "lif_reference",
    "reset_net",
    "step_states",
]

_STEP_STATES: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "evformer_step_states", default=None
)


@contextlib.contextmanager
def step_states() -> Iterator[dict]:
    """Within this context every :class:`LIFNode` (and fused layer, which then falls back to
    the reference path) starts from the membrane potential it ended with in the previous call
    inside the same context. Used by the models' single-step (``step_mode="s"``) loop."""
    states: dict = {}
    token = _STEP_STATES.set(states)
    try:
        yield states
    finally:
        _STEP_STATES.reset(token)


def in_step_mode() -> bool:
    """True inside :func:`step_states` (fused kernels cannot carry state between calls)."""
    return _STEP_STATES.get() is not None


def lif_reference(
    x_seq: torch.Tensor, params: LIFParams, v0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference multi-step LIF built from differentiable torch ops.

    ``x_seq [T, ...]`` input current; ``v0 [...]`` initial potential (``v_reset`` if None).
    Returns ``(spikes [T, ...], v_last [...])``.
    """
    v = torch.full_like(x_seq[0], params.v_reset) if v0 is None else v0
    out = []
    for x in x_seq:
        h = v + (x - (v - params.v_reset)) / params.tau
        s = spike(h - params.v_threshold, params.surrogate)
        s_reset = s.detach() if params.detach_reset else s
        v = h * (1 - s_reset) + params.v_reset * s_reset
        out.append(s)
    return torch.stack(out), v


class LIFNode(nn.Module):
    """Multi-step LIF layer: ``[T, ...]`` currents in, ``[T, ...]`` spikes (0/1) out.

    Keyword-only: ``tau`` (> 1), ``v_threshold``, ``v_reset`` (hard reset value, also the
    initial potential), ``detach_reset``, ``surrogate`` ("sigmoid"/"atan" or a
    :class:`~evformer.models.surrogate.Surrogate`; default sigmoid with alpha 4) and
    ``backend`` ("auto", "torch", "numba", "triton"). No state survives a call.
    """

    def __init__(
        self,
        *,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float = 0.0,
        detach_reset: bool = True,
        surrogate: str | Surrogate = "sigmoid",
        surrogate_alpha: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.params = LIFParams(
            tau=float(tau),
            v_threshold=float(v_threshold),
            v_reset=float(v_reset),
            detach_reset=bool(detach_reset),
            surrogate=get_surrogate(surrogate, surrogate_alpha),
        )
        self.backend = check_backend(backend)

    @classmethod
    def from_params(cls, params: LIFParams, *, backend: str = "auto") -> LIFNode:
        node = cls(backend=backend)
        node.params = params
        return node

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"tau={p.tau}, v_threshold={p.v_threshold}, v_reset={p.v_reset}, "
            f"detach_reset={p.detach_reset}, surrogate={p.surrogate}, backend={self.backend!r}"
        )

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.dim() < 2:
            raise ValueError(
                f"LIFNode expects a time-first tensor [T, ...] with at least 2 dims, "
                f"got shape {tuple(x_seq.shape)}"
            )
        states = _STEP_STATES.get()
        if states is not None:
            s, v = lif_reference(x_seq, self.params, states.get(id(self)))
            states[id(self)] = v
            return s
        backend = resolve_backend(self.backend, x_seq.device)
        if backend == "torch":
            return lif_reference(x_seq, self.params)[0]
        return lif_fused(x_seq, self.params, backend)


def reset_net(model: nn.Module) -> nn.Module:
    """Reset every stateful neuron in ``model``; returns ``model``.

    evformer's own neurons keep no state between forward calls, so for a pure evformer model
    this changes nothing. Modules that do keep state -- spikingjelly layers mixed into a model
    (anything with a ``reset()`` method, e.g. ``MemoryModule``) -- are reset, so a training
    loop written for spikingjelly (``functional.reset_net(net)`` after each batch) works
    unchanged.
    """
    try:
        from spikingjelly.activation_based.base import MemoryModule
    except ImportError:  # spikingjelly absent: nothing stateful can be in the model
        return model
    for m in model.modules():
        if isinstance(m, MemoryModule):
            m.reset()
    return model
