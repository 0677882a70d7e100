"""MAE reconstruction figures (evformer.viz.reconstruction): the panels checked exactly
(visible patches pasted back bit for bit, masked patches at the fill value, a perfect
normalised-pixel prediction de-normalised back to the original) for C = 1, 2, 3, and the
figure's layout and colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from evformer.models.mae import patchify, random_masking
from evformer.viz import plot_mae_reconstructions, reconstruction_panels, save_figure

P = 4  # patch size
H, W = 16, 12  # a non-square 4x3 token grid catches row/column mix-ups


def _case(C: int, N: int = 3, seed: int = 0, mean=None, std=None):
    """Normalised model input [N, C, H, W], a 0.75 mask [N, L], the perfect normalised-pixel
    prediction [N, L, p*p*C] (what mae_loss compares against) and the raw images."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(N, C, H, W, generator=g, dtype=torch.float64)
    if C == 2:  # event counts
        raw = torch.poisson(3.0 * raw, generator=g)
    m = torch.as_tensor(mean if mean is not None else [0.0] * C, dtype=torch.float64)
    s = torch.as_tensor(std if std is not None else [1.0] * C, dtype=torch.float64)
    x = (raw - m.view(1, C, 1, 1)) / s.view(1, C, 1, 1)
    mask = random_masking(N, (H // P) * (W // P), 0.75, generator=g).mask
    t = patchify(x, P)
    pred = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + 1e-6)
    return x.float(), mask, pred.float(), raw.numpy()


def _pixel_mask(mask: torch.Tensor, C: int) -> np.ndarray:
    """[N, L] token mask -> [N, C, H, W] bool, True = masked pixel (written independently of
    patchify: token r * w + q covers rows r*p.., columns q*p..)."""
    N = mask.shape[0]
    h, w = H // P, W // P
    out = np.zeros((N, C, H, W), dtype=bool)
    for n in range(N):
        for tok in range(h * w):
            if mask[n, tok]:
                r, q = divmod(tok, w)
                out[n, :, r * P : (r + 1) * P, q * P : (q + 1) * P] = True
    return out


@pytest.mark.parametrize("C", [1, 2, 3])
def test_visible_patches_are_pasted_back_exactly_and_masked_ones_filled(C):
    x, mask, _, raw = _case(C)
    noise = torch.randn(
        x.shape[0], mask.shape[1], P * P * C, generator=torch.Generator().manual_seed(1)
    )
    orig, masked, recon = reconstruction_panels(x, mask, noise, patch_size=P, fill=-7.0)
    pm = _pixel_mask(mask, C)
    assert orig.shape == masked.shape == recon.shape == (x.shape[0], C, H, W)
    np.testing.assert_allclose(orig, raw, atol=1e-6)  # float32 input round trip
    assert np.array_equal(recon[~pm], orig[~pm])  # bit for bit where visible
    assert np.array_equal(masked[~pm], orig[~pm])
    assert np.all(masked[pm] == -7.0)
    assert not np.allclose(recon[pm], orig[pm])  # the noise prediction really is shown there


def test_default_fill_is_nan_and_drawn_blank():
    x, mask, pred, _ = _case(3)
    _, masked, _ = reconstruction_panels(x, mask, pred, patch_size=P)
    pm = _pixel_mask(mask, 3)
    assert np.isnan(masked[pm]).all() and np.isfinite(masked[~pm]).all()


@pytest.mark.parametrize("C", [1, 2, 3])
def test_perfect_normalised_prediction_reproduces_the_original(C):
    mean = [0.5, 0.4, 0.3][:C]
    std = [0.25, 0.2, 0.3][:C]
    x, mask, pred, raw = _case(C, mean=mean, std=std)
    orig, _, recon = reconstruction_panels(x, mask, pred, patch_size=P, mean=mean, std=std)
    np.testing.assert_allclose(orig, raw, atol=1e-5)
    np.testing.assert_allclose(recon, orig, atol=1e-5)  # masked patches included


def test_without_norm_pix_the_prediction_is_taken_as_is():
    x, mask, _, _ = _case(3)
    pred = patchify(x.double(), P)  # raw target space
    orig, _, recon = reconstruction_panels(x, mask, pred, patch_size=P, norm_pix=False)
    np.testing.assert_allclose(recon, orig, atol=1e-6)
    # the same prediction read as normalised pixels is something else
    _, _, wrong = reconstruction_panels(x, mask, pred, patch_size=P, norm_pix=True)
    assert not np.allclose(wrong, orig, atol=1e-3)


def test_event_frames_over_time_are_averaged_and_numpy_inputs_work():
    x, mask, pred, _ = _case(2)
    seq = torch.stack([x, x + 1.0, x - 1.0], dim=1)  # [N, T, C, H, W], mean over T is x
    a = reconstruction_panels(seq.numpy(), mask.numpy().astype(bool), pred.numpy(), patch_size=P)
    b = reconstruction_panels(x, mask, pred, patch_size=P)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, atol=1e-6)


