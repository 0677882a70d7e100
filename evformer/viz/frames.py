"""Event frames as pictures: one RGB image per time step, grids of them, and GIF animations.

Frames are ``[T, 2, H, W]`` per-pixel counts as :func:`evformer.events.to_frames` gives
them (channel 0 = OFF, channel 1 = ON), or one channel, ``[T, 1, H, W]`` / ``[T, H, W]``
(spikes, a single polarity, any non-negative map), as NumPy arrays or torch tensors.

:func:`frames_to_rgb` is the one colour mapping: a value ``v`` becomes
``clip(v / vmax, 0, 1)``, ON counts are painted in :data:`ON_COLOR`, OFF counts in
:data:`OFF_COLOR` (added, so a pixel with both is their mix) on black, one channel in grey.
``vmax`` is ONE number for all time steps, so a brighter frame really holds more events.
:func:`frame_grid_figure` and :func:`save_frames_gif` both use it. The figures are built on
``matplotlib.figure.Figure`` (no pyplot state), as :mod:`evformer.viz.plots`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.animation import PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from evformer._atomic import atomic_write_bytes

__all__ = ["OFF_COLOR", "ON_COLOR", "frame_grid_figure", "frames_to_rgb", "save_frames_gif"]

# The polarity colours of every evformer.viz figure (RGB in [0, 1]); the same as the event
# panels of evformer.viz.reconstruction. Pure red and blue do not share a channel, so an
# RGB pixel of frames_to_rgb gives back both counts.
ON_COLOR: tuple[float, float, float] = (1.0, 0.0, 0.0)
OFF_COLOR: tuple[float, float, float] = (0.0, 0.0, 1.0)


def _to_numpy(a, name: str) -> np.ndarray:
    """A NumPy view/copy of an array or (duck-typed, so torch is never imported) tensor."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor
        a = a.detach().cpu()
        if a.dtype.is_complex:
            raise TypeError(f"{name}: expected real values, got {a.dtype}")
        try:
            a = a.numpy()
        except TypeError:  # dtypes NumPy lacks, e.g. bfloat16
            a = a.float().numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:  # ragged nested lists and the like
        raise TypeError(f"{name}: expected an array or tensor of frames, got {type(a)}") from e
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name}: expected integer or real values, got dtype {arr.dtype}")
    return arr


