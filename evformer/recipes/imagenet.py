"""ImageNet-1k with Spikformer 8-384, T = 4 (presets for every published V1 and V2 size).

V1, the official ``imagenet.yml``: AdamW lr 5e-4, weight decay 0.05, 300 cosine epochs +
10 cooldown, 20 warmup epochs from 1e-6, min lr 1e-5; RandAugment rand-m9-mstd0.5-inc1,
Mixup 0.8, CutMix 1.0, random erasing 0.25, label smoothing 0.1, AMP; 8 GPUs x 24 images
(global batch 192). V2 presets follow the paper's text: batch 512, 10 warmup epochs, no
Mixup/CutMix. Fine-tuning a pretrained model: ``--init weights.pt --layer-decay 0.7``.
Published (T = 4): V1 8-384 75.24, 6-512 77.26, 8-512 78.23, 10-512 78.57, 8-768 79.55;
V2 8-384 78.80, 8-512 80.38.

    python -m evformer.recipes.imagenet --demo
    torchrun --nproc_per_node=8 -m evformer.recipes.imagenet --data-root datasets \
        --preset imagenet_8_512
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evformer.recipes._common import Recipe, run
from evformer.recipes._static import StaticConfig, build_static_data, build_static_test


@dataclass
class Config(StaticConfig):
    model: str = "spikformer_8_384"
    T: int = 4
    num_classes: int = 1000
    dataset: str = "imagenet"
    transforms: str = "imagenet"
    image_size: int = 224
    crop_scale_min: float = 0.08
    epochs: int = 300
    cooldown_epochs: int = 10
    warmup_epochs: float = 20.0
    batch_size: int = 192
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    erasing: float = 0.25
    num_workers: int = 8


# Generated 64 x 64 images (10 classes) through the ImageNet transforms, a tiny model.
DEMO = dict(
    dataset="synthetic",
    num_classes=10,
    image_size=64,
    crop_scale_min=0.35,
    eval_crop_pct=1.0,
    model_args={"embed_dim": 64, "depth": 1, "num_heads": 4},
    T=1,
    epochs=6,
    cooldown_epochs=0,
    warmup_epochs=1.0,
    batch_size=32,
    lr=2e-3,
    mixup=0.0,
    cutmix=0.0,
    num_workers=0,
)

RECIPE = Recipe(
    name="imagenet",
    config_cls=Config,
    demo=DEMO,
    build_data=build_static_data,
    build_test=build_static_test,
    description=__doc__.split("\n\n")[0],
    default_preset="imagenet_8_384",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
