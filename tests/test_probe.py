"""Linear probe (evformer.engine.probe): separable features are classified perfectly,
random labels stay at chance, the encoder is frozen and left as it was found, and a real
tiny Spikformer V2 runs through it deterministically."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from evformer.engine import ProbeResult, extract_features, linear_probe
from evformer.models import create_model


def _clusters(n: int, k: int, d: int, seed: int) -> TensorDataset:
    """``k`` well separated Gaussian clusters in ``d`` dims, label = cluster."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.eye(k, d)
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, d, generator=g)
    return TensorDataset(x, y)


def test_separable_features_reach_100_percent():
    res = linear_probe(lambda x: x, _clusters(200, 4, 8, 0), _clusters(100, 4, 8, 1))
    assert isinstance(res, ProbeResult)
    assert res.train_acc == 100.0 and res.test_acc == 100.0
    assert (res.n_train, res.n_test, res.feature_dim) == (200, 100, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.test_acc = 0.0


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(
        torch.randn(400, 8, generator=g), torch.randint(0, 4, (400,), generator=g)
    )
    test = TensorDataset(torch.randn(400, 8, generator=g), torch.randint(0, 4, (400,), generator=g))
    res = linear_probe(lambda x: x, train, test, seed=3)
    # chance is 25 %; one standard deviation of the test accuracy is about 2.2 points
    assert 15.0 <= res.test_acc <= 35.0
    assert res.train_acc < 45.0  # 8 features cannot memorise 400 random labels


def test_scaler_is_fit_on_train_only():
    """A test set shifted far from the training data is classified with the training
    statistics: shifting every test feature by +100 along the class axis sends all of it to
    the class whose centre lies that way."""
    train = _clusters(200, 2, 2, 0)
    x, y = _clusters(100, 2, 2, 1).tensors
    shifted = TensorDataset(x + torch.tensor([100.0, 0.0]), y)  # class 0's direction
    res = linear_probe(lambda v: v, train, shifted)
    assert res.test_acc == pytest.approx(50.0)  # everything predicted as class 0


class _FakeEncoder(nn.Module):
    """forward_features/forward_head as a Spikformer: tokens [T, B, N, D], pooled [B, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.9)  # would scramble features if left in train mode
        self.calls: list[tuple[bool, bool, bool]] = []

    def forward_features(self, x):
        self.calls.append((self.training, torch.is_grad_enabled(), x.is_floating_point()))
        return self.drop(x).unsqueeze(0).unsqueeze(2).expand(2, -1, 5, -1)  # T=2, N=5

    def forward_head(self, x, pre_logits=False):
        assert pre_logits, "the probe must read the pooled features, not logits"
        return x.mean(2).mean(0)

    def forward(self, x):  # pragma: no cover - the probe must not call this
        raise AssertionError("linear_probe must use forward_features/forward_head")


def test_spikformer_like_model_is_frozen_and_restored():
    enc = _FakeEncoder().train()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = (20 * torch.eye(3)[y] + torch.randn(60, 3, generator=g)).round().to(torch.int64)
    ds = TensorDataset(x, y)
    res = linear_probe(enc, ds, ds, batch_size=16)
    assert res.train_acc == 100.0 and res.feature_dim == 3
    assert enc.calls and all(c == (False, False, True) for c in enc.calls)  # eval, no grad, float
    assert enc.training  # put back in train mode
    feats, labels = extract_features(enc, ds, batch_size=7)
    np.testing.assert_array_equal(feats, x.double().numpy())  # pooled = the input, in order
    np.testing.assert_array_equal(labels, y.numpy())


def test_bad_features_and_single_class_are_explained():
    ds = _clusters(20, 2, 4, 0)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        linear_probe(lambda x: x.unsqueeze(0), ds, ds)
    one = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(lambda x: x, one, ds)
    with pytest.raises(TypeError, match="forward_features"):
        linear_probe(object(), ds, ds)


def _tiny_spikformer() -> nn.Module:
    torch.manual_seed(0)
    return create_model(
        "spikformer_v2_8_384",
        img_size=32,
        embed_dim=32,
        depth=1,
        num_heads=2,
        stem_stages=2,
        T=1,
        num_classes=0,
    )


def test_real_tiny_spikformer_runs_deterministically():
    model = _tiny_spikformer()
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(12, 3, 32, 32, generator=g), torch.arange(12) % 2)
    test = TensorDataset(torch.rand(6, 3, 32, 32, generator=g), torch.arange(6) % 2)
    a = linear_probe(model, train, test, batch_size=5, seed=1)
    b = linear_probe(model, train, test, batch_size=5, seed=1)
    assert a == b
    assert (a.n_train, a.n_test, a.feature_dim) == (12, 6, 32)
    assert 0.0 <= a.test_acc <= 100.0 and 0.0 <= a.train_acc <= 100.0
    # the features are the pooled pre-logits, the same whatever the batch split
    feats, _ = extract_features(model, train, batch_size=5)
    model.eval()
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(train.tensors[0]), pre_logits=True)
    assert feats.shape == (12, 32)
    np.testing.assert_allclose(feats, ref.double().numpy(), rtol=1e-5, atol=1e-6)
