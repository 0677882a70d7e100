"""Frame augmentation on [T, C, H, W]: exact ops, one draw for all frames, policies, Mixup."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from evformer.data import transforms as F


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(t=4, c=2, h=12, w=12, seed=0) -> torch.Tensor:
    return torch.rand(t, c, h, w, generator=gen(seed))


# ----------------------------------------------------------------------------- exact ops


def test_flip_roll_translate_exact():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)  # rows [0..3], [4..7], [8..11]
    assert F.hflip(x)[0, 0, 0].tolist() == [3, 2, 1, 0]
    r = F.roll(x, 1, -1)  # down 1 row, left 1 column, wrapping
    assert r[0, 0].tolist() == [[9, 10, 11, 8], [1, 2, 3, 0], [5, 6, 7, 4]]
    t = F.translate(x, 1, 2)  # down 1, right 2, zero fill
    assert t[0, 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 4, 5]]
    t = F.translate(x, -2, -1)
    assert t[0, 0].tolist() == [[9, 10, 11, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert not F.translate(x, 0, 4).any() and torch.equal(F.translate(x, 0, 0), x)


@pytest.mark.parametrize("dy,dx", [(0, 3), (2, -1), (-4, 5), (0, 0)])
def test_translate_equals_torchvision_affine(dy, dx):
    x = sample(h=10, w=14)
    want = tvf.affine(
        x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], fill=0.0,
        interpolation=InterpolationMode.NEAREST,
    )  # fmt: skip
    assert torch.equal(F.translate(x, dy, dx), want)


def test_rotate_quarter_turns_equal_rot90():
    x = sample(h=16, w=16)
    assert torch.equal(F.rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))
    # just off 90 deg torchvision takes the affine-grid path instead of its rot90 fast path:
    # direction and centre of that path agree with rot90 too
    assert torch.equal(F.rotate(x, 90.0 + 1e-6), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(F.rotate(x, -90.0 + 1e-6), torch.rot90(x, -1, dims=(-2, -1)))
    assert torch.equal(F.rotate(x, 0.0), x)


def test_erase_exact():
    x = torch.ones(2, 2, 5, 6)
    out = F.erase(x, 1, 2, 3, 2, value=0.0)
    assert out.sum() == 4 * (30 - 6) and not out[..., 1:4, 2:4].any()
    assert x.all()  # input untouched


def events_to_frame(x, y, h, w):
    frame = np.zeros((h, w), np.int64)
    np.add.at(frame, (y, x), 1)
    return frame


def test_resize_sum_equals_binning_downsampled_events():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 32, 5000), rng.integers(0, 24, 5000)
    frame = torch.from_numpy(events_to_frame(x, y, 24, 32)).to(torch.int16)[None, None]
    out = F.resize(frame, (12, 8), mode="sum")  # factors 2 (rows) and 4 (columns)
    assert out.dtype == torch.int64 and out.sum() == 5000
    np.testing.assert_array_equal(out[0, 0].numpy(), events_to_frame(x // 4, y // 2, 12, 8))
    area = F.resize(frame.float(), (12, 8), mode="area")
    torch.testing.assert_close(area, out.float() / 8)
    near = F.resize(frame, 6, mode="nearest-exact")
    assert near.dtype == torch.int16 and near.shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match="divide"):
        F.resize(frame, (10, 8), mode="sum")


# ----------------------------------------------------------------------------- one draw per sample

RANDOM_OPS = [
    F.RandomHorizontalFlip(p=0.5),
    F.RandomRoll(max_dy=5, max_dx=5),
    F.RandomTranslate(max_dx=4, max_dy=3),
    F.RandomRotate(degrees=30.0),
    F.RandomRotate(degrees=30.0, interpolation="bilinear"),
    F.RandomShearX(degrees=30.0),
    F.RandomErasing(p=1.0, scale=(0.05, 0.3)),
    F.get_policy("nda"),
    F.get_policy("spikformer_cifar10dvs"),
]


@pytest.mark.parametrize("op", RANDOM_OPS, ids=repr)
def test_same_op_applied_to_every_frame(op):
    x = sample(t=5, h=16, w=16)
    changed = 0
    for seed in range(8):
        out = op(x, gen(seed))
        assert out.shape == x.shape
        changed += not torch.equal(out, x)
        for i in range(x.shape[0]):
            # frame i alone, with the same generator state, gets exactly frame i's result
            assert torch.equal(op(x[i : i + 1], gen(seed)), out[i : i + 1])
        assert torch.equal(op(x, gen(seed)), out)  # reproducible
    assert changed >= 2  # the check above is not vacuous


def test_random_op_magnitudes_in_range():
    g = gen(0)
    rot = [F.RandomRotate(degrees=30.0).sample(g) for _ in range(2000)]
    assert -30 <= min(rot) < -29 and 29 < max(rot) <= 30
    shifts = np.array([F.RandomRoll(max_dy=5, max_dx=2).sample(g) for _ in range(2000)])
    assert set(shifts[:, 0]) == set(range(-5, 6)) and set(shifts[:, 1]) == set(range(-2, 3))
    tx = np.array([F.RandomTranslate(max_dx=5, max_dy=0).sample(g) for _ in range(500)])
    assert set(tx[:, 0]) == {0} and set(tx[:, 1]) == set(range(-5, 6))


def test_erasing_area_within_range():
    op = F.RandomErasing(p=1.0, scale=(0.001, 0.11), ratio=(1.0, 1.0))
    g = gen(1)
    area = 128 * 128
    fracs = []
    for _ in range(2000):
        top, left, h, w = op.sample(128, 128, g)
        assert h == w and 0 <= top <= 128 - h and 0 <= left <= 128 - w
        # h = round(sqrt(target)), so the box side is within 0.5 px of the target side
        assert math.sqrt(0.001 * area) - 0.5 <= h <= math.sqrt(0.11 * area) + 0.5
        fracs.append(h * w / area)
    assert min(fracs) < 0.002 and max(fracs) > 0.10
    assert abs(np.mean(fracs) - 0.0555) < 0.005  # uniform area fraction on [0.001, 0.11]
    half = F.RandomErasing(p=0.5)
    hits = [half.sample(32, 32, g) is not None for _ in range(2000)]
    assert 0.45 < np.mean(hits) < 0.55


# ------------------------------------------------------------------ torchvision-backed ops


@pytest.mark.parametrize("seed", range(6))
def test_library_ops_apply_the_parameters_they_sample(seed):
    # each torchvision-backed op equals the functional op at the parameters sample() reports
    x = sample(t=3, h=20, w=24)
    near = dict(interpolation=InterpolationMode.NEAREST, fill=0.0)
    rot = F.RandomRotate(degrees=30.0)
    assert torch.equal(rot(x, gen(seed)), tvf.rotate(x, rot.sample(gen(seed)), **near))
    shear = F.RandomShearX(degrees=30.0)
    want = tvf.affine(
        x, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear.sample(gen(seed)), 0.0], **near
    )
    assert torch.equal(shear(x, gen(seed)), want)
    tr = F.RandomTranslate(max_dx=4, max_dy=3)
    dy, dx = tr.sample(gen(seed))
    want = tvf.affine(x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], **near)
    assert torch.equal(tr(x, gen(seed)), want)
    er = F.RandomErasing(p=0.7, scale=(0.05, 0.3))
    want = x.clone()
    box = er.sample(20, 24, gen(seed))
    if box is not None:
        top, left, h, w = box
        want[..., top : top + h, left : left + w] = 0
    assert torch.equal(er(x, gen(seed)), want)


def test_shear_x_hand_computed():
    # torchvision's shear about the centre: x_in = x_out + tan(angle) * (y_out - centre row)
    x = torch.zeros(1, 1, 5, 5)
    x[..., :, 2] = 1.0  # a vertical line through the centre column
    assert torch.equal(F.shear_x(x, 45.0)[0, 0], torch.eye(5).flip(1))  # x_out = 4 - row
    assert torch.equal(F.shear_x(x, -45.0)[0, 0], torch.eye(5))  # x_out = row


def test_translate_shifts_uniform():
    g = gen(6)
    shifts = np.array([F.RandomTranslate(max_dx=5, max_dy=2).sample(g) for _ in range(3300)])
    assert chi_square(np.bincount(shifts[:, 1] + 5), [1 / 11] * 11) < 29.6  # chi2(10) 99.9%
    assert chi_square(np.bincount(shifts[:, 0] + 2), [1 / 5] * 5) < 18.5  # chi2(4) 99.9%


def test_library_ops_leave_global_rng_alone():
    x = sample()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    outs = [op(x, gen(0)) for op in RANDOM_OPS]
    F.RandomErasing().sample(8, 8, gen(0))
    assert torch.initial_seed() == 7 and torch.equal(torch.rand(3), expected)
    torch.manual_seed(8)  # and the global state does not change what they do
    assert all(torch.equal(op(x, gen(0)), out) for op, out in zip(RANDOM_OPS, outs))


# ----------------------------------------------------------------------------- policies


def chi_square(counts, probs):
    counts = np.asarray(counts, float)
    expected = counts.sum() * np.asarray(probs)
    return float(((counts - expected) ** 2 / expected).sum())


def test_policy_structure_and_choice_frequencies():
    nda = F.get_policy("nda")
    assert [type(t).__name__ for t in nda.transforms] == [
        "RandomRoll",
        "RandomRotate",
        "RandomShearX",
    ]
    assert nda.transforms[1].degrees == 30 and nda.transforms[2].degrees == 30
    g = gen(2)
    counts = np.bincount([nda.choose(g) for _ in range(3000)], minlength=3)
    assert chi_square(counts, [1 / 3] * 3) < 13.8  # chi2(df=2) 99.9% quantile

    spk = F.get_policy("spikformer_cifar10dvs")
    flip, choice = spk.transforms
    assert flip.p == 0.5
    names = [type(t).__name__ for t in choice.transforms]
    assert names == [
        "Identity", "RandomShearX", "RandomTranslate", "RandomTranslate", "RandomRotate",
        "RandomErasing",
    ]  # fmt: skip
    assert choice.transforms[1].degrees == pytest.approx(math.degrees(0.3))
    assert (choice.transforms[2].max_dx, choice.transforms[2].max_dy) == (5, 0)
    assert (choice.transforms[3].max_dx, choice.transforms[3].max_dy) == (0, 5)
    assert choice.transforms[5].scale == (0.001, 0.11) and choice.transforms[5].p == 1.0
    counts = np.bincount([choice.choose(g) for _ in range(6000)], minlength=6)
    assert chi_square(counts, [1 / 6] * 6) < 20.5  # chi2(df=5) 99.9% quantile
    # the flip happens in about half of the samples
    x = sample(t=1, c=1, h=8, w=8)
    flipped = [torch.equal(flip(x, g), F.hflip(x)) for _ in range(2000)]
    assert abs(np.mean(flipped) - 0.5) < 0.04
    with pytest.raises(ValueError, match="unknown policy"):
        F.get_policy("autoaugment")


def test_weighted_random_choice():
    rc = F.RandomChoice((F.Identity(), F.RandomRoll()), weights=(3, 1))
    g = gen(3)
    counts = np.bincount([rc.choose(g) for _ in range(4000)], minlength=2)
    assert chi_square(counts, [0.75, 0.25]) < 10.8


# ----------------------------------------------------------------------------- Mixup / CutMix


def batch(b=6, seed=0):
    x = torch.rand(b, 3, 2, 16, 16, generator=gen(seed)) + 1.0  # all pixels differ from 0
    y = torch.randint(0, 10, (b,), generator=gen(seed + 1))
    return x, y


def test_mixup_targets_and_inputs():
    x, y = batch()
    mix = F.Mixup(num_classes=10, mixup_alpha=0.5, label_smoothing=0.1)
    for seed in range(10):
        out, soft = mix(x, y, gen(seed))
        torch.testing.assert_close(soft.sum(1), torch.ones(6))
        lam, _ = F.Mixup(num_classes=10, mixup_alpha=0.5).sample(gen(seed))
        torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
        onehot = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
        torch.testing.assert_close(soft, lam * onehot + (1 - lam) * onehot.flip(0))
    assert torch.equal(mix(x, y, gen(4))[0], mix(x, y, gen(4))[0])


def test_mixup_off_returns_smoothed_one_hot():
    x, y = batch()
    disabled = F.Mixup(num_classes=10)
    disabled.enabled = False  # what a training loop does after mixup_off_epoch
    for mix in (F.Mixup(num_classes=10, prob=0.0), disabled):
        out, soft = mix(x, y, gen(0))
        assert torch.equal(out, x)
        assert torch.allclose(soft.max(1).values, torch.full((6,), 0.91))
        assert torch.equal(soft.argmax(1), y)
    ints = torch.randint(0, 4, (2, 3, 2, 8, 8), dtype=torch.int16)
    assert F.Mixup(num_classes=3, prob=0.0)(ints, torch.tensor([0, 1]))[0].dtype == torch.float32


def test_cutmix_box_same_for_all_frames_and_lam_matches_area():
    x, y = batch(b=5)  # odd batch: the middle sample pastes from itself
    mix = F.Mixup(num_classes=10, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    seen_partial = False
    for seed in range(20):
        out, soft = mix(x, y, gen(seed))
        changed = out != x  # [B, T, C, H, W]
        box = changed[0, 0, 0]
        for b in (0, 1, 3, 4):
            for t in range(3):
                for c in range(2):
                    assert torch.equal(changed[b, t, c], box)
        assert not changed[2].any()
        frac = box.float().mean().item()
        if y[0] != y[4]:
            # soft target of sample 0: lam on its own label, 1 - lam on sample 4's
            assert soft[0, y[0]].item() == pytest.approx(1 - frac)
            assert soft[0, y[4]].item() == pytest.approx(frac)
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        if len(rows):
            assert box.sum() == len(rows) * len(cols)  # a rectangle
            seen_partial |= 0 < frac < 1
        torch.testing.assert_close(soft.sum(1), torch.ones(5))
    assert seen_partial


def test_mixup_switch_and_beta():
    mix = F.Mixup(num_classes=10, mixup_alpha=0.5, cutmix_alpha=1.0, prob=0.8, switch_prob=0.25)
    g = gen(5)
    draws = [mix.sample(g) for _ in range(4000)]
    applied = [d for d in draws if d[0] < 1.0]
    assert abs(len(applied) / 4000 - 0.8) < 0.03
    assert abs(np.mean([c for _, c in applied]) - 0.25) < 0.03
    lams = np.array([lam for lam, c in applied if not c])
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.125) < 0.015  # Beta(0.5, 0.5)


def test_mixup_rejects_bad_targets():
    x, y = batch()
    mix = F.Mixup(num_classes=10)
    with pytest.raises(ValueError, match="integer class indices"):
        mix(x, y.float(), gen(0))
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        mix(x, y + 10, gen(0))
    with pytest.raises(ValueError, match="batch"):
        mix(x, y[:3], gen(0))


# ----------------------------------------------------------------------------- seeding


class _Augmented(Dataset):
    def __init__(self):
        self.op = F.get_policy("nda")

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.arange(64.0).reshape(1, 1, 8, 8)
        info = torch.utils.data.get_worker_info()
        # NumPy's global RNG stands in for a third-party transform: seed_worker must seed it
        legacy = np.random.rand()  # noqa: NPY002
        return self.op(x), float(F.worker_rng().random()), legacy, info.id


def _run_loader(seed):
    loader = DataLoader(
        _Augmented(),
        batch_size=None,
        num_workers=2,
        worker_init_fn=F.seed_worker,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context="fork",
    )
    return list(loader)


def test_dataloader_workers_reproducible_and_distinct():
    a, b, c = _run_loader(0), _run_loader(0), _run_loader(1)
    for (xa, ra, na, _), (xb, rb, nb, _) in zip(a, b):
        assert torch.equal(xa, xb) and ra == rb and na == nb
    assert any(not torch.equal(xa, xc) for (xa, *_), (xc, *_) in zip(a, c))
    # the first item of each worker: different draws in the two workers
    first = {w: (r, n) for _, r, n, w in reversed(a)}
    assert first[0][0] != first[1][0] and first[0][1] != first[1][1]


def test_default_generator_follows_torch_manual_seed():
    op = F.RandomRotate(degrees=30.0)
    torch.manual_seed(123)
    F.seed_worker(0)  # restart the stream (a new seed value restarts it by itself)
    first = [op.sample() for _ in range(3)]
    assert [op.sample() for _ in range(3)] != first  # the stream continues
    torch.manual_seed(123)
    F.seed_worker(0)
    assert [op.sample() for _ in range(3)] == first
    torch.manual_seed(124)
    assert [op.sample() for _ in range(3)] != first
    torch.manual_seed(123)  # back to 123 from another seed: a fresh stream for 123
    assert [op.sample() for _ in range(3)] == first
    # the global torch stream is not consumed
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    op.sample()
    assert torch.equal(torch.rand(3), expected)


def test_bad_generator_and_input():
    with pytest.raises(TypeError, match="torch.Generator"):
        F.RandomRoll()(sample(), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[T, C, H, W\]"):
        F.RandomRoll()(torch.zeros(8, 8), gen(0))
    with pytest.raises(ValueError, match="probability"):
        F.RandomHorizontalFlip(p=1.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", RANDOM_OPS, ids=repr)
def test_cuda_matches_cpu(op):
    x = sample(t=4, h=32, w=32)
    for seed in range(4):
        cpu = op(x, gen(seed))
        gpu = op(x.cuda(), gen(seed)).cpu()  # parameters still come from the CPU generator
        # grid sampling may round pixel centres that sit exactly on a tie differently
        assert (cpu - gpu).abs().gt(1e-4).float().mean() < 0.01
    xb, y = batch()
    mix = F.Mixup(num_classes=10, mixup_alpha=0.5, cutmix_alpha=1.0)
    a, sa = mix(xb, y, gen(3))
    b, sb = mix(xb.cuda(), y.cuda(), gen(3))
    torch.testing.assert_close(b.cpu(), a)
    torch.testing.assert_close(sb.cpu(), sa)
