"""Per-iteration cosine learning-rate schedule with linear warmup and a constant cooldown."""

from __future__ import annotations

import math

import torch


def lr_at(
    step: int,
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: float,
    warmup_epochs: float = 0.0,
    warmup_lr: float = 0.0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate before optimizer step ``step`` (0-based), in the same unit as ``base_lr``.

    With ``e = step / steps_per_epoch`` (fractional epochs):

    - ``e < warmup_epochs``: linear from ``warmup_lr`` to ``base_lr``;
    - ``warmup_epochs <= e < epochs``: half cosine from ``base_lr`` down to ``min_lr``
      (MAE's per-iteration form, continuous at the end of warmup);
    - ``e >= epochs``: ``min_lr`` (the cooldown epochs of the timm recipes).

    timm's epoch-wise CosineLRScheduler, used by the official Spikformer code, starts its
    cosine at epoch 0 and steps once per epoch, so its lr jumps at the end of warmup; this
    schedule is the per-iteration one of the Spikformer V2 paper.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    e = step / steps_per_epoch
    if e < warmup_epochs:
        return warmup_lr + (base_lr - warmup_lr) * e / warmup_epochs
    if e >= epochs:
        return min_lr
    progress = (e - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class CosineSchedule:
    """Sets every parameter group's lr to ``lr_at(step) * group["lr_scale"]``.

    Call :meth:`step` once per optimizer step, before ``optimizer.step()``; the learning
    rate is a pure function of the step count, so the state is one int and resuming from a
    checkpoint reproduces the schedule exactly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        steps_per_epoch: int,
        epochs: float,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.kwargs = dict(
            base_lr=float(base_lr),
            steps_per_epoch=int(steps_per_epoch),
            epochs=float(epochs),
            warmup_epochs=float(warmup_epochs),
            warmup_lr=float(warmup_lr),
            min_lr=float(min_lr),
        )
        lr_at(0, **self.kwargs)  # validate the arguments now rather than at the first step
        self.last_step = -1

    def lr(self, step: int) -> float:
        """The unscaled learning rate at optimizer step ``step``."""
        return lr_at(step, **self.kwargs)

    def step(self) -> float:
        """Advance one iteration and write the new rates into the optimizer; returns the
        unscaled rate."""
        self.last_step += 1
        lr = self.lr(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, **self.kwargs}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count; the schedule parameters of a checkpoint must match."""
        saved = {k: state[k] for k in self.kwargs if k in state}
        changed = {k: (v, self.kwargs[k]) for k, v in saved.items() if v != self.kwargs[k]}
        if changed:
            detail = ", ".join(f"{k}: checkpoint {a} != now {b}" for k, (a, b) in changed.items())
            raise ValueError(
                f"the checkpoint's lr schedule differs from this run's ({detail}); resume with "
                "the same epochs, batch size and lr settings, or start a new run"
            )
        self.last_step = int(state["last_step"])
