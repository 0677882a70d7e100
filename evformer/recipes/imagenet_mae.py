"""Masked-image pretraining of a Spikformer V2 encoder (MAE, paper section 5.2), on ImageNet
or on event frames.

The paper's recipe: 200 epochs (20 warmup), per-iteration cosine, AdamW betas (0.9, 0.95),
weight decay 0.05 (none on 1-D parameters and biases), global batch 1024, random-resized
crop and flip only, 75 % of the tokens masked, normalised-pixel target, T = 1, a 4-layer
256-wide 4-head decoder. Learning rate: the paper's "base learning rate 1e-3" at batch 1024,
scaled linearly with the global batch, ``lr = blr * batch_size / blr_batch`` = 1e-3 *
batch / 1024 (``--lr`` sets it directly). Presets for every pretrained V2 size
(``imagenet_mae_v2_{8_384,8_512,12_512,12_768,16_768}``). Event data
(``--dataset dvs_gesture|cifar10_dvs|synthetic``): frames [T, 2, H, W] of event counts.

Writes, besides the engine's run files: ``reconstructions/epoch_NNN.png`` every epoch and
``encoder.pt`` (the encoder weights alone) at the end; fine-tune it with
``python -m evformer.recipes.imagenet --preset imagenet_v2_12_512_finetune --init
RUN/encoder.pt``.

    python -m evformer.recipes.imagenet_mae --demo   # built-in event data, about a minute on a CPU
    torchrun --nproc_per_node=8 -m evformer.recipes.imagenet_mae --data-root datasets \\
        --preset imagenet_mae_v2_12_512
    python -m evformer.recipes.imagenet_mae --dataset dvs_gesture --data-root datasets \\
        --model-args stem_stages=4 --batch-size 64
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evformer.recipes._common import Recipe, load_run_config, load_weights, run
from evformer.recipes._pretrain import (
    PretrainConfig,
    build_mae,
    build_pretrain_data,
    build_pretrain_test,
    run_pretrain,
)


@dataclass
class Config(PretrainConfig):
    model: str = "mae_spikformer_v2_8_384"
    T: int = 1
    dataset: str = "imagenet"
    transforms: str = "imagenet"
    image_size: int = 224
    crop_scale_min: float = 0.2  # MAE's RandomResizedCrop(scale=(0.2, 1.0))
    randaugment: bool = False
    erasing: float = 0.0
    epochs: int = 200
    cooldown_epochs: int = 0
    warmup_epochs: float = 20.0
    batch_size: int = 1024
    lr: float | None = None  # peak lr; None: blr * batch_size / blr_batch
    blr: float = 1e-3
    blr_batch: int = 1024
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    num_workers: int = 8


# SyntheticGesture frames (11 classes, labelled test split), the 64 x 64 sensor sum-pooled
# to 32 x 32, T = 1, a tiny V2 (2 SCS stages: 8 x 8 tokens of 4 x 4 pixels, 64 wide, one
# block), a one-block decoder; then the linear probe against the random initialisation.
DEMO = dict(
    dataset="synthetic",
    synthetic_size=64,
    synthetic_train_per_class=64,
    synthetic_test_per_class=16,
    resize=32,
    model_args={
        "stem_stages": 2,
        "stem_ratio": 2,
        "embed_dim": 64,
        "depth": 1,
        "num_heads": 4,
        "decoder_dim": 64,
        "decoder_depth": 1,
        "decoder_heads": 4,
    },
    T=1,
    epochs=15,
    warmup_epochs=1.0,
    batch_size=32,
    lr=2e-3,
    recon_samples=6,
    probe=True,
    num_workers=0,
)

RECIPE = Recipe(
    name="imagenet_mae",
    config_cls=Config,
    demo=DEMO,
    build_data=build_pretrain_data,
    build_test=build_pretrain_test,
    description=__doc__.split("\n\n")[0],
    default_preset="imagenet_mae_v2_8_384",
    execute=run_pretrain,
)


def load_model(
    run_dir: str | os.PathLike,
    *,
    checkpoint: str = "last.pt",
    data_root: str | os.PathLike | None = None,
):
    """The masked autoencoder of a pretraining run, in eval mode, with every weight (decoder
    included) from ``run_dir/checkpoint``, and the run's :class:`Config` (from its
    ``config.yaml``; ``data_root`` replaces the recorded data root). The model is built at
    the size and channels of the run's held-out data, which must therefore be readable.
    Returns ``(model, config)``."""
    import torch

    path = Path(run_dir) / checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no checkpoint; a pretraining run writes it "
            "(python -m evformer.recipes.imagenet_mae --demo --out RUN)"
        )
    settings = load_run_config(Config, path, recipe=RECIPE.name)
    if data_root is not None:
        settings["data_root"] = str(data_root)
    cfg = Config(**settings)
    cfg.validate()
    sample = RECIPE.build_data(cfg, train=False).test[0][0]
    model = build_mae(cfg, torch.as_tensor(sample).float())
    load_weights(model, path, strict=True)
    return model.eval(), cfg


def main(argv: Sequence[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
