"""Training and evaluation loops shared by every recipe.

:func:`fit` trains a classifier (or, with ``objective=MaskedReconstruction()``, a masked
autoencoder: one loop, the step is an :class:`Objective`) with AdamW (parameter groups,
optional layer-wise decay), a per-iteration cosine schedule, label smoothing, optional
Mixup/CutMix switched off at a given epoch, gradient clipping and AMP on CUDA; it resets
spiking state around every batch, evaluates top-1/top-5, per-class accuracy and the
confusion matrix, and keeps the run directory up to date (``metrics.jsonl``,
``config.yaml``, ``run_info.json``, ``last.pt``, ``best.pt``, ``curves.png``,
``confusion_matrix.png``, ``results.json``).

Runs are exactly resumable: the data order is a function of (seed, epoch), a checkpoint
records how far into the epoch training got, and every random generator the loop uses is
saved. Under ``torchrun`` the same code runs data-parallel (DistributedDataParallel,
same global batch as one process); rank 0 logs and checkpoints.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evformer.engine.checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from evformer.engine.distributed import DistInfo, all_gather_objects, all_reduce, resolve_device
from evformer.engine.metrics import confusion_matrix, per_class_accuracy, topk_correct
from evformer.engine.optim import build_optimizer, vit_layer_id
from evformer.engine.sampling import EpochSampler, ShardSampler, epoch_generator
from evformer.engine.schedule import CosineSchedule
from evformer.engine.tracking import MetricsLog, TensorBoard, atomic_write_text, write_run_info

# Mixup/CutMix as the loop sees it: (inputs, integer labels [B], generator) ->
# (mixed inputs, soft targets [B, num_classes] without label smoothing).
BatchMix = Callable[
    [torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]


@dataclass
class FitConfig:
    """Everything :func:`fit` needs besides the model and data: the one definition of the
    training settings. Learning rates are absolute (not scaled by the batch size);
    ``batch_size`` is the global batch over all processes.

    The defaults suit library use (a quick run on in-memory data); each recipe's ``Config``
    inherits these fields and overrides the defaults with its published values."""

    epochs: int = 1  # cosine epochs (warmup included); cooldown epochs come on top
    cooldown_epochs: int = 0  # extra epochs at min_lr
    batch_size: int = 16  # global; each of N processes takes batch_size / N
    eval_batch_size: int | None = None  # per process; None: batch_size / N
    lr: float = 1e-3  # AdamW peak learning rate (after warmup)
    min_lr: float = 1e-5  # end of the cosine, and the cooldown lr
    warmup_lr: float = 1e-6  # lr at step 0, rising linearly to lr
    warmup_epochs: float = 0.0  # linear warmup (fractions allowed), part of epochs
    weight_decay: float = 0.05  # AdamW; not applied to biases, norms and embeddings
    layer_decay: float | None = None  # e.g. 0.7 for fine-tuning; None: one lr for all layers
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    label_smoothing: float = 0.0  # applied by the loss to hard and mixed targets alike
    mixup_off_epoch: int | None = None  # Mixup/CutMix off from this epoch on (None: never)
    clip_grad: float | None = None  # max global grad norm; None: no clipping
    amp: bool | None = None  # mixed precision; None (auto): on with CUDA, off on CPU
    amp_dtype: str = "float16"  # float16 or bfloat16 (bfloat16 needs no loss scaling)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    seed: int = 0  # data order, augmentation and initial weights
    num_workers: int = 0  # DataLoader worker processes per rank
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0: epoch ends only)
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    max_steps_per_epoch: int | None = None  # cap on batches per epoch (smoke tests, demos)
    max_eval_batches: int | None = None  # cap on test batches per evaluation
    topk: tuple[int, ...] = (1, 5)  # evaluated top-k (acc1/acc5 are NaN without 1/5 here)
    progress: bool = True  # tqdm bar on rank 0
    find_unused_parameters: bool = False  # DDP: for models with parameters a step may skip
    plots: bool = True  # curves.png and confusion_matrix.png in the run directory
    tensorboard: bool = True  # tensorboard/ event files (when tensorboard is installed)

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs

    def validate(self) -> None:
        if self.epochs < 1 or self.cooldown_epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 1, cooldown_epochs >= 0")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs}]"
            )
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16', got {self.amp_dtype!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive or None, got {self.clip_grad}")
        if self.eval_every < 1 or self.checkpoint_every < 0:
            raise ValueError("eval_every must be >= 1 and checkpoint_every >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.topk or any(k < 1 for k in self.topk):
            raise ValueError(f"topk must be one or more integers >= 1, got {self.topk}")


class Objective:
    """What one training step computes from a batch; everything else in the loop (data
    order, parameter groups, schedule, AMP, DDP, checkpoints and resume, non-finite
    handling, metrics, progress) is shared.

    :meth:`step` gets the input ``x`` (on the device, float) and the batch's second item
    ``y`` (still as the loader gave it) and returns ``(loss, stats)``: the scalar loss to
    back-propagate and float64 ``[3]`` sums over the rank's batch -- ``loss * B``, top-1
    hits (0 without accuracy) and ``B`` -- which the trainer all-reduces and accumulates.
    This base class is the classifier's step: label-smoothed cross-entropy, Mixup/CutMix
    while :meth:`Trainer.mixup_active`, top-1 against the (mixed) target's argmax.
    """

    name = "classification"
    has_accuracy = True  # train_acc1 in the metrics; test evaluation and best.pt apply

    def step(
        self, trainer: Trainer, x: torch.Tensor, y: Any, *, mixing: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = trainer.config
        y = torch.as_tensor(y).to(trainer.device, torch.long, non_blocking=True)
        target = y
        if mixing:
            x, target = trainer.mixup(x, y, trainer.mix_gen)
        with _autocast(trainer.device, trainer.use_amp, cfg.amp_dtype):
            logits = trainer.ddp(x)
        loss = classification_loss(logits, target, label_smoothing=cfg.label_smoothing)
        bs = y.shape[0]
        stats = torch.stack(
            [
                loss.detach().double() * bs,
                topk_correct(logits.detach(), target.detach(), (1,))[0].to(loss.device),
                torch.tensor(float(bs), dtype=torch.float64, device=loss.device),
            ]
        )
        return loss, stats

    def row(self) -> dict:
        """Constant entries of every ``metrics.jsonl`` row (settings worth plotting against)."""
        return {}


class MaskedReconstruction(Objective):
    """Masked-image modelling (MAE): batches ``(x, noise)`` with the masking noise
    ``[B, L]`` (uniform [0, 1), one row per sample, drawn by the data pipeline from the
    sample's ``(seed, epoch, index)``, so a sample's mask is the same for any number of
    processes and after a resume); the model is called as
    ``loss, pred, mask = model(x, noise=noise)`` (``evformer.models.SpikformerMAE``).
    No accuracy, no test evaluation, no ``best.pt``. ``row`` entries (e.g. the mask ratio)
    go into every metrics row."""

    name = "masked_reconstruction"
    has_accuracy = False

    def __init__(self, *, row: dict | None = None) -> None:
        self._row = dict(row or {})

    def step(
        self, trainer: Trainer, x: torch.Tensor, y: Any, *, mixing: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.as_tensor(y).to(trainer.device, torch.float32, non_blocking=True)
        with _autocast(trainer.device, trainer.use_amp, trainer.config.amp_dtype):
            loss, _, _ = trainer.ddp(x, noise=noise)
        loss = loss.float()
        bs = x.shape[0]
        zero = torch.zeros((), dtype=torch.float64, device=loss.device)
        stats = torch.stack(
            [
                loss.detach().double() * bs,
                zero,
                torch.tensor(float(bs), dtype=torch.float64, device=loss.device),
            ]
        )
        return loss, stats

    def row(self) -> dict:
        return dict(self._row)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; ``checkpoint`` holds the state from just
    before the offending step (or None when no run directory was given)."""

    def __init__(self, message: str, *, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class EvalResult:
    """Test metrics over a whole dataset: mean cross-entropy ``loss``, ``acc1``/``acc5`` in
    percent, ``n`` samples, ``confusion`` [K, K] counts (row = true class) and
    ``per_class`` accuracy in percent [K] (NaN for absent classes)."""

    loss: float
    acc1: float
    acc5: float
    n: int
    confusion: np.ndarray
    per_class: np.ndarray

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "acc1": self.acc1,
            "acc5": self.acc5,
            "n": self.n,
            "per_class_acc": [None if math.isnan(v) else float(v) for v in self.per_class],
            "confusion": self.confusion.tolist(),
        }


