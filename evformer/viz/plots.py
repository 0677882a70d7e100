"""Training-curve and confusion-matrix figures (matplotlib, Agg canvas, PNG).

The figures are built on ``matplotlib.figure.Figure`` with an Agg canvas rather than
``pyplot``: no global state, no GUI backend, safe in worker processes and on headless
machines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from evformer._atomic import atomic_write


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (``evformer._atomic``); returns the path."""
    FigureCanvasAgg(fig)
    with atomic_write(path) as f:
        fig.savefig(f, dpi=dpi, format="png")
    return Path(path)


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and "epoch" in r]
    if not pts:
        return np.empty(0), np.empty(0)
    e, v = zip(*pts)
    return np.asarray(e, dtype=float), np.asarray(v, dtype=float)


def training_curves_figure(rows: Sequence[dict]) -> Figure:
    """Loss, accuracy (%) and learning rate against the epoch, from ``metrics.jsonl`` rows
    (keys ``epoch``, ``train_loss``, ``test_loss``, ``train_acc1``, ``test_acc1``,
    ``test_acc5``, ``lr``; missing keys are skipped)."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        e, v = _series(rows, key)
        if e.size:
            ax_loss.plot(e, v, marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for key, label in (
        ("train_acc1", "train top-1"),
        ("test_acc1", "test top-1"),
        ("test_acc5", "test top-5"),
    ):
        e, v = _series(rows, key)
        if e.size:
            ax_acc.plot(e, v, marker="o", ms=3, label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if not ax_acc.lines:  # e.g. a masked-pretraining run: say so rather than leave it blank
        ax_acc.text(
            0.5, 0.5, "no accuracy in these metrics\n(a pretraining run?)", ha="center",
            va="center", transform=ax_acc.transAxes, color="0.4",
        )  # fmt: skip
    e, v = _series(rows, "lr")
    if e.size:
        ax_lr.plot(e, v, marker="o", ms=3)
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    for ax in (ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_training_curves(rows: Sequence[dict], path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write :func:`training_curves_figure` as a PNG to ``path`` (atomically)."""
    return save_figure(training_curves_figure(rows), path, dpi=dpi)


def confusion_matrix_figure(
    cm: np.ndarray, *, class_names: Sequence[str] | None = None, normalize: bool = True
) -> Figure:
    """Confusion matrix ``cm`` [K, K] (row = true class, column = predicted). With
    ``normalize`` each row is shown as a percentage of that class's samples; the cell text
    always gives the raw count."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    support = cm.sum(axis=1, keepdims=True)
    shown = np.where(support > 0, 100.0 * cm / np.maximum(support, 1), 0.0) if normalize else cm
    size = min(max(4.0, 0.45 * k + 2.0), 16.0)
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=100 if normalize else None)
    fig.colorbar(im, ax=ax, label="% of true class" if normalize else "count")
    if k <= 30:  # beyond that the labels and numbers are unreadable anyway
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        hi = np.nanmax(shown) if shown.size else 0
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    color = "white" if shown[i, j] > 0.6 * hi else "black"
                    ax.text(
                        j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7, color=color
                    )
    ax.set(xlabel="predicted class", ylabel="true class")
    total = cm.sum()
    acc = 100.0 * np.trace(cm) / total if total else float("nan")
    ax.set_title(f"confusion matrix ({total} samples, accuracy {acc:.2f} %)")
    return fig


def plot_confusion_matrix(
    cm: np.ndarray,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    dpi: int = 110,
) -> Path:
    """Write :func:`confusion_matrix_figure` as a PNG to ``path`` (atomically)."""
    fig = confusion_matrix_figure(cm, class_names=class_names, normalize=normalize)
    return save_figure(fig, path, dpi=dpi)
