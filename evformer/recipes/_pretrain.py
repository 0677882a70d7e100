"""Masked-image pretraining (Spikformer V2 MAE, paper section 5.2) as a recipe: the config
fields, the data (an ImageFolder root, or event frames), the per-sample masking noise, the
reconstruction figures, ``encoder.pt`` and the ``--demo`` linear probe.

The training loop is the engine's (:func:`evformer.engine.fit` with the
:class:`~evformer.engine.MaskedReconstruction` objective): parameter groups, schedule, AMP,
DDP, checkpoints and exact resume, non-finite handling and ``metrics.jsonl`` are the same
code the supervised recipes run.

Masks and reproducibility: sample ``i`` of epoch ``e`` gets its masking noise ``[L]`` from
``epoch_generator(seed, e, i, MASK_STREAM)`` -- a stream of its own next to the sample's
augmentation generators (``evformer.data.seeding.sample_generators(seed, e, i)``), so a
sample's mask depends on (seed, epoch, index) alone: the same for any number of processes
and loader workers, and after a resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from evformer.recipes._common import (
    EXIT_NONFINITE,
    EXIT_OK,
    Data,
    Recipe,
    _default_run_dir,
    _say,
    config_dict,
    load_weights,
)
from evformer.recipes._event import EVENT_DATASETS, EventConfig, event_dataset
from evformer.recipes._static import StaticConfig

# the 4th entry of the (seed, epoch, index, stream) seed of a sample's masking noise; the
# reconstruction figure's fixed masks use RECON_STREAM at epoch 0
MASK_STREAM, RECON_STREAM = 0x3A5C, 0x3A5D
PRETRAIN_DATASETS = ("imagenet", *EVENT_DATASETS)


@dataclass
class PretrainConfig(StaticConfig, EventConfig):
    """Masked-image pretraining settings: the static-image fields (``image_size``,
    ``crop_scale_min``, ...) for ``--dataset imagenet`` and the event fields (``resize``,
    ``split_by``, ...) for ``--dataset dvs_gesture|cifar10_dvs|synthetic``, plus:

    Learning rate: ``lr`` is the absolute peak rate; left at ``None`` it is resolved from
    ``blr * batch_size / blr_batch`` (linear scaling with the global batch). The paper gives
    "base learning rate 1e-3 ... batch size 1024" without a scaling rule, so ``blr`` is
    read as the rate *at* its batch of 1024 (``blr_batch``), not MAE's per-256 base rate
    (which would give 4e-3 at 1024); the resolved value is the ``lr`` in ``config.yaml``.
    """

    lr: float | None = None  # peak lr; None: blr * batch_size / blr_batch
    blr: float = 1e-3  # base lr at a global batch of blr_batch (paper: 1e-3 at 1024)
    blr_batch: int = 1024  # the global batch at which blr applies
    num_classes: int = 0  # pretraining has no head (the probe reads the dataset's labels)
    mask_ratio: float = 0.75  # fraction of tokens masked (MAE, paper)
    norm_pix_loss: bool = True  # target: each patch normalised by its own mean and std
    recon_samples: int = 8  # fixed samples in the reconstruction figure of every epoch
    probe: bool = False  # after training: linear probe of the encoder vs random weights

    def validate(self) -> None:
        if self.blr <= 0 or self.blr_batch < 1:
            raise ValueError(
                f"--blr must be > 0 and --blr-batch >= 1, got {self.blr}, {self.blr_batch}"
            )
        if self.lr is None:
            self.lr = self.blr * self.batch_size / self.blr_batch
        super().validate()
        if self.dataset not in PRETRAIN_DATASETS:
            raise ValueError(f"--dataset must be one of {PRETRAIN_DATASETS}, got {self.dataset!r}")
        if self.eval_only or self.eval_t:
            raise ValueError(
                "masked pretraining has no classifier to evaluate (--eval-only, --eval-t): "
                "fine-tune RUN/encoder.pt with a supervised recipe (--init) and evaluate that"
            )
        if self.mixup > 0 or self.cutmix > 0:
            raise ValueError("Mixup/CutMix apply to classification, not masked pretraining")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio}")
        if self.recon_samples < 0:
            raise ValueError(f"--recon-samples must be >= 0, got {self.recon_samples}")

    @property
    def events(self) -> bool:
        return self.dataset in EVENT_DATASETS


# ----------------------------------------------------------------------------- data


def build_pretrain_data(cfg: PretrainConfig, *, train: bool = True) -> Data:
    """Training images or frames (labels ignored by the loss) and a labelled held-out set
    (reconstruction figures, the probe).

    ``imagenet``: ``<data-root>/ImageNet/train`` through RandomResizedCrop (area
    ``crop_scale_min``..1) and horizontal flip only; the figure samples come from the same
    folder through the deterministic evaluation transform (no ``val`` folder is needed).
    Event datasets: frames ``[T, 2, H, W]`` at ``cfg.T`` (event counts, resized as the event
    recipes do with ``--resize``), the ``--augment`` frame policy (default none), the
    dataset's test split as the held-out set."""
    if cfg.events:
        from evformer.data import get_policy

        test = event_dataset(cfg, "test", cfg.T)
        train_set = event_dataset(cfg, "train", cfg.T) if train else None
        policy = None if cfg.augment == "none" else get_policy(cfg.augment)
        names = list(getattr(test, "classes", ()))
        return Data(train=train_set, test=test, class_names=names, train_transform=policy)
    from evformer.data import ImageNet
    from evformer.recipes._static import _transforms

    train_tf, eval_tf = _transforms(cfg)
    train_set = ImageNet(cfg.data_root, "train", transform=None)
    held_out = ImageNet(cfg.data_root, "train", transform=eval_tf)
    return Data(
        train=train_set if train else None,
        test=held_out,
        class_names=list(train_set.classes),
        train_transform=train_tf,
    )


