"""Engine units: schedule, parameter groups, metrics, samplers, checkpoints, loss, logging,
evaluation and the training loop on tiny models (CPU)."""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from evformer.engine import (
    CosineSchedule,
    EpochSampler,
    FitConfig,
    MetricsLog,
    NonFiniteLossError,
    SeededTransformDataset,
    ShardSampler,
    accuracy,
    build_optimizer,
    capture_rng_state,
    classification_loss,
    confusion_matrix,
    evaluate,
    evaluate_time_steps,
    fit,
    load_checkpoint,
    lr_at,
    model_state_from,
    param_groups,
    per_class_accuracy,
    reset_states,
    restore_rng_state,
    save_checkpoint,
    topk_correct,
)

# ---------------------------------------------------------------- schedule

SCHED = dict(
    base_lr=1e-3, steps_per_epoch=10, epochs=20, warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-5
)


def test_lr_at_hand_values():
    assert lr_at(0, **SCHED) == pytest.approx(1e-5)
    # half way through warmup: midpoint of warmup_lr and base_lr
    assert lr_at(25, **SCHED) == pytest.approx((1e-5 + 1e-3) / 2)
    assert lr_at(50, **SCHED) == pytest.approx(1e-3)  # end of warmup: base lr, no jump
    # half way through the cosine (epoch 12.5): mean of base and min
    assert lr_at(125, **SCHED) == pytest.approx((1e-3 + 1e-5) / 2)
    # a quarter into the cosine: min + (base - min) * (1 + cos(pi/4)) / 2
    expect = 1e-5 + (1e-3 - 1e-5) * (1 + math.sqrt(0.5)) / 2
    assert lr_at(50 + 375 // 10, **SCHED) == pytest.approx(expect, rel=1e-2)
    assert lr_at(200, **SCHED) == pytest.approx(1e-5)  # cooldown: min lr
    assert lr_at(260, **SCHED) == pytest.approx(1e-5)


def test_lr_at_monotone_and_continuous():
    lrs = [lr_at(s, **SCHED) for s in range(0, 230)]
    assert all(b >= a for a, b in zip(lrs[:50], lrs[1:51]))  # warmup rises
    assert all(b <= a for a, b in zip(lrs[50:], lrs[51:]))  # then never rises again
    assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) < 1e-3 / 40


@pytest.mark.parametrize(
    "kw",
    [dict(steps_per_epoch=0), dict(epochs=0), dict(warmup_epochs=30), dict(warmup_epochs=-1)],
)
def test_lr_at_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        lr_at(0, **{**SCHED, **kw})


def test_cosine_schedule_sets_scaled_group_lrs_and_round_trips():
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p1], "lr_scale": 1.0}, {"params": [p2], "lr_scale": 0.5}])
    sched = CosineSchedule(opt, **SCHED)
    for _ in range(30):
        lr = sched.step()
    assert lr == pytest.approx(lr_at(29, **SCHED))
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * lr)
    other = CosineSchedule(opt, **SCHED)
    other.load_state_dict(sched.state_dict())
    assert other.step() == pytest.approx(lr_at(30, **SCHED))
    changed = CosineSchedule(opt, **{**SCHED, "base_lr": 5e-4})
    with pytest.raises(ValueError, match="base_lr"):
        changed.load_state_dict(sched.state_dict())


# ---------------------------------------------------------------- parameter groups


class TinyViT(nn.Module):
    """Parameter names shaped like the Spikformer ones: patch_embed, block.<k>, head."""

    def __init__(self, depth: int = 3, dim: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(2, dim, 3, bias=False), nn.BatchNorm2d(dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, dim, 1))
        self.block = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim)) for _ in range(depth)
        )
        self.head = nn.Linear(dim, 3)


