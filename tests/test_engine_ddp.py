"""Data-parallel training under ``torchrun`` on CPU (gloo, 2 processes) follows the same loss
curve as one process with the same global batch, evaluates to the same metrics, and only
rank 0 writes the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _dist import free_port, subprocess_env

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from evformer.engine import (
        FitConfig, SeededTransformDataset, cleanup_distributed, fit, init_distributed,
        seed_everything,
    )

    torch.set_num_threads(1)
    run_dir = sys.argv[1]
    dist = init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 10, generator=g)
    y = (x @ torch.randn(10, 4, generator=g)).argmax(1)
    train = SeededTransformDataset(
        TensorDataset(x, y), lambda s, gen: s + 0.1 * torch.randn(10, generator=gen),
        seed=1,
    )
    seed_everything(0)  # same initial weights on every rank
    # LayerNorm, not BatchNorm: per-rank batch statistics would differ from one process
    model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    losses = []
    cfg = FitConfig(epochs=3, batch_size=16, lr=1e-2, warmup_epochs=1, label_smoothing=0.1,
                    clip_grad=1.0, seed=3, progress=False, plots=False, tensorboard=False)
    res = fit(model, train_set=train, test_set=TensorDataset(x[:37], y[:37]), config=cfg,
              run_dir=run_dir, dist=dist, on_step=lambda info: losses.append(info["loss"]))
    if dist.is_main:
        with open(run_dir + "/out.json", "w") as f:
            json.dump({"losses": losses, "world": dist.world_size, "acc1": res.final.acc1,
                       "n": res.final.n, "cm": res.final.confusion.tolist()}, f)
    cleanup_distributed()
    """
)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r1 = subprocess.run(
        [sys.executable, str(script), str(one)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            str(script), str(two),
        ],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = json.loads((one / "out.json").read_text())
    b = json.loads((two / "out.json").read_text())
    assert (a["world"], b["world"]) == (1, 2)
    assert len(a["losses"]) == len(b["losses"]) == 3 * (100 // 16)
    # same global batches and gradient average: equal up to float summation order
    torch.testing.assert_close(
        torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-4, atol=1e-5
    )
    assert a["losses"][-1] < a["losses"][0]
    # evaluation shards cover all 37 test samples exactly once
    assert a["n"] == b["n"] == 37
    assert a["acc1"] == b["acc1"] and a["cm"] == b["cm"]
    wa = torch.load(one / "last.pt", weights_only=True)
    wb = torch.load(two / "last.pt", weights_only=True)
    assert wb["world_size"] == 2 and len(wb["rng"]) == 2  # each rank's RNG state saved
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
