"""Classification metrics: top-k accuracy, confusion matrix (scikit-learn) and per-class
accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)):
    """Number of samples whose label is among the ``k`` highest logits, for each ``k``.

    ``logits`` [B, K], ``target`` [B] integer labels, or [B, K] soft targets (Mixup), whose
    argmax is taken as the label. ``k`` larger than ``K`` counts every sample. Returns a
    float64 tensor [len(topk)] on the CPU.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, num_classes], got shape {tuple(logits.shape)}")
    if target.ndim == 2:
        target = target.argmax(dim=1)
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    num_classes = logits.shape[1]
    kmax = min(max(topk), num_classes)
    pred = logits.topk(kmax, dim=1).indices  # [B, kmax], best first
    hit = pred.eq(target[:, None])  # [B, kmax]
    out = [hit[:, : min(k, num_classes)].any(dim=1).sum() for k in topk]
    return torch.stack(out).double().cpu()


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)):
    """Top-k accuracies in percent, a list of floats (see :func:`topk_correct`)."""
    n = logits.shape[0]
    if n == 0:
        raise ValueError("accuracy of an empty batch")
    return (topk_correct(logits, target, topk) * (100.0 / n)).tolist()


def confusion_matrix(
    target: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor, *, num_classes: int
) -> np.ndarray:
    """[num_classes, num_classes] int64 counts; row = true class, column = predicted class.

    Every class gets its row and column even when absent from this batch, so matrices of
    different shards can be summed.
    """
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).ravel()
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"target has {t.size} labels but pred has {p.size}")
    for name, a in (("target", t), ("pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(
                f"{name} holds labels outside [0, {num_classes}): {a.min()}..{a.max()}"
            )
    if t.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return _sk_confusion_matrix(t, p, labels=np.arange(num_classes)).astype(np.int64)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class in percent from a confusion matrix (NaN for a class with no
    samples), [num_classes] float64."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, 100.0 * np.diag(cm) / support, np.nan)
