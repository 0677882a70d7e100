"""Masked-autoencoder reconstructions: original, masked input and reconstruction side by side.

:func:`reconstruction_panels` is the pure part (arrays in, arrays out, tested exactly);
:func:`plot_mae_reconstructions` lays the panels out on a ``matplotlib.figure.Figure`` with an
Agg canvas (no ``pyplot`` state, as :mod:`evformer.viz.plots`); write it with
:func:`save_figure`.

The prediction is taken in the model's target space (:func:`evformer.models.mae.mae_loss`):
patches ``[N, L, p*p*C]`` of the *normalised* input (the tensor the model saw), each patch
normalised by its own mean and unbiased variance when ``norm_pix``. Mapping it back therefore
uses the statistics of the original patch at the same position, ``pred * sqrt(var + 1e-6) +
mean`` (as MAE's visualisation notebook), then the dataset normalisation is undone,
``x * std + mean``. Patch layout and token order come from
:func:`evformer.models.mae.patchify` / :func:`~evformer.models.mae.unpatchify`, not a second
copy of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from evformer.models.mae import patchify, unpatchify
from evformer.viz.plots import save_figure

__all__ = ["plot_mae_reconstructions", "reconstruction_panels", "save_figure"]

# the epsilon of mae_loss's per-patch normalisation (MAE: var + 1e-6)
_NORM_PIX_EPS = 1.0e-6
# colour of masked patches in the displayed masked panel (RGB in [0, 1]); grayscale uses a
# tint so that a masked patch cannot be mistaken for a grey image region
_MASK_RGB = {"rgb": (0.5, 0.5, 0.5), "gray": (0.55, 0.65, 0.8), "events": (0.5, 0.5, 0.5)}


def _as_tensor(a, name: str) -> torch.Tensor:
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.is_complex():
        raise TypeError(f"{name} must be real, got {t.dtype}")
    return t.to("cpu", torch.float64)


def _channel_stats(v: Sequence[float] | float | None, C: int, name: str, default: float):
    if v is None:
        return torch.full((1, C, 1, 1), default, dtype=torch.float64)
    t = torch.as_tensor(np.asarray(v, dtype=np.float64)).flatten()
    if t.numel() == 1:
        t = t.expand(C)
    if t.numel() != C:
        raise ValueError(f"{name} has {t.numel()} values for {C} channels; give one per channel")
    return t.reshape(1, C, 1, 1)


def reconstruction_panels(
    images,
    mask,
    pred,
    *,
    patch_size: int,
    norm_pix: bool = True,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    fill: float = float("nan"),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three panels of an MAE visualisation as float64 arrays ``[N, C, H, W]``, in the
    units of the un-normalised input (pixel values for images, event counts for frames).

    - ``images [N, C, H, W]``: the model's input, normalised with ``mean``/``std`` per
      channel if those are given (``[N, T, C, H, W]`` event frames are averaged over ``T``
      first, as :class:`~evformer.models.mae.SpikformerMAE` builds its target);
    - ``mask [N, L]``: 1 = masked, 0 = visible, ``L = (H/p)(W/p)`` tokens in row-major order;
    - ``pred [N, L, p*p*C]``: the decoder output in the loss's target space (per-patch
      normalised when ``norm_pix``; torch tensors or NumPy arrays, any float dtype).

    Returns ``(original, masked, reconstructed)``: the de-normalised input; the same with
    every masked pixel set to ``fill`` (in output units; NaN by default, drawn as a blank
    patch); and the de-normalised prediction with the visible patches pasted back from the
    original, so it equals ``original`` exactly wherever ``mask == 0``. Values are not
    clipped.
    """
    x = _as_tensor(images, "images")
    if x.dim() == 5:
        x = x.mean(1)
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W] (or [N, T, C, H, W]), got {tuple(x.shape)}")
    N, C, H, W = x.shape
    p = int(patch_size)
    if p < 1 or H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible by patch_size {patch_size}")
    h, w = H // p, W // p
    m = _as_tensor(mask, "mask")
    if m.shape != (N, h * w):
        raise ValueError(
            f"mask has shape {tuple(m.shape)}, expected [N, L] = [{N}, {h * w}] for {N} images "
            f"of {H}x{W} with patch_size {p}"
        )
    y = _as_tensor(pred, "pred")
    if y.shape != (N, h * w, p * p * C):
        raise ValueError(
            f"pred has shape {tuple(y.shape)}, expected [N, L, p*p*C] = [{N}, {h * w}, {p * p * C}]"
        )

    target = patchify(x, p)  # [N, L, p*p*C] in normalised-input units
    if norm_pix:
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as mae_loss
        y = y * torch.sqrt(var + _NORM_PIX_EPS) + mu
    visible = (m == 0).unsqueeze(-1)  # [N, L, 1] bool, True = visible
    # where(), not a blend: visible patches are copied bit for bit, and the same
    # unpatchify + de-normalisation below then gives bit-identical pixels
    pasted = torch.where(visible, target, y)

    ch_mean = _channel_stats(mean, C, "mean", 0.0)
    ch_std = _channel_stats(std, C, "std", 1.0)

    def denorm(patches: torch.Tensor) -> np.ndarray:
        return (unpatchify(patches, p, C, h, w) * ch_std + ch_mean).numpy()

    original = denorm(target)
    reconstructed = denorm(pasted)
    pix_visible = unpatchify(visible.expand_as(target).to(torch.float64), p, C, h, w).numpy()
    masked_img = np.where(pix_visible > 0, original, fill)
    return original, masked_img, reconstructed


