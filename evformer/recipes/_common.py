"""What every recipe shares: the config dataclass base, YAML presets, the command line
generated from the dataclass fields, run directories, missing-data handling and the
train / evaluate flow.

Precedence, lowest first: the recipe's ``Config`` defaults (the published recipe), the
``--demo`` overrides, a ``--preset`` YAML file, explicit command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

# Top-level ``recipes/`` of the source checkout, where the YAML presets live.
PRESET_DIR = Path(__file__).resolve().parents[2] / "recipes"

EXIT_OK, EXIT_ERROR, EXIT_NO_DATA, EXIT_NONFINITE = 0, 1, 2, 3


@dataclass
class RecipeConfig:
    """Fields shared by every recipe. Each recipe's ``Config`` subclass sets the defaults to
    its published values (SPEC-models.md, the official Spikformer configs)."""

    # -- model
    model: str = ""  # registry name, see evformer.models.list_models()
    model_args: dict = field(default_factory=dict)  # extra create_model overrides
    T: int = 4  # time steps (event recipes: frames per sample)
    num_classes: int = 10
    init: str | None = None  # initial weights (fine-tuning), loaded non-strictly
    # -- data
    data_root: str = "datasets"
    num_workers: int = 4
    # -- optimisation: AdamW, per-iteration cosine with warmup and cooldown
    epochs: int = 300  # cosine epochs, warmup included
    cooldown_epochs: int = 10  # extra epochs at min_lr
    warmup_epochs: float = 20.0
    batch_size: int = 128  # global, over all processes
    eval_batch_size: int | None = None  # per process (default: batch_size / processes)
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float | None = None
    clip_grad: float | None = None
    # -- regularisation
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Mixup alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # CutMix instead of Mixup when both are on
    mixup_off_epoch: int | None = None  # no mixing from this epoch on
    # -- precision and devices
    amp: bool | None = None  # None: on with CUDA, off on CPU
    amp_dtype: str = "float16"
    sync_bn: bool = False
    find_unused_parameters: bool = False  # DDP: for models with parameters a step may skip
    device: str = "auto"  # auto, cpu, cuda, or cuda:<index>
    # -- run
    seed: int = 0
    out: str | None = None  # run directory (default runs/<recipe>/<time>)
    resume: str | None = None  # a last.pt to continue from (same run directory)
    eval_only: bool = False  # evaluate --checkpoint, no training
    checkpoint: str | None = None  # weights for --eval-only
    eval_t: tuple[int, ...] = ()  # also evaluate at these T after training (Table VI)
    checkpoint_every: int = 0  # extra checkpoint every N steps (0: at epoch ends)
    eval_every: int = 1
    max_steps_per_epoch: int | None = None  # cap batches per epoch (smoke tests)
    max_eval_batches: int | None = None
    progress: bool = True
    demo: bool = False  # built-in data and a laptop-sized configuration
    preset: str | None = None  # YAML preset applied (recorded for the run directory)


# ----------------------------------------------------------------------------- parsing


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _converter(tp: Any, name: str) -> Callable[[str], Any]:
    """A function turning a command-line string into a value of field type ``tp``."""
    base, optional = _unwrap_optional(tp)

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        if base is bool:
            return _parse_bool(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str:
            return text
        if typing.get_origin(base) is tuple or base is tuple:
            items = [s for s in text.replace(" ", "").split(",") if s]
            inner = (typing.get_args(base) or (str,))[0]
            return tuple(
                int(s) if inner is int else float(s) if inner is float else s for s in items
            )
        if base is dict or typing.get_origin(base) is dict:
            out = {}
            for item in filter(None, (s.strip() for s in text.split(","))):
                if "=" not in item:
                    raise ValueError(
                        f"--{name.replace('_', '-')}: expected key=value, got {item!r}"
                    )
                k, v = item.split("=", 1)
                out[k.strip()] = yaml.safe_load(v)
            return out
        raise TypeError(f"field {name}: unsupported type {tp!r}")

    return convert


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Check and convert a YAML value for field ``name``."""
    hints = typing.get_type_hints(cls)
    base, optional = _unwrap_optional(hints[name])
    where = f"{source}: {name}"
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: null is not allowed (type {hints[name]})")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if typing.get_origin(base) is tuple or base is tuple:
        if isinstance(value, (int, str)):
            value = _converter(base, name)(str(value))
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ValueError(f"{where}: expected a list, got {value!r}")
    if base is dict or typing.get_origin(base) is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    raise TypeError(f"{where}: unsupported field type {hints[name]!r}")


