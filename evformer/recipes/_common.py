"""What every recipe shares: the config dataclass base, YAML presets, the command line
generated from the dataclass fields, run directories, missing-data handling and the
train / evaluate flow.

Precedence, lowest first: the recipe's ``Config`` defaults (the published recipe), the
``--demo`` overrides, with ``--resume`` the resumed run's own settings (its
``config.yaml``), a ``--preset`` YAML file, explicit command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
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

from evformer.engine.trainer import FitConfig

# The YAML presets ship inside the package (package data); the top-level ``recipes/`` of a
# source checkout is a link to this folder.
PRESET_DIR = Path(__file__).resolve().parent / "presets"

# What identifies a run: a resumed run keeps these (changing them is a new run).
RUN_IDENTITY = ("model", "model_args", "num_classes", "dataset")
# Settings of a resumed run that describe the earlier invocation, not the run itself.
_NOT_RESUMED = ("resume", "out", "eval_only", "checkpoint")

EXIT_OK, EXIT_ERROR, EXIT_NO_DATA, EXIT_NONFINITE = 0, 1, 2, 3


@dataclass
class RecipeConfig(FitConfig):
    """A recipe's settings: the engine's training settings (inherited from
    :class:`~evformer.engine.FitConfig`, defined there once, every one a command-line flag)
    plus the model, data and run fields below. Each recipe's ``Config`` subclass overrides
    the defaults with its published values (SPEC-models.md, the official Spikformer
    configs); ``Recipe.default_preset`` names the preset file that holds the same values."""

    # -- model
    model: str = ""  # registry name, see evformer.models.list_models()
    model_args: dict = field(default_factory=dict)  # extra create_model overrides
    T: int = 4  # time steps (event recipes: frames per sample)
    num_classes: int = 10
    init: str | None = None  # initial weights (fine-tuning), loaded non-strictly
    # -- data
    data_root: str = "datasets"
    # recipes read files: 4 loader processes per rank instead of the engine's 0
    num_workers: int = 4
    # -- Mixup/CutMix (built here, handed to the engine as a batch function)
    mixup: float = 0.0  # Mixup alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # CutMix instead of Mixup when both are on
    # -- devices and run
    device: str = "auto"  # auto, cpu, cuda, or cuda:<index>
    out: str | None = None  # run directory (default runs/<recipe>/<time>)
    resume: str | None = None  # a last.pt to continue, with its run's config.yaml settings
    eval_only: bool = False  # evaluate --checkpoint, no training
    checkpoint: str | None = None  # weights for --eval-only
    eval_t: tuple[int, ...] = ()  # also evaluate at these T after training (Table VI)
    demo: bool = False  # built-in data and a laptop-sized configuration
    preset: str | None = None  # YAML preset applied (recorded for the run directory)

    def fit_config(self) -> FitConfig:
        """The engine's part of this config, as handed to :func:`evformer.engine.fit`."""
        return FitConfig(**{f.name: getattr(self, f.name) for f in fields(FitConfig)})

    def validate(self) -> None:
        super().validate()
        _check_device(self.device)
        if not self.model:
            raise ValueError("no model given (--model)")
        if self.T < 1:
            raise ValueError(f"--T must be >= 1, got {self.T}")
        if self.eval_only and not self.checkpoint:
            raise ValueError("--eval-only needs --checkpoint PATH (weights to evaluate)")
        if self.resume and self.eval_only:
            raise ValueError("--resume and --eval-only exclude each other")
        if any(t < 1 for t in self.eval_t):
            raise ValueError(f"--eval-t values must be >= 1, got {self.eval_t}")


