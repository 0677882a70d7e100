"""CIFAR-100 with Spikformer 4-384, T = 4 (presets ``cifar100_4_256``, ``cifar100_2_384``).

The CIFAR-10 recipe with 100 classes and CIFAR-100 normalisation statistics. Published:
77.86 % (4-384), 75.96 % (4-256), 76.95 % (2-384).

    python -m evformer.recipes.cifar100 --demo
    python -m evformer.recipes.cifar100 --data-root datasets
    torchrun --nproc_per_node=4 -m evformer.recipes.cifar100 --data-root datasets
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evformer.recipes import cifar10
from evformer.recipes._common import Recipe, run
from evformer.recipes._static import build_static_data, build_static_test


@dataclass
class Config(cifar10.Config):
    num_classes: int = 100
    dataset: str = "cifar100"


# The demo data has 10 classes: a CIFAR-100-sized head is pointless on it.
DEMO = dict(cifar10.DEMO)

RECIPE = Recipe(
    name="cifar100",
    config_cls=Config,
    demo=DEMO,
    build_data=build_static_data,
    build_test=build_static_test,
    description=__doc__.split("\n\n")[0],
    default_preset="cifar100_4_384",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
