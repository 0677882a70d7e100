"""CIFAR-10 with Spikformer 4-384, T = 4 (presets ``cifar10_4_256``, ``cifar10_2_384``).

The official ``cifar10.yml``: AdamW lr 5e-4, weight decay 0.06, batch 128, 300 cosine
epochs + 10 cooldown, 20 warmup epochs from 1e-5, min lr 1e-5; horizontal flip,
RandAugment limited to Equalize/Rotate/ShearX/TranslateX/Y (rand-m9-n1-mstd0.4-inc1),
random erasing 0.25, Mixup alpha 0.5 off from epoch 200, label smoothing 0.1, AMP on CUDA.
Published: 95.19 % (4-384), 93.94 % (4-256), 94.80 % (2-384).

    python -m evformer.recipes.cifar10 --demo
    python -m evformer.recipes.cifar10 --data-root datasets
    torchrun --nproc_per_node=4 -m evformer.recipes.cifar10 --data-root datasets
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evformer.recipes._common import Recipe, run
from evformer.recipes._static import StaticConfig, build_static_data, build_static_test


@dataclass
class Config(StaticConfig):
    model: str = "spikformer_cifar_4_384"
    T: int = 4
    num_classes: int = 10
    dataset: str = "cifar10"
    transforms: str = "cifar"
    image_size: int = 32
    epochs: int = 300
    cooldown_epochs: int = 10
    warmup_epochs: float = 20.0
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    weight_decay: float = 0.06
    label_smoothing: float = 0.1
    mixup: float = 0.5
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_off_epoch: int | None = 200
    erasing: float = 0.25


# Generated 32 x 32 images (10 hue classes), a small 1-block model, a few epochs.
DEMO = dict(
    dataset="synthetic",
    num_classes=10,
    model_args={"embed_dim": 64, "depth": 1, "num_heads": 4},
    T=2,
    epochs=6,
    cooldown_epochs=0,
    warmup_epochs=1.0,
    batch_size=32,
    lr=2e-3,
    mixup_off_epoch=3,
    num_workers=0,
)

RECIPE = Recipe(
    name="cifar10",
    config_cls=Config,
    demo=DEMO,
    build_data=build_static_data,
    build_test=build_static_test,
    description=__doc__.split("\n\n")[0],
    default_preset="cifar10_4_384",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
