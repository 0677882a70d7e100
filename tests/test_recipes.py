"""Recipes end to end on tiny generated data (CPU): every recipe through its real dataset
reader on fake files for a couple of iterations, config precedence and presets, missing
data (exit code 2, a message, no traceback), --eval-only / --eval-t / --resume, and the
dvs_gesture --demo with a reduced budget."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evformer.engine import FitConfig
from evformer.events import from_columns, write_aedat2, write_aedat31
from evformer.recipes._common import (
    PRESET_DIR,
    config_dict,
    load_preset,
    parse_config,
    resolve_preset,
)
from evformer.recipes._event import EventConfig
from evformer.recipes._static import StaticConfig

RECIPES = ("dvs_gesture", "cifar10_dvs", "cifar10", "cifar100", "imagenet")

# a tiny model, one short epoch, CPU, quiet
TINY = [
    "--model-args", "embed_dim=32,depth=1,num_heads=2",
    "--T", "2",
    "--epochs", "1", "--cooldown-epochs", "0", "--warmup-epochs", "0",
    "--batch-size", "4", "--max-steps-per-epoch", "2", "--max-eval-batches", "2",
    "--num-workers", "0", "--device", "cpu", "--no-progress",
]  # fmt: skip


# ----------------------------------------------------------------- fake datasets


def _events(rng: np.random.Generator, n: int, t0: int, t1: int) -> np.ndarray:
    t = np.sort(rng.integers(t0, t1, n))
    return from_columns(t, rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n))


def _fake_dvsgesture(root: Path, rng: np.random.Generator) -> None:
    folder = root / "DvsGesture"
    folder.mkdir(parents=True)
    for split, name, n_rows in (("train", "user01_lab", 10), ("test", "user24_led", 4)):
        write_aedat31(folder / f"{name}.aedat", _events(rng, 6000, 0, n_rows * 100_000))
        rows = [f"{1 + i % 11},{i * 100_000},{(i + 1) * 100_000}" for i in range(n_rows)]
        text = "\n".join(["class,startTime_usec,endTime_usec", *rows]) + "\n"
        (folder / f"{name}_labels.csv").write_text(text)
        (folder / f"trials_to_{split}.txt").write_text(f"{name}.aedat\n")


def _fake_cifar10dvs(root: Path, rng: np.random.Generator) -> None:
    from evformer.data.neuromorphic import CIFAR10_DVS_CLASSES

    for cls in CIFAR10_DVS_CLASSES:
        d = root / "CIFAR10-DVS" / cls
        d.mkdir(parents=True)
        for i in range(10):  # 9 train, 1 test per class
            write_aedat2(d / f"cifar10_{cls}_{i}.aedat", _events(rng, 200, 0, 500_000))


def _fake_cifar(root: Path, rng: np.random.Generator, *, classes: int) -> None:
    """torchvision's pickled CIFAR layout, a few images per file."""

    def dump(path: Path, n: int, label_key: str) -> None:
        data = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(v) for v in rng.integers(0, classes, n)],
        }
        path.write_bytes(pickle.dumps(data))

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", 4, "labels")
        dump(folder / "test_batch", 8, "labels")
        meta = {"label_names": [f"c{i}" for i in range(10)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", 16, "fine_labels")
        dump(folder / "test", 8, "fine_labels")
        meta = {"fine_label_names": [f"c{i}" for i in range(100)]}
        (folder / "meta").write_bytes(pickle.dumps(meta))


def _fake_imagenet(root: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    for split, n in (("train", 4), ("val", 2)):
        for wnid in ("n01", "n02", "n03"):
            d = root / "ImageNet" / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{wnid}_{i}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    _fake_dvsgesture(root, rng)
    _fake_cifar10dvs(root, rng)
    _fake_cifar(root, rng, classes=10)
    _fake_cifar(root, rng, classes=100)
    _fake_imagenet(root, rng)
    return root


def _main(recipe: str, argv: list[str]) -> int:
    return importlib.import_module(f"evformer.recipes.{recipe}").main(argv)


EXTRA = {
    "dvs_gesture": ["--resize", "32"],
    "cifar10_dvs": ["--resize", "32"],
    "cifar10": ["--no-verify"],
    "cifar100": ["--no-verify"],
    "imagenet": ["--num-classes", "3", "--image-size", "32"],
}


# ----------------------------------------------------------------- every recipe runs


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_evaluates_on_fake_files(recipe, data_root, tmp_path):
    out = tmp_path / "run"
    rc = _main(recipe, [*TINY, *EXTRA[recipe], "--data-root", str(data_root), "--out", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["step"] == 2
    assert np.isfinite(rows[0]["train_loss"]) and 0.0 <= rows[0]["test_acc1"] <= 100.0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["recipe"] == recipe and config["T"] == 2 and config["data_root"] == str(data_root)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"] == config["model"]
    # the run's config.yaml is itself a preset that reproduces the run's settings
    mod = importlib.import_module(f"evformer.recipes.{recipe}")
    again = mod.Config(**load_preset(mod.Config, out / "config.yaml", recipe=recipe))
    assert config_dict(again, recipe=recipe) == config
    for png in ("curves.png", "confusion_matrix.png"):
        assert (out / png).stat().st_size > 1000


# ----------------------------------------------------------------- configuration


def test_precedence_defaults_demo_preset_flags(tmp_path):
    mod = importlib.import_module("evformer.recipes.dvs_gesture")
    base = parse_config(mod.Config, [], recipe="dvs_gesture", demo=mod.DEMO, description="")
    assert (base.T, base.lr, base.epochs, base.batch_size) == (16, 1e-3, 200, 16)  # published
    demo = parse_config(mod.Config, ["--demo"], recipe="dvs_gesture", demo=mod.DEMO, description="")
    assert demo.dataset == "synthetic" and demo.T == mod.DEMO["T"]
    preset = tmp_path / "p.yaml"
    preset.write_text("recipe: dvs_gesture\nT: 10\nlr: 5.0e-4\nepochs: 3\n")
    cfg = parse_config(
        mod.Config,
        ["--demo", "--preset", str(preset), "--lr", "2e-4", "--eval-t", "1,2,4"],
        recipe="dvs_gesture",
        demo=mod.DEMO,
        description="",
    )
    # preset beats demo (T, epochs), the flag beats the preset (lr), demo beats defaults
    assert (cfg.T, cfg.epochs, cfg.lr, cfg.dataset) == (10, 3, 2e-4, "synthetic")
    assert cfg.eval_t == (1, 2, 4) and cfg.preset == str(preset)


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads_into_its_recipe(path):
    recipe = yaml.safe_load(path.read_text())["recipe"]
    mod = importlib.import_module(f"evformer.recipes.{recipe}")
    values = load_preset(mod.Config, path, recipe=recipe)
    cfg = mod.Config(**values)
    # masked pretraining presets name the MAE wrapper of a V2 encoder
    assert cfg.model.removeprefix("mae_").startswith("spikformer_") and cfg.T in (1, 4, 10, 16)


# settings a recipe may leave out of its preset: where the run happens, not what it is
MACHINE_SETTINGS = {"num_workers"}


@pytest.mark.parametrize("recipe", (*RECIPES, "imagenet_mae"))
def test_default_preset_and_config_agree_field_by_field(recipe):
    """The published numbers live in the recipe's ``Config`` and in its default preset;
    neither may drift from the other."""
    mod = importlib.import_module(f"evformer.recipes.{recipe}")
    path = resolve_preset(mod.RECIPE.default_preset)
    preset = load_preset(mod.Config, path, recipe=recipe)
    default = mod.Config()
    differ = {k: (v, getattr(default, k)) for k, v in preset.items() if getattr(default, k) != v}
    assert not differ, f"{path.name} vs {recipe}.Config() (preset, Config): {differ}"
    # every value the recipe sets differently from its family's defaults is published too
    from evformer.recipes._pretrain import PretrainConfig

    if issubclass(mod.Config, PretrainConfig):  # static and event fields both
        family = PretrainConfig
    else:
        family = EventConfig if issubclass(mod.Config, EventConfig) else StaticConfig
    base = family()
    own = {f.name for f in dataclasses.fields(mod.Config)}
    own = {k for k in own if getattr(default, k) != getattr(base, k)} - MACHINE_SETTINGS
    assert own <= set(preset), f"{path.name} lacks {sorted(own - set(preset))}"
    assert default.model.removeprefix("mae_").startswith("spikformer_")
    assert default.model == preset["model"]


# one non-default value per engine setting, as it is typed on the command line
ENGINE_FLAGS = {
    "epochs": (["--epochs", "7"], 7),
    "cooldown_epochs": (["--cooldown-epochs", "2"], 2),
    "batch_size": (["--batch-size", "8"], 8),
    "eval_batch_size": (["--eval-batch-size", "5"], 5),
    "lr": (["--lr", "3e-3"], 3e-3),
    "min_lr": (["--min-lr", "2e-5"], 2e-5),
    "warmup_lr": (["--warmup-lr", "3e-6"], 3e-6),
    "warmup_epochs": (["--warmup-epochs", "0.5"], 0.5),
    "weight_decay": (["--weight-decay", "0.01"], 0.01),
    "layer_decay": (["--layer-decay", "0.75"], 0.75),
    "betas": (["--betas", "0.8", "0.99"], (0.8, 0.99)),
    "label_smoothing": (["--label-smoothing", "0.2"], 0.2),
    "mixup_off_epoch": (["--mixup-off-epoch", "4"], 4),
    "clip_grad": (["--clip-grad", "1.5"], 1.5),
    "amp": (["--no-amp"], False),
    "amp_dtype": (["--amp-dtype", "bfloat16"], "bfloat16"),
    "sync_bn": (["--sync-bn"], True),
    "seed": (["--seed", "7"], 7),
    "num_workers": (["--num-workers", "2"], 2),
    "checkpoint_every": (["--checkpoint-every", "3"], 3),
    "eval_every": (["--eval-every", "2"], 2),
    "max_steps_per_epoch": (["--max-steps-per-epoch", "3"], 3),
    "max_eval_batches": (["--max-eval-batches", "2"], 2),
    "topk": (["--topk", "1,3"], (1, 3)),
    "progress": (["--no-progress"], False),
    "find_unused_parameters": (["--find-unused-parameters"], True),
    "plots": (["--no-plots"], False),
    "tensorboard": (["--no-tensorboard"], False),
}


def test_every_engine_setting_reaches_the_engine_from_the_command_line(tmp_path, monkeypatch):
    import evformer.engine
    from evformer.engine import FitResult

    assert set(ENGINE_FLAGS) == {f.name for f in dataclasses.fields(FitConfig)}
    mod = importlib.import_module("evformer.recipes.cifar10")
    demo = parse_config(mod.Config, ["--demo"], recipe="cifar10", demo=mod.DEMO, description="")
    for name, (_, value) in ENGINE_FLAGS.items():
        assert getattr(demo, name) != value, f"pick a value for {name} that is not the default"

    handed = []

    def fake_fit(model, *, config, **kwargs):
        handed.append(config)
        return FitResult(final=None, best_acc1=0.0, best_epoch=-1)

    monkeypatch.setattr(evformer.engine, "fit", fake_fit)
    argv = ["--demo", "--model-args", "embed_dim=32,depth=1,num_heads=2", "--device", "cpu"]
    argv += ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    argv += [token for flag, _ in ENGINE_FLAGS.values() for token in flag]
    assert _main("cifar10", argv) == 0
    (config,) = handed
    assert type(config) is FitConfig  # the engine's settings alone, not the recipe's
    assert dataclasses.asdict(config) == {k: v for k, (_, v) in ENGINE_FLAGS.items()}


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--amp"], "amp", True),
        (["--amp", "false"], "amp", False),
        (["--amp", "auto"], "amp", None),
        (["--no-amp", "--amp", "none"], "amp", None),
        (["--betas", "0.9,0.95"], "betas", (0.9, 0.95)),
        (["--eval-t", "1", "2", "4"], "eval_t", (1, 2, 4)),
        (["--eval-t", "1,2,4"], "eval_t", (1, 2, 4)),
        (["--topk", "1"], "topk", (1,)),
    ],
)
def test_flag_spellings(argv, field, value):
    mod = importlib.import_module("evformer.recipes.dvs_gesture")
    cfg = parse_config(mod.Config, argv, recipe="dvs_gesture", demo=mod.DEMO, description="")
    assert getattr(cfg, field) == value


def test_fixed_length_settings_are_checked(tmp_path, capsys):
    mod = importlib.import_module("evformer.recipes.dvs_gesture")
    with pytest.raises(SystemExit) as exc:
        parse_config(mod.Config, ["--betas", "0.9"], recipe="dvs_gesture", demo={}, description="")
    assert exc.value.code == 2 and "--betas: expected 2 values" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: dvs_gesture\nbetas: [0.9, 0.99, 0.999]\n")
    with pytest.raises(ValueError, match="betas"):
        load_preset(mod.Config, bad, recipe="dvs_gesture")


def test_preset_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: dvs_gesture\nlearning_rate: 1\n")
    assert _main("dvs_gesture", ["--preset", str(bad)]) == 1
    assert "learning_rate" in capsys.readouterr().err
    assert _main("cifar10", ["--preset", "dvs_gesture_t10"]) == 1
    assert "preset for the 'dvs_gesture' recipe" in capsys.readouterr().err
    assert _main("cifar10", ["--preset", "no_such_preset"]) == 1
    assert "cifar10_4_384" in capsys.readouterr().err  # lists what exists


# ----------------------------------------------------------------- missing data


@pytest.mark.parametrize("recipe", RECIPES)
def test_missing_data_exits_2_with_instructions(recipe, tmp_path, capsys):
    rc = _main(recipe, [*TINY, "--data-root", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not found" in err and "Download" in err and "--data-root" in err
    assert "Traceback" not in err


def test_missing_data_on_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "evformer.recipes.cifar10_dvs", "--data-root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "CIFAR10-DVS not found" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------- eval-only, eval-t, resume


def test_eval_only_eval_t_and_resume(data_root, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, *EXTRA["cifar10_dvs"], "--data-root", str(data_root)]
    args += ["--max-eval-batches", "none"]  # the whole test set: 10 samples
    assert _main("cifar10_dvs", [*args, "--out", str(out)]) == 0
    # continue the same run for one more epoch
    with pytest.warns(UserWarning, match="schedule differs"):  # epochs changed: 1 -> 2
        assert _main("cifar10_dvs", [*args, "--epochs", "2", "--resume", str(out / "last.pt")]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["step"] == 4
    # evaluate the checkpoint at its own T and at T = 1 and 3 (test set re-binned)
    ev = tmp_path / "eval"
    rc = _main(
        "cifar10_dvs",
        [*args, "--eval-only", "--checkpoint", str(out / "last.pt"), "--eval-t", "1,3",
         "--out", str(ev)],
    )  # fmt: skip
    assert rc == 0
    res = json.loads((ev / "eval.json").read_text())
    assert res["test"]["n"] == 10 and sorted(res["eval_t"]) == ["1", "3"]
    assert all(r["n"] == 10 for r in res["eval_t"].values())
    assert _main("cifar10_dvs", [*args, "--eval-only"]) == 1  # no --checkpoint
    missing = str(tmp_path / "nope.pt")
    assert _main("cifar10_dvs", [*args, "--eval-only", "--checkpoint", missing]) == 2


# ----------------------------------------------------------------- the demo


@pytest.mark.slow
def test_dvs_gesture_demo_reduced_budget_far_above_chance(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = _main(
        "dvs_gesture",
        ["--demo", "--data-root", str(tmp_path / "data"), "--out", str(out), "--no-progress",
         "--synthetic-train-per-class", "16", "--synthetic-test-per-class", "4",
         "--epochs", "6", "--batch-size", "8"],
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    acc = results["final"]["acc1"]
    assert acc >= 40.0  # chance is 100 / 11 = 9.1 %
    assert f"{acc:.2f} %" in capsys.readouterr().out  # the final accuracy is printed
    assert (out / "curves.png").is_file() and (out / "confusion_matrix.png").is_file()


# ----------------------------------------------------------------- official checkpoints

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _as_official_dvs(sd: dict, depth: int) -> dict:
    """evformer Spikformer state dict -> the official CIFAR10-DVS file's key layout
    (Conv1d synapses [out, in, 1], separate q/k/v), written from the SPEC's description."""
    out = {}
    for j, s in enumerate(("", "1", "2", "3")):
        out[f"patch_embed.proj_conv{s}.weight"] = sd[f"patch_embed.stages.{j}.conv.weight"]
        for b in _BN:
            out[f"patch_embed.proj_bn{s}.{b}"] = sd[f"patch_embed.stages.{j}.bn.{b}"]
    out["patch_embed.rpe_conv.weight"] = sd["patch_embed.rpe.conv.weight"]
    for b in _BN:
        out[f"patch_embed.rpe_bn.{b}"] = sd[f"patch_embed.rpe.bn.{b}"]
    for i in range(depth):
        p, q = f"block.{i}.", f"blocks.{i}."
        for n, w in zip("qkv", sd[f"{q}attn.qkv.linear.weight"].chunk(3)):
            out[f"{p}attn.{n}_conv.weight"] = w[..., None]
        for b in _BN[:4]:
            for n, t in zip("qkv", sd[f"{q}attn.qkv.bn.{b}"].chunk(3)):
                out[f"{p}attn.{n}_bn.{b}"] = t
        for n in "qkv":
            out[f"{p}attn.{n}_bn.num_batches_tracked"] = sd[f"{q}attn.qkv.bn.num_batches_tracked"]
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            out[f"{p}{name}_conv.weight"] = sd[f"{q}{name}.linear.weight"][..., None]
            out[f"{p}{name}_conv.bias"] = sd[f"{q}{name}.linear.bias"]
            for b in _BN:
                out[f"{p}{name}_bn.{b}"] = sd[f"{q}{name}.bn.{b}"]
    out["head.weight"], out["head.bias"] = sd["head.weight"], sd["head.bias"]
    out["pos_embed"] = torch.zeros(1, 4, sd["head.weight"].shape[1])  # unused upstream
    return out


def test_eval_only_loads_official_checkpoint_like_a_plain_state_dict(data_root, tmp_path):
    import argparse

    from evformer.models import create_model

    torch.manual_seed(3)
    model = create_model("spikformer_cifar10dvs_2_256", embed_dim=32, depth=1, num_heads=2, T=2)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    official = tmp_path / "official.pth"
    torch.save(  # as the official train.py saves: with its argparse Namespace
        {"model": _as_official_dvs(model.state_dict(), 1), "epoch": 5,
         "args": argparse.Namespace(lr=1e-3, T=16)},
        official,
    )  # fmt: skip
    results = []
    for ckpt, out in ((plain, tmp_path / "a"), (official, tmp_path / "b")):
        args = [*TINY, *EXTRA["cifar10_dvs"], "--data-root", str(data_root), "--eval-only"]
        rc = _main("cifar10_dvs", [*args, "--checkpoint", str(ckpt), "--out", str(out)])
        assert rc == 0
        results.append(json.loads((out / "eval.json").read_text())["test"])
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    assert results[0]["confusion"] == results[1]["confusion"]
