"""Recipe hardening: resuming (a finished run keeps its complete results; ``--resume`` alone
continues the run as it was configured and refuses another recipe's or model's run),
one-paragraph errors instead of tracebacks (bad device, checkpoints of another shape,
corrupt recordings, unwritable cache folders), the ``--skip-bad`` / ``--cache-dir``
flags, and the presets shipped inside the package (wheel install)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from evformer.engine import FitConfig, fit
from evformer.engine.trainer import Trainer
from evformer.events import from_columns, write_aedat31
from evformer.recipes._common import PRESET_DIR

REPO = Path(__file__).resolve().parents[1]

# the dvs_gesture demo shrunk to seconds: 32 x 32 synthetic gestures, 22 train / 11 test
TINY_DEMO = [
    "--demo", "--synthetic-size", "32", "--synthetic-train-per-class", "2",
    "--synthetic-test-per-class", "1", "--prepare-workers", "1",
    "--model-args", "embed_dim=32,depth=1,num_heads=2", "--T", "2",
    "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress",
]  # fmt: skip


def _main(recipe: str, argv: list[str]) -> int:
    return importlib.import_module(f"evformer.recipes.{recipe}").main(argv)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run directory) of a finished one-epoch tiny dvs_gesture demo run."""
    base = tmp_path_factory.mktemp("demo")
    data, out = base / "data", base / "run"
    assert _main("dvs_gesture", [*TINY_DEMO, "--data-root", str(data), "--out", str(out)]) == 0
    return data, out


@pytest.fixture
def run_copy(demo_run, tmp_path) -> Path:
    """A private copy of the finished demo run (tests resume it and change it)."""
    dst = tmp_path / "run"
    shutil.copytree(demo_run[1], dst)
    return dst


def _metric_epochs(run: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------- 3: a finished run


def test_resuming_a_finished_run_keeps_its_complete_results(demo_run, run_copy, capsys):
    data, _ = demo_run
    before = json.loads((run_copy / "results.json").read_text())
    assert before["final"]["confusion"]
    (run_copy / "confusion_matrix.png").unlink()
    argv = [*TINY_DEMO, "--data-root", str(data), "--resume", str(run_copy / "last.pt")]
    assert _main("dvs_gesture", argv) == 0
    after = json.loads((run_copy / "results.json").read_text())
    assert after.keys() == before.keys()
    for key in ("acc1", "acc5", "n", "per_class_acc", "confusion"):
        assert after["final"][key] == before["final"][key], key
    assert after["final"]["loss"] == pytest.approx(before["final"]["loss"], rel=1e-6)
    assert (run_copy / "confusion_matrix.png").stat().st_size > 1000
    assert _metric_epochs(run_copy) == [0]  # nothing trained twice
    assert f"top-1 {before['final']['acc1']:.2f} %" in capsys.readouterr().out


def test_engine_resume_of_a_finished_run_recomputes_the_final_evaluation(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=g), torch.arange(24) % 3
    cfg = FitConfig(epochs=1, batch_size=8, progress=False, plots=False, tensorboard=False)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(6, 3)

    data = TensorDataset(x, y)
    first = fit(model(), train_set=data, test_set=data, config=cfg, run_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    again = fit(
        model(), train_set=data, test_set=data, config=cfg, run_dir=tmp_path,
        resume=tmp_path / "last.pt",
    )  # fmt: skip
    assert again.final is not None and again.final.acc1 == first.final.acc1
    assert json.loads((tmp_path / "results.json").read_text()) == results


# ----------------------------------------------------------------- 7: --resume settings


def test_resume_alone_continues_the_run_as_configured(run_copy):
    # no --demo, no --data-root, no model arguments: all come from the run's config.yaml;
    # flags given still override (--epochs 2 extends the run by one epoch)
    argv = ["--resume", str(run_copy / "last.pt"), "--epochs", "2"]
    with pytest.warns(UserWarning, match="schedule differs"):
        assert _main("dvs_gesture", argv) == 0
    assert _metric_epochs(run_copy) == [0, 1]
    import yaml

    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert config["dataset"] == "synthetic" and config["epochs"] == 2 and config["demo"]
    assert config["model_args"] == {"embed_dim": 32, "depth": 1, "num_heads": 2}
    assert torch.load(run_copy / "last.pt", weights_only=True)["epoch"] == 2


def test_resume_refuses_a_run_of_another_recipe(run_copy, capsys):
    assert _main("cifar10_dvs", ["--resume", str(run_copy / "last.pt")]) == 1
    err = capsys.readouterr().err
    assert "'dvs_gesture' run" in err and "evformer.recipes.dvs_gesture" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--model", "spikformer_cifar10dvs_2_256"], "model"),
        (["--model-args", "embed_dim=64,depth=1,num_heads=2"], "model_args"),
        (["--dataset", "dvs_gesture"], "dataset"),
    ],
)
def test_resume_refuses_a_change_of_model_or_data(run_copy, capsys, flags, field):
    assert _main("dvs_gesture", ["--resume", str(run_copy / "last.pt"), *flags]) == 1
    err = capsys.readouterr().err
    assert f"changes {field} " in err and "--init" in err