def test_param_groups_weight_decay_split():
    model = TinyViT()
    groups = param_groups(model, weight_decay=0.05)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    for name, p in model.named_parameters():
        expect = 0.0 if (p.ndim <= 1 or name.endswith("bias") or "pos_embed" in name) else 0.05
        assert wd[name] == expect, name
    assert wd["block.0.0.weight"] == 0.05 and wd["patch_embed.0.weight"] == 0.05
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_param_groups_layer_decay_scales():
    model = TinyViT(depth=3)
    d = 0.7
    groups = param_groups(model, weight_decay=0.05, layer_decay=d)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    # MAE rule with L = 3: stem d^4, block k d^(3-k), head 1
    assert scale["patch_embed.0.weight"] == pytest.approx(d**4)
    assert scale["pos_embed"] == pytest.approx(d**4)
    assert scale["block.0.0.weight"] == pytest.approx(d**3)
    assert scale["block.2.1.bias"] == pytest.approx(d**1)
    assert scale["head.weight"] == pytest.approx(1.0)
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(frozen, weight_decay=0.0)
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(nn.Linear(2, 2), weight_decay=0.0, layer_decay=0.7)


def test_build_optimizer_state_loads_weights_only(tmp_path):
    model = TinyViT()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert {g["lr"] for g in opt.param_groups} == {1e-3 * g["lr_scale"] for g in opt.param_groups}
    x = torch.randn(2, 4)
    sum(blk(x).sum() for blk in model.block).backward()
    model.head(x).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", {"optimizer": opt.state_dict()})
    opt2 = build_optimizer(TinyViT(), lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    opt2.load_state_dict(load_checkpoint(tmp_path / "c.pt")["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


# ---------------------------------------------------------------- metrics and loss


def test_topk_correct_hand_computed():
    logits = torch.tensor(
        [[0.1, 0.5, 0.2, 0.0], [0.9, 0.1, 0.3, 0.2], [0.0, 0.1, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]]
    )
    target = torch.tensor([1, 2, 0, 3])
    # row 0 top1 hit; row 1: label 2 ranks 2nd; row 2: label 0 ranks last; row 3 ranks last
    assert topk_correct(logits, target, (1, 2, 3, 10)).tolist() == [1, 2, 2, 4]
    assert accuracy(logits, target, (1, 2)) == [25.0, 50.0]
    soft = torch.nn.functional.one_hot(target, 4).float() * 0.6 + 0.1
    assert topk_correct(logits, soft, (1,)).tolist() == [1]


def test_confusion_matrix_against_bincount_and_per_class():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    ref = np.bincount(t * 5 + p, minlength=25).reshape(5, 5)  # independent of sklearn
    cm = confusion_matrix(torch.from_numpy(t), p, num_classes=5)
    np.testing.assert_array_equal(cm, ref)
    assert confusion_matrix([0, 0], [0, 0], num_classes=3).shape == (3, 3)
    acc = per_class_accuracy(np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]]))
    np.testing.assert_allclose(acc, [75.0, np.nan, 50.0])
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], num_classes=3)


def test_classification_loss_hand_value_and_soft_equals_hard():
    logits = torch.tensor([[2.0, 0.0]])
    # -log softmax: label 0 -> log(1 + e^-2)
    assert classification_loss(logits, torch.tensor([0])).item() == pytest.approx(
        math.log(1 + math.exp(-2.0)), rel=1e-6
    )
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    onehot = torch.nn.functional.one_hot(y, 5).float()
    for eps in (0.0, 0.1):
        hard = classification_loss(logits, y, label_smoothing=eps)
        soft = classification_loss(logits, onehot, label_smoothing=eps)
        assert soft.item() == pytest.approx(hard.item(), rel=1e-6)
    # smoothing by hand: (1 - e) CE + e * mean_k(-log p_k)
    logp = torch.log_softmax(logits, -1)
    by_hand = ((1 - 0.1) * -logp.gather(1, y[:, None])[:, 0] - 0.1 * logp.mean(1)).mean()
    assert classification_loss(logits, y, label_smoothing=0.1).item() == pytest.approx(
        by_hand.item(), rel=1e-6
    )


# ---------------------------------------------------------------- samplers


