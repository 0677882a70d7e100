"""Run directories read back and plotted (evformer.viz.runs).

The run directory is written by the real writers: ``evformer.engine.fit`` (metrics.jsonl,
config.yaml, run_info.json, results.json) on a tiny model, and the recipes' ``--eval-t``
table (``evformer.recipes._common._eval_t``, written as ``_run`` writes eval_t.json).
Plotted data is read back from the artists and compared with the files' numbers or a
plain NumPy computation."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from evformer.engine import FitConfig, evaluate_time_steps, fit
from evformer.engine.tracking import atomic_write_text
from evformer.viz import (
    Run,
    accuracy_vs_t_figure,
    load_run,
    per_class_accuracy_figure,
    run_confusion_figure,
    run_curves_figure,
)

TRAIN_T = 4
EVAL_T = (1, 4, 8)


class _TinyT(nn.Module):
    """A linear classifier with a ``T`` attribute: running it at another ``T`` shifts the
    class-0 logit by ``T - 4`` so accuracy changes with ``T`` as in the real models."""

    def __init__(self) -> None:
        super().__init__()
        self.T = TRAIN_T
        self.lin = nn.Linear(6, 3)
        self.register_buffer("shift", torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + (self.T - TRAIN_T) * self.shift


def _problem(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, (x @ w).argmax(dim=1))


@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    """(run directory, FitResult, eval-t table as the recipe returns it)."""
    run_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = _TinyT()
    test = _problem(48, seed=1)
    cfg = FitConfig(
        epochs=3, batch_size=16, lr=5e-2, eval_every=2, progress=False, plots=False,
        tensorboard=False,
    )  # fmt: skip
    res = fit(
        model,
        train_set=_problem(96, seed=0),
        test_set=test,
        config=cfg,
        run_dir=run_dir,
        class_names=["a", "b", "c"],
        run_config={"recipe": "dvs_gesture", "model": "tiny", "T": TRAIN_T},
    )
    from evformer.recipes._common import _eval_t

    rcfg = SimpleNamespace(eval_t=EVAL_T, num_workers=0, max_eval_batches=None, T=TRAIN_T)
    recipe = SimpleNamespace(build_test=lambda cfg, t: test)
    table = _eval_t(recipe, rcfg, model, None, 16, False)
    atomic_write_text(run_dir / "eval_t.json", json.dumps(table, indent=2) + "\n")
    return run_dir, res, table


def _line(ax, label):
    lines = [ln for ln in ax.lines if ln.get_label() == label]
    assert len(lines) == 1, f"{label!r}: {[ln.get_label() for ln in ax.lines]}"
    return np.asarray(lines[0].get_xdata(), float), np.asarray(lines[0].get_ydata(), float)


def test_load_run_reads_back_what_fit_and_eval_t_wrote(made_run):
    run_dir, res, table = made_run
    run = load_run(run_dir)
    assert isinstance(run, Run) and run.path == run_dir
    assert [r["epoch"] for r in run.metrics] == [0, 1, 2]
    assert run.metrics == res.history
    assert run.metrics[-1]["test_acc1"] == res.final.acc1
    assert run.final["acc1"] == res.final.acc1
    np.testing.assert_array_equal(run.confusion, res.final.confusion)
    assert run.confusion.dtype == np.int64 and run.confusion.sum() == 48
    assert run.class_names == ["a", "b", "c"]
    assert run.T == TRAIN_T and run.recipe == "dvs_gesture" and run.config["model"] == "tiny"
    assert "git" in run.info and run.info["steps_per_epoch"] == 96 // 16
    assert list(run.eval_t) == list(EVAL_T)
    for t in EVAL_T:
        for key in ("acc1", "acc5", "loss", "n"):
            assert run.eval_t[t][key] == table[str(t)][key], (t, key)
    # the T shift changes the accuracy: the figure below has something to show
    assert len({run.eval_t[t]["acc1"] for t in EVAL_T}) > 1
    assert "epochs=3" in repr(run) and "T=4" in repr(run)


def test_run_curves_lines_equal_the_metrics(made_run):
    run_dir, _, _ = made_run
    run = load_run(run_dir)
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["test_loss"] is None  # eval_every=2: epoch 0 was not evaluated
    fig = run_curves_figure(run)
    ax_loss, ax_acc, ax_lr = fig.axes[:3]

    def expected(key):
        kept = [(r["epoch"], r[key]) for r in rows if r[key] is not None]
        return np.array([e for e, _ in kept], float), np.array([v for _, v in kept], float)

    for ax, label, key in (
        (ax_loss, "train", "train_loss"),
        (ax_loss, "test", "test_loss"),
        (ax_acc, "train top-1", "train_acc1"),
        (ax_acc, "test top-1", "test_acc1"),
        (ax_acc, "test top-5", "test_acc5"),
    ):
        x, y = _line(ax, label)
        ex, ey = expected(key)
        np.testing.assert_array_equal(x, ex, err_msg=key)
        np.testing.assert_array_equal(y, ey, err_msg=key)
    assert _line(ax_acc, "test top-1")[0].tolist() == [1.0, 2.0]
    (lr_line,) = ax_lr.lines
    np.testing.assert_array_equal(lr_line.get_ydata(), [r["lr"] for r in rows])
    title = fig._suptitle.get_text()
    assert run_dir.name in title and "T=4" in title and "tiny" in title


def test_run_confusion_figure_shows_row_percentages_and_counts(made_run):
    run = load_run(made_run[0])
    cm = run.confusion
    img = run_confusion_figure(run).axes[0].images[0].get_array()
    np.testing.assert_allclose(img, 100.0 * cm / cm.sum(axis=1, keepdims=True))
    fig = run_confusion_figure(run, normalize=False)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), cm)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    with pytest.raises(TypeError, match="normalize"):
        run_confusion_figure(run, normalize="yes")


def test_per_class_bars_equal_diagonal_over_row_sums():
    cm = np.array([[3, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [1, 0, 1, 8]])  # class 2: none
    fig = per_class_accuracy_figure(cm, class_names=["w", "x", "y", "z"])
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches])
    with np.errstate(invalid="ignore", divide="ignore"):
        expect = np.diag(cm) / cm.sum(axis=1) * 100.0
    np.testing.assert_allclose(heights, expect, equal_nan=True)
    assert heights[0] == 75.0 and heights[1] == 50.0 and np.isnan(heights[2])
    overall = [ln for ln in ax.lines if ln.get_label().startswith("overall")][0]
    np.testing.assert_allclose(overall.get_ydata(), 100.0 * 13 / 18)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["w", "x", "y", "z"]
    assert any(t.get_text() == "no samples" for t in ax.texts)


def test_per_class_bars_of_a_run_equal_the_engine_numbers(made_run):
    run = load_run(made_run[0])
    ax = per_class_accuracy_figure(run.confusion, class_names=run.class_names).axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, run.final["per_class_acc"])


def test_accuracy_vs_t_points_equal_the_results(made_run):
    run = load_run(made_run[0])
    ax = accuracy_vs_t_figure(run).axes[0]
    x, y = _line(ax, "top-1")
    assert x.tolist() == [1.0, 4.0, 8.0]
    assert y.tolist() == [run.eval_t[t]["acc1"] for t in EVAL_T]
    _, y5 = _line(ax, "top-5")
    assert y5.tolist() == [run.eval_t[t]["acc5"] for t in EVAL_T]
    vx, _ = _line(ax, "trained at T=4")
    assert vx.tolist() == [4.0, 4.0]

    # the eval_t.json table itself (string keys, unsorted), and train_T given by hand
    table = {"8": {"acc1": 10.0, "acc5": 50.0}, "2": {"acc1": 30.0, "acc5": 90.0}}
    ax = accuracy_vs_t_figure(table, train_T=2, top5=False).axes[0]
    x, y = _line(ax, "top-1")
    assert x.tolist() == [2.0, 8.0] and y.tolist() == [30.0, 10.0]
    assert [ln.get_label() for ln in ax.lines] == ["top-1", "trained at T=2"]


def test_accuracy_vs_t_takes_evaluate_time_steps_output():
    model = _TinyT()
    test = _problem(24, seed=3)
    res = evaluate_time_steps(model, lambda t: test, [2, 4], batch_size=8, device="cpu")
    ax = accuracy_vs_t_figure(res, train_T=4).axes[0]
    x, y = _line(ax, "top-1")
    assert x.tolist() == [2.0, 4.0] and y.tolist() == [res[2].acc1, res[4].acc1]


def test_not_a_run_errors_name_the_missing_file(made_run, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl is missing.*evformer\.recipes"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_run(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="run_dir"):
        load_run(3)

    # a run killed before it finished: metrics only
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(made_run[0] / "metrics.jsonl", partial)
    run = load_run(partial)
    assert len(run.metrics) == 3 and run.confusion is None and run.eval_t == {}
    run_curves_figure(run)  # the curves need metrics.jsonl only
    with pytest.raises(ValueError, match=r"results\.json is missing"):
        run_confusion_figure(run)
    with pytest.raises(ValueError, match=r"eval_t\.json.*--eval-t"):
        accuracy_vs_t_figure(run)
    (partial / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"results\.json: not valid JSON"):
        load_run(partial)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="square"):
        per_class_accuracy_figure(np.ones((2, 3)))
    with pytest.raises(ValueError, match="class_names"):
        per_class_accuracy_figure(np.eye(3), class_names=["a", "b"])
    with pytest.raises(ValueError, match=">= 0"):
        per_class_accuracy_figure(-np.eye(2))
    with pytest.raises(TypeError, match="cm"):
        per_class_accuracy_figure(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match="Run"):
        run_curves_figure({"metrics": []})
    with pytest.raises(TypeError, match="result"):
        accuracy_vs_t_figure([1, 2, 4])
    with pytest.raises(ValueError, match="integer"):
        accuracy_vs_t_figure({"two": {"acc1": 1.0}})
    with pytest.raises(ValueError, match="acc1"):
        accuracy_vs_t_figure({"2": {"acc5": 1.0}})
    with pytest.raises(ValueError, match="train_T"):
        accuracy_vs_t_figure({"2": {"acc1": 1.0}}, train_T=0)


def test_curves_of_a_run_without_accuracy_say_so():
    """A masked-pretraining run logs no accuracy: the accuracy panel says so (no lines)."""
    from evformer.viz import training_curves_figure

    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 0.1} for e in range(3)]
    fig = training_curves_figure(rows)
    ax_loss, ax_acc, _ = fig.axes
    assert len(ax_loss.lines) == 1 and not ax_acc.lines
    assert "no accuracy" in ax_acc.texts[0].get_text()
    rows[0]["test_acc1"] = 50.0
    assert not training_curves_figure(rows).axes[1].texts
