"""Training runs: read a run directory back and plot what it holds.

A run directory is what :func:`evformer.engine.fit` and the recipes write (rank 0):

- ``metrics.jsonl``: one row per epoch (``epoch`` from 0, ``train_loss``, ``train_acc1``,
  ``test_loss``/``test_acc1``/``test_acc5`` in percent or ``null`` on epochs without an
  evaluation, ``lr`` at the end of the epoch, ...), appended after every epoch;
- ``config.yaml`` (the resolved settings, ``T`` included for recipes) and ``run_info.json``
  (git revision, command line, versions), written when training starts;
- ``results.json``, written when training ends: ``final`` holds the last evaluation
  (``acc1``, ``acc5``, ``per_class_acc``, ``confusion`` [K, K] counts, row = true class)
  and ``class_names`` the label names;
- ``eval_t.json`` with ``--eval-t``: ``{"T": {"acc1", "acc5", "loss", "n"}}``, the
  trained model evaluated at other numbers of time steps (Table VI of the paper);
  ``eval.json`` from ``--eval-only --out DIR`` holds the same table under ``eval_t``.

:func:`load_run` reads them into a :class:`Run`; the ``*_figure`` functions return a
``matplotlib.figure.Figure`` (:func:`~evformer.viz.plots.save_figure` writes one). The curves
are :func:`~evformer.viz.plots.training_curves_figure`, the figure the trainer writes as
``curves.png``; the confusion matrix is
:func:`~evformer.viz.plots.confusion_matrix_figure` (``confusion_matrix.png``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from evformer.engine.metrics import per_class_accuracy
from evformer.engine.tracking import MetricsLog
from evformer.viz.plots import confusion_matrix_figure, training_curves_figure

__all__ = [
    "Run",
    "accuracy_vs_t_figure",
    "load_run",
    "per_class_accuracy_figure",
    "run_confusion_figure",
    "run_curves_figure",
]

_MAKE_RUN = (
    "a recipe writes one, e.g. `python -m evformer.recipes.dvs_gesture --demo --out DIR` "
    "(or evformer.engine.fit(..., run_dir=DIR))"
)


@dataclass(frozen=True)
class Run:
    """What a run directory holds (see the module docstring for the files).

    ``metrics``: the ``metrics.jsonl`` rows in order; ``config``: ``config.yaml`` ({} when
    absent); ``info``: ``run_info.json`` ({}); ``results``: ``results.json`` ({} while the
    run has not finished); ``eval_t``: ``{T: {"acc1": %, "acc5": %, "loss": ..., "n": ...}}``
    sorted by ``T``, from ``eval_t.json`` (else ``eval.json``'s ``eval_t``; {} when
    neither exists).
    """

    path: Path
    metrics: list[dict] = field(repr=False)
    config: dict = field(default_factory=dict, repr=False)
    info: dict = field(default_factory=dict, repr=False)
    results: dict = field(default_factory=dict, repr=False)
    eval_t: dict[int, dict] = field(default_factory=dict, repr=False)

    @property
    def T(self) -> int | None:
        """Time steps the model was trained with (``config.yaml``'s ``T``; None for a
        library run without one)."""
        t = self.config.get("T")
        return int(t) if isinstance(t, int) and not isinstance(t, bool) else None

    @property
    def recipe(self) -> str | None:
        """The recipe that made the run (``dvs_gesture``, ...), None for library runs."""
        return self.config.get("recipe")

    @property
    def final(self) -> dict | None:
        """The last evaluation (``results.json``'s ``final``), None when not stored."""
        return self.results.get("final")

    @property
    def confusion(self) -> np.ndarray | None:
        """The final confusion matrix, int64 counts [K, K] (row = true class, column =
        predicted), or None when ``results.json`` holds none."""
        final = self.final
        if not final or final.get("confusion") is None:
            return None
        return np.asarray(final["confusion"], dtype=np.int64)

    @property
    def class_names(self) -> list[str] | None:
        """Label names from ``results.json`` (None when not stored)."""
        names = self.results.get("class_names")
        return [str(n) for n in names] if names else None

    def __repr__(self) -> str:
        parts = [f"{str(self.path)!r}", f"epochs={len(self.metrics)}"]
        if self.recipe:
            parts.append(f"recipe={self.recipe!r}")
        if self.config.get("model"):
            parts.append(f"model={self.config['model']!r}")
        if self.T is not None:
            parts.append(f"T={self.T}")
        if self.final:
            parts.append(f"final_acc1={self.final.get('acc1')}")
        if self.eval_t:
            parts.append(f"eval_t={list(self.eval_t)}")
        return f"Run({', '.join(parts)})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _read_mapping(path: Path) -> dict:
    """The JSON object in ``path``, {} when the file does not exist."""
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _value(entry: Any, key: str) -> float:
    """``entry[key]`` (a JSON row) or ``entry.key`` (an ``EvalResult``) as a float; NaN
    when absent or null."""
    v = entry.get(key) if isinstance(entry, Mapping) else getattr(entry, key, None)
    return float("nan") if v is None else float(v)


def _eval_table(table: Mapping, source: str) -> dict[int, dict]:
    """``{T (int or its string): row}`` -> ``{T: {"acc1", "acc5", "loss", "n"}}`` sorted
    by ``T``; rows are JSON objects or :class:`~evformer.engine.EvalResult`."""
    out: dict[int, dict] = {}
    for key, entry in table.items():
        try:
            t = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: time step {key!r} is not an integer") from None
        if t < 1 or str(t) != str(key).strip():
            raise ValueError(f"{source}: time step {key!r} is not an integer >= 1")
        if not (isinstance(entry, Mapping) or hasattr(entry, "acc1")):
            raise TypeError(
                f"{source}: the entry for T={t} must be a mapping with 'acc1' or an "
                f"EvalResult, got {type(entry).__name__}"
            )
        row = {k: _value(entry, k) for k in ("acc1", "acc5", "loss")}
        if math.isnan(row["acc1"]):
            raise ValueError(f"{source}: the entry for T={t} has no 'acc1'")
        n = entry.get("n") if isinstance(entry, Mapping) else getattr(entry, "n", None)
        row["n"] = None if n is None else int(n)
        out[t] = row
    return dict(sorted(out.items()))


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read the run directory ``run_dir`` (see the module docstring for its files).

    Only ``metrics.jsonl`` is required; the others are read when present, so a run still
    training (no ``results.json`` yet) loads too. Raises ``FileNotFoundError`` naming the
    missing directory or ``metrics.jsonl`` (and how to make a run), ``NotADirectoryError``
    for a file, ``ValueError`` for a file that cannot be parsed (with its path).
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(
            f"run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}"
        )
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist; {_MAKE_RUN}")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{path} is a file, not a run directory; pass the folder that holds metrics.jsonl "
            f"(here perhaps {path.parent})"
        )
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a training run directory: {metrics_path.name} is missing "
            f"(it gets one row per finished epoch); {_MAKE_RUN}"
        )
    metrics = MetricsLog(metrics_path).read()
    table: Mapping = _read_mapping(path / "eval_t.json")
    source = str(path / "eval_t.json")
    if not table:
        table = _read_mapping(path / "eval.json").get("eval_t") or {}
        source = f"{path / 'eval.json'}: eval_t"
    if not isinstance(table, Mapping):
        raise ValueError(f"{source}: expected a mapping of T to results")
    return Run(
        path=path,
        metrics=metrics,
        config=_read_config(path / "config.yaml"),
        info=_read_mapping(path / "run_info.json"),
        results=_read_mapping(path / "results.json"),
        eval_t=_eval_table(table, source),
    )