def test_epoch_sampler_global_batches_are_world_size_independent():
    n, gb = 53, 8
    one = list(EpochSampler(n, batch_size=gb, seed=3))
    assert len(one) == (n // gb) * gb and len(set(one)) == len(one)
    two = [list(EpochSampler(n, batch_size=gb, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    for b in range(n // gb):
        global_batch = two[0][b * 4 : (b + 1) * 4] + two[1][b * 4 : (b + 1) * 4]
        assert global_batch == one[b * gb : (b + 1) * gb]
    s = EpochSampler(n, batch_size=gb, seed=3)
    s.set_epoch(1)
    assert list(s) != one  # a new permutation each epoch
    s.set_epoch(0, start_batch=2)
    assert list(s) == one[2 * gb :] and len(s) == len(one) - 2 * gb
    assert list(EpochSampler(n, batch_size=gb, seed=4)) != one
    capped = EpochSampler(n, batch_size=gb, seed=3, max_batches=2)
    assert list(capped) == one[: 2 * gb]
    with pytest.raises(ValueError, match="multiple"):
        EpochSampler(n, batch_size=7, seed=0, num_replicas=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(5, batch_size=8, seed=0)


def test_shard_sampler_covers_every_sample_once():
    shards = [list(ShardSampler(11, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_seeded_transform_dataset_is_order_independent():
    base = TensorDataset(torch.zeros(10, 3), torch.arange(10))
    ds = SeededTransformDataset(base, lambda x, g: x + torch.rand(3, generator=g), seed=1)
    ds.set_epoch(2)
    forward = [ds[i][0] for i in range(10)]
    backward = [ds[i][0] for i in reversed(range(10))][::-1]
    for a, b in zip(forward, backward):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ds.set_epoch(3)
    assert not torch.equal(ds[0][0], forward[0])
    assert ds[4][1].item() == 4


# ---------------------------------------------------------------- checkpoints and logging


def test_checkpoint_round_trip_weights_only_and_rng(tmp_path):
    model = TinyViT()
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002 (the global state is what is being saved)
    torch.manual_seed(1)
    state = capture_rng_state()
    expect = (random.random(), np.random.random(), torch.rand(1).item())  # noqa: NPY002
    path = save_checkpoint(
        tmp_path / "run" / "last.pt", {"model": model.state_dict(), "rng": state}
    )
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind
    ckpt = torch.load(path, weights_only=True)
    restore_rng_state(ckpt["rng"])
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expect  # noqa: NPY002
    sd = model_state_from(ckpt)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="Namespace"):
        save_checkpoint(tmp_path / "bad.pt", {"args": argparse.Namespace(lr=1)})
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_metrics_log_append_truncate_and_nan(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for e in range(4):
        log.append({"epoch": e, "test_acc1": float("nan") if e == 1 else 10.0 * e})
    log.truncate(before_epoch=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    assert json.loads(lines[1])["test_acc1"] is None  # strict JSON: no NaN literal


def test_reset_states_resets_spikingjelly_neurons():
    from spikingjelly.activation_based import neuron

    lif = neuron.LIFNode(step_mode="m")
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(lif))
    net(torch.ones(3, 1, 2) * 5)
    assert isinstance(lif.v, torch.Tensor)  # state left over from the batch
    reset_states(net)
    assert lif.v == 0.0  # spikingjelly's reset value


# ---------------------------------------------------------------- evaluation and fit


def _linear_problem(n=96, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g)).argmax(1)
    return TensorDataset(x, y)


def test_evaluate_matches_direct_computation():
    ds = _linear_problem()
    model = nn.Linear(6, 3)
    res = evaluate(model, ds, batch_size=10, device="cpu")
    x, y = ds.tensors
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1).numpy()
    assert res.n == 96
    assert res.acc1 == pytest.approx(100.0 * np.mean(pred == y.numpy()))
    assert res.acc5 == 100.0  # 3 classes: top-5 is everything
    assert res.loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    ref_cm = np.bincount(y.numpy() * 3 + pred, minlength=9).reshape(3, 3)
    np.testing.assert_array_equal(res.confusion, ref_cm)


def test_evaluate_time_steps_sets_and_restores_t():
    class Rep(nn.Module):
        def __init__(self):
            super().__init__()
            self.T = 4
            self.fc = nn.Linear(6, 3)
            self.seen: list[int] = []

        def forward(self, x):
            self.seen.append(self.T)
            return self.fc(x)

    model = Rep()
    made = []
    res = evaluate_time_steps(
        model,
        lambda t: made.append(t) or _linear_problem(n=12),
        [1, 2, 6],
        batch_size=12,
        device="cpu",
    )
    assert sorted(res) == [1, 2, 6] and made == [1, 2, 6] and model.seen == [1, 2, 6]
    assert model.T == 4


def test_fit_learns_and_writes_run_dir(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    ds = _linear_problem(n=192)
    cfg = FitConfig(epochs=4, batch_size=16, lr=1e-2, warmup_epochs=1, progress=False)
    res = fit(model, train_set=ds, test_set=ds, config=cfg, run_dir=tmp_path, class_names="abc")
    assert res.final.acc1 > 80.0  # chance is ~33 %
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for key in ("train_loss", "test_loss", "test_acc1", "lr", "epoch_seconds"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["test_acc1"] == pytest.approx(res.final.acc1)
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine went down
    for name in ("config.yaml", "run_info.json", "last.pt", "best.pt", "results.json"):
        assert (tmp_path / name).is_file(), name
    for png in ("curves.png", "confusion_matrix.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((tmp_path / "run_info.json").read_text())
    commit = info["git"]["commit"]
    assert commit == "unknown" or len(commit) == 40  # a sha, or "unknown" outside git
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 4 and last["step"] == 4 * (192 // 16) and last["step_in_epoch"] == 0


def test_fit_rejects_amp_on_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        fit(
            nn.Linear(6, 3),
            train_set=_linear_problem(),
            test_set=None,
            config=FitConfig(amp=True, progress=False),
            dist=None,
        )


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"topk": ()}, "topk"),
        ({"topk": (0, 1)}, "topk"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"amp_dtype": "float8"}, "amp_dtype"),
    ],
)
def test_fit_config_rejects_bad_settings_by_name(setting, match):
    FitConfig().validate()
    with pytest.raises(ValueError, match=match):
        FitConfig(**setting).validate()


def test_nonfinite_loss_stops_with_checkpoint_from_before(tmp_path):
    ds = _linear_problem(n=64)
    x, y = ds.tensors
    x = x.clone()
    x[37] = float("nan")  # one poisoned sample: the loss of its batch is NaN
    model = nn.Linear(6, 3)
    steps = []
    snapshots = {}

    def on_step(info):
        steps.append(info["step"])
        snapshots[info["step"]] = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = FitConfig(epochs=3, batch_size=8, progress=False, plots=False)
    with pytest.raises(NonFiniteLossError, match="nan") as err:
        fit(
            model,
            train_set=TensorDataset(x, y),
            test_set=None,
            config=cfg,
            run_dir=tmp_path,
            on_step=on_step,
        )
    ckpt = load_checkpoint(err.value.checkpoint)
    assert ckpt["step"] == steps[-1]  # the bad step was not applied
    assert ckpt["step_in_epoch"] < 8
    for k, v in ckpt["model"].items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, snapshots[steps[-1]][k], rtol=0, atol=0)


def test_plots_write_png_and_reject_bad_input(tmp_path):
    from evformer.viz import confusion_matrix_figure, plot_confusion_matrix, plot_training_curves

    rows = [{"epoch": 0, "train_loss": 2.0, "lr": 1e-3}, {"epoch": 1, "train_loss": 1.0}]
    path = plot_training_curves(rows, tmp_path / "c.png")  # epochs without test metrics
    assert path.read_bytes()[:4] == b"\x89PNG"
    cm = np.array([[3, 1], [0, 0]])  # a class without samples
    plot_confusion_matrix(cm, tmp_path / "m.png", class_names=["a", "b"])
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "m.png"]  # no temp files
    with pytest.raises(ValueError, match="square"):
        confusion_matrix_figure(np.ones((2, 3)))
    with pytest.raises(ValueError, match="class names"):
        confusion_matrix_figure(cm, class_names=["a"])