@dataclass
class FitResult:
    final: EvalResult | None
    best_acc1: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    run_dir: Path | None = None


def seed_everything(seed: int, *, rank: int = 0) -> None:
    """Seed the global Python, NumPy and torch RNGs (for code outside evformer that uses
    them, and for parameter initialisation in ``torch.nn``). Call before building the model;
    all ranks must build the same initial model, so the model is built before the per-rank
    offset is applied by :func:`fit`."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)  # noqa: NPY002 (seeding for third-party code)
    torch.manual_seed(seed + rank)


def reset_states(model: nn.Module) -> None:
    """Reset spiking state before and after every batch (``evformer.models.reset_net``:
    evformer's neurons keep none between calls; spikingjelly ``MemoryModule`` layers mixed
    into a model do). Membrane potentials must not leak from one batch into the next."""
    from evformer.models.neurons import reset_net

    reset_net(model)


def classification_loss(
    logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy. ``target`` [B] integer labels or [B, K] probabilities (Mixup);
    label smoothing mixes the target with the uniform distribution, ``(1 - e) y + e / K``,
    in both cases (identical to ``F.cross_entropy(label_smoothing=e)`` for hard labels)."""
    logits = logits.float()
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if target.shape != logits.shape:
        raise ValueError(f"soft target {tuple(target.shape)} != logits {tuple(logits.shape)}")
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / logits.shape[1]
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def _to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # event frames may arrive as integer counts (4-8x smaller in loader memory)
    x = x.to(device, non_blocking=True)
    return x if x.is_floating_point() else x.float()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device, enabled: bool, dtype: str):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: str | torch.device | None = None,
    dist: DistInfo | None = None,
    num_workers: int = 0,
    topk: Sequence[int] = (1, 5),
    amp: bool = False,
    amp_dtype: str = "float16",
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate a classifier on ``dataset`` (items ``(x, label)``; x [C, H, W] static or
    [T, C, H, W] event frames). Under DDP every rank evaluates its shard and the sums are
    all-reduced, so each sample counts once. ``batch_size`` is per process. The loss is the
    plain cross-entropy (no label smoothing), as in the published recipes."""
    model = _unwrap(model)
    if dist is None:
        dist = DistInfo(device=resolve_device(device))
    dev = dist.device if device is None else resolve_device(device, local_rank=dist.local_rank)
    was_training = model.training
    model.eval()
    sampler = ShardSampler(len(dataset), num_replicas=dist.world_size, rank=dist.rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # keep the global RNG untouched
    )
    topk = tuple(topk)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros(len(topk), dtype=torch.float64)
    count = 0
    cm: np.ndarray | None = None
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = tqdm(total=total, desc=desc, disable=not (progress and dist.is_main), leave=False)
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _to_input(x, dev), torch.as_tensor(y).to(dev, torch.long, non_blocking=True)
        reset_states(model)
        with _autocast(dev, amp, amp_dtype):
            logits = model(x)
        logits = logits.float()
        reset_states(model)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct += topk_correct(logits, y, topk)
        count += y.shape[0]
        batch_cm = confusion_matrix(y, logits.argmax(dim=1), num_classes=logits.shape[1])
        cm = batch_cm if cm is None else cm + batch_cm
        bar.update(1)
    bar.close()
    model.train(was_training)
    # ranks may have seen different class counts; the head size is the same everywhere
    k = torch.tensor([0 if cm is None else cm.shape[0]], dtype=torch.int64)
    num_classes = int(all_reduce(k, op="max", device=dev).item())
    if cm is None:
        cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    packed = torch.cat(
        [
            loss_sum[None],
            correct,
            torch.tensor([float(count)], dtype=torch.float64),
            torch.from_numpy(cm.astype(np.float64)).ravel(),
        ]
    )
    packed = all_reduce(packed, device=dev)
    n = int(packed[1 + len(topk)].item())
    if n == 0:
        raise ValueError("the evaluation set is empty")
    acc = (packed[1 : 1 + len(topk)] * (100.0 / n)).tolist()
    cm = packed[2 + len(topk) :].round().to(torch.int64).reshape(num_classes, num_classes).numpy()
    acc1 = acc[topk.index(1)] if 1 in topk else float("nan")
    acc5 = acc[topk.index(5)] if 5 in topk else float("nan")
    return EvalResult(
        loss=float(packed[0]) / n,
        acc1=float(acc1),
        acc5=float(acc5),
        n=n,
        confusion=cm,
        per_class=per_class_accuracy(cm),
    )


def load_model_state(
    model: nn.Module, state: dict, *, strict: bool = True, source: str = "checkpoint"
) -> tuple[list[str], list[str]]:
    """Load ``state`` (name -> tensor) into ``model``; returns ``(missing, unexpected)`` keys.

    Raises ``ValueError`` naming every key whose shape differs (checkpoint shape vs. model
    shape) -- with or without ``strict``: a tensor of the wrong shape cannot be loaded --
    and, with ``strict``, the missing and unexpected keys. ``source`` names the file in the
    message."""
    own = model.state_dict()
    mismatched = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of another shape: " + "; ".join(mismatched))
    if strict and missing:
        problems.append(
            f"{len(missing)} missing: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    if strict and unexpected:
        problems.append(
            f"{len(unexpected)} unexpected: {', '.join(unexpected[:10])}"
            + (" ..." if len(unexpected) > 10 else "")
        )
    if problems:
        raise ValueError(
            f"{source} does not fit the model {type(model).__name__}: {'. '.join(problems)}. "
            "Use the model settings it was trained with (model, model_args, num_classes)."
        )
    if strict:
        model.load_state_dict(state)
    else:
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected


class Trainer:
    """The state of one training run; :func:`fit` is the usual entry point."""

    def __init__(
        self,
        model: nn.Module,
        *,
        train_set: Dataset,
        test_set: Dataset | None,
        config: FitConfig,
        run_dir: str | Path | None = None,
        dist: DistInfo | None = None,
        mixup: BatchMix | None = None,
        class_names: Sequence[str] | None = None,
        run_config: dict | None = None,
        layer_id_fn: Callable[[str, int], int] = vit_layer_id,
        on_step: Callable[[dict], None] | None = None,
        objective: Objective | None = None,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> None:
        config.validate()
        self.objective = objective if objective is not None else Objective()
        if test_set is not None and not self.objective.has_accuracy:
            raise ValueError(
                f"the {self.objective.name} objective has no test evaluation; pass test_set=None"
            )
        if mixup is not None and not self.objective.has_accuracy:
            raise ValueError(f"Mixup/CutMix applies to classification, not {self.objective.name}")
        self.config = config
        self.dist = dist if dist is not None else DistInfo(device=resolve_device(None))
        self.device = self.dist.device
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.mixup = mixup
        self.class_names = list(class_names) if class_names is not None else None
        self.run_config = run_config if run_config is not None else {"fit": asdict(config)}
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.train_set, self.test_set = train_set, test_set

        self.use_amp = config.amp if config.amp is not None else self.device.type == "cuda"
        if self.use_amp and self.device.type != "cuda":
            raise ValueError(
                f"amp=True needs a CUDA device, this run is on {self.device}; use amp=False"
            )
        if config.sync_bn and self.dist.distributed and self.device.type != "cuda":
            raise ValueError("sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")

        model = model.to(self.device)
        if config.sync_bn and self.dist.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = build_optimizer(
            model,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=config.betas,
            layer_decay=config.layer_decay,
            layer_id_fn=layer_id_fn,
        )
        if self.dist.distributed:
            self.ddp: nn.Module = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
        else:
            self.ddp = model

        self.sampler = EpochSampler(
            len(train_set),
            batch_size=config.batch_size,
            seed=config.seed,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            max_batches=config.max_steps_per_epoch,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.scheduler = CosineSchedule(
            self.optimizer,
            base_lr=config.lr,
            steps_per_epoch=self.steps_per_epoch,
            epochs=config.epochs,
            warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr,
            min_lr=config.min_lr,
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and config.amp_dtype == "float16"
        )
        self.mix_gen = torch.Generator()

        # progress of the run (what a checkpoint records)
        self.epoch = 0
        self.step_in_epoch = 0
        self.step = 0
        self.accum = self._zero_accum()
        self.best_acc1 = -math.inf
        self.best_epoch = -1
        self.last_eval: EvalResult | None = None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.run_dir else None
        self.tb: TensorBoard | None = None

    # ----------------------------------------------------------------- checkpoints
    @staticmethod
    def _zero_accum() -> dict:
        return {"loss_sum": 0.0, "correct1": 0.0, "count": 0.0, "seconds": 0.0}

    def state_dict(self) -> dict:
        """A weights-only checkpoint of the run. Collective under DDP: every rank calls it
        (each contributes its RNG states), rank 0 writes."""
        rng = all_gather_objects(capture_rng_state())
        gens = all_gather_objects(self.mix_gen.get_state())
        return {
            "model": _unwrap(self.ddp).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "world_size": self.dist.world_size,
            "rng": rng,
            "generators": {"mixup": gens},
            "train_accum": dict(self.accum),
            "best": {"acc1": float(self.best_acc1), "epoch": int(self.best_epoch)},
            "config": self.run_config,
            "fit_config": asdict(self.config),
        }

    def save(self, name: str) -> Path | None:
        state = self.state_dict()
        if self.run_dir is None or not self.dist.is_main:
            return None
        return save_checkpoint(self.run_dir / name, state)

    def load(self, path: str | Path) -> None:
        """Restore a run from a checkpoint written by :meth:`save` (any rank count; with a
        different number of processes the per-rank RNG streams are re-derived, so the
        continuation is statistically but not bit-for-bit the same)."""
        ckpt = load_checkpoint(path, map_location="cpu")
        if "optimizer" not in ckpt or "step_in_epoch" not in ckpt:
            raise ValueError(
                f"{path} is not a resumable training checkpoint (no optimizer/progress state); "
                "use it with --eval-only --checkpoint or as initial weights instead"
            )
        load_model_state(_unwrap(self.ddp), ckpt["model"], strict=True, source=str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        try:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except ValueError as e:
            # deliberately changing the schedule on resume (e.g. a lower lr after a NaN) is
            # allowed, but the run is no longer the one that was checkpointed
            warnings.warn(f"{e}; continuing with this run's schedule", stacklevel=2)
            self.scheduler.last_step = int(ckpt["scheduler"]["last_step"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.step_in_epoch = int(ckpt["step_in_epoch"])
        self.step = int(ckpt["step"])
        if self.step_in_epoch > self.steps_per_epoch:
            raise ValueError(
                f"{path}: {self.step_in_epoch} steps into epoch {self.epoch}, but this run has "
                f"{self.steps_per_epoch} steps per epoch (batch size or data changed?)"
            )
        self.accum = {k: float(v) for k, v in ckpt["train_accum"].items()}
        self.best_acc1 = float(ckpt["best"]["acc1"])
        self.best_epoch = int(ckpt["best"]["epoch"])
        same_world = int(ckpt["world_size"]) == self.dist.world_size
        if same_world:
            restore_rng_state(ckpt["rng"][self.dist.rank])
            self.mix_gen.set_state(ckpt["generators"]["mixup"][self.dist.rank])
        else:
            warnings.warn(
                f"{path} was written by {ckpt['world_size']} processes, this run has "
                f"{self.dist.world_size}: the data order is kept, the per-rank random "
                "streams are re-derived (the continuation is not bit-identical)",
                stacklevel=2,
            )
            seed_everything(self.config.seed + self.epoch, rank=self.dist.rank)
            self.mix_gen = epoch_generator(self.config.seed, self.epoch, 1, self.dist.rank)

    # ----------------------------------------------------------------- loops
    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        return DataLoader(
            self.train_set,
            batch_size=self.config.batch_size // self.dist.world_size,
            sampler=self.sampler,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            # the loader draws its workers' base seed from this generator; without one it
            # would draw from the global torch RNG and shift dropout on a resumed run
            generator=epoch_generator(self.config.seed, epoch, 2, self.dist.rank),
        )

    def mixup_active(self, epoch: int) -> bool:
        off = self.config.mixup_off_epoch
        return self.mixup is not None and (off is None or epoch < off)

    def _nonfinite(self, loss_value: float, lr: float, pre_state: dict) -> None:
        path = None
        if self.run_dir is not None and self.dist.is_main:
            path = save_checkpoint(self.run_dir / "nonfinite.pt", pre_state)
        where = f"epoch {self.epoch}, step {self.step_in_epoch} of {self.steps_per_epoch}"
        hint = (
            f"the state from just before this step is in {path} and the last regular "
            f"checkpoint in {self.run_dir / 'last.pt'}; "
            if path is not None
            else ""
        )
        raise NonFiniteLossError(
            f"training loss became {loss_value} at {where} (global step {self.step}, "
            f"lr {lr:.3g}). {hint}try a lower lr or longer warmup, gradient clipping "
            f"(clip_grad), or amp off / amp_dtype bfloat16, then resume or restart.",
            checkpoint=path,
        )

    def train_one_epoch(self) -> dict:
        """Train the rest of epoch ``self.epoch`` (from ``self.step_in_epoch``); returns the
        epoch's mean loss, top-1 accuracy (against the argmax of the mixed target under
        Mixup), throughput and seconds."""
        cfg = self.config
        model = _unwrap(self.ddp)
        model.train()
        epoch = self.epoch
        if self.step_in_epoch == 0:
            self.accum = self._zero_accum()
            self.mix_gen = epoch_generator(cfg.seed, epoch, 1, self.dist.rank)
        mixing = self.mixup_active(epoch)
        loader = self._loader(epoch, self.step_in_epoch)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.total_epochs}",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        seconds_before = self.accum["seconds"]
        samples_now = 0
        lr = self.scheduler.lr(self.step)
        for x, y in loader:
            pre_state = {
                "rng": capture_rng_state(),
                "mix": self.mix_gen.get_state(),
            }
            x = _to_input(x, self.device)
            reset_states(model)
            loss, stats = self.objective.step(self, x, y, mixing=mixing)
            stats = all_reduce(stats, device=self.device).cpu()
            lr = self.scheduler.lr(self.step)
            if not math.isfinite(float(stats[0])):
                reset_states(model)
                self._nonfinite(float(stats[0] / stats[2]), lr, self._pre_step_state(pre_state))
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # sets lr_at(self.step) in every group
            self.scaler.scale(loss).backward()
            if cfg.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            reset_states(model)

            self.step += 1
            self.step_in_epoch += 1
            self.accum["loss_sum"] += float(stats[0])
            self.accum["correct1"] += float(stats[1])
            self.accum["count"] += float(stats[2])
            samples_now += int(stats[2])
            elapsed = time.perf_counter() - t_start
            self.accum["seconds"] = seconds_before + elapsed
            bar.update(1)
            shown = {"loss": f"{self.accum['loss_sum'] / self.accum['count']:.4f}"}
            if self.objective.has_accuracy:
                shown["acc"] = f"{100 * self.accum['correct1'] / self.accum['count']:.1f}"
            bar.set_postfix(
                **shown,
                lr=f"{lr:.2e}",
                sps=f"{samples_now / max(elapsed, 1e-9):.1f}",
                refresh=False,
            )
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save("last.pt")
            if self.on_step is not None:
                self.on_step(
                    {
                        "epoch": epoch,
                        "step": self.step,
                        "step_in_epoch": self.step_in_epoch,
                        "loss": float(stats[0] / stats[2]),
                        "lr": lr,
                    }
                )
        bar.close()
        count = max(self.accum["count"], 1.0)
        out = {"train_loss": self.accum["loss_sum"] / count}
        if self.objective.has_accuracy:
            out["train_acc1"] = 100.0 * self.accum["correct1"] / count
        out.update(
            train_seconds=self.accum["seconds"],
            samples_per_second=self.accum["count"] / max(self.accum["seconds"], 1e-9),
            lr=lr,
        )
        return out

    def _pre_step_state(self, pre: dict) -> dict:
        """A checkpoint of the state before the current (not yet applied) step."""
        state = self.state_dict()
        state["rng"] = all_gather_objects(pre["rng"])
        state["generators"] = {"mixup": all_gather_objects(pre["mix"])}
        return state

    def evaluate(self, *, desc: str = "test") -> EvalResult:
        cfg = self.config
        return evaluate(
            self.ddp,
            self.test_set,
            batch_size=cfg.eval_batch_size or cfg.batch_size // self.dist.world_size,
            dist=self.dist,
            num_workers=cfg.num_workers,
            topk=cfg.topk,
            amp=self.use_amp,
            amp_dtype=cfg.amp_dtype,
            max_batches=cfg.max_eval_batches,
            progress=cfg.progress,
            desc=desc,
        )

    def fit(self, *, resume: str | Path | None = None) -> FitResult:
        cfg = self.config
        if resume is not None:
            self.load(resume)
        else:
            # distinct per-rank streams for anything drawing from the global RNGs (dropout)
            seed_everything(cfg.seed, rank=self.dist.rank)
        main = self.dist.is_main and self.run_dir is not None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_info(
                self.run_dir,
                config=self.run_config,
                extra={
                    "world_size": self.dist.world_size,
                    "device": str(self.device),
                    "amp": self.use_amp,
                    "resumed_from": str(resume) if resume is not None else None,
                    "steps_per_epoch": self.steps_per_epoch,
                },
            )
            self.metrics.truncate(before_epoch=self.epoch)
            if cfg.tensorboard:
                self.tb = TensorBoard(self.run_dir / "tensorboard", purge_step=self.epoch)
        try:
            while self.epoch < cfg.total_epochs:
                self._run_epoch()
        finally:
            if self.tb is not None:
                self.tb.close()
        final = self.last_eval
        if final is None and resume is not None and self.test_set is not None and self.epoch:
            # resumed a run that had already finished (killed after its last checkpoint, or
            # resumed again): its final evaluation is not in the checkpoint, so it is redone
            # on the checkpointed weights -- the same numbers the finished run had
            final = self.last_eval = self.evaluate(desc="test (final, recomputed)")
        history = self.metrics.read() if self.metrics is not None and main else []
        if main:
            if cfg.plots:
                self._plot_curves()
            self._write_results(final)
        return FitResult(
            final=final,
            best_acc1=self.best_acc1,
            best_epoch=self.best_epoch,
            history=history,
            run_dir=self.run_dir,
        )

    def _run_epoch(self) -> dict:
        cfg = self.config
        epoch = self.epoch
        train = self.train_one_epoch()
        t0 = time.perf_counter()
        last = epoch == cfg.total_epochs - 1
        row: dict[str, Any] = {"epoch": epoch, "step": self.step, **train, **self.objective.row()}
        if self.objective.has_accuracy:
            row["mixup"] = self.mixup_active(epoch)
        if self.test_set is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            res = self.evaluate(desc=f"test {epoch + 1}/{cfg.total_epochs}")
            self.last_eval = res
            row.update(test_loss=res.loss, test_acc1=res.acc1, test_acc5=res.acc5)
            if res.acc1 > self.best_acc1:
                self.best_acc1, self.best_epoch = res.acc1, epoch
                if self.run_dir is not None and self.dist.is_main:
                    atomic_torch_save(
                        {
                            "model": _unwrap(self.ddp).state_dict(),
                            "epoch": epoch,
                            "test_acc1": res.acc1,
                            "config": self.run_config,
                        },
                        self.run_dir / "best.pt",
                    )
        elif self.objective.has_accuracy:
            row.update(test_loss=None, test_acc1=None, test_acc5=None)
        if self.objective.has_accuracy:
            row["best_test_acc1"] = self.best_acc1 if self.best_epoch >= 0 else None
        if self.on_epoch is not None:  # every rank; before last.pt, so a resume redoes it
            self.on_epoch(row)
        row["epoch_seconds"] = train.pop("train_seconds") + (time.perf_counter() - t0)
        if self.dist.is_main:
            if self.metrics is not None:
                self.metrics.append(row)
            if self.tb is not None:
                self.tb.scalars(row, epoch)
            if cfg.progress:
                test = row.get("test_acc1")
                acc = "" if test is None else f", test acc1 {test:.2f} %"
                tqdm.write(
                    f"epoch {epoch + 1}/{cfg.total_epochs}: train loss {row['train_loss']:.4f}"
                    f"{acc}, {row['epoch_seconds']:.1f} s"
                )
        self.epoch += 1
        self.step_in_epoch = 0
        self.accum = self._zero_accum()
        self.save("last.pt")
        return row

    def _plot_curves(self) -> None:
        from evformer.viz.plots import plot_training_curves

        plot_training_curves(self.metrics.read(), self.run_dir / "curves.png")

    def _write_results(self, final: EvalResult | None) -> None:
        import json

        out: dict[str, Any] = {
            "final_epoch": self.epoch - 1,
            "best_test_acc1": self.best_acc1 if self.best_epoch >= 0 else None,
            "best_epoch": self.best_epoch if self.best_epoch >= 0 else None,
            "class_names": self.class_names,
        }
        if final is not None:
            out["final"] = final.as_dict()
            if self.config.plots:
                from evformer.viz.plots import plot_confusion_matrix

                names = self.class_names
                if names is not None and len(names) != final.confusion.shape[0]:
                    names = None
                plot_confusion_matrix(
                    final.confusion, self.run_dir / "confusion_matrix.png", class_names=names
                )
        atomic_write_text(self.run_dir / "results.json", json.dumps(out, indent=2) + "\n")


def fit(
    model: nn.Module,
    *,
    train_set: Dataset,
    test_set: Dataset | None,
    config: FitConfig,
    run_dir: str | Path | None = None,
    dist: DistInfo | None = None,
    mixup: BatchMix | None = None,
    class_names: Sequence[str] | None = None,
    resume: str | Path | None = None,
    run_config: dict | None = None,
    layer_id_fn: Callable[[str, int], int] = vit_layer_id,
    on_step: Callable[[dict], None] | None = None,
    objective: Objective | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_set`` (items ``(x, label)``) and evaluate on ``test_set``
    after every ``config.eval_every`` epochs and at the end.

    ``mixup(x, y, generator) -> (x, soft_targets)`` is applied to training batches until
    ``config.mixup_off_epoch``. ``run_dir`` (rank 0) receives ``metrics.jsonl``,
    ``config.yaml`` (``run_config``, else ``config``), ``run_info.json``, ``last.pt``,
    ``best.pt``, ``results.json`` and the PNG plots. ``resume`` continues from a
    ``last.pt``: the result is the same as an uninterrupted run on the same hardware.
    ``on_step(info)`` is called after every optimizer step (rank-local), ``on_epoch(row)``
    at the end of every epoch on every rank with its metrics row (before ``last.pt``).
    ``objective`` (default: classification, :class:`Objective`) is what a step computes;
    :class:`MaskedReconstruction` trains a masked autoencoder (``test_set=None``, items
    ``(x, noise [L])``).

    Raises :class:`NonFiniteLossError` when the loss becomes NaN/inf.
    """
    trainer = Trainer(
        model,
        train_set=train_set,
        test_set=test_set,
        config=config,
        run_dir=run_dir,
        dist=dist,
        mixup=mixup,
        class_names=class_names,
        run_config=run_config,
        layer_id_fn=layer_id_fn,
        on_step=on_step,
        objective=objective,
        on_epoch=on_epoch,
    )
    return trainer.fit(resume=resume)


