"""Static datasets (fake CIFAR / ImageFolder written in the real formats), transforms, encoders."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from evformer.data.neuromorphic import DatasetNotFoundError
from evformer.data.static import (
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RA_CIFAR_OPS,
    ImageNet,
    PoissonEncoder,
    RandAugment,
    RandomCropPad,
    RandomResizedCrop,
    RepeatEncoder,
    _ra_apply,
    cifar_eval_transform,
    cifar_train_transform,
)

# ----------------------------------------------------------------- fake CIFAR folders


def _images(n: int, seed: int) -> np.ndarray:
    """n images [n, 32, 32, 3] uint8, pixel (r, c) of image k, channel ch = f(k, r, c, ch)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _rows(imgs: np.ndarray) -> np.ndarray:
    # The CIFAR python format: each row is 1024 red, 1024 green, 1024 blue values, row-major.
    return imgs.transpose(0, 3, 1, 2).reshape(len(imgs), 3072)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def make_cifar10(root: Path, per_batch: int = 2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = _images(5 * per_batch, 0)
    labels = [i % 10 for i in range(5 * per_batch)]
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": labels[sl],
                "data": _rows(train[sl]),
                "filenames": [f"img{i}.png" for i in range(per_batch)],
            },
        )
    test = _images(3, 1)
    _dump(folder / "test_batch", {"labels": [7, 8, 9], "data": _rows(test), "batch_label": "t"})
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    _dump(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return train, labels, test


def make_cifar100(root: Path):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = _images(4, 2)
    _dump(
        folder / "train",
        {"data": _rows(train), "fine_labels": [3, 99, 0, 5], "coarse_labels": [0] * 4},
    )
    test = _images(2, 3)
    _dump(folder / "test", {"data": _rows(test), "fine_labels": [42, 1], "coarse_labels": [1, 1]})
    _dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return train, test


def test_cifar10_reads_the_real_pickle_layout(tmp_path):
    train, labels, test = make_cifar10(tmp_path)
    ds = CIFAR10(tmp_path, "train", transform=None, verify=False)
    assert len(ds) == 10 and ds.targets == labels and ds.classes[0] == "airplane"
    for i in (0, 7):
        img, y = ds[i]
        np.testing.assert_array_equal(np.asarray(img), train[i])  # HWC, channel order RGB
        assert y == labels[i]
    te = CIFAR10(tmp_path, "test", verify=False)  # the paper's eval transform
    x, y = te[2]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 9
    ref = (test[2].transpose(2, 0, 1) / 255.0 - np.array(CIFAR10_MEAN)[:, None, None]) / np.array(
        CIFAR10_STD
    )[:, None, None]
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_cifar10_train_transform_shapes_and_reproducible(tmp_path):
    make_cifar10(tmp_path)
    ds = CIFAR10(tmp_path, "train", transform=None, verify=False)
    tf = cifar_train_transform()
    img = ds[3][0]
    a = tf(img, torch.Generator().manual_seed(1))
    b = tf(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    outs = {
        tuple(tf(img, torch.Generator().manual_seed(s)).flatten()[:50].tolist()) for s in range(8)
    }
    assert len(outs) > 1  # it is random
    paper = CIFAR10(tmp_path, "train", verify=False)
    assert paper[0][0].shape == (3, 32, 32)
    padded = cifar_train_transform(crop_padding=4, randaugment=False, erasing=0.0)
    assert padded(img, torch.Generator().manual_seed(0)).shape == (3, 32, 32)


def test_cifar_verify_missing_and_split_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10(tmp_path, "train")
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg
    make_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"data_batch_1: MD5 differs"):
        CIFAR10(tmp_path, "train")  # verify=True: a hand-made file is not the original
    with pytest.raises(ValueError, match="split"):
        CIFAR10(tmp_path, "val", verify=False)


def test_cifar100_fine_labels(tmp_path):
    train, test = make_cifar100(tmp_path)
    ds = CIFAR100(tmp_path, "train", transform=None, verify=False)
    assert ds.targets == [3, 99, 0, 5] and len(ds.classes) == 100
    np.testing.assert_array_equal(np.asarray(ds[1][0]), train[1])
    te = CIFAR100(tmp_path, "test", verify=False)
    assert te[0][1] == 42 and te[0][0].shape == (3, 32, 32)


# ----------------------------------------------------------------- ImageNet folder


def make_imagefolder(root: Path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            d = root / "ImageNet" / split / wnid
            d.mkdir(parents=True)
            for k in range(2):
                arr = rng.integers(0, 256, (256, 300, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{wnid}_{k}.png")
                arrays[(split, wnid, k)] = arr
    return arrays


def test_imagenet_folder_paper_transforms(tmp_path):
    arrays = make_imagefolder(tmp_path)
    tr = ImageNet(tmp_path, "train")
    va = ImageNet(tmp_path, "val")
    assert len(tr) == 4 and tr.classes == ["n01440764", "n01443537"] and tr.targets == [0, 0, 1, 1]
    x, y = tr[2]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    # eval: shorter side 256 already -> no resize; centre 224 crop; normalise (exact)
    x, y = va[1]
    arr = arrays[("val", "n01440764", 1)]
    top, left = (256 - 224) // 2, int(round((300 - 224) / 2.0))
    crop = arr[top : top + 224, left : left + 224].transpose(2, 0, 1) / 255.0
    ref = (crop - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(DatasetNotFoundError, match="image-net.org"):
        ImageNet(tmp_path / "none", "train")


# ----------------------------------------------------------------- transforms


def test_randaugment_plan_follows_timm_rules():
    ra = RandAugment(num_ops=1, magnitude=10, magnitude_std=0.0, ops=RA_CIFAR_OPS, prob=1.0)
    g = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(400):
        ((name, arg),) = ra.sample(g)
        seen.setdefault(name, set()).add(round(arg, 6))
    assert set(seen) == set(RA_CIFAR_OPS)  # only the configured ops, all of them
    assert seen["Rotate"] == {30.0, -30.0}  # magnitude 10 -> +-30 degrees
    assert seen["ShearX"] == {0.3, -0.3}
    assert seen["TranslateXRel"] == {0.45, -0.45}
    # prob: each op skipped half of the time
    half = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5)
    counts = [len(half.sample(g)) for _ in range(2000)]
    assert abs(np.mean(counts) - 1.0) < 0.08
    # magnitude noise: rotate magnitudes spread around 9 (27 degrees), clipped at 10
    noisy = RandAugment(num_ops=1, magnitude=9, magnitude_std=0.5, ops=("Rotate",), prob=1.0)
    mags = np.array([abs(noisy.sample(g)[0][1]) / 3.0 for _ in range(3000)])
    assert mags.max() <= 10.0 and abs(np.median(mags) - 9.0) < 0.1
    assert 0.3 < mags[mags < 10].std() < 0.5


def test_randaugment_ops_on_images():
    ra = RandAugment(ops=("Rotate",))
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(ra.apply(img, [("Rotate", 0.0)]), img)
    shifted = ra.apply(img, [("TranslateXRel", 0.25)])
    np.testing.assert_array_equal(shifted[:, :, 8:].numpy(), img[:, :, :24].numpy())
    assert (shifted[:, :, :8] == torch.tensor(ra.fill).view(3, 1, 1).to(torch.uint8)).all()
    for name in RandAugment().ops:  # every op runs on uint8 and keeps shape and dtype
        out = ra.apply(img, [(name, 0.2 if name not in ("PosterizeIncreasing",) else 2)])
        assert out.shape == img.shape and out.dtype == torch.uint8
    with pytest.raises(TypeError, match="uint8"):
        ra.apply(img.float(), [])
    with pytest.raises(ValueError, match="unknown ops"):
        RandAugment(ops=("Blur",))


def test_random_resized_crop_boxes():
    rrc = RandomResizedCrop(16, scale=(0.25, 0.5))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = rrc.box(40, 60, g)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.2 <= h * w / 2400 <= 0.55
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # impossible boxes fall back to the centre crop with the ratio clamped
    assert RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0)).box(10, 30, g) == (
        0,
        10,
        10,
        10,
    )
    out = rrc(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8), g)
    assert out.shape == (3, 16, 16)


def test_random_resized_crop_applies_its_box():
    rrc = RandomResizedCrop(16, scale=(0.25, 0.5))
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    for seed in range(5):
        top, left, h, w = rrc.box(40, 60, torch.Generator().manual_seed(seed))
        want = tvf.resized_crop(
            img, top, left, h, w, [16, 16], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        assert torch.equal(rrc(img, torch.Generator().manual_seed(seed)), want)


def test_random_crop_pad_is_a_uniform_zero_padded_window():
    img = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)  # no zeros inside the image
    padded = tvf.pad(img, [4], fill=0)
    crop = RandomCropPad(32, 4)
    offsets = []
    for seed in range(300):
        out = crop(img, torch.Generator().manual_seed(seed))
        hits = [
            (t, c)
            for t in range(9)
            for c in range(9)
            if torch.equal(out, padded[:, t : t + 32, c : c + 32])
        ]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert {t for t, _ in offsets} == set(range(9)) and {c for _, c in offsets} == set(range(9))


@pytest.mark.parametrize(
    "name,matrix", [("ShearX", (1, 0.27, 0, 0, 1, 0)), ("ShearY", (1, 0, 0, -0.3, 1, 0))]
)
def test_randaugment_shear_matches_timm_pil(name, matrix):
    # timm shears with PIL's Image.transform about the top-left corner; with nearest
    # sampling the torchvision op is pixel-exact to it
    arr = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    fill = (124, 116, 104)
    ref = Image.fromarray(arr).transform(
        (40, 32), Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=fill
    )
    factor = matrix[1] if name == "ShearX" else matrix[3]
    img = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    out = _ra_apply(img, name, factor, list(map(float, fill)), InterpolationMode.NEAREST)
    np.testing.assert_array_equal(out.numpy(), np.asarray(ref).transpose(2, 0, 1))


def test_eval_transform_is_deterministic():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    tf = cifar_eval_transform()
    torch.testing.assert_close(tf(img), tf(img))


# ----------------------------------------------------------------- encoders


def test_repeat_encoder_is_exact():
    x = torch.randn(3, 4, 5)
    y = RepeatEncoder(4)(x)
    assert y.shape == (4, 3, 4, 5)
    for t in range(4):
        assert torch.equal(y[t], x)
    batch = torch.randn(2, 3, 4, 5)
    assert RepeatEncoder(2)(batch).shape == (2, 2, 3, 4, 5)
    with pytest.raises(ValueError):
        RepeatEncoder(0)


def test_poisson_encoder_rates_and_reproducibility():
    T = 4000
    x = torch.tensor([[0.0, 0.1, 0.5], [0.9, 1.0, 0.25]])
    spikes = PoissonEncoder(T, torch.Generator().manual_seed(0))(x)
    assert spikes.shape == (T, 2, 3) and spikes.dtype == torch.float32
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    rate = spikes.mean(0)
    assert rate[0, 0] == 0 and rate[1, 1] == 1
    tol = 5 * torch.sqrt(x * (1 - x) / T) + 1e-9  # 5 binomial standard deviations
    assert ((rate - x).abs() <= tol).all()
    # steps are independent: correlation between consecutive steps ~ 0
    s = spikes[:, 0, 2]
    c = torch.corrcoef(torch.stack([s[:-1], s[1:]]))[0, 1]
    assert abs(float(c)) < 5 / math.sqrt(T)
    a = PoissonEncoder(16, torch.Generator().manual_seed(3))(x)
    b = PoissonEncoder(16, torch.Generator().manual_seed(3))(x)
    c2 = PoissonEncoder(16, torch.Generator().manual_seed(4))(x)
    assert torch.equal(a, b) and not torch.equal(a, c2)
    # a per-call generator overrides the stored one
    d = PoissonEncoder(16)(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, d)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PoissonEncoder(4)(x * 2)
    with pytest.raises(TypeError):
        PoissonEncoder(4)(torch.ones(2, dtype=torch.uint8))