def _one_row(frames, name: str) -> np.ndarray:
    """``frames`` as ``[T, C, H, W]`` with C in (1, 2), checked finite and non-negative."""
    a = _to_numpy(frames, name)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 2):
        raise ValueError(
            f"{name}: expected frames [T, 2, H, W] (channel 0 = OFF, 1 = ON), [T, 1, H, W] or "
            f"[T, H, W], got shape {tuple(a.shape)}"
        )
    if min(a.shape) == 0:
        raise ValueError(f"{name}: expected at least one frame of at least 1x1, got {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ValueError(f"{name}: frames hold NaN or infinite values")
    if a.min() < 0:
        raise ValueError(
            f"{name}: expected non-negative values (counts, spikes), found {a.min()}; "
            f"show a signed map, e.g. ON - OFF, as two channels instead"
        )
    return a


def _check_vmax(vmax, name: str = "vmax") -> float | None:
    if vmax is None:
        return None
    if isinstance(vmax, bool) or not isinstance(vmax, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a positive number or None, got {type(vmax).__name__}")
    if not (math.isfinite(vmax) and vmax > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {vmax}")
    return float(vmax)


def _auto_vmax(arrays: Sequence[np.ndarray]) -> float:
    """The largest value over ``arrays``; 1 when all are zero (the frames are then black)."""
    hi = max(float(a.max()) for a in arrays)
    return hi if hi > 0 else 1.0


def _rgb(a: np.ndarray, vmax: float) -> np.ndarray:
    v = np.clip(a.astype(np.float64) / vmax, 0.0, 1.0)  # [T, C, H, W]
    if a.shape[1] == 1:
        return np.repeat(v[:, 0, :, :, None], 3, axis=-1)
    on = v[:, 1, :, :, None] * np.asarray(ON_COLOR)
    off = v[:, 0, :, :, None] * np.asarray(OFF_COLOR)
    return np.clip(on + off, 0.0, 1.0)


def frames_to_rgb(frames, *, vmax: float | None = None) -> np.ndarray:
    """Colour frames for display: float64 RGB ``[T, H, W, 3]`` in [0, 1].

    ``frames``: ``[T, 2, H, W]`` (channel 0 = OFF, 1 = ON), ``[T, 1, H, W]`` or
    ``[T, H, W]``, non-negative (NumPy or torch; bool spikes count as 0/1). Each value
    becomes ``clip(v / vmax, 0, 1)``; two channels are painted ``on * ON_COLOR + off *
    OFF_COLOR`` on black, one channel in grey. ``vmax`` (in the frames' unit, e.g. events
    per pixel) is one scale for all T frames; ``None`` takes the largest value of all of
    them (1 if all are zero), so values compare across time steps.
    """
    a = _one_row(frames, "frames")
    vmax = _check_vmax(vmax)
    return _rgb(a, vmax if vmax is not None else _auto_vmax([a]))


def _rows(frames) -> list[np.ndarray]:
    """One ``[T, C, H, W]`` array per figure row."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames: expected at least one row, got an empty sequence")
        return [_one_row(f, f"frames[{i}]") for i, f in enumerate(frames)]
    a = _to_numpy(frames, "frames")
    if a.ndim == 5:
        if a.shape[0] == 0:
            raise ValueError(f"frames: expected at least one row, got shape {a.shape}")
        return [_one_row(r, f"frames[{i}]") for i, r in enumerate(a)]
    return [_one_row(a, "frames")]


def frame_grid_figure(
    frames,
    *,
    row_labels: Sequence[str] | None = None,
    time_labels: Sequence[str] | None = None,
    vmax: float | None = None,
    scale: Literal["figure", "row"] = "figure",
    unit: str = "events per pixel",
    title: str | None = None,
    panel_size: float = 1.3,
) -> Figure:
    """A grid of frames: one row per sample, one column per time step.

    ``frames`` is one sample, ``[T, 2, H, W]`` (channel 0 = OFF, 1 = ON; colours of
    :func:`frames_to_rgb`), ``[T, 1, H, W]`` or ``[T, H, W]`` (grey); or several,
    ``[N, T, C, H, W]``, or a list of such per-row arrays with the same T (their H, W and
    C may differ, e.g. a cropped or downsampled copy beside the original). NumPy or torch.

    Brightness is ``clip(v / vmax, 0, 1)``. With ``scale="figure"`` (default) every panel
    shares one ``vmax`` (given, or the largest value in the figure), so time steps and rows
    compare directly; ``scale="row"`` gives each row its own largest value (stated in the
    row label) for rows whose counts differ by orders of magnitude. The scale and ``unit``
    are written in the figure title. ``row_labels`` names the N rows, ``time_labels`` the
    T columns (default ``t = 0 .. T-1``); ``panel_size`` is the panel width in inches.
    All panels are images in one axes, ``fig.axes[0].images[row * T + t]``, each fitted to
    an equal cell with its aspect kept.
    """
    rows = _rows(frames)
    n, T = len(rows), rows[0].shape[0]
    for i, r in enumerate(rows):
        if r.shape[0] != T:
            raise ValueError(
                f"frames: every row needs the same number of time steps; row 0 has {T}, "
                f"row {i} has {r.shape[0]}"
            )
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"row_labels: expected {n} labels (one per row), got {len(row_labels)}")
    if time_labels is not None and len(time_labels) != T:
        raise ValueError(
            f"time_labels: expected {T} labels (one per frame), got {len(time_labels)}"
        )
    if scale not in ("figure", "row"):
        raise ValueError(f"scale: expected 'figure' or 'row', got {scale!r}")
    vmax = _check_vmax(vmax)
    if vmax is not None and scale == "row":
        raise ValueError("vmax: a fixed vmax is one scale for the figure; drop it or scale='row'")
    if not (isinstance(panel_size, (int, float)) and panel_size > 0):
        raise ValueError(f"panel_size: expected a positive width in inches, got {panel_size!r}")

    if scale == "figure":
        shared = vmax if vmax is not None else _auto_vmax(rows)
        scales = [shared] * n
        note = f"brightness 0 to {shared:g} {unit}, one scale for all panels"
    else:
        scales = [_auto_vmax([r]) for r in rows]
        note = f"brightness 0 to each row's max ({unit})"

    # All panels are images in ONE axes, each in a cell 1 wide and `cell_h` tall (data
    # units), fitted to the cell with its aspect kept: a hundred-odd axes would make the
    # figure several times slower to lay out and draw.
    cell_h = max(r.shape[2] / r.shape[3] for r in rows)  # tallest H / W
    gap = 0.06
    fig = Figure(
        figsize=(T * panel_size + 1.2, n * panel_size * cell_h + 1.0), layout="constrained"
    )
    ax = fig.subplots()
    for i, (r, s) in enumerate(zip(rows, scales)):
        rgb = _rgb(r, s)
        h, w = r.shape[2:]
        px = min(1.0 / w, cell_h / h)  # data units per pixel
        for k in range(T):
            x0 = k * (1.0 + gap) + (1.0 - w * px) / 2
            y0 = i * (cell_h + gap) + (cell_h - h * px) / 2
            # extent (left, right, bottom, top); the y axis is inverted, row 0 on top
            extent = (x0, x0 + w * px, y0 + h * px, y0)
            ax.imshow(rgb[k], extent=extent, interpolation="nearest")
    ax.set_xlim(-gap / 2, T * (1.0 + gap) - gap / 2)
    ax.set_ylim(n * (cell_h + gap) - gap / 2, -gap / 2)
    ax.set_aspect("equal")
    ax.xaxis.tick_top()
    ax.set_xticks(
        [k * (1.0 + gap) + 0.5 for k in range(T)],
        list(time_labels) if time_labels is not None else [f"t = {k}" for k in range(T)],
        fontsize=8,
    )
    labels = []
    for i, s in enumerate(scales):
        label = row_labels[i] if row_labels is not None else (f"{i}" if n > 1 else "")
        if scale == "row":
            label = f"{label}\nmax {s:g}" if label else f"max {s:g}"
        labels.append(label)
    ax.set_yticks([i * (cell_h + gap) + cell_h / 2 for i in range(n)], labels, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9)
    if any(r.shape[1] == 2 for r in rows):
        handles = [
            Patch(facecolor=ON_COLOR, label="ON"),
            Patch(facecolor=OFF_COLOR, label="OFF"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False, fontsize=8)
    return fig


def save_frames_gif(
    frames,
    path: str | os.PathLike,
    *,
    fps: float = 8.0,
    vmax: float | None = None,
    zoom: int | None = None,
    label: bool = True,
) -> Path:
    """Write frames as an animated GIF (looping), one GIF frame per time step; returns ``path``.

    ``frames``: ``[T, 2, H, W]``, ``[T, 1, H, W]`` or ``[T, H, W]``, coloured by
    :func:`frames_to_rgb` with one ``vmax`` for all T. Each pixel becomes a ``zoom`` x
    ``zoom`` block (default: the smallest integer that makes the longer side >= 256 px),
    so the GIF is ``(W * zoom) x (H * zoom)`` pixels; ``label`` writes ``k/T`` in the
    corner. Played at ``fps`` frames per second (GIF stores whole centiseconds, so the
    delay is rounded). Pillow merges identical consecutive frames into one longer frame,
    so such a GIF holds fewer than T frames but plays for the same time.

    Rendered with matplotlib's ``PillowWriter``; the file is written under a temporary
    name in the target's folder and renamed (``evformer._atomic``), so ``path`` is never
    left half written.
    """
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"path: expected a file name ending in .gif, got {str(path)!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 100:
        raise ValueError(f"fps: expected frames per second in (0, 100], got {fps!r}")
    rgb = frames_to_rgb(frames, vmax=vmax)  # [T, H, W, 3]
    T, H, W, _ = rgb.shape
    if zoom is None:
        zoom = max(1, math.ceil(256 / max(H, W)))
    if isinstance(zoom, bool) or not isinstance(zoom, (int, np.integer)) or zoom < 1:
        raise ValueError(f"zoom: expected an integer >= 1, got {zoom!r}")

    dpi = 100
    # + 1e-3 px: PillowWriter truncates size * dpi to int, and e.g. 0.29 * 100 < 29
    fig = Figure(figsize=((W * zoom + 1e-3) / dpi, (H * zoom + 1e-3) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    im = ax.imshow(rgb[0], interpolation="nearest", aspect="auto")
    text = None
    if label:
        text = ax.text(
            0.02, 0.98, "", transform=ax.transAxes, ha="left", va="top", color="white", fontsize=7
        )
    writer = PillowWriter(fps=fps)
    # Pillow picks the format from the file name: the writer gets a .gif in a scratch
    # folder, whose bytes then replace ``path`` in one atomic write
    with tempfile.TemporaryDirectory(prefix="evformer-gif-") as scratch:
        gif_tmp = Path(scratch) / "frames.gif"
        with writer.saving(fig, gif_tmp, dpi=dpi):
            for k in range(T):
                im.set_data(rgb[k])
                if text is not None:
                    text.set_text(f"{k + 1}/{T}")
                writer.grab_frame()
        atomic_write_bytes(path, gif_tmp.read_bytes())
    return path
