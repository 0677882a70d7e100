"""Masked pretraining figures: reconstructions (original, masked input, reconstruction side
by side), the token masks, and the masked stem's activity.

:func:`reconstruction_panels` is the pure part (arrays in, arrays out, tested exactly);
:func:`plot_mae_reconstructions` lays the panels out on a ``matplotlib.figure.Figure`` with an
Agg canvas (no ``pyplot`` state, as :mod:`evformer.viz.plots`); write it with
:func:`save_figure`. :func:`mask_figure` draws token masks at pixel resolution (over images
if given); :func:`stem_stage_outputs` records what each SCS stage (or unit) of a
:class:`~evformer.models.mae.SpikformerMAE` computes during one masked forward (forward
hooks, the model unchanged) and :func:`stem_activity_figure` puts each one next to the mask
upsampled to its resolution, with the count of non-zeros at masked positions (0 by design).

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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from evformer.models.mae import SpikformerMAE, patchify, unpatchify, upsample_mask
from evformer.models.neurons import step_states
from evformer.viz.frames import frames_to_rgb
from evformer.viz.plots import save_figure

__all__ = [
    "STEM_OUTPUTS",
    "StemActivity",
    "StemOutput",
    "mask_figure",
    "plot_mae_reconstructions",
    "reconstruction_panels",
    "save_figure",
    "stem_activity_figure",
    "stem_stage_outputs",
]

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
    else:  # events: frames_to_rgb's colours (channel 0 = OFF, 1 = ON) on black, one scale
        ev = np.clip(v, 0.0, None)  # a de-normalised prediction can dip below 0
        if ev.shape[0] == 1:  # one channel is read as ON counts
            ev = np.concatenate([np.zeros_like(ev), ev])
        rgb = frames_to_rgb(ev[None], vmax=hi)[0]
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
    ``channels_as_events=True`` with 1 or 2 channels, one channel read as ON) are event
    counts in :func:`~evformer.viz.frames.frames_to_rgb`'s colours, channel 0 = OFF in blue
    and channel 1 = ON in red on black, scaled by the original's largest count so the three
    panels of a sample share one scale; any other ``C`` is grayscale (the channel
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


# -- token masks -------------------------------------------------------------------------------


def _as_masks(masks) -> torch.Tensor:
    """``masks [N, L]`` or ``[L]`` -> float64 ``[N, L]`` of 0 / 1, validated."""
    m = _as_tensor(masks, "masks")
    if m.dim() == 1:
        m = m.unsqueeze(0)
    if m.dim() != 2 or 0 in m.shape:
        raise ValueError(
            f"masks must be [N, L] or [L] (1 = masked, 0 = visible), got shape {tuple(m.shape)}"
        )
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(
            "masks must hold 0 (visible) and 1 (masked) only, as SpikformerMAE and "
            "random_masking return them"
        )
    return m


def _token_grid(L: int, grid, image_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The ``(h, w)`` token grid of ``L`` tokens: ``grid`` itself, else square patches that
    tile the images, else a square grid."""
    if grid is not None:
        try:
            h, w = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise TypeError(
                f"grid must be a pair (h, w) of token rows and columns, got {grid!r}"
            ) from None
        if h < 1 or w < 1 or h * w != L:
            raise ValueError(f"grid {grid!r} has {h * w} tokens, the masks have L = {L}")
        return h, w
    if image_hw is not None:
        H, W = image_hw
        p = math.isqrt(H * W // L) if (H * W) % L == 0 else 0
        if p < 1 or p * p * L != H * W or H % p or W % p:
            raise ValueError(
                f"{L} tokens do not tile {H}x{W} images with square patches; give grid=(h, w)"
            )
        return H // p, W // p
    h = math.isqrt(L)
    if h * h != L:
        raise ValueError(f"{L} tokens do not form a square grid; give grid=(h, w)")
    return h, h


def mask_figure(
    masks,
    *,
    grid: tuple[int, int] | None = None,
    images=None,
    titles: Sequence[str] | None = None,
    mask_alpha: float = 0.8,
    channels_as_events: bool | None = None,
    max_cols: int = 6,
) -> Figure:
    """One panel per token mask, drawn at pixel resolution, optionally over images.

    - ``masks [N, L]`` (or one ``[L]``): 1 = masked, 0 = visible, token ``r * w + q`` at
      row ``r``, column ``q`` (what :class:`~evformer.models.mae.SpikformerMAE` returns and
      :func:`~evformer.models.mae.random_masking` builds);
    - ``grid``: the ``(h, w)`` token grid; default: the square patches that tile ``images``,
      else a square grid;
    - ``images``: ``[C, H, W]`` (one image under every mask), ``[N, C, H, W]`` or ``[N, T,
      C, H, W]`` (averaged over ``T``), in display units (pixel values in [0, 1], event
      counts), ``H = h p``, ``W = w p``; shown as :func:`plot_mae_reconstructions` shows
      them (RGB, ON red / OFF blue events, grayscale; ``channels_as_events`` as there).

    Each panel holds the image (``ax.images[0]``, when given) and, last, the mask layer: an
    RGBA ``[H, W, 4]`` image (``[h, w, 4]`` without images) in the mask colour, alpha
    ``mask_alpha`` (1 without images) on masked pixels and 0 on visible ones, the token mask
    repeated ``p x p`` by :func:`~evformer.models.mae.upsample_mask`, the model's own
    upsampling. Titles (``titles[i]`` first, if given) say how many tokens are masked.
    """
    m = _as_masks(masks)
    N, L = m.shape
    img = None
    if images is not None:
        img = _as_tensor(images, "images")
        if img.dim() == 3:
            img = img.unsqueeze(0).expand(N, *img.shape)
        elif img.dim() == 5:
            img = img.mean(1)
        if img.dim() != 4 or img.shape[0] != N:
            raise ValueError(
                f"images must be [C, H, W] (under every mask), [N, C, H, W] or [N, T, C, H, W] "
                f"with N = {N} masks, got shape {tuple(_as_tensor(images, 'images').shape)}"
            )
    h, w = _token_grid(L, grid, None if img is None else tuple(img.shape[-2:]))
    p = 1
    if img is not None:
        H, W = img.shape[-2:]
        if H % h or W % w or H // h != W // w:
            raise ValueError(
                f"images of {H}x{W} pixels do not split into the {h}x{w} token grid with square "
                "patches; give images of (h p)x(w p) pixels or the matching grid=(h, w)"
            )
        p = H // h
    if titles is not None and len(titles) != N:
        raise ValueError(f"titles has {len(titles)} entries for {N} masks; give one per mask")
    if not 0.0 < mask_alpha <= 1.0:
        raise ValueError(f"mask_alpha must be in (0, 1], got {mask_alpha}")
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")

    masked = upsample_mask(m.view(N, h, w), p).numpy() > 0  # [N, h p, w p], True = masked
    mode = "rgb" if img is None else _display_mode(img.shape[1], channels_as_events)
    cols = min(N, int(max_cols))
    rows = -(-N // cols)
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows * h / w + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[N:]:
        fig.delaxes(ax)
    for i, ax in enumerate(axes[:N]):
        if img is not None:
            panel = img[i].numpy()
            ax.imshow(_to_rgb(panel, mode, *_display_range(panel, mode)), interpolation="nearest")
        layer = np.zeros((*masked.shape[1:], 4))
        layer[..., :3] = _MASK_RGB[mode]
        layer[..., 3] = np.where(masked[i], mask_alpha if img is not None else 1.0, 0.0)
        ax.imshow(layer, interpolation="nearest")
        # token borders as a faint grid
        ax.set_xticks(np.arange(p, w * p, p) - 0.5, minor=True)
        ax.set_yticks(np.arange(p, h * p, p) - 0.5, minor=True)
        ax.grid(which="minor", color="0.85", linewidth=0.4)
        ax.tick_params(which="both", length=0)
        ax.set_xticks([])
        ax.set_yticks([])
        k = int(m[i].sum())
        head = f"{titles[i]}\n" if titles is not None else ""
        ax.set_title(f"{head}{k} of {L} tokens masked ({100.0 * k / L:.0f} %)", fontsize=8)
    return fig


# -- the masked stem ---------------------------------------------------------------------------

#: what :func:`stem_stage_outputs` records
STEM_OUTPUTS = ("stage", "unit", "bn")
_UNITS = ("down", "fc1", "fc2")  # the ConvBNLIF units of an SCSStage, in call order
_ACTIVITY_LABEL = {
    "stage": "mean spike count",
    "unit": "spike rate",
    "bn": "mean |BN output|",
}


@dataclass(frozen=True)
class StemOutput:
    """What one stem module computed during a masked forward.

    ``output [T, B, C, H', W']`` float32: spike counts (``"stage"``: ``s + r`` of the
    stage's residual, 0 to 2), spikes (``"unit"``) or the sparse BatchNorm output, the
    LIF's input current (``"bn"``); ``masked [B, H', W']`` bool, True = masked: the token
    mask repeated ``factor x factor`` (``factor = H' / h``, ``h`` token rows).
    """

    name: str
    output: np.ndarray
    masked: np.ndarray
    factor: int

    def activity(self) -> np.ndarray:
        """``[B, H', W']``: mean ``|output|`` over the time steps and channels."""
        return np.abs(self.output).mean(axis=(0, 2))

    def masked_nonzeros(self, sample: int | None = None) -> int:
        """Entries of ``output`` (every step and channel) that are not exactly 0 at masked
        positions (NaN counts), of all samples or of one; 0 for the masked stem."""
        out, masked = self.output, self.masked
        if sample is not None:
            out, masked = out[:, sample : sample + 1], masked[sample : sample + 1]
        return int(np.count_nonzero(out[np.broadcast_to(masked[None, :, None], out.shape)]))


@dataclass(frozen=True)
class StemActivity:
    """The result of :func:`stem_stage_outputs`: the recorded ``outputs`` in call order, what
    they are (``what``), and the forward's own results as NumPy: ``loss``, ``pred [B, L,
    p*p*C]``, ``mask [B, L]`` (1 = masked), on the ``grid = (h, w)`` of ``patch_size``."""

    outputs: tuple[StemOutput, ...]
    what: str
    loss: float
    pred: np.ndarray
    mask: np.ndarray
    grid: tuple[int, int]
    patch_size: int

    def masked_nonzeros(self, sample: int | None = None) -> int:
        """Non-zeros at masked positions over all outputs (:meth:`StemOutput.masked_nonzeros`)."""
        return sum(o.masked_nonzeros(sample) for o in self.outputs)


def stem_stage_outputs(
    mae: SpikformerMAE, x: torch.Tensor, *, generator: torch.Generator, what: str = "stage"
) -> StemActivity:
    """Run ``loss, pred, mask = mae(x, generator=generator)`` once, without gradients, and
    record what the SCS stem computes, through forward hooks (the model is not changed).

    ``x [B, C, H, W]`` (images, repeated over ``T``) or ``[B, T, C, H, W]`` (event frames),
    on the model's device. ``what``:

    - ``"stage"``: each SCS stage's output, ``[T, B, C_i, H / 2^(i+1), W / 2^(i+1)]``;
    - ``"unit"``: the spikes of each stage's three conv + BN + LIF units (``down``, ``fc1``,
      ``fc2``);
    - ``"bn"``: each unit's sparse BatchNorm output (its LIF's input current).

    The forward runs on the reference path whatever the model's backend (inside
    :func:`evformer.models.step_states`, where every fused layer falls back to it; each
    neuron starts from rest as in a plain forward): there every stage computes a
    full-resolution map with explicit zeros at masked positions, while the fused CPU stem
    carries only the visible positions as rows and has no masked position to look at. The
    two paths compute the same function (``tests/test_mae.py`` holds them to each other).
    The model runs in its current mode: call ``mae.eval()`` first for running BatchNorm
    statistics (in training mode the forward updates them, as any forward does). Outputs are
    copied to the CPU as float32; each comes with the token mask upsampled to its
    resolution, so :meth:`StemActivity.masked_nonzeros` counts what leaked (0 by design).
    """
    if not isinstance(mae, SpikformerMAE):
        raise TypeError(f"mae must be a SpikformerMAE, got {type(mae).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, C, H, W] or [B, T, C, H, W], got {type(x)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if what not in STEM_OUTPUTS:
        raise ValueError(f"what must be one of {STEM_OUTPUTS}, got {what!r}")

    targets: list[tuple[str, torch.nn.Module]] = []
    for i, stage in enumerate(mae.encoder.patch_embed.stages):
        if what == "stage":
            targets.append((f"stage {i + 1}", stage))
        else:
            for unit in _UNITS:
                module = getattr(stage, unit)
                targets.append((f"stage {i + 1} {unit}", module.lif if what == "bn" else module))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in targets}

    def keep(name: str, t: torch.Tensor) -> None:
        seen[name].append(t.detach().to("cpu", torch.float32))

    handles = []
    try:
        for name, module in targets:
            if what == "bn":  # the LIF's input is the BatchNorm output
                hook = (lambda n: lambda mod, args: keep(n, args[0]))(name)
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = (lambda n: lambda mod, args, out: keep(n, out))(name)
                handles.append(module.register_forward_hook(hook))
        with torch.no_grad(), step_states():
            loss, pred, mask = mae(x, generator=generator)
    finally:
        for handle in handles:
            handle.remove()

    missing = [name for name, got in seen.items() if len(got) != 1]
    if missing:
        raise RuntimeError(
            f"the stem modules {missing} were not called exactly once by SpikformerMAE.forward; "
            "stem_stage_outputs needs the SCS stages (and units) to run as modules"
        )
    H, W = x.shape[-2:]
    p = mae.patch_size
    h, w = H // p, W // p
    mask = mask.detach().to("cpu", torch.float32)
    token_masked = mask.view(-1, h, w)
    outputs = []
    for name, _ in targets:
        out = seen[name][0]
        factor = out.shape[-2] // h
        if out.dim() != 5 or factor * h != out.shape[-2] or factor * w != out.shape[-1]:
            raise RuntimeError(
                f"{name}: output {tuple(out.shape)} is not [T, B, C, H', W'] on a multiple of "
                f"the {h}x{w} token grid"
            )
        masked = upsample_mask(token_masked, factor).numpy() > 0
        outputs.append(StemOutput(name, out.numpy(), masked, factor))
    return StemActivity(
        outputs=tuple(outputs),
        what=what,
        loss=float(loss),
        pred=pred.detach().to("cpu", torch.float32).numpy(),
        mask=mask.numpy(),
        grid=(h, w),
        patch_size=p,
    )


def stem_activity_figure(activity: StemActivity, *, sample: int = 0) -> Figure:
    """Per recorded stem output (one column each, from :func:`stem_stage_outputs`): its
    activity map for ``sample`` (mean ``|output|`` over steps and channels,
    :meth:`StemOutput.activity`) above the token mask upsampled to its resolution (1 =
    masked, dark), and the number of non-zeros at masked positions under it -- 0 wherever
    the masked stem works as specified. The figure title gives the total."""
    if not isinstance(activity, StemActivity):
        raise TypeError(
            f"activity must be a StemActivity (stem_stage_outputs), got {type(activity).__name__}"
        )
    B = activity.mask.shape[0]
    if not isinstance(sample, (int, np.integer)) or not 0 <= sample < B:
        raise ValueError(f"sample must be an index in [0, {B}), got {sample!r}")
    n = len(activity.outputs)
    fig = Figure(figsize=(2.3 * n + 0.6, 5.2), layout="constrained")
    axes = np.asarray(fig.subplots(2, n, squeeze=False))
    for j, o in enumerate(activity.outputs):
        act = o.activity()[sample]
        im = axes[0, j].imshow(
            act, cmap="magma", vmin=0.0, vmax=max(float(act.max()), 1e-12), interpolation="nearest"
        )
        fig.colorbar(im, ax=axes[0, j], shrink=0.8)
        axes[1, j].imshow(
            o.masked[sample].astype(np.float64),
            cmap="gray_r",
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        Hs, Ws = o.masked.shape[1:]
        axes[0, j].set_title(f"{o.name}\n{Hs}x{Ws}, mask x{o.factor}", fontsize=8)
        axes[1, j].set_xlabel(
            f"{o.masked_nonzeros(sample)} non-zeros\nat masked positions", fontsize=8
        )
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel(_ACTIVITY_LABEL[activity.what], fontsize=8)
    axes[1, 0].set_ylabel("mask (dark = masked)", fontsize=8)
    fig.suptitle(
        f"sample {sample}: {activity.masked_nonzeros(sample)} non-zeros at masked positions in "
        f"{n} stem outputs ({activity.what})",
        fontsize=9,
    )
    return fig