def evaluate_time_steps(
    model: nn.Module,
    make_dataset: Callable[[int], Dataset],
    timesteps: Sequence[int],
    *,
    batch_size: int,
    device: str | torch.device | None = None,
    dist: DistInfo | None = None,
    num_workers: int = 0,
    amp: bool = False,
    max_batches: int | None = None,
) -> dict[int, EvalResult]:
    """Evaluate one trained model at several numbers of time steps (the paper's Table VI
    protocol): for each ``T`` the model's ``T`` attribute is set (static input is repeated
    ``T`` times) and ``make_dataset(T)`` supplies the test set (event data must be re-binned
    into ``T`` frames). The model's original ``T`` is restored afterwards."""
    base = _unwrap(model)
    if not hasattr(base, "T"):
        raise AttributeError(f"{type(base).__name__} has no 'T' attribute to vary")
    original = base.T
    out: dict[int, EvalResult] = {}
    try:
        for t in timesteps:
            if int(t) < 1:
                raise ValueError(f"time steps must be >= 1, got {t}")
            base.T = int(t)
            out[int(t)] = evaluate(
                base,
                make_dataset(int(t)),
                batch_size=batch_size,
                device=device,
                dist=dist,
                num_workers=num_workers,
                amp=amp,
                max_batches=max_batches,
                desc=f"eval T={t}",
            )
    finally:
        base.T = original
    return out