def _check_run(run: Any, name: str = "run") -> Run:
    if not isinstance(run, Run):
        raise TypeError(
            f"{name} must be a Run (evformer.viz.load_run(run_dir)), got {type(run).__name__}"
        )
    return run


def run_curves_figure(run: Run) -> Figure:
    """Train/test loss, accuracy (%) and learning rate against the epoch (from 0) of
    ``run``: :func:`~evformer.viz.plots.training_curves_figure` of its ``metrics.jsonl``
    rows, titled with the run's folder, model, ``T`` and best test accuracy."""
    run = _check_run(run)
    fig = training_curves_figure(run.metrics)
    title = [run.path.name]
    if run.config.get("model"):
        title.append(str(run.config["model"]))
    if run.T is not None:
        title.append(f"T={run.T}")
    best = run.results.get("best_test_acc1")
    if best is not None and run.results.get("best_epoch") is not None:
        title.append(f"best test top-1 {best:.2f} % (epoch {run.results['best_epoch']})")
    fig.suptitle(", ".join(title))
    return fig


def _no_confusion(run: Run) -> ValueError:
    where = run.path / "results.json"
    why = "is missing" if not where.is_file() else "holds no final evaluation ('final')"
    return ValueError(
        f"run {run.path} has no confusion matrix: {where} {why}; fit writes it when training "
        f"ends with a test set (a run still training, or a masked-pretraining run, has none)"
    )


def run_confusion_figure(run: Run, *, normalize: bool = True) -> Figure:
    """The final confusion matrix of ``run`` (``results.json``), labelled with its class
    names; ``normalize`` shows each row in % of the true class (cell text: counts)."""
    run = _check_run(run)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    cm = run.confusion
    if cm is None:
        raise _no_confusion(run)
    names = run.class_names
    if names is not None and len(names) != cm.shape[0]:
        names = None
    return confusion_matrix_figure(cm, class_names=names, normalize=normalize)