def test_resume_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert _main("dvs_gesture", ["--resume", str(tmp_path / "nope" / "last.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------- 8: one-paragraph errors


@pytest.mark.parametrize("device", ["foo", "cuda:99"])
def test_a_bad_device_is_an_error_message(device, capsys):
    assert _main("dvs_gesture", ["--demo", "--device", device]) == 1
    err = capsys.readouterr().err
    assert f"--device {device}" in err or f"--device {device!r}" in err


def test_bad_device_on_the_command_line_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "evformer.recipes.cifar10", "--demo", "--device", "foo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "not a device" in proc.stderr and "Traceback" not in proc.stderr


def _other_shape(demo_run) -> list[str]:
    data, _ = demo_run
    argv = [*TINY_DEMO, "--data-root", str(data), "--model-args"]
    return [*argv, "embed_dim=64,depth=1,num_heads=2"]  # the last --model-args wins


@pytest.mark.parametrize("how", ["eval_only", "init"])
def test_a_checkpoint_of_another_shape_lists_the_keys(demo_run, tmp_path, capsys, how):
    ckpt = str(demo_run[1] / "last.pt")
    extra = ["--eval-only", "--checkpoint", ckpt] if how == "eval_only" else ["--init", ckpt]
    assert _main("dvs_gesture", [*_other_shape(demo_run), *extra, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "head.weight: (11, 32) in the checkpoint, (11, 64) in the model" in err
    assert ckpt in err and "Traceback" not in err


def test_resuming_into_a_model_of_another_shape_lists_the_keys(tmp_path):
    data = TensorDataset(torch.randn(8, 6), torch.arange(8) % 3)
    cfg = FitConfig(epochs=1, batch_size=4, progress=False, plots=False, tensorboard=False)
    fit(nn.Linear(6, 3), train_set=data, test_set=None, config=cfg, run_dir=tmp_path)
    trainer = Trainer(nn.Linear(6, 4), train_set=data, test_set=None, config=cfg)
    with pytest.raises(ValueError, match=r"weight: \(3, 6\) in the checkpoint, \(4, 6\) in"):
        trainer.load(tmp_path / "last.pt")


def _events(rng: np.random.Generator, n: int, t1: int) -> np.ndarray:
    t = np.sort(rng.integers(0, t1, n))
    return from_columns(t, rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n))


def _fake_gesture(root: Path, *, corrupt: bool) -> Path:
    """DVS Gesture layout: two train recordings (the second corrupt when asked), one test."""
    rng = np.random.default_rng(0)
    folder = root / "DvsGesture"
    folder.mkdir(parents=True)
    trials = {"train": ["user01_lab", "user02_lab"], "test": ["user24_led"]}
    for split, names in trials.items():
        for name in names:
            write_aedat31(folder / f"{name}.aedat", _events(rng, 3000, 400_000))
            rows = [f"{1 + i},{i * 100_000},{(i + 1) * 100_000}" for i in range(4)]
            text = "\n".join(["class,startTime_usec,endTime_usec", *rows]) + "\n"
            (folder / f"{name}_labels.csv").write_text(text)
        (folder / f"trials_to_{split}.txt").write_text("".join(f"{n}.aedat\n" for n in names))
    if corrupt:
        bad = folder / "user02_lab.aedat"
        raw = bytearray(bad.read_bytes())
        raw[-3000:] = b"\xff" * 3000  # garbage packet headers at the end
        bad.write_bytes(bytes(raw))
    return root


GESTURE = [
    "--model-args", "embed_dim=32,depth=1,num_heads=2", "--T", "2", "--resize", "32",
    "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--max-eval-batches", "1",
    "--num-workers", "0",
    "--prepare-workers", "1", "--device", "cpu", "--no-progress", "--no-plots",
]  # fmt: skip


def test_a_corrupt_recording_is_an_error_message_and_skip_bad_skips_it(tmp_path, capsys):
    root = _fake_gesture(tmp_path / "data", corrupt=True)
    argv = [*GESTURE, "--data-root", str(root), "--out", str(tmp_path / "run")]
    assert _main("dvs_gesture", argv) == 1
    err = capsys.readouterr().err
    assert "user02_lab.aedat" in err and "--skip-bad" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="unreadable recording"):
        assert _main("dvs_gesture", [*argv, "--skip-bad"]) == 0
    assert (tmp_path / "run" / "results.json").is_file()


def test_an_unwritable_cache_folder_is_an_error_message_and_cache_dir_moves_it(tmp_path, capsys):
    root = _fake_gesture(tmp_path / "data", corrupt=False)
    (root / ".evformer").write_text("")  # a file where the cache folder should be
    argv = [*GESTURE, "--data-root", str(root), "--out", str(tmp_path / "run")]
    assert _main("dvs_gesture", argv) == 1
    err = capsys.readouterr().err
    assert "cache folder" in err and "--cache-dir DIR" in err and "Traceback" not in err
    cache = tmp_path / "cache"
    assert _main("dvs_gesture", [*argv, "--cache-dir", str(cache)]) == 0
    assert {"dvsgesture-test.h5", "dvsgesture-train.h5"} <= {p.name for p in cache.glob("*.h5")}


def test_a_read_only_cache_folder_is_an_error_message(tmp_path, capsys, monkeypatch):
    import evformer.data.event_dataset as event_dataset

    root = _fake_gesture(tmp_path / "data", corrupt=False)
    # tests run as root here, where chmod cannot make a folder unwritable
    monkeypatch.setattr(event_dataset.os, "access", lambda path, mode: False)
    assert _main("dvs_gesture", [*GESTURE, "--data-root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "not writable" in err and "--cache-dir DIR" in err and "Traceback" not in err


# ----------------------------------------------------------------- 12: presets in the wheel


def test_top_level_recipes_folder_shows_the_shipped_presets():
    top = REPO / "recipes"
    assert top.resolve() == PRESET_DIR
    assert sorted(p.name for p in top.glob("*.yaml")) == sorted(
        p.name for p in PRESET_DIR.glob("*.yaml")
    )


@pytest.mark.slow
def test_every_preset_resolves_by_name_from_an_installed_wheel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "evformer", src / "evformer", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"), "."],
        cwd=src, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "whl").glob("evformer-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert len(names) >= 20
    script = (
        "import importlib, sys, yaml\n"
        "from evformer.recipes._common import load_preset, resolve_preset\n"
        "for name in sys.argv[1:]:\n"
        "    path = resolve_preset(name)\n"
        "    recipe = yaml.safe_load(path.read_text())['recipe']\n"
        "    mod = importlib.import_module(f'evformer.recipes.{recipe}')\n"
        "    cfg = mod.Config(**load_preset(mod.Config, path, recipe=recipe))\n"
        "    print(name, path, cfg.model)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=tmp_path,  # not the checkout: evformer must come from the installed wheel
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(names)
    for line in lines:
        _, path, model = line.split()
        assert Path(path).is_relative_to(site / "evformer" / "recipes" / "presets"), line
        assert model.removeprefix("mae_").startswith("spikformer_"), line