def _display_mode(C: int, channels_as_events: bool | None) -> str:
    events = C == 2 if channels_as_events is None else bool(channels_as_events)
    if events:
        if C not in (1, 2):
            raise ValueError(
                f"channels_as_events needs 1 or 2 channels (OFF, ON counts), got C = {C}"
            )
        return "events"
    return "rgb" if C == 3 else "gray"


def _display_range(original: np.ndarray, mode: str) -> tuple[float, float]:
    """The value range ``(lo, hi)`` one sample's three panels share: the original's min and
    max of the channel mean (grayscale), or 0 and its largest count (events)."""
    v = original.mean(0) if mode == "gray" else original
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    if mode == "events":
        lo, hi = 0.0, max(hi, 0.0)
    if not hi > lo:  # a flat or empty sample: avoid dividing by zero
        hi = lo + 1.0
    return lo, hi


def _to_rgb(panel: np.ndarray, mode: str, lo: float, hi: float) -> np.ndarray:
    """One panel ``[C, H, W]`` -> displayable ``[H, W, 3]`` in [0, 1]; non-finite pixels
    (masked patches) get the mode's mask colour."""
    blank = ~np.isfinite(panel).all(axis=0)  # [H, W]
    v = np.nan_to_num(panel, nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "rgb":
        rgb = np.clip(v.transpose(1, 2, 0), 0.0, 1.0)
    elif mode == "gray":
        g = np.clip((v.mean(0) - lo) / (hi - lo), 0.0, 1.0)
        rgb = np.repeat(g[..., None], 3, axis=-1)
    else:  # events: channel 0 = OFF (blue), channel 1 = ON (red), black = no event
        v = np.clip(v / hi, 0.0, 1.0)
        off, on = (v[0], v[1]) if v.shape[0] == 2 else (np.zeros_like(v[0]), v[0])
        rgb = np.stack([on, np.zeros_like(on), off], axis=-1)
    rgb[blank] = _MASK_RGB[mode]
    return rgb


def plot_mae_reconstructions(
    images,
    mask,
    pred,
    *,
    patch_size: int,
    norm_pix: bool = True,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    channels_as_events: bool | None = None,
    max_rows: int = 8,
) -> Figure:
    """A figure with one row per sample (the first ``max_rows``) and three columns: the
    original, the masked input (masked patches blank) and the reconstruction with the visible
    patches pasted back. Arguments as :func:`reconstruction_panels`.

    Display: ``C = 3`` is RGB clipped to [0, 1] after de-normalisation; ``C = 2`` (or
    ``channels_as_events=True`` with 1 or 2 channels) are event counts, channel 0 = OFF in
    blue and channel 1 = ON in red on black, scaled by the original's largest count so the
    three panels of a sample share one scale; any other ``C`` is grayscale (the channel
    mean) on the original's min-max range. ``None`` means events exactly when ``C == 2``.
    The figure is returned unsaved (:func:`save_figure`).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    n = min(len(images), int(max_rows))
    original, masked, recon = reconstruction_panels(
        images[:n], mask[:n], pred[:n], patch_size=patch_size, norm_pix=norm_pix, mean=mean, std=std
    )
    N, C, H, W = original.shape
    mode = _display_mode(C, channels_as_events)
    fig = Figure(figsize=(3 * 2.2, N * 2.2 * H / W + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(N, 3, squeeze=False))
    for i in range(N):
        lo, hi = _display_range(original[i], mode)
        for j, panel in enumerate((original[i], masked[i], recon[i])):
            ax = axes[i, j]
            ax.imshow(_to_rgb(panel, mode, lo, hi), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if mode == "events":
            axes[i, 0].set_ylabel(f"max {hi:.3g}", fontsize=8)
    for ax, title in zip(axes[0], ("original", "masked input", "reconstruction + visible")):
        ax.set_title(title, fontsize=9)
    return fig
