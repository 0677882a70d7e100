"""Event-stream and frame figures (evformer.viz.events, evformer.viz.frames): the plotted data
read back from the artists and compared with plain NumPy (histogram counts per bin,
``np.add.at`` pixel counts, hand-computed RGB values), the subsample drawn from the given
generator, one colour scale over all time steps, the GIF read back with PIL, and errors that
name the bad argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evformer.events import from_columns
from evformer.viz import (
    OFF_COLOR,
    ON_COLOR,
    count_map_figure,
    event_rate_figure,
    event_scatter_figure,
    frame_grid_figure,
    frames_to_rgb,
    save_frames_gif,
)

H, W = 5, 7  # a non-square sensor catches (height, width) mix-ups


def _stream(n: int = 400, seed: int = 0, t0: int = 12_345, span_us: int = 50_000):
    """A sorted random stream on the H x W sensor that does not start at t = 0."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(t0, t0 + span_us, n))
    t[0] = t0
    return from_columns(t, rng.integers(0, W, n), rng.integers(0, H, n), rng.integers(0, 2, n))


# ----------------------------------------------------------------------------- rate


def test_event_rate_matches_numpy_histogram():
    ev = _stream()
    bin_us = 3_000
    fig = event_rate_figure(ev, bin_us=bin_us)
    ax = fig.axes[0]
    on, off = ax.patches[0].get_data(), ax.patches[1].get_data()
    t0, t_last = int(ev["t"][0]), int(ev["t"][-1])
    n_bins = (t_last - t0) // bin_us + 1
    edges_us = t0 + bin_us * np.arange(n_bins + 1)
    for data, pol in ((on, 1), (off, 0)):
        counts, _ = np.histogram(ev["t"][ev["p"] == pol], bins=edges_us)
        np.testing.assert_allclose(data.values, counts / (bin_us / 1e6))
        np.testing.assert_allclose(data.edges, (edges_us - t0) / 1e3)
    assert tuple(ax.patches[0].get_edgecolor()[:3]) == ON_COLOR
    assert tuple(ax.patches[1].get_edgecolor()[:3]) == OFF_COLOR
    assert ax.get_ylabel() == "events per second"


