"""The masked-pretraining recipe (``python -m evformer.recipes.imagenet_mae``) on tiny
generated event data (CPU): a run end to end (metrics, config, figures, encoder.pt, probe),
kill + resume bit-identical (masks included), the same masks and weights for one and two
processes at the same global batch, missing data (exit 2), a non-finite loss (exit 3), the
learning-rate rule, and encoder.pt loaded by the supervised recipes' ``--init``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _dist import free_port, subprocess_env

from evformer.models import create_model
from evformer.recipes import imagenet_mae
from evformer.recipes._common import parse_config
from evformer.recipes._pretrain import mask_noise

MODEL_ARGS = (
    "stem_stages=2,stem_ratio=1,embed_dim=32,depth=1,num_heads=2,"
    "decoder_dim=32,decoder_depth=1,decoder_heads=2"
)
# SyntheticGesture at 32 x 32 (4 + 2 samples per class), a tiny V2 (8 x 8 tokens), T = 1
TINY = [
    "--dataset", "synthetic", "--synthetic-size", "32",
    "--synthetic-train-per-class", "4", "--synthetic-test-per-class", "2",
    "--model-args", MODEL_ARGS, "--T", "1",
    "--epochs", "2", "--warmup-epochs", "0.5", "--batch-size", "8",
    "--max-steps-per-epoch", "3", "--recon-samples", "2",
    "--num-workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One generated SyntheticGesture cache shared by the tests of this module."""
    root = tmp_path_factory.mktemp("data")
    cfg = parse_config(
        imagenet_mae.Config,
        [*TINY, "--data-root", str(root)],
        recipe="imagenet_mae",
        demo={},
        description="",
    )
    imagenet_mae.RECIPE.build_data(cfg)  # generate and cache both splits once
    return root


def _run(argv: list[str]) -> int:
    return imagenet_mae.main(argv)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------- end to end