def build_pretrain_test(cfg: PretrainConfig, T: int) -> Dataset:
    """The held-out set (event data re-binned into ``T`` frames)."""
    return event_dataset(cfg, "test", T) if cfg.events else build_pretrain_data(cfg).test


def mask_noise(seed: int, epoch: int, index: int, num_tokens: int, *, stream: int = MASK_STREAM):
    """Uniform [0, 1) noise ``[num_tokens]`` of sample ``index`` in ``epoch`` (float32): the
    argsort of this row is the sample's mask (``SpikformerMAE(noise=...)``)."""
    from evformer.engine import epoch_generator

    return torch.rand(num_tokens, generator=epoch_generator(seed, epoch, index, stream))


class MaskedSamples(Dataset):
    """``(x, noise [L])`` for sample ``i``: ``x`` from ``base`` (a
    ``SeededTransformDataset``: augmentation from ``(seed, epoch, i)``, label dropped) and
    :func:`mask_noise` ``(seed, epoch, i)``. :meth:`set_epoch` reaches both."""

    def __init__(self, base: Dataset, *, num_tokens: int, seed: int) -> None:
        self.base, self.num_tokens, self.seed = base, int(num_tokens), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, _ = self.base[index]
        return x, mask_noise(self.seed, self.epoch, int(index), self.num_tokens)


# ----------------------------------------------------------------------------- model


def _image_geometry(cfg: PretrainConfig, sample: torch.Tensor) -> dict:
    """``img_size`` and ``in_channels`` of the data (``[C, H, W]`` or ``[T, C, H, W]``)."""
    C, H, W = sample.shape[-3:]
    if H != W:
        raise ValueError(f"{cfg.dataset}: frames of {H}x{W}; the MAE needs square input")
    return {"img_size": int(H), "in_channels": int(C)}


def build_mae(cfg: PretrainConfig, sample: torch.Tensor) -> nn.Module:
    """``create_model(cfg.model)`` at the data's size and channels, ``cfg.T``, the mask
    ratio and target (``model_args`` override any of them)."""
    from evformer.models import create_model

    kwargs = {
        **_image_geometry(cfg, sample),
        "T": cfg.T,
        "mask_ratio": cfg.mask_ratio,
        "norm_pix_loss": cfg.norm_pix_loss,
        **cfg.model_args,
    }
    return create_model(cfg.model, **kwargs)