def test_event_rate_by_hand():
    # bins of 1 ms from t0 = 100 µs: [100, 1100) holds 3 events (2 ON), [1100, 2100) one OFF
    ev = from_columns([100, 150, 1099, 1100], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0])
    ax = event_rate_figure({f: ev[f] for f in "txyp"}, bin_us=1000).axes[0]
    np.testing.assert_array_equal(ax.patches[0].get_data().values, [2000.0, 0.0])
    np.testing.assert_array_equal(ax.patches[1].get_data().values, [1000.0, 1000.0])
    np.testing.assert_array_equal(ax.patches[0].get_data().edges, [0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------- count maps


@pytest.mark.parametrize("combined", ["sum", "difference"])
def test_count_maps_match_add_at(combined):
    ev = _stream(seed=1)
    fig = count_map_figure(ev, sensor_size=(H, W), combined=combined)
    maps = {}
    for pol in (0, 1):
        m = np.zeros((H, W), dtype=np.int64)
        sel = ev["p"] == pol
        np.add.at(m, (ev["y"][sel], ev["x"][sel]), 1)
        maps[pol] = m
    expected = maps[1] + maps[0] if combined == "sum" else maps[1] - maps[0]
    on_ax, off_ax, both_ax = fig.axes[:3]
    np.testing.assert_array_equal(on_ax.images[0].get_array(), maps[1])
    np.testing.assert_array_equal(off_ax.images[0].get_array(), maps[0])
    np.testing.assert_array_equal(both_ax.images[0].get_array(), expected)
    # ON and OFF share one colour scale; the difference is symmetric around 0
    hi = max(maps[0].max(), maps[1].max())
    assert on_ax.images[0].get_clim() == off_ax.images[0].get_clim() == (0, hi)
    lo3, hi3 = both_ax.images[0].get_clim()
    if combined == "difference":
        assert lo3 == -hi3 == -np.abs(expected).max()
    assert len(fig.axes) == 6  # three maps, three colour bars


def test_count_map_by_hand():
    ev = from_columns([0, 1, 2], [6, 6, 0], [4, 4, 0], [1, 1, 0])  # x = 6, y = 4: bottom right
    fig = count_map_figure(ev, sensor_size=(H, W))
    on, off, both = (ax.images[0].get_array() for ax in fig.axes[:3])
    assert on[4, 6] == 2 and on.sum() == 2
    assert off[0, 0] == 1 and off.sum() == 1
    assert both.sum() == 3
    # ON (max 2) and OFF (max 1) share the scale 0..2
    clims = [ax.images[0].get_clim() for ax in fig.axes[:2]]
    assert clims == [(0, 2), (0, 2)]


# ----------------------------------------------------------------------------- scatter


def _scatter_points(fig):
    """(x, t_ms, y) rows of the ON and OFF point clouds of an event scatter."""
    ax = fig.axes[0]
    out = []
    for coll in ax.collections[:2]:
        xs, ts, ys = (np.asarray(v, dtype=float) for v in coll._offsets3d)
        out.append(np.stack([xs, ts, ys], axis=1))
    return out


def test_scatter_shows_every_event_below_the_limit():
    ev = _stream(n=50)
    fig = event_scatter_figure(ev, max_events=50)
    on, off = _scatter_points(fig)
    t_ms = (ev["t"] - ev["t"][0]) / 1e3
    for pts, pol in ((on, 1), (off, 0)):
        sel = ev["p"] == pol
        np.testing.assert_array_equal(pts, np.stack([ev["x"][sel], t_ms[sel], ev["y"][sel]], 1))
    assert "all 50 events" in fig.axes[0].get_title()
    assert tuple(fig.axes[0].collections[0].get_facecolor()[0][:3]) == ON_COLOR
    assert tuple(fig.axes[0].collections[1].get_facecolor()[0][:3]) == OFF_COLOR


def test_scatter_subsample_is_reproducible_and_counted():
    ev = _stream(n=500)
    a = _scatter_points(event_scatter_figure(ev, max_events=120, rng=np.random.default_rng(3)))
    b = _scatter_points(event_scatter_figure(ev, max_events=120, rng=np.random.default_rng(3)))
    c = _scatter_points(event_scatter_figure(ev, max_events=120, rng=np.random.default_rng(4)))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not all(u.shape == v.shape and np.array_equal(u, v) for u, v in zip(a, c))
    assert len(a[0]) + len(a[1]) == 120
    # the points are the events rng.choice(N, 120, replace=False) draws, each shown once
    idx = np.sort(np.random.default_rng(3).choice(500, size=120, replace=False))
    sub = ev[idx]
    t_ms = (sub["t"] - ev["t"][0]) / 1e3
    for pts, pol in zip(a, (1, 0)):
        sel = sub["p"] == pol
        np.testing.assert_array_equal(pts, np.stack([sub["x"][sel], t_ms[sel], sub["y"][sel]], 1))
    title = event_scatter_figure(ev, max_events=120).axes[0].get_title()
    assert "120 of 500 events" in title
    # rng=None is a fixed seed: the same figure twice
    d = _scatter_points(event_scatter_figure(ev, max_events=120))
    e = _scatter_points(event_scatter_figure(ev, max_events=120))
    np.testing.assert_array_equal(np.concatenate(d), np.concatenate(e))


# ----------------------------------------------------------------------------- frames


def _hand_frames():
    """[T=2, 2, 2, 3] counts with a maximum of 4 in frame 0 and 1 in frame 1."""
    f = np.zeros((2, 2, 2, 3), dtype=np.int32)
    f[0, 1, 0, 0] = 4  # frame 0: ON 4 at (0, 0)
    f[0, 1, 1, 2] = 2  # ON 2 and OFF 1 at (1, 2)
    f[0, 0, 1, 2] = 1
    f[1, 0, 0, 1] = 1  # frame 1: OFF 1 at (0, 1)
    return f


def test_frames_to_rgb_by_hand():
    rgb = frames_to_rgb(_hand_frames())
    assert rgb.shape == (2, 2, 3, 3) and rgb.dtype == np.float64
    on, off = np.asarray(ON_COLOR), np.asarray(OFF_COLOR)
    expected = np.zeros((2, 2, 3, 3))
    expected[0, 0, 0] = 1.0 * on  # vmax = 4, the largest count of both frames
    expected[0, 1, 2] = 0.5 * on + 0.25 * off
    expected[1, 0, 1] = 0.25 * off  # frame 1 is not stretched to its own max
    np.testing.assert_allclose(rgb, expected)
    # an explicit vmax clips; torch input gives the same colours
    np.testing.assert_allclose(
        frames_to_rgb(torch.from_numpy(_hand_frames()), vmax=2.0)[0, 0, 0], on
    )
    np.testing.assert_allclose(frames_to_rgb(torch.from_numpy(_hand_frames())), expected)


def test_frames_to_rgb_one_channel_is_grey():
    spikes = np.zeros((3, 4, 4), dtype=bool)
    spikes[1, 2, 3] = True
    rgb = frames_to_rgb(spikes)
    np.testing.assert_array_equal(rgb[1, 2, 3], [1.0, 1.0, 1.0])
    assert rgb.sum() == 3.0
    np.testing.assert_array_equal(frames_to_rgb(spikes[:, None]), rgb)


def _panels(fig, n: int, T: int):
    """The panel images of a frame grid as rows of AxesImages, checked to sit in reading
    order: left to right within a row, rows top to bottom (y grows downwards)."""
    (ax,) = fig.axes
    images = ax.images
    assert len(images) == n * T
    grid = [images[i * T : (i + 1) * T] for i in range(n)]
    centre = np.array([[im.get_extent() for im in row] for row in grid])  # [n, T, 4]
    cx = (centre[..., 0] + centre[..., 1]) / 2
    cy = (centre[..., 2] + centre[..., 3]) / 2
    assert (np.diff(cx, axis=1) > 0).all() and (np.diff(cy, axis=0) > 0).all()
    assert ax.yaxis_inverted()
    return grid


def test_frame_grid_one_scale_over_time_and_rows():
    f = _hand_frames()
    fig = frame_grid_figure(f)
    (row,) = _panels(fig, 1, 2)
    np.testing.assert_allclose(row[0].get_array(), frames_to_rgb(f)[0])
    # frame 1 holds one count against the figure's max of 4: a quarter of full OFF
    np.testing.assert_allclose(row[1].get_array()[0, 1], 0.25 * np.asarray(OFF_COLOR))
    assert "0 to 4 events per pixel" in fig.get_suptitle()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["t = 0", "t = 1"]
    # two rows [N, T, 2, H, W]: the second row (max 8) sets the shared scale
    two = np.stack([f, 2 * f])
    fig = frame_grid_figure(two, row_labels=["once", "twice"], time_labels=["a", "b"])
    once, twice = _panels(fig, 2, 2)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["once", "twice"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]
    np.testing.assert_allclose(once[0].get_array()[0, 0], 0.5 * np.asarray(ON_COLOR))
    np.testing.assert_allclose(twice[0].get_array()[0, 0], np.asarray(ON_COLOR))
    assert "0 to 8 events" in fig.get_suptitle()
    # scale="row": each row to its own max
    fig = frame_grid_figure(two, scale="row")
    for row in _panels(fig, 2, 2):
        np.testing.assert_allclose(row[0].get_array()[0, 0], np.asarray(ON_COLOR))
    assert "max 8" in fig.axes[0].get_yticklabels()[1].get_text()


def test_frame_grid_rows_of_different_sizes_and_grey():
    f = _hand_frames()  # [2, 2, 2, 3]
    grey = torch.zeros(2, 4, 4)
    grey[0, 3, 3] = 2.0
    fig = frame_grid_figure([f, grey], row_labels=["events", "grey"], vmax=4)
    events_row, grey_row = _panels(fig, 2, 2)
    np.testing.assert_allclose(grey_row[0].get_array()[3, 3], [0.5, 0.5, 0.5])
    assert grey_row[0].get_array().shape == (4, 4, 3)
    assert events_row[0].get_array().shape == (2, 3, 3)
    assert "0 to 4 events" in fig.get_suptitle()
    # both fill their cell's width (1 data unit): a smaller frame is drawn larger, not tiny
    for im in (events_row[0], grey_row[0]):
        left, right, _, _ = im.get_extent()
        assert right - left == pytest.approx(1.0)


def test_save_frames_gif_read_back(tmp_path):
    T, h, w, zoom = 3, 6, 5, 8
    f = np.zeros((T, 2, h, w), dtype=np.int32)
    for k in range(T):  # a distinct ON pixel per frame, and one full OFF pixel in the corner
        f[k, 1, k, k] = 2
        f[k, 0, h - 1, w - 1] = 2
    out = save_frames_gif(f, tmp_path / "clip.gif", fps=5, zoom=zoom, label=False)
    assert out == tmp_path / "clip.gif"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.gif"]  # no temporary file left
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.n_frames == T
        assert im.size == (w * zoom, h * zoom)
        for k in range(T):
            im.seek(k)
            assert im.info["duration"] == 200
            px = np.asarray(im.convert("RGB"), dtype=int)
            centre = (k * zoom + zoom // 2, k * zoom + zoom // 2)
            np.testing.assert_allclose(px[centre], 255 * np.asarray(ON_COLOR), atol=8)
            corner = ((h - 1) * zoom + zoom // 2, (w - 1) * zoom + zoom // 2)
            np.testing.assert_allclose(px[corner], 255 * np.asarray(OFF_COLOR), atol=8)
            other = (k + 1) % T
            assert px[other * zoom + zoom // 2, other * zoom + zoom // 2].max() <= 8  # black


def test_save_frames_gif_default_zoom(tmp_path):
    out = save_frames_gif(np.random.default_rng(0).integers(0, 3, (2, 40, 30)), tmp_path / "a.gif")
    with Image.open(out) as im:
        assert im.size == (30 * 7, 40 * 7)  # smallest zoom with the long side >= 256 px


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (lambda: frames_to_rgb(np.zeros((2, 3, 4, 4))), ValueError, r"frames: .*\[T, 2, H, W\]"),
        (lambda: frames_to_rgb(np.zeros((4, 4))), ValueError, "frames: expected frames"),
        (lambda: frames_to_rgb(-np.ones((2, 4, 4))), ValueError, "frames: expected non-negative"),
        (lambda: frames_to_rgb(np.full((2, 4, 4), np.nan)), ValueError, "frames: .*NaN"),
        (lambda: frames_to_rgb(np.ones((2, 4, 4)), vmax=0), ValueError, "vmax"),
        (
            lambda: frame_grid_figure([np.ones((2, 4, 4)), np.ones((3, 4, 4))]),
            ValueError,
            "frames: .*row 1 has 3",
        ),
        (lambda: frame_grid_figure([np.ones((2, 1, 4, 4, 4))]), ValueError, r"frames\[0\]"),
        (
            lambda: frame_grid_figure(np.ones((2, 2, 2, 4, 4)), row_labels=["a"]),
            ValueError,
            "row_labels: expected 2",
        ),
        (lambda: frame_grid_figure(np.ones((2, 4, 4)), scale="col"), ValueError, "scale"),
        (
            lambda: frame_grid_figure(np.ones((2, 4, 4)), scale="row", vmax=2.0),
            ValueError,
            "vmax",
        ),
        (lambda: save_frames_gif(np.ones((2, 4, 4)), "/tmp/x.png"), ValueError, "path: .*gif"),
        (lambda: save_frames_gif(np.ones((2, 4, 4)), "/tmp/x.gif", fps=0), ValueError, "fps"),
        (
            lambda: save_frames_gif(np.ones((2, 4, 4)), "/tmp/x.gif", zoom=0),
            ValueError,
            "zoom",
        ),
        (lambda: event_rate_figure(_stream(), bin_us=0), ValueError, "bin_us"),
        (lambda: event_rate_figure(_stream(), bin_us=1.5), TypeError, "bin_us"),
        (lambda: event_rate_figure(_stream()[:0]), ValueError, "events: .*empty"),
        (lambda: event_scatter_figure(_stream(), rng=42), TypeError, "rng"),
        (lambda: event_scatter_figure(_stream(), max_events=0), ValueError, "max_events"),
        (lambda: event_scatter_figure(np.zeros(5)), ValueError, "events"),
        (lambda: event_scatter_figure([1, 2]), TypeError, "events"),
        (lambda: count_map_figure(_stream(), sensor_size=(W, H)), ValueError, "sensor_size"),
        (lambda: count_map_figure(_stream(), sensor_size=(5, 7, 2)), TypeError, "sensor_size"),
        (lambda: count_map_figure(_stream(), combined="ratio"), ValueError, "combined"),
        (
            lambda: count_map_figure(from_columns([0], [0], [0], [2])),
            ValueError,
            "polarity",
        ),
    ],
)
def test_bad_arguments_are_named(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_failed_gif_write_leaves_the_old_file(tmp_path, monkeypatch):
    """A writer that dies after the first frame: the old file stays, no temporary is left."""
    import evformer.viz.frames as frames_mod

    target = tmp_path / "keep.gif"
    target.write_bytes(b"old")
    grab = frames_mod.PillowWriter.grab_frame
    calls = []

    def failing_grab(self, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return grab(self, **kw)

    monkeypatch.setattr(frames_mod.PillowWriter, "grab_frame", failing_grab)
    with pytest.raises(RuntimeError, match="disk full"):
        save_frames_gif(np.ones((3, 4, 4)), target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gif"]