def _check_device(device: str) -> None:
    """Refuse a ``--device`` that is not a device, or a GPU this machine does not have."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:<index>"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
            )


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


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple or tp is tuple


def _split_items(text: str) -> list[str]:
    """``"1,2,4"``, ``"1 2 4"``, ``"1, 2, 4"`` -> ``["1", "2", "4"]``."""
    return [s for s in re.split(r"[,\s]+", text) if s]


def _tuple_length(tp: Any) -> int | None:
    """How many items ``tp`` holds: ``tuple[X, Y]`` -> 2, ``tuple[X, ...]`` -> None (any)."""
    args = typing.get_args(tp)
    return None if not args or args[-1] is Ellipsis else len(args)


def _tuple_items(tp: Any, name: str, items: Sequence[Any]) -> tuple:
    """Check the number of ``items`` against ``tp`` and convert each to its element type."""
    n = _tuple_length(tp)
    if n is not None and len(items) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(items)} ({items!r})")
    types_ = (
        typing.get_args(tp) if n is not None else [(typing.get_args(tp) or (str,))[0]] * len(items)
    )
    return tuple(
        int(v) if t is int else float(v) if t is float else str(v) for v, t in zip(items, types_)
    )


def _converter(tp: Any, name: str) -> Callable[[str], Any]:
    """A function turning a command-line string into a value of field type ``tp``."""
    base, optional = _unwrap_optional(tp)

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        if base is bool:
            if optional and text.strip().lower() == "auto":
                return None
            return _parse_bool(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str:
            return text
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
    if _is_tuple(base):
        if isinstance(value, (int, float, str)):
            value = _split_items(str(value))
        if isinstance(value, (list, tuple)):
            try:
                return _tuple_items(base, where, list(value))
            except ValueError as e:
                raise ValueError(f"{where}: expected a list of {base}, got {value!r}") from e
        raise ValueError(f"{where}: expected a list, got {value!r}")
    if base is dict or typing.get_origin(base) is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    raise TypeError(f"{where}: unsupported field type {hints[name]!r}")


def resolve_preset(name: str) -> Path:
    """A preset path, or a preset name looked up among the presets shipped with evformer
    (``evformer/recipes/presets/``, which the top-level ``recipes/`` links to)."""
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


def load_run_config(cls: type, checkpoint: str | Path, *, recipe: str) -> dict:
    """The settings of the run that wrote ``checkpoint`` (a ``last.pt``): its directory's
    ``config.yaml``, else the copy inside the checkpoint; ``{}`` when neither exists (a
    checkpoint from library use). Raises ``ValueError`` when the run belongs to another
    recipe. Fields naming the earlier invocation (``resume``, ``out``, ...) are left out."""
    checkpoint = Path(checkpoint)
    source = checkpoint.parent / "config.yaml"
    if source.is_file():
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: not valid YAML ({e})") from e
    else:
        from evformer.engine.checkpoint import load_checkpoint

        source = checkpoint
        data = load_checkpoint(checkpoint).get("config")
    if not isinstance(data, dict) or "recipe" not in data:
        return {}
    owner = data["recipe"]
    if owner != recipe:
        raise ValueError(
            f"{checkpoint} is a checkpoint of a {owner!r} run (see {source}), not a "
            f"{recipe!r} one: resume it with python -m evformer.recipes.{owner} "
            f"--resume {checkpoint}, or start a {recipe} run from its weights with --init"
        )
    names = {f.name for f in fields(cls)}
    return {
        k: _coerce(cls, k, v, str(source))
        for k, v in data.items()
        if k in names and k not in _NOT_RESUMED
    }


def _field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` -> {name: comment}, from the class and its bases
    (the comments in the config classes double as ``--help`` text)."""
    import inspect

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


