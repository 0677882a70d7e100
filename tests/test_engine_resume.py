"""Exact resume: a run killed (SIGKILL) mid-epoch and resumed from its last checkpoint ends
with bit-identical weights and the same metrics as an uninterrupted run.

The training script runs in subprocesses so the kill is a real one. It exercises everything
that carries state across steps: a shuffled sampler, per-sample augmentation with loader
workers, Mixup with its generator (switched off mid-run), dropout (global torch RNG),
BatchNorm buffers, AdamW moments, the per-iteration schedule and gradient clipping; with an
event dataset, also event-level augmentation (each sample's NumPy generator).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from evformer.events import from_columns

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from evformer.engine import FitConfig, SeededTransformDataset, fit, seed_everything

    torch.set_num_threads(1)
    run_dir, workers, kill_at, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    events = sys.argv[5] if len(sys.argv) > 5 else ""  # an event cache: train on it

    g = torch.Generator().manual_seed(0)
    x = torch.randn(84, 2, 6, 6, generator=g)
    y = (x.mean(dim=(2, 3)) @ torch.randn(2, 3, generator=g)).argmax(1)

    def augment(sample, gen):
        # a random roll and additive noise, drawn from the per-sample generator
        shift = int(torch.randint(-2, 3, (), generator=gen))
        noise = 0.1 * torch.randn(sample.shape, generator=gen)
        return torch.roll(sample, shift, dims=-1) + noise

    def mixup(inp, lab, gen):
        lam = float(torch.distributions.Beta(0.5, 0.5).sample())  # global RNG on purpose
        lam = 0.5 * lam + 0.5 * float(torch.rand((), generator=gen))
        perm = torch.randperm(inp.shape[0], generator=gen)
        soft = nn.functional.one_hot(lab, 3).float()
        return lam * inp + (1 - lam) * inp[perm], lam * soft + (1 - lam) * soft[perm]

    seed_everything(5)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )

    def on_step(info):
        if info["step"] == kill_at:
            os.kill(os.getpid(), 9)

    cfg = FitConfig(
        epochs=3, cooldown_epochs=1, batch_size=12, lr=5e-3, warmup_epochs=1, min_lr=1e-4,
        label_smoothing=0.1, mixup_off_epoch=2, clip_grad=1.0, seed=11, num_workers=workers,
        checkpoint_every=4, progress=False, plots=False, tensorboard=False,
    )
    train = SeededTransformDataset(TensorDataset(x, y), augment, seed=11)
    if events:
        from evformer.data import EventCache, EventFrameDataset
        from evformer.events import Compose, DropEvent, RandomFlipLR

        ev_aug = Compose((DropEvent((0.1, 0.6)), RandomFlipLR(sensor_size=(6, 6))))
        frames = EventFrameDataset(EventCache(events), n_frames=1, event_transform=ev_aug)
        # [1, 2, 6, 6] frames -> [2, 6, 6], then the frame-level augmentation
        train = SeededTransformDataset(frames, lambda f, gen: augment(f[0], gen), seed=11)
    fit(model, train_set=train, test_set=TensorDataset(x[:30], y[:30]), config=cfg,
        run_dir=run_dir, mixup=mixup, on_step=on_step, resume=resume or None)
    """
)


def _run(
    script: Path,
    run_dir: Path,
    *,
    workers: int,
    kill_at: int = -1,
    resume: str = "",
    events: Path | None = None,
):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [str(run_dir), str(workers), str(kill_at), resume, *([str(events)] if events else [])]
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = ("epoch_seconds", "train_seconds", "samples_per_second")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_killed_run_resumes_to_identical_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    full, killed = tmp_path / "full", tmp_path / "killed"

    ref = _run(script, full, workers=0)
    assert ref.returncode == 0, ref.stderr

    # 7 steps per epoch (84 // 12); checkpoints every 4 steps; the kill at step 11 comes
    # 4 steps into epoch 1, after the checkpoint at step 8 (1 step into epoch 1).
    dead = _run(script, killed, workers=2, kill_at=11)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    ckpt = torch.load(killed / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (1, 1, 8)

    again = _run(script, killed, workers=2, resume=str(killed / "last.pt"))
    assert again.returncode == 0, again.stderr

    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 * 7
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # bit-identical, BN buffers included
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert _metrics(full) == _metrics(killed)  # same losses and accuracies, each epoch once
    assert [r["mixup"] for r in _metrics(full)] == [True, True, False, False]


def _event_cache(path: Path) -> Path:
    """84 samples of random events on a 6 x 6 sensor; label = the busier third of the rows."""
    from evformer.data import prepare_event_cache

    rng = np.random.default_rng(0)
    samples = []
    for _ in range(84):
        n = int(rng.integers(40, 120))
        t, x, y = np.sort(rng.integers(0, 10_000, n)), rng.integers(0, 6, n), rng.integers(0, 6, n)
        samples.append(
            (from_columns(t, x, y, rng.integers(0, 2, n)), int(np.bincount(y // 2).argmax()))
        )
    prepare_event_cache(
        path, [0], lambda _: samples, fingerprint="resume", meta={}, sensor_size=(6, 6),
        num_workers=0, progress=False,
    )  # fmt: skip
    return path


@pytest.mark.slow  # five training subprocesses
def test_killed_run_with_event_augmentation_resumes_to_identical_weights(tmp_path):
    """Event-level augmentation draws from each sample's (seed, epoch, index) generator,
    so a killed and resumed run redoes it exactly, with 0 or 2 loader workers."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    events = _event_cache(tmp_path / "events.h5")
    ref = _run(script, tmp_path / "full", workers=0, events=events)
    assert ref.returncode == 0, ref.stderr
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    for workers in (0, 2):
        killed = tmp_path / f"killed{workers}"
        dead = _run(script, killed, workers=workers, kill_at=11, events=events)
        assert dead.returncode == -signal.SIGKILL, dead.stderr
        again = _run(script, killed, workers=workers, resume=str(killed / "last.pt"), events=events)
        assert again.returncode == 0, again.stderr
        b = torch.load(killed / "last.pt", weights_only=True)
        assert a["step"] == b["step"] == 4 * 7
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (workers, key)
        assert _metrics(tmp_path / "full") == _metrics(killed)