def _num_tokens(model: nn.Module) -> int:
    c = model.config
    size = (c.img_size, c.img_size) if isinstance(c.img_size, int) else c.img_size
    return (size[0] // c.patch_size) * (size[1] // c.patch_size)


def encoder_model_name(mae_name: str) -> str:
    """``mae_spikformer_v2_12_512`` -> ``spikformer_v2_12_512`` (the fine-tuning model)."""
    return mae_name.removeprefix("mae_")


# ----------------------------------------------------------------------------- figures


class ReconstructionFigures:
    """Every epoch: ``reconstructions/epoch_NNN.png`` (and ``reconstructions.png``, the
    latest) of fixed held-out samples under fixed masks, through
    :func:`evformer.viz.reconstruction.plot_mae_reconstructions` (original, masked input,
    reconstruction with the visible patches pasted back, de-normalised; ON/OFF in two
    colours for events). Runs the model in eval mode without gradients; draws no random
    number (the masks are fixed), so training is unaffected."""

    def __init__(
        self, model: nn.Module, dataset: Dataset, cfg: PretrainConfig, run_dir: Path, device
    ) -> None:
        n = min(cfg.recon_samples, len(dataset))
        # spread over the set (labels i % K in the built-in sets: several classes)
        idx = np.linspace(0, len(dataset) - 1, n).round().astype(int) if n else []
        self.model, self.run_dir, self.device = model, Path(run_dir), device
        self.x = (
            torch.stack([torch.as_tensor(dataset[int(i)][0]).float() for i in idx]) if n else None
        )
        L = _num_tokens(model)
        self.noise = (
            torch.stack([mask_noise(cfg.seed, 0, int(i), L, stream=RECON_STREAM) for i in idx])
            if n
            else None
        )
        if cfg.events:
            self.mean = self.std = None
        else:
            from evformer.data.static import IMAGENET_MEAN, IMAGENET_STD

            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.norm_pix = cfg.norm_pix_loss

    @torch.no_grad()
    def __call__(self, row: dict) -> None:
        if self.x is None:
            return
        from evformer.engine import reset_states
        from evformer.viz.reconstruction import plot_mae_reconstructions, save_figure

        model = self.model
        was_training = model.training
        model.eval()
        reset_states(model)
        _, pred, mask = model(self.x.to(self.device), noise=self.noise.to(self.device))
        reset_states(model)
        model.train(was_training)
        fig = plot_mae_reconstructions(
            self.x,
            mask.float().cpu(),
            pred.float().cpu(),
            patch_size=model.patch_size,
            norm_pix=self.norm_pix,
            mean=self.mean,
            std=self.std,
            max_rows=len(self.x),
        )
        fig.suptitle(f"epoch {row['epoch'] + 1}: train loss {row['train_loss']:.4f}", fontsize=9)
        folder = self.run_dir / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        save_figure(fig, folder / f"epoch_{row['epoch'] + 1:03d}.png")
        save_figure(fig, self.run_dir / "reconstructions.png")


# ----------------------------------------------------------------------------- the run


def run_pretrain(recipe: Recipe, cfg: PretrainConfig) -> int:
    """Pretrain, write ``encoder.pt``, optionally probe (``--probe``, the demo)."""
    from evformer.engine import (
        MaskedReconstruction,
        NonFiniteLossError,
        SeededTransformDataset,
        all_gather_objects,
        fit,
        init_distributed,
        seed_everything,
    )
    from evformer.engine.checkpoint import save_checkpoint

    for flag, path in (("--resume", cfg.resume), ("--init", None if cfg.resume else cfg.init)):
        if path and not Path(path).is_file():  # before any data is read
            raise FileNotFoundError(f"{flag} {path}: no such file")
    dist = init_distributed(None if cfg.device == "auto" else cfg.device)
    run_dir = Path(all_gather_objects(str(_default_run_dir(cfg, recipe.name)))[0])
    data = recipe.build_data(cfg, train=True)
    first = torch.as_tensor(data.test[0][0])
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = build_mae(cfg, first)
    if cfg.init and not cfg.resume:
        notes = load_weights(model, cfg.init, strict=False)
        _say(dist, f"initial weights from {cfg.init}{': ' + '; '.join(notes) if notes else ''}")
    L = _num_tokens(model)
    train_set = MaskedSamples(
        SeededTransformDataset(data.train, data.train_transform, seed=cfg.seed),
        num_tokens=L,
        seed=cfg.seed,
    )
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    _say(
        dist,
        f"{recipe.name}: model {cfg.model} (encoder {n_enc / 1e6:.2f} M + decoder "
        f"{(n_all - n_enc) / 1e6:.2f} M parameters), T={cfg.T}, {L} tokens, mask ratio "
        f"{cfg.mask_ratio}, lr {cfg.lr:.3g} (batch {cfg.batch_size}), {len(train_set)} "
        f"training samples, {dist.world_size} process(es) on {dist.device}, run directory "
        f"{run_dir}",
    )
    figures = None
    if dist.is_main and cfg.recon_samples:
        figures = ReconstructionFigures(model, data.test, cfg, run_dir, dist.device)
    run_config = config_dict(cfg, recipe=recipe.name)
    try:
        result = fit(
            model,
            train_set=train_set,
            test_set=None,
            config=cfg.fit_config(),
            run_dir=run_dir,
            dist=dist,
            resume=cfg.resume,
            run_config=run_config,
            objective=MaskedReconstruction(row={"mask_ratio": cfg.mask_ratio}),
            on_epoch=figures,
        )
    except NonFiniteLossError as e:
        _say(dist, f"error: {e}", err=True)
        return EXIT_NONFINITE
    if not dist.is_main:
        return EXIT_OK
    encoder_name = encoder_model_name(cfg.model)
    encoder_args = _encoder_args(cfg, model)
    save_checkpoint(
        run_dir / "encoder.pt",
        {
            "model": model.encoder_state_dict(),
            "model_name": encoder_name,
            "model_args": encoder_args,
            "config": run_config,
        },
    )
    losses = [r["train_loss"] for r in result.history]
    summary: dict[str, Any] = _read_json(run_dir / "results.json")
    summary.update(
        objective="masked_reconstruction",
        first_epoch_loss=losses[0] if losses else None,
        last_epoch_loss=losses[-1] if losses else None,
        encoder=str(run_dir / "encoder.pt"),
        encoder_model=encoder_name,
    )
    if losses:
        _say(dist, f"train loss: epoch 1 {losses[0]:.4f} -> epoch {len(losses)} {losses[-1]:.4f}")
    hint = _finetune_hint(cfg, encoder_args, run_dir / "encoder.pt")
    _say(dist, f"encoder weights in {run_dir / 'encoder.pt'}; fine-tune with: {hint}")
    if cfg.probe:
        summary["probe"] = _probe(cfg, model, data, first, dist)
    from evformer.engine.tracking import atomic_write_text

    atomic_write_text(run_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    return EXIT_OK


def _encoder_args(cfg: PretrainConfig, model: nn.Module) -> dict:
    """The encoder settings that differ from the fine-tuning model's registry defaults
    (``--model-args`` of the supervised recipe): the ``model_args`` that are encoder fields,
    and the input size and channels of the data."""
    from evformer.models import create_model

    enc = model.encoder.config
    with torch.device("meta"):
        default = create_model(encoder_model_name(cfg.model)).config
    names = {f.name for f in dataclasses.fields(enc)} - {"T", "num_classes"}
    return {n: getattr(enc, n) for n in sorted(names) if getattr(enc, n) != getattr(default, n)}


def _finetune_hint(cfg: PretrainConfig, args: dict, path: Path) -> str:
    recipe = {"cifar10_dvs": "cifar10_dvs", "imagenet": "imagenet"}.get(cfg.dataset, "dvs_gesture")
    extra = ""
    if args:
        extra = " --model-args " + ",".join(f"{k}={v}" for k, v in args.items())
    if cfg.dataset == "synthetic":
        extra += " --dataset synthetic"
    if cfg.events and cfg.resize:
        extra += f" --resize {cfg.resize}"
    return (
        f"python -m evformer.recipes.{recipe} --model {encoder_model_name(cfg.model)}{extra} "
        f"--init {path}"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: Dataset, *, batch_size: int, device, max_samples: int = 1024
) -> None:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over
    the first ``max_samples`` items ``(x, label)`` of ``dataset`` (train-mode forward passes
    without gradients; no weight changes), then put ``model`` in eval mode."""
    from torch.utils.data import DataLoader, Subset

    from evformer.engine.batchnorm import recalibrate_batchnorm as recalibrate

    subset = Subset(dataset, range(min(len(dataset), max_samples)))  # type: ignore[arg-type]
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    recalibrate(model, (x.to(device).float() for x, _ in loader))


def _probe(cfg: PretrainConfig, model: nn.Module, data: Data, first, dist) -> dict:
    """Linear probe (:func:`evformer.engine.probe.linear_probe`) of the pretrained encoder
    and of the same encoder at its random initialisation (rebuilt from the same seed):
    fit on the pooled features of the labelled training split (no augmentation), scored on
    the held-out test split. Both encoders first get their BatchNorm statistics re-estimated
    on the unmasked training inputs (:func:`recalibrate_batchnorm`): a fresh encoder's
    running statistics (mean 0, variance 1) would silence every neuron on raw event counts
    and give constant features, and the pretrained ones come from masked inputs."""
    from evformer.engine import seed_everything
    from evformer.engine.probe import linear_probe

    if data.train is None or not cfg.events:
        raise ValueError("--probe needs a labelled event dataset (the demo's synthetic data)")
    seed_everything(cfg.seed)
    random_init = build_mae(cfg, first).encoder.to(dist.device)
    batch_size = max(1, cfg.eval_batch_size or cfg.batch_size)
    out: dict[str, Any] = {}
    for name, encoder in (("pretrained", model.encoder), ("random_init", random_init)):
        recalibrate_batchnorm(encoder, data.train, batch_size=batch_size, device=dist.device)
        res = linear_probe(
            encoder,
            data.train,
            data.test,
            device=dist.device,
            batch_size=batch_size,
            seed=cfg.seed,
        )
        out[name] = dataclasses.asdict(res)
    chance = 100 / max(len(data.class_names), 1)
    _say(
        dist,
        f"linear probe (logistic regression on pooled encoder features, fit on "
        f"{out['pretrained']['n_train']} train, scored on {out['pretrained']['n_test']} test "
        f"samples): pretrained {out['pretrained']['test_acc']:.1f} %, random init "
        f"{out['random_init']['test_acc']:.1f} % (chance {chance:.1f} %)",
    )
    return out