def test_tiny_pretraining_run_writes_everything(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _run([*TINY, "--data-root", str(data_root), "--out", str(out), "--probe"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("train_loss", "lr", "epoch_seconds", "samples_per_second", "mask_ratio"):
            assert key in r, key
        assert r["mask_ratio"] == 0.75 and r["train_loss"] > 0
        assert "train_acc1" not in r and "test_acc1" not in r  # no classification metrics
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["recipe"] == "imagenet_mae" and config["blr"] == 1e-3
    assert config["lr"] == pytest.approx(1e-3 * 8 / 1024)  # the resolved rate
    assert json.loads((out / "run_info.json").read_text())
    for name in ("last.pt", "encoder.pt", "reconstructions.png", "curves.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == [
        "epoch_001.png",
        "epoch_002.png",
    ]
    assert not (out / "best.pt").exists()  # no test accuracy to select on
    res = json.loads((out / "results.json").read_text())
    assert res["first_epoch_loss"] == rows[0]["train_loss"]
    assert res["last_epoch_loss"] == rows[-1]["train_loss"]
    for name in ("pretrained", "random_init"):
        assert 0 <= res["probe"][name]["test_acc"] <= 100
        assert res["probe"][name]["n_train"] == 44 and res["probe"][name]["n_test"] == 22
    assert "linear probe" in text and "encoder.pt" in text
    # load_model rebuilds the run's model with every weight of last.pt, in eval mode
    model, cfg = imagenet_mae.load_model(out)
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert not model.training and cfg.model == config["model"]
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(FileNotFoundError, match="best.pt: no checkpoint"):
        imagenet_mae.load_model(out, checkpoint="best.pt")


def test_learning_rate_rule_and_presets():
    cfg = parse_config(
        imagenet_mae.Config,
        ["--preset", "imagenet_mae_v2_12_512", "--batch-size", "4096"],
        recipe="imagenet_mae",
        demo={},
        description="",
    )
    assert cfg.lr == pytest.approx(4e-3) and cfg.model == "mae_spikformer_v2_12_512"
    assert (cfg.epochs, cfg.warmup_epochs, cfg.betas, cfg.weight_decay) == (
        200,
        20.0,
        (0.9, 0.95),
        0.05,
    )
    assert (cfg.mask_ratio, cfg.norm_pix_loss, cfg.randaugment, cfg.erasing) == (
        0.75,
        True,
        False,
        0.0,
    )
    # an explicit --lr wins over the rule
    cfg = parse_config(
        imagenet_mae.Config, ["--lr", "3e-4"], recipe="imagenet_mae", demo={}, description=""
    )
    assert cfg.lr == 3e-4
    default = parse_config(imagenet_mae.Config, [], recipe="imagenet_mae", demo={}, description="")
    assert default.lr == pytest.approx(1e-3) and default.batch_size == 1024


# ----------------------------------------------------------------- resume


def test_kill_and_resume_is_bit_identical(data_root, tmp_path, monkeypatch):
    from evformer.engine.trainer import Trainer

    args = [*TINY, "--data-root", str(data_root), "--recon-samples", "0"]
    full = tmp_path / "full"
    assert _run([*args, "--out", str(full)]) == 0

    part = tmp_path / "part"
    save = Trainer.save

    def killed_after_step_4(self, name):
        path = save(self, name)
        if self.step == 4:  # mid-epoch 2 (3 steps per epoch), just after a checkpoint
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        _run([*args, "--out", str(part), "--checkpoint-every", "1"])
    monkeypatch.setattr(Trainer, "save", save)
    assert torch.load(part / "last.pt", weights_only=True)["step"] == 4
    assert _run([*args, "--checkpoint-every", "1", "--resume", str(part / "last.pt")]) == 0

    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["train_loss"] for r in _rows(full)] == [r["train_loss"] for r in _rows(part)]
    ea = torch.load(full / "encoder.pt", weights_only=True)["model"]
    eb = torch.load(part / "encoder.pt", weights_only=True)["model"]
    assert all(torch.equal(v, eb[k]) for k, v in ea.items())


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("imagenet", "ImageNet not found"), ("dvs_gesture", "not found")],
)
def test_missing_data_exits_2_with_instructions(dataset, expected, tmp_path, capsys):
    args = [*TINY, "--dataset", dataset, "--data-root", str(tmp_path / "empty")]
    assert _run(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Download" in err and "--data-root" in err
    assert "Traceback" not in err


def test_nonfinite_loss_exits_3(data_root, tmp_path, monkeypatch, capsys):
    from evformer.models.mae import SpikformerMAE

    def nan_loss(self, x_seq, pred, mask):
        return (pred * float("nan")).mean()

    monkeypatch.setattr(SpikformerMAE, "forward_loss", nan_loss)
    out = tmp_path / "run"
    assert _run([*TINY, "--data-root", str(data_root), "--out", str(out)]) == 3
    assert "training loss became nan" in capsys.readouterr().err
    assert (out / "nonfinite.pt").is_file() and not (out / "encoder.pt").exists()


def test_bad_settings_exit_1(capsys):
    assert _run(["--mask-ratio", "1.0"]) == 1
    assert _run(["--eval-t", "1,2"]) == 1
    assert "fine-tune" in capsys.readouterr().err


# ----------------------------------------------------------------- encoder.pt -> --init


def test_encoder_pt_initialises_the_supervised_recipe(data_root, tmp_path, capsys):
    from evformer.recipes import dvs_gesture

    out = tmp_path / "pre"
    args = [*TINY, "--data-root", str(data_root), "--recon-samples", "0", "--epochs", "1"]
    assert _run([*args, "--out", str(out)]) == 0
    enc = torch.load(out / "encoder.pt", weights_only=True)
    assert enc["model_name"] == "spikformer_v2_8_384"
    capsys.readouterr()
    argv = [
        "--dataset", "synthetic", "--synthetic-size", "32",
        "--synthetic-train-per-class", "4", "--synthetic-test-per-class", "2",
        "--model", "spikformer_v2_8_384", "--model-args", MODEL_ARGS.split(",decoder")[0]
        + ",in_channels=2,img_size=32",
        "--T", "1", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
        "--max-steps-per-epoch", "1", "--num-workers", "0", "--device", "cpu",
        "--no-progress", "--no-tensorboard", "--no-plots",
        "--data-root", str(data_root), "--init", str(out / "encoder.pt"),
        "--out", str(tmp_path / "ft"),
    ]  # fmt: skip
    rc = dvs_gesture.main(argv)
    assert rc == 0, capsys.readouterr().err
    line = next(x for x in capsys.readouterr().out.splitlines() if "initial weights" in x)
    # exactly the classifier head is left as initialised; every encoder key is loaded
    assert line.endswith(
        "2 not loaded (not in the file, kept as initialised): head.weight, head.bias"
    ), line
    # the pretraining's last.pt (encoder and decoder) works too: its encoder part is taken
    args = [a if a != str(out / "encoder.pt") else str(out / "last.pt") for a in argv]
    assert dvs_gesture.main([*args[:-1], str(tmp_path / "ft2")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "initial weights" in x)
    assert line.endswith("head.weight, head.bias"), line


def test_imagenet_folder_pretraining_then_imagenet_init(tmp_path, capsys):
    """The ImageNet path: an ImageFolder root (labels ignored), RGB reconstructions, and
    the supervised imagenet recipe started from the encoder."""
    import numpy as np
    from PIL import Image

    from evformer.recipes import imagenet

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for wnid in ("n01", "n02"):
            d = tmp_path / "data" / "ImageNet" / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{wnid}_{i}.png")
    enc_args = "stem_stages=2,stem_ratio=1,embed_dim=32,depth=1,num_heads=2"
    common = [
        "--data-root", str(tmp_path / "data"), "--image-size", "32", "--T", "1",
        "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
        "--num-workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    out = tmp_path / "pre"
    args = [*common, "--model-args", f"{enc_args},decoder_dim=32,decoder_depth=1,decoder_heads=2"]
    assert _run([*args, "--recon-samples", "2", "--out", str(out)]) == 0
    assert (out / "reconstructions" / "epoch_001.png").is_file()
    assert _rows(out)[0]["epoch"] == 0
    capsys.readouterr()
    rc = imagenet.main(
        [*common, "--dataset", "imagenet", "--num-classes", "2", "--model", "spikformer_v2_8_384",
         "--model-args", enc_args, "--eval-crop-pct", "1.0", "--no-plots",
         "--init", str(out / "encoder.pt"), "--out", str(tmp_path / "ft")]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    line = next(x for x in capsys.readouterr().out.splitlines() if "initial weights" in x)
    assert line.endswith(
        "2 not loaded (not in the file, kept as initialised): head.weight, head.bias"
    ), line


@pytest.mark.parametrize("size", ["8_384", "12_512", "12_768", "16_768"])
def test_published_encoder_keys_match_the_finetuning_model(size):
    """Every encoder weight of mae_spikformer_v2_<size> has a same-shaped twin in
    spikformer_v2_<size> (the model of the fine-tuning presets); only the head is new."""
    with torch.device("meta"):
        mae = create_model(f"mae_spikformer_v2_{size}")
        ft = create_model(f"spikformer_v2_{size}", T=1)
    enc = mae.encoder_state_dict()
    own = ft.state_dict()
    assert sorted(set(own) - set(enc)) == ["head.bias", "head.weight"]
    assert not set(enc) - set(own)
    assert all(enc[k].shape == own[k].shape for k in enc)


# ----------------------------------------------------------------- processes


def test_masks_depend_on_seed_epoch_and_index_only():
    a = mask_noise(0, 3, 17, 64)
    assert torch.equal(a, mask_noise(0, 3, 17, 64))
    assert not torch.equal(a, mask_noise(0, 3, 18, 64))
    assert not torch.equal(a, mask_noise(0, 4, 17, 64))
    assert not torch.equal(a, mask_noise(1, 3, 17, 64))


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from evformer.engine import (
        FitConfig, MaskedReconstruction, SeededTransformDataset, cleanup_distributed, fit,
        init_distributed, seed_everything,
    )
    from evformer.models.mae import mae_loss, patchify
    from evformer.recipes._pretrain import MaskedSamples

    class TinyMAE(nn.Module):
        # LayerNorm only (per-rank BatchNorm statistics would differ from one process)
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(2 * 4 * 4, 16)
            self.norm = nn.LayerNorm(16)
            self.pred = nn.Linear(16, 2 * 4 * 4)
            self.mask_token = nn.Parameter(torch.zeros(16))

        def forward(self, x, *, noise):
            target = patchify(x.mean(1), 4)  # [B, 16, 32]
            keep = 4
            ids = noise.argsort(1)
            mask = torch.ones_like(noise).scatter(1, ids[:, :keep], 0.0)
            tok = self.norm(self.embed(target))
            tok = torch.where(mask[..., None] > 0, self.mask_token.expand_as(tok), tok)
            tok = tok + tok.mean(1, keepdim=True)
            pred = self.pred(tok)
            return mae_loss(pred, target, mask), pred, mask

    torch.set_num_threads(1)
    run_dir = sys.argv[1]
    dist = init_distributed("cpu")
    x = torch.rand(48, 1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    train = MaskedSamples(
        SeededTransformDataset(TensorDataset(x, torch.zeros(48)), None, seed=5),
        num_tokens=16, seed=5,
    )
    seen = {}
    base_getitem = MaskedSamples.__getitem__
    def record(self, i):
        xi, noise = base_getitem(self, i)
        seen[f"{self.epoch}:{i}"] = noise.tolist()
        return xi, noise
    MaskedSamples.__getitem__ = record
    seed_everything(0)
    model = TinyMAE()
    cfg = FitConfig(epochs=2, batch_size=8, lr=1e-2, warmup_epochs=0.5, betas=(0.9, 0.95),
                    seed=5, progress=False, plots=False, tensorboard=False)
    losses = []
    fit(model, train_set=train, test_set=None, config=cfg, run_dir=run_dir, dist=dist,
        objective=MaskedReconstruction(row={"mask_ratio": 0.75}),
        on_step=lambda info: losses.append(info["loss"]))
    with open(f"{run_dir}/seen{dist.rank}.json", "w") as f:
        json.dump(seen, f)
    if dist.is_main:
        with open(run_dir + "/out.json", "w") as f:
            json.dump({"losses": losses, "world": dist.world_size}, f)
    cleanup_distributed()
    """
)


@pytest.mark.slow
def test_one_and_two_processes_draw_the_same_masks_and_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r1 = subprocess.run(
        [sys.executable, str(script), str(one)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            str(script), str(two),
        ],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert r2.returncode == 0, r2.stderr[-3000:]
    seen1 = json.loads((one / "seen0.json").read_text())
    seen2 = {**json.loads((two / "seen0.json").read_text())}
    seen2.update(json.loads((two / "seen1.json").read_text()))
    assert len(seen1) == 2 * 48 and seen1 == seen2  # every sample, the same mask
    a = json.loads((one / "out.json").read_text())
    b = json.loads((two / "out.json").read_text())
    torch.testing.assert_close(
        torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-4, atol=1e-5
    )
    wa = torch.load(one / "last.pt", weights_only=True)["model"]
    wb = torch.load(two / "last.pt", weights_only=True)["model"]
    for k, v in wa.items():
        torch.testing.assert_close(wb[k], v, rtol=1e-4, atol=1e-5)
    rows = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[0]["mask_ratio"] == 0.75