def resolve_preset(name: str) -> Path:
    """A preset path, or a preset name looked up in the top-level ``recipes/`` folder."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (PRESET_DIR / name, PRESET_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    available = sorted(x.stem for x in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    raise FileNotFoundError(
        f"preset {name!r} not found (neither a file nor a name in {PRESET_DIR}); "
        f"available: {', '.join(available) or 'none'}"
    )


def load_preset(cls: type, path: str | Path, *, recipe: str) -> dict:
    """Read a YAML preset: a mapping of ``cls`` field names to values; an optional
    ``recipe:`` key must name this recipe."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    data = dict(data)
    owner = data.pop("recipe", recipe)
    if owner != recipe:
        raise ValueError(
            f"{path} is a preset for the {owner!r} recipe, not {recipe!r}: run "
            f"python -m evformer.recipes.{owner} --preset {path}"
        )
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{path}: unknown field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(names))}"
        )
    return {k: _coerce(cls, k, v, str(path)) for k, v in data.items()}


def _field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` -> {name: comment}, from the class and its bases
    (the comments in the config classes double as ``--help`` text)."""
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", src, re.MULTILINE):
            out[m.group(1)] = m.group(2).strip()
    return out


def build_parser(cls: type, *, prog: str, description: str) -> argparse.ArgumentParser:
    """One ``--flag`` per config field (``--eval-t 1,2,4``, ``--amp/--no-amp``,
    ``--model-args depth=2,embed_dim=128``), defaults suppressed so only the flags actually
    given override the preset, plus ``--preset``/``--config``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        "--config",
        dest="preset",
        help="YAML preset: a file, or a name from the top-level recipes/ folder",
    )
    hints = typing.get_type_hints(cls)
    defaults = cls()
    notes = _field_comments(cls)
    for f in fields(cls):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        help_text = (notes.get(f.name, "") + f" (default: {default!r})").strip()
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        base, optional = _unwrap_optional(tp)
        if typing.get_origin(base) is tuple or base is tuple:
            metavar = "N,N,..."
        elif base is dict or typing.get_origin(base) is dict:
            metavar = "KEY=VALUE,..."
        elif base is bool:
            metavar = "{true,false,none}"
        else:
            metavar = base.__name__.upper() + ("|none" if optional else "")
        parser.add_argument(
            flag, type=_converter(tp, f.name), metavar=metavar, help=help_text, dest=f.name
        )
    return parser


def parse_config(
    cls: type,
    argv: Sequence[str] | None,
    *,
    recipe: str,
    demo: dict,
    description: str,
) -> RecipeConfig:
    """Defaults < ``--demo`` overrides < ``--preset`` < explicit flags."""
    parser = build_parser(cls, prog=f"python -m evformer.recipes.{recipe}", description=description)
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if given.get("demo"):
        values.update(demo)
    if given.get("preset"):
        path = resolve_preset(given["preset"])
        values.update(load_preset(cls, path, recipe=recipe))
        given["preset"] = str(path)
    values.update(given)
    cfg = cls(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: RecipeConfig) -> None:
    if not cfg.model:
        raise ValueError("no model given (--model)")
    if cfg.T < 1:
        raise ValueError(f"--T must be >= 1, got {cfg.T}")
    if cfg.eval_only and not cfg.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH (weights to evaluate)")
    if cfg.resume and cfg.eval_only:
        raise ValueError("--resume and --eval-only exclude each other")
    if any(t < 1 for t in cfg.eval_t):
        raise ValueError(f"--eval-t values must be >= 1, got {cfg.eval_t}")


def config_dict(cfg: RecipeConfig, *, recipe: str) -> dict:
    """Plain dict of the resolved config (YAML/JSON/checkpoint friendly)."""
    d = dataclasses.asdict(cfg)
    return {"recipe": recipe, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


# ----------------------------------------------------------------------------- recipes


@dataclass
class Data:
    """What a recipe's data builder returns: datasets whose items are ``(x, label)``.
    ``train_transform(x, generator)`` (random augmentation) is applied per sample through
    ``SeededTransformDataset`` so runs are exactly resumable."""

    train: Dataset | None
    test: Dataset
    class_names: Sequence[str]
    train_transform: Callable[[Any, torch.Generator], Any] | None = None


@dataclass
class Recipe:
    """A recipe: its name, config class, ``--demo`` overrides and data builders.

    ``build_data(cfg, train=bool)`` returns :class:`Data` (raises
    ``evformer.data.DatasetNotFoundError`` when the data is missing);
    ``build_test(cfg, T)`` the test set binned/encoded for ``T`` time steps.
    """

    name: str
    config_cls: type
    demo: dict
    build_data: Callable[..., Data]
    build_test: Callable[[RecipeConfig, int], Dataset]
    description: str


def _model_kwargs(cfg: RecipeConfig) -> dict:
    return {"num_classes": cfg.num_classes, "T": cfg.T, **cfg.model_args}


def build_model(cfg: RecipeConfig) -> nn.Module:
    from evformer.models import create_model

    return create_model(cfg.model, **_model_kwargs(cfg))


def load_weights(model: nn.Module, path: str | Path, *, strict: bool) -> list[str]:
    """Load model weights from an evformer checkpoint, a plain state dict, or an official
    Spikformer checkpoint (converted by ``evformer.models.load_official_checkpoint``), all
    through ``torch.load(weights_only=True)``. Returns short notes for the user: the
    conversion, and with ``strict=False`` the keys that did not match."""
    from evformer.engine import load_checkpoint, model_state_from

    # official files pickle their argparse command line next to the weights
    ckpt = load_checkpoint(path, trusted_types=(argparse.Namespace,))
    state = model_state_from(ckpt, path=path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("block.") for k in state) and not any(
        k.startswith("blocks.") for k in state
    ):
        from evformer.models import load_official_checkpoint

        try:
            load_official_checkpoint(model, state)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} looks like an official Spikformer checkpoint: {e}") from e
        return [f"converted from the official Spikformer layout ({path})"]
    result = model.load_state_dict(state, strict=strict)
    notes = []
    if result.missing_keys:
        notes.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        unexpected = result.unexpected_keys
        notes.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return notes


def _default_run_dir(cfg: RecipeConfig, recipe: str) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.resume:  # continue in the directory the checkpoint came from
        return Path(cfg.resume).resolve().parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe}{'-demo' if cfg.demo else ''}" / stamp


def _fit_config(cfg: RecipeConfig):
    from evformer.engine import FitConfig

    return FitConfig(
        epochs=cfg.epochs,
        cooldown_epochs=cfg.cooldown_epochs,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        label_smoothing=cfg.label_smoothing,
        mixup_off_epoch=cfg.mixup_off_epoch,
        clip_grad=cfg.clip_grad,
        amp=cfg.amp,
        amp_dtype=cfg.amp_dtype,
        sync_bn=cfg.sync_bn,
        find_unused_parameters=cfg.find_unused_parameters,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        checkpoint_every=cfg.checkpoint_every,
        eval_every=cfg.eval_every,
        max_steps_per_epoch=cfg.max_steps_per_epoch,
        max_eval_batches=cfg.max_eval_batches,
        progress=cfg.progress,
    )


def _mixup(cfg: RecipeConfig):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from evformer.data import Mixup

    # label smoothing is applied once, by the loss, to mixed and unmixed targets alike
    return Mixup(
        num_classes=cfg.num_classes,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=0.0,
    )


def _say(dist, msg: str, *, err: bool = False) -> None:
    if dist is None or dist.is_main:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def run(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then train (or ``--eval-only``) and report. Returns the
    process exit code: 0 done, 1 bad settings or files, 2 data or checkpoint missing (and,
    from argparse, a malformed command line), 3 the loss became non-finite."""
    from evformer.data import DatasetNotFoundError

    try:
        cfg = parse_config(
            recipe.config_cls,
            argv,
            recipe=recipe.name,
            demo=recipe.demo,
            description=recipe.description,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return _run(recipe, cfg)
    except DatasetNotFoundError as e:
        print(f"error: {e}\n(data root: --data-root {cfg.data_root})", file=sys.stderr)
        return EXIT_NO_DATA
    except FileNotFoundError as e:  # a --checkpoint/--resume/--init path
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_DATA
    except ValueError as e:
        # bad settings or files (class count, batch size, checkpoint layout): the message
        # says what is wrong; the traceback is for debugging evformer itself
        if os.environ.get("EVFORMER_TRACEBACK"):
            raise
        print(f"error: {e}\n(set EVFORMER_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        from evformer.engine import cleanup_distributed

        cleanup_distributed()


def _run(recipe: Recipe, cfg: RecipeConfig) -> int:
    from evformer.engine import (
        NonFiniteLossError,
        SeededTransformDataset,
        all_gather_objects,
        evaluate,
        fit,
        init_distributed,
        seed_everything,
    )
    from evformer.engine.tracking import atomic_write_text

    dist = init_distributed(None if cfg.device == "auto" else cfg.device)
    use_amp = cfg.amp if cfg.amp is not None else dist.device.type == "cuda"
    # every rank must write into rank 0's directory (timestamps could differ)
    run_dir = Path(all_gather_objects(str(_default_run_dir(cfg, recipe.name)))[0])
    data = recipe.build_data(cfg, train=not cfg.eval_only)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    per_rank_eval = cfg.eval_batch_size or max(1, cfg.batch_size // dist.world_size)

    if cfg.eval_only:
        notes = load_weights(model, cfg.checkpoint, strict=True)
        model.to(dist.device)
        res = evaluate(
            model,
            data.test,
            batch_size=per_rank_eval,
            dist=dist,
            num_workers=cfg.num_workers,
            amp=use_amp,
            amp_dtype=cfg.amp_dtype,
            max_batches=cfg.max_eval_batches,
            progress=cfg.progress,
        )
        out = {"checkpoint": cfg.checkpoint, "T": cfg.T, "test": res.as_dict()}
        _say(
            dist,
            f"test accuracy at T={cfg.T}: top-1 {res.acc1:.2f} %, top-5 {res.acc5:.2f} % "
            f"({res.n} samples){'; ' + '; '.join(notes) if notes else ''}",
        )
        out["eval_t"] = _eval_t(recipe, cfg, model, dist, per_rank_eval, use_amp)
        if dist.is_main and cfg.out:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "eval.json", json.dumps(out, indent=2) + "\n")
            _say(dist, f"wrote {run_dir / 'eval.json'}")
        return EXIT_OK

    if cfg.init and not cfg.resume:
        notes = load_weights(model, cfg.init, strict=False)
        _say(dist, f"initial weights from {cfg.init}{': ' + '; '.join(notes) if notes else ''}")
    train_set = data.train
    if data.train_transform is not None:
        train_set = SeededTransformDataset(train_set, data.train_transform, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    _say(
        dist,
        f"{recipe.name}: model {cfg.model} ({n_params / 1e6:.2f} M parameters), T={cfg.T}, "
        f"{len(train_set)} train / {len(data.test)} test samples, {dist.world_size} process(es) "
        f"on {dist.device}, run directory {run_dir}",
    )
    try:
        result = fit(
            model,
            train_set=train_set,
            test_set=data.test,
            config=_fit_config(cfg),
            run_dir=run_dir,
            dist=dist,
            mixup=_mixup(cfg),
            class_names=list(data.class_names),
            resume=cfg.resume,
            run_config=config_dict(cfg, recipe=recipe.name),
        )
    except NonFiniteLossError as e:
        _say(dist, f"error: {e}", err=True)
        return EXIT_NONFINITE
    final = result.final
    if final is not None:
        _say(
            dist,
            f"final test accuracy (epoch {cfg.epochs + cfg.cooldown_epochs}): top-1 "
            f"{final.acc1:.2f} %, top-5 {final.acc5:.2f} %; best top-1 {result.best_acc1:.2f} % "
            f"(epoch {result.best_epoch + 1}); run directory {run_dir}",
        )
    if cfg.eval_t:
        table = _eval_t(recipe, cfg, model, dist, per_rank_eval, use_amp)
        if dist.is_main:
            atomic_write_text(run_dir / "eval_t.json", json.dumps(table, indent=2) + "\n")
    return EXIT_OK


def _eval_t(recipe, cfg, model, dist, batch_size, use_amp) -> dict:
    """Accuracy of ``model`` at each ``cfg.eval_t`` (Table VI protocol)."""
    if not cfg.eval_t:
        return {}
    from evformer.engine import evaluate_time_steps

    res = evaluate_time_steps(
        model,
        lambda t: recipe.build_test(cfg, t),
        cfg.eval_t,
        batch_size=batch_size,
        dist=dist,
        num_workers=cfg.num_workers,
        amp=use_amp,
        max_batches=cfg.max_eval_batches,
    )
    rows = ["| T | top-1 (%) | top-5 (%) |", "|---|---|---|"]
    rows += [f"| {t} | {r.acc1:.2f} | {r.acc5:.2f} |" for t, r in res.items()]
    _say(
        dist,
        f"accuracy of the model trained at T={cfg.T} evaluated at other T:\n" + "\n".join(rows),
    )
    return {
        str(t): {"acc1": r.acc1, "acc5": r.acc5, "loss": r.loss, "n": r.n} for t, r in res.items()
    }