class _TupleAction(argparse.Action):
    """``--eval-t 1,2,4`` or ``--eval-t 1 2 4``; ``--betas 0.9 0.999`` (exactly two)."""

    def __init__(self, *args: Any, field_type: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.field_type = field_type

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = [s for v in values for s in _split_items(v)]
        try:
            value = _tuple_items(self.field_type, option_string or self.dest, items)
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        setattr(namespace, self.dest, value)


def _add_flag(group, name: str, tp: Any, help_text: str) -> None:
    flag = "--" + name.replace("_", "-")
    base, optional = _unwrap_optional(tp)
    if base is bool and not optional:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    elif base is bool:  # --amp, --no-amp, --amp auto (None: decided at run time)
        group.add_argument(
            flag,
            nargs="?",
            const=True,
            type=_converter(tp, name),
            metavar="{true,false,auto}",
            dest=name,
            help=help_text,
        )
        group.add_argument(
            "--no-" + flag[2:], action="store_const", const=False, dest=name, help="same as false"
        )
    elif _is_tuple(base):
        n = _tuple_length(base)
        group.add_argument(
            flag,
            nargs="*" if n is None else "+",
            action=_TupleAction,
            field_type=base,
            metavar="N" if n is None else "X",
            dest=name,
            help=help_text if n is None else f"{n} values; {help_text}",
        )
    else:
        if base is dict or typing.get_origin(base) is dict:
            metavar = "KEY=VALUE,..."
        else:
            metavar = base.__name__.upper() + ("|none" if optional else "")
        group.add_argument(
            flag, type=_converter(tp, name), metavar=metavar, help=help_text, dest=name
        )


def build_parser(cls: type, *, prog: str, description: str) -> argparse.ArgumentParser:
    """One ``--flag`` per config field, the engine's :class:`FitConfig` fields included
    (``--eval-t 1,2,4``, ``--betas 0.9 0.999``, ``--amp/--no-amp``, ``--plots/--no-plots``,
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
        help="YAML preset: a file, or the name of a preset shipped with evformer "
        "(evformer/recipes/presets/, linked from the top-level recipes/)",
    )
    recipe_group = parser.add_argument_group("model, data and run")
    fit_group = parser.add_argument_group("training (evformer.engine.FitConfig)")
    fit_names = {f.name for f in fields(FitConfig)}
    hints = typing.get_type_hints(cls)
    defaults = cls()
    notes = _field_comments(cls)
    for f in fields(cls):
        if f.name == "preset":
            continue
        default = getattr(defaults, f.name)
        help_text = (notes.get(f.name, "") + f" (default: {default!r})").strip()
        group = fit_group if f.name in fit_names else recipe_group
        _add_flag(group, f.name, hints[f.name], help_text)
    return parser


def parse_config(
    cls: type,
    argv: Sequence[str] | None,
    *,
    recipe: str,
    demo: dict,
    description: str,
) -> RecipeConfig:
    """Defaults < ``--demo`` overrides < the resumed run's settings (``--resume``) <
    ``--preset`` < explicit flags. A resumed run keeps its :data:`RUN_IDENTITY` fields."""
    parser = build_parser(cls, prog=f"python -m evformer.recipes.{recipe}", description=description)
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if given.get("demo"):
        values.update(demo)
    saved: dict[str, Any] = {}
    if given.get("resume") and Path(given["resume"]).is_file():  # else: exit 2 in run()
        saved = load_run_config(cls, given["resume"], recipe=recipe)
        values.update(saved)
    explicit: dict[str, Any] = {}
    if given.get("preset"):
        path = resolve_preset(given["preset"])
        explicit.update(load_preset(cls, path, recipe=recipe))
        given["preset"] = str(path)
    explicit.update(given)
    changed = [
        f"{k} {saved[k]!r} -> {explicit[k]!r}"
        for k in RUN_IDENTITY
        if k in saved and k in explicit and explicit[k] != saved[k]
    ]
    if changed:
        raise ValueError(
            f"--resume {given['resume']} continues a run, which keeps its model and data; "
            f"this command line changes {', '.join(changed)}. Drop those settings, or start "
            f"a new run from the checkpoint's weights with --init {given['resume']}"
        )
    values.update(explicit)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def config_dict(cfg: RecipeConfig, *, recipe: str) -> dict:
    """Plain dict of the resolved config (YAML/JSON/checkpoint friendly), loadable again as
    a preset; the model, data and run fields first, then the engine's."""
    d = dataclasses.asdict(cfg)
    fit_names = {f.name for f in fields(FitConfig)}
    order = [k for k in d if k not in fit_names] + [k for k in d if k in fit_names]
    return {"recipe": recipe, **{k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in order}}


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
    ``default_preset`` names the file in ``recipes/`` that publishes the same values as
    ``config_cls()`` (a test holds the two to each other, field by field). ``execute(recipe,
    cfg) -> exit code`` replaces the supervised train / evaluate flow (masked pretraining).
    """

    name: str
    config_cls: type
    demo: dict
    build_data: Callable[..., Data]
    build_test: Callable[[RecipeConfig, int], Dataset]
    description: str
    default_preset: str
    execute: Callable[[Recipe, RecipeConfig], int] | None = None


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
    from evformer.engine.trainer import load_model_state

    # official files pickle their argparse command line next to the weights
    ckpt = load_checkpoint(path, trusted_types=(argparse.Namespace,))
    state = model_state_from(ckpt, path=path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if not any(k in own for k in state) and any(k.startswith("encoder.") for k in state):
        # a masked-autoencoder checkpoint (a pretraining last.pt): its encoder part
        state = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
    if any(k.startswith("block.") for k in state) and not any(
        k.startswith("blocks.") for k in state
    ):
        from evformer.models import load_official_checkpoint

        try:
            load_official_checkpoint(model, state)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} looks like an official Spikformer checkpoint: {e}") from e
        return [f"converted from the official Spikformer layout ({path})"]
    missing, unexpected = load_model_state(model, state, strict=strict, source=str(path))
    notes = []
    if missing:
        notes.append(
            f"{len(missing)} not loaded (not in the file, kept as initialised): {_keys(missing)}"
        )
    if unexpected:
        notes.append(
            f"{len(unexpected)} in the file but not in the model (ignored): {_keys(unexpected)}"
        )
    return notes


def _keys(names: Sequence[str], limit: int = 20) -> str:
    """Every name up to ``limit``, then how many more."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def _default_run_dir(cfg: RecipeConfig, recipe: str) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.resume:  # continue in the directory the checkpoint came from
        return Path(cfg.resume).resolve().parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe}{'-demo' if cfg.demo else ''}" / stamp


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
    from evformer.data import CachePreparationError, DatasetNotFoundError

    try:
        cfg = parse_config(
            recipe.config_cls,
            argv,
            recipe=recipe.name,
            demo=recipe.demo,
            description=f"{recipe.description}\n\nThe defaults are the published recipe, "
            f"the values in recipes/{recipe.default_preset}.yaml.",
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return (recipe.execute or _run)(recipe, cfg)
    except DatasetNotFoundError as e:
        print(f"error: {e}\n(data root: --data-root {cfg.data_root})", file=sys.stderr)
        return EXIT_NO_DATA
    except FileNotFoundError as e:  # a --checkpoint/--resume/--init path
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_DATA
    except (ValueError, CachePreparationError, OSError) as e:
        # bad settings or files (class count, batch size, checkpoint layout, an unreadable
        # recording, a cache folder that cannot be written): the message says what is
        # wrong; the traceback is for debugging evformer itself
        if os.environ.get("EVFORMER_TRACEBACK"):
            raise
        print(
            f"error: {e}{_flag_hint(str(e), cfg)}\n(set EVFORMER_TRACEBACK=1 to see the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    finally:
        from evformer.engine import cleanup_distributed

        cleanup_distributed()


# library arguments that data errors mention -> the recipe flag that sets them
_FLAGS_FOR = {"skip_bad": "--skip-bad", "cache_dir": "--cache-dir DIR"}


def _flag_hint(message: str, cfg: RecipeConfig) -> str:
    """Name the command-line flags for the library arguments a message mentions."""
    names = {f.name for f in fields(cfg)}
    flags = [flag for arg, flag in _FLAGS_FOR.items() if arg in message and arg in names]
    return f"\n(on the command line: {', '.join(flags)})" if flags else ""


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

    files = {
        "--resume": cfg.resume,
        "--checkpoint": cfg.checkpoint if cfg.eval_only else None,
        "--init": cfg.init if not (cfg.resume or cfg.eval_only) else None,
    }
    for flag, path in files.items():
        if path and not Path(path).is_file():  # before any data is read
            raise FileNotFoundError(f"{flag} {path}: no such file")
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
    # Every random draw of sample i comes from (seed, epoch, i): train_transform's and the
    # dataset's own event_transform's (evformer.data.seeding), so runs resume exactly.
    train_set = SeededTransformDataset(data.train, data.train_transform, seed=cfg.seed)
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
            config=cfg.fit_config(),
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