def _check_confusion(cm: Any) -> np.ndarray:
    a = np.asarray(cm)
    if a.dtype == object or not (
        np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    ):
        raise TypeError(f"cm must be a numeric [K, K] array of counts, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"cm must be a square [K, K] confusion matrix, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError("cm must hold finite counts >= 0")
    return a


def per_class_accuracy_figure(
    cm: np.ndarray, *, class_names: Sequence[str] | None = None
) -> Figure:
    """Accuracy of each class in % (recall: ``cm[k, k] / cm[k].sum()``, the engine's
    :func:`~evformer.engine.per_class_accuracy`) as bars, from a confusion matrix ``cm``
    [K, K] (row = true class). A class without samples has a NaN bar (nothing drawn,
    marked "no samples"); dashed lines give the overall accuracy and chance (100 / K)."""
    cm = _check_confusion(cm)
    k = cm.shape[0]
    if class_names is not None:
        if isinstance(class_names, str):
            raise TypeError("class_names must be a sequence of names, not one string")
        names = [str(n) for n in class_names]
        if len(names) != k:
            raise ValueError(f"{len(names)} class_names for a {k}x{k} confusion matrix")
    else:
        names = [str(i) for i in range(k)]
    acc = per_class_accuracy(cm)  # [K] %, NaN without samples
    support = cm.sum(axis=1)
    total = cm.sum()
    overall = 100.0 * np.trace(cm) / total if total else float("nan")

    fig = Figure(figsize=(min(max(5.0, 0.35 * k + 2.0), 16.0), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(k)
    ax.bar(x, acc, color="tab:blue", label="per class")
    ax.axhline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.1f} %")
    ax.axhline(100.0 / k, color="gray", ls=":", lw=1, label=f"chance {100.0 / k:.1f} %")
    for i in np.flatnonzero(support == 0):
        ax.text(i, 2.0, "no samples", rotation=90, ha="center", va="bottom", fontsize=7)
    if k <= 40:
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0, 105), xlim=(-0.6, k - 0.4), ylabel="accuracy (%)", xlabel="true class")
    balanced = float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")
    ax.set_title(f"per-class accuracy ({int(total)} samples, mean over classes {balanced:.1f} %)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def accuracy_vs_t_figure(
    result: Run | Mapping, *, train_T: int | None = None, top5: bool = True
) -> Figure:
    """Test accuracy (%) against the number of time steps ``T`` the trained model is run
    with (``--eval-t``; the paper's Table VI protocol), log2 ``T`` axis.

    ``result``: a :class:`Run` (its ``eval_t``; ``train_T`` defaults to its ``T``), or the
    table itself, ``{T: {"acc1", "acc5", ...}}`` as in ``eval_t.json`` (string or int keys)
    or as :func:`evformer.engine.evaluate_time_steps` returns it (``{T: EvalResult}``).
    ``train_T`` is drawn as a vertical line; ``top5`` adds the top-5 curve where known.
    """
    if isinstance(result, Run):
        table = result.eval_t
        if train_T is None:
            train_T = result.T
        if not table:
            cmd = (
                f"python -m evformer.recipes.{result.recipe or '<recipe>'} --preset "
                f"{result.path / 'config.yaml'} --eval-only --checkpoint "
                f"{result.path / 'best.pt'} --eval-t 1,2,4,8 --out {result.path}"
            )
            raise ValueError(
                f"run {result.path} has no accuracy-against-T results: neither eval_t.json "
                f"(training with --eval-t) nor eval.json with eval_t is there; make one with "
                f"`{cmd}`"
            )
    elif isinstance(result, Mapping):
        table = _eval_table(result, "result")
        if not table:
            raise ValueError("result is an empty table; expected {T: {'acc1': ..., ...}}")
    else:
        raise TypeError(
            f"result must be a Run or a mapping {{T: results}} (eval_t.json), got "
            f"{type(result).__name__}"
        )
    if train_T is not None and (
        isinstance(train_T, bool) or not isinstance(train_T, (int, np.integer)) or train_T < 1
    ):
        raise ValueError(f"train_T must be an integer >= 1 or None, got {train_T!r}")

    ts = np.array(list(table), dtype=float)
    acc1 = np.array([row["acc1"] for row in table.values()], dtype=float)
    acc5 = np.array([row["acc5"] for row in table.values()], dtype=float)
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(ts, acc1, marker="o", label="top-1")
    if top5 and np.isfinite(acc5).any():
        ax.plot(ts, acc5, marker="s", ls="--", label="top-5")
    if train_T is not None:
        ax.axvline(int(train_T), color="tab:red", ls=":", label=f"trained at T={int(train_T)}")
    ax.set_xscale("log", base=2)
    ticks = sorted({*ts.tolist(), *([float(train_T)] if train_T is not None else [])})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="time steps T at test", ylabel="accuracy (%)", ylim=(0, 105))
    ax.set_title("accuracy against the number of time steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