def test_shape_errors_name_the_expected_shape():
    x, mask, pred, _ = _case(3)
    with pytest.raises(ValueError, match=r"mask has shape .* expected \[N, L\]"):
        reconstruction_panels(x, mask[:, :-1], pred, patch_size=P)
    with pytest.raises(ValueError, match=r"pred has shape .* p\*p\*C"):
        reconstruction_panels(x, mask, pred[..., :-1], patch_size=P)
    with pytest.raises(ValueError, match="not divisible"):
        reconstruction_panels(x, mask, pred, patch_size=5)
    with pytest.raises(ValueError, match="one per channel"):
        reconstruction_panels(x, mask, pred, patch_size=P, mean=[0.5, 0.5])


def _pixels(ax) -> np.ndarray:
    return np.asarray(ax.get_images()[0].get_array())


@pytest.mark.parametrize("C, N", [(1, 2), (2, 3), (3, 1)])
def test_figure_has_three_axes_per_sample(C, N):
    x, mask, pred, _ = _case(C, N=N)
    fig = plot_mae_reconstructions(x, mask, pred, patch_size=P)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * N
    for ax in fig.axes:
        img = _pixels(ax)
        assert img.shape == (H, W, 3) and np.isfinite(img).all()
        assert img.min() >= 0.0 and img.max() <= 1.0


def test_max_rows_limits_the_rows():
    x, mask, pred, _ = _case(3, N=5)
    assert len(plot_mae_reconstructions(x, mask, pred, patch_size=P, max_rows=2).axes) == 6


def test_event_colours_on_red_off_blue_shared_scale():
    N, C = 1, 2
    x = torch.zeros(N, C, H, W)
    x[0, 1, 0, 0] = 4.0  # ON event: channel 1
    x[0, 0, 0, 1] = 2.0  # OFF event: channel 0
    mask = torch.zeros(N, (H // P) * (W // P))
    mask[0, -1] = 1.0  # hide the bottom-right patch
    pred = torch.zeros(N, mask.shape[1], P * P * C)
    fig = plot_mae_reconstructions(x, mask, pred, patch_size=P, norm_pix=False)
    orig = _pixels(fig.axes[0])
    np.testing.assert_allclose(orig[0, 0], [1.0, 0.0, 0.0])  # ON: red at full scale
    np.testing.assert_allclose(orig[0, 1], [0.0, 0.0, 0.5])  # OFF: blue, same scale (2 / 4)
    np.testing.assert_allclose(orig[5, 5], [0.0, 0.0, 0.0])  # no event: black
    masked = _pixels(fig.axes[1])
    assert not np.allclose(masked[-1, -1], [0.0, 0.0, 0.0])  # masked patch: not "no event"
    # forcing grayscale on event frames, and events on RGB, are explicit choices
    gray = plot_mae_reconstructions(
        x, mask, pred, patch_size=P, norm_pix=False, channels_as_events=False
    )
    g = _pixels(gray.axes[0])
    assert np.allclose(g[..., 0], g[..., 1]) and np.allclose(g[..., 1], g[..., 2])
    with pytest.raises(ValueError, match="1 or 2 channels"):
        x3, m3, p3, _ = _case(3)
        plot_mae_reconstructions(x3, m3, p3, patch_size=P, channels_as_events=True)


def test_rgb_is_clipped_to_unit_range():
    x, mask, pred, _ = _case(3, N=1)
    fig = plot_mae_reconstructions(x * 3.0 - 1.0, mask, pred * 10.0, patch_size=P)
    for ax in fig.axes:
        img = _pixels(ax)
        assert img.min() == 0.0 and img.max() == 1.0


def test_save_figure_writes_a_png_atomically(tmp_path):
    x, mask, pred, _ = _case(2, N=1)
    out = save_figure(plot_mae_reconstructions(x, mask, pred, patch_size=P), tmp_path / "r.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]  # no temporary left behind


def test_event_panels_use_the_frames_colour_mapping():
    """One colour mapping for events in evformer.viz: the event panels are
    frames_to_rgb of the counts on the original's scale; one channel is read as ON."""
    from evformer.viz import frames_to_rgb

    x, mask, pred, raw = _case(2, N=1)
    fig = plot_mae_reconstructions(x, mask, pred, patch_size=P)
    expected = frames_to_rgb(raw[:1], vmax=float(raw[0].max()))[0]
    np.testing.assert_allclose(_pixels(fig.axes[0]), expected, atol=1e-6)
    one = x[:, 1:]  # the ON channel alone, shown as events on request
    pred1 = torch.zeros(1, mask.shape[1], P * P)
    fig1 = plot_mae_reconstructions(
        one, mask, pred1, patch_size=P, norm_pix=False, channels_as_events=True
    )
    red = raw[0, 1] / raw[0, 1].max()
    np.testing.assert_allclose(
        _pixels(fig1.axes[0]), np.stack([red, 0 * red, 0 * red], -1), atol=1e-6
    )
