"""Event streams as figures: a 3-D x-y-t scatter, the event rate over time, per-pixel counts.

Input is what :mod:`evformer.events` accepts: a structured array of ``EVENT_DTYPE``
(``t`` µs, ``x`` column, ``y`` row, ``p`` 0 = OFF / 1 = ON) or a mapping of the four
columns ``{"t", "x", "y", "p"}``. Time axes are in ms from the stream's first event.
ON and OFF are drawn in :data:`~evformer.viz.frames.ON_COLOR` and
:data:`~evformer.viz.frames.OFF_COLOR`, as in every evformer.viz figure. Figures are
built on ``matplotlib.figure.Figure`` (no pyplot state) and returned unsaved
(:func:`evformer.viz.save_figure` writes one).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from matplotlib.figure import Figure

from evformer.events.core import Columns, columns
from evformer.viz.frames import OFF_COLOR, ON_COLOR

__all__ = ["count_map_figure", "event_rate_figure", "event_scatter_figure"]

Events = np.ndarray | Mapping[str, np.ndarray]


def _columns(events: Events) -> Columns:
    """The four columns of ``events``, polarity checked to be 0/1."""
    cols = columns(events, name="events")
    if cols.n_events and (int(cols.p.min()) < 0 or int(cols.p.max()) > 1):
        raise ValueError(
            f"events: polarity p must be 0 (OFF) or 1 (ON), found values in "
            f"[{int(cols.p.min())}, {int(cols.p.max())}]"
        )
    return cols


def _positive_int(value, name: str, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer{unit}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer{unit}, got {value}")
    return int(value)


def _polarity_share(p: np.ndarray) -> str:
    return f"{np.count_nonzero(p) / p.shape[0]:.1%} ON" if p.shape[0] else "no events"


def event_scatter_figure(
    events: Events,
    *,
    max_events: int = 20_000,
    rng: np.random.Generator | None = None,
    marker_size: float = 1.0,
    title: str | None = None,
) -> Figure:
    """The stream as points in 3-D: x (px) across, time (ms from the first event) in depth,
    y (px) up the vertical axis with row 0 at the top, as in an image. ON and OFF events are
    two point clouds in the polarity colours (no depth shading, so colours stay fixed).

    With more than ``max_events`` events a uniform random subset of ``max_events`` is drawn
    without replacement from ``rng`` (default ``np.random.default_rng(0)``, so the same
    call draws the same figure) and kept in time order; the title says how many of how many
    are shown. Returns a figure with one 3-D axes whose ``collections`` are (ON, OFF).
    """
    cols = _columns(events)
    max_events = _positive_int(max_events, "max_events", " (events to draw)")
    if rng is None:
        rng = np.random.default_rng(0)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng: expected a numpy.random.Generator (e.g. np.random.default_rng(seed)) or "
            f"None, got {type(rng).__name__}"
        )
    n = cols.n_events
    if n > max_events:
        idx = np.sort(rng.choice(n, size=max_events, replace=False))
        shown = f"{max_events:,} of {n:,} events shown (random subset)"
    else:
        idx = np.arange(n)
        shown = f"all {n:,} events shown" if n else "no events"
    t0 = int(cols.t.min()) if n else 0
    t_ms = (cols.t[idx].astype(np.int64) - t0) / 1e3
    x = cols.x[idx].astype(np.float64)
    y = cols.y[idx].astype(np.float64)
    on = cols.p[idx] == 1

    fig = Figure(figsize=(7.0, 5.5), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    for mask, color, name in ((on, ON_COLOR, "ON"), (~on, OFF_COLOR, "OFF")):
        ax.scatter(
            x[mask],
            t_ms[mask],
            y[mask],
            s=marker_size,
            color=color,
            depthshade=False,
            linewidths=0,
            label=name,
        )
    ax.set(xlabel="x (px)", ylabel="time (ms)", zlabel="y (px)")
    ax.invert_zaxis()  # image rows grow downwards
    ax.legend(loc="upper left", markerscale=6)
    head = f"{title}\n" if title else ""
    share = f", {_polarity_share(cols.p)}" if n else ""
    ax.set_title(f"{head}{shown}{share}", fontsize=9)
    return fig


def event_rate_figure(events: Events, *, bin_us: int = 10_000, title: str | None = None) -> Figure:
    """ON and OFF event rates (events per second) against time (ms from the first event).

    Time is cut into bins of ``bin_us`` µs starting at the first event,
    ``[t0 + k * bin_us, t0 + (k + 1) * bin_us)``, as many as reach the last event; the
    rate of a bin is its count divided by ``bin_us``. The last bin may run past the end of
    the stream, so its rate can read low. Drawn as two step curves (``ax.patches`` holds
    the ON then the OFF ``StepPatch``). An empty stream has no time axis: ``ValueError``.
    """
    cols = _columns(events)
    bin_us = _positive_int(bin_us, "bin_us", " (µs)")
    if cols.n_events == 0:
        raise ValueError("events: the stream is empty, there is no rate to plot")
    t = cols.t.astype(np.int64)
    t0 = int(t.min())
    k = (t - t0) // bin_us  # bin of each event
    n_bins = int(k.max()) + 1
    edges_ms = np.arange(n_bins + 1) * (bin_us / 1e3)
    on = cols.p == 1

    fig = Figure(figsize=(8.0, 3.2), layout="constrained")
    ax = fig.subplots()
    for mask, color, name in ((on, ON_COLOR, "ON"), (~on, OFF_COLOR, "OFF")):
        counts = np.bincount(k[mask], minlength=n_bins)
        ax.stairs(counts / (bin_us * 1e-6), edges_ms, color=color, label=name, linewidth=1.2)
    ax.set(
        xlabel="time from first event (ms)",
        ylabel="events per second",
        xlim=(0.0, float(edges_ms[-1])),
    )
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend()
    head = f"{title}: " if title else ""
    ax.set_title(
        f"{head}event rate in {bin_us / 1e3:g} ms bins ({cols.n_events:,} events, "
        f"{_polarity_share(cols.p)})",
        fontsize=9,
    )
    return fig


def _sensor(sensor_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = sensor_size
    except (TypeError, ValueError):
        raise TypeError(
            f"sensor_size: expected (height, width), two positive integers, got {sensor_size!r}"
        ) from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(
                f"sensor_size: expected (height, width), two positive integers, got "
                f"{tuple(sensor_size)!r} (tonic's (W, H, P) order is not accepted)"
            )
    return int(h), int(w)


def count_map_figure(
    events: Events,
    *,
    sensor_size: Sequence[int] = (128, 128),
    combined: Literal["sum", "difference"] = "sum",
    title: str | None = None,
) -> Figure:
    """Per-pixel event counts: ON, OFF, and their sum (all events) or difference (ON - OFF).

    ``sensor_size`` is ``(height, width)`` in pixels, the order of
    :mod:`evformer.events.augment` (tonic's ``sensor_size`` is ``(W, H, P)``); every event
    must lie on it, ``0 <= y < height`` and ``0 <= x < width``. The ON and OFF maps share
    one colour scale (0 to the larger of their maxima) so they compare directly; the
    difference map is symmetric around 0 (red = more ON, blue = more OFF). Each panel has
    a colour bar in events per pixel. ``fig.axes[:3]`` are the three maps, row ``y``,
    column ``x``, origin top left as in an image.
    """
    cols = _columns(events)
    h, w = _sensor(sensor_size)
    if combined not in ("sum", "difference"):
        raise ValueError(f"combined: expected 'sum' or 'difference', got {combined!r}")
    x, y = cols.x.astype(np.int64), cols.y.astype(np.int64)
    if cols.n_events:
        xmin, xmax, ymin, ymax = int(x.min()), int(x.max()), int(y.min()), int(y.max())
        if xmin < 0 or ymin < 0 or xmax >= w or ymax >= h:
            raise ValueError(
                f"sensor_size: events fall outside (height={h}, width={w}): x in [{xmin}, "
                f"{xmax}], y in [{ymin}, {ymax}]; pass the (height, width) the stream has"
            )
    on = cols.p == 1
    # bincount over flat pixel indices: one pass per polarity
    flat = y * w + x
    on_map = np.bincount(flat[on], minlength=h * w).reshape(h, w)
    off_map = np.bincount(flat[~on], minlength=h * w).reshape(h, w)
    hi = max(int(on_map.max()), int(off_map.max()), 1)

    fig = Figure(figsize=(13.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        (on_map, "Reds", 0, hi, "ON events per pixel"),
        (off_map, "Blues", 0, hi, "OFF events per pixel"),
    ]
    if combined == "sum":
        both = on_map + off_map
        panels.append((both, "magma", 0, max(int(both.max()), 1), "all events per pixel"))
    else:
        diff = on_map - off_map
        lim = max(int(np.abs(diff).max()), 1)
        panels.append((diff, "bwr", -lim, lim, "ON - OFF events per pixel"))
    for ax, (img, cmap, lo, top, name) in zip(axes, panels):
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=top, interpolation="nearest")
        ax.set(title=name, xlabel="x (px)", ylabel="y (px)")
        fig.colorbar(im, ax=ax, shrink=0.85, label="events")
    head = f"{title}: " if title else ""
    fig.suptitle(
        f"{head}{cols.n_events:,} events on {h}x{w} (height x width), {_polarity_share(cols.p)}",
        fontsize=10,
    )
    return fig
