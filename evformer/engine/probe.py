"""Linear probing of a frozen encoder: pooled features, then a logistic regression.

The standard check of a self-supervised encoder (MAE reports it beside fine-tuning): the
encoder is frozen, every sample is mapped once to its pooled feature vector, and a linear
classifier is fit on the training features alone. Here the classifier is scikit-learn's
L2-regularised multinomial ``LogisticRegression`` (lbfgs) on standardised features (the
scaler fit on the training set only), which needs no learning-rate schedule and converges to
the same optimum every run; MAE's own probe trains a BatchNorm + linear layer with SGD
instead, so absolute numbers are comparable only between runs of this function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["ProbeResult", "extract_features", "linear_probe"]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeResult:
    """Top-1 accuracies in percent (0-100) of the linear probe on the training features it
    was fit on and on the held-out test features; sample counts and the feature width D."""

    train_acc: float
    test_acc: float
    n_train: int
    n_test: int
    feature_dim: int


def _feature_fn(model: nn.Module | FeatureFn) -> FeatureFn:
    """Pooled features of a Spikformer (``forward_head(forward_features(x), pre_logits=True)``,
    the mean over tokens and time steps) or the callable itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    if callable(model):
        return model
    raise TypeError(
        f"linear_probe needs a model with forward_features/forward_head or a callable "
        f"x -> [B, D], got {type(model).__name__}"
    )


@torch.no_grad()
def extract_features(
    model: nn.Module | FeatureFn,
    dataset: Dataset,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, D]`` (float64) and integer labels ``[n]`` of every item ``(x, label)``
    of ``dataset``, in dataset order.

    ``x`` is what the model takes per sample (``[C, H, W]`` images or ``[T, C, H, W]`` event
    frames for a Spikformer; integer counts are cast to float). An ``nn.Module`` runs in eval
    mode under ``torch.no_grad`` on ``device`` and is put back in its previous mode and on
    its previous device afterwards; a plain callable must accept tensors on ``device``.
    """
    fn = _feature_fn(model)
    dev = torch.device(device)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    restore: tuple[bool, torch.device] | None = None
    if isinstance(module, nn.Module):
        first = next(module.parameters(), None)
        restore = (module.training, first.device if first is not None else dev)
        module.to(dev).eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # keep the global RNG untouched
    )
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        for x, y in loader:
            x = x.to(dev, non_blocking=True)
            if not x.is_floating_point():
                x = x.float()
            f = fn(x)
            if f.dim() != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(
                    f"features must be [B, D] = [{x.shape[0]}, D] for a batch of {x.shape[0]}, "
                    f"got {tuple(f.shape)}; pool tokens and time steps first"
                )
            feats.append(f.detach().to("cpu", torch.float64).numpy())
            labels.append(torch.as_tensor(y).reshape(-1).to("cpu", torch.int64).numpy())
    finally:
        if restore is not None:
            module.train(restore[0]).to(restore[1])
    if not feats:
        raise ValueError("extract_features: the dataset is empty")
    out = np.concatenate(feats)
    if not np.isfinite(out).all():
        raise ValueError("extract_features: the encoder produced non-finite features")
    return out, np.concatenate(labels)


def linear_probe(
    model: nn.Module | FeatureFn,
    train_set: Dataset,
    test_set: Dataset,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    max_iter: int = 2000,
    C: float = 1.0,
    seed: int = 0,
) -> ProbeResult:
    """Fit a linear classifier on frozen encoder features and report train/test accuracy.

    Features come from :func:`extract_features` (a Spikformer's pooled ``[B, D]`` features:
    mean over tokens and time, the input of its head; or any callable ``x -> [B, D]``).
    ``StandardScaler`` is fit on the training features only and applied to both sets; then
    ``LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter, random_state=seed)``, which
    is multinomial (softmax) for more than two classes. ``C`` is the inverse L2 strength.
    Datasets yield ``(x, label)``; test labels absent from the training set count as errors.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers)
    f_train, y_train = extract_features(model, train_set, **kw)
    f_test, y_test = extract_features(model, test_set, **kw)
    if f_train.shape[1] != f_test.shape[1]:
        raise ValueError(
            f"train features have {f_train.shape[1]} dims, test features {f_test.shape[1]}"
        )
    if np.unique(y_train).size < 2:
        raise ValueError(
            f"linear_probe needs at least 2 classes in the training set, got labels "
            f"{np.unique(y_train).tolist()}"
        )
    scaler = StandardScaler().fit(f_train)
    clf = LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(f_train), y_train)
    train_acc = 100.0 * float(np.mean(clf.predict(scaler.transform(f_train)) == y_train))
    test_acc = 100.0 * float(np.mean(clf.predict(scaler.transform(f_test)) == y_test))
    return ProbeResult(
        train_acc=train_acc,
        test_acc=test_acc,
        n_train=len(y_train),
        n_test=len(y_test),
        feature_dim=int(f_train.shape[1]),
    )
