"""Synthetic gestures: 11 classes of moving shapes, rendered and turned into DVS events.

In the spirit of DVS128 Gesture (a hand in front of a dark, static background), one
or two bright shapes ("hands") move over a low-contrast textured background that
shakes slightly (camera jitter). ``render_gesture`` draws the intensity frames,
``make_gesture_events`` runs them through ``evformer.events.simulate``.

Classes (``GESTURE_CLASSES``):

====  ================  =====================================================
  0   swipe_right       one shape crosses the whole view left -> right
  1   swipe_left        class 0 played backwards
  2   swipe_down        one shape crosses the whole view top -> bottom
  3   swipe_up          class 2 played backwards
  4   circle_cw         one full clockwise turn on a large circle, from the top
  5   circle_ccw        class 4 played backwards
  6   grow              a shape grows from nothing to ~3x its size, then fades
  7   shrink            class 6 played backwards
  8   clap              two shapes meet and part horizontally, 2-3 times
  9   drum              two shapes side by side beat up and down in anti-phase
 10   roll              two small shapes orbit each other quickly
====  ================  =====================================================

The pairs in ``DIRECTION_PAIRS`` are exact time reversals of each other: the same
random parameters give the same frames in reverse order. Each gesture also leaves
every pixel it touches as it found it (the shape enters and leaves the view, returns
to its start, or appears and fades), so each pixel sees as many ON as OFF crossings
in either direction. Summed over time, the two classes of a pair have the same
distribution; only the order of the frames (or the ON/OFF layout within a short time
window) tells them apart.

Randomised per sample: shape (disc, square, blob, ring), size, rotation and spin,
brightness, background level and texture, camera jitter, position, path, timing
(start, end, number of repetitions, speed) and sensor noise rate. Everything is
drawn from the ``rng`` passed in, in a fixed order, so a seed fixes the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evformer.events.simulator import simulate

# Bump when anything changes the samples a seed produces (dataset caches key on it).
GENERATOR_VERSION = 1

GESTURE_CLASSES: tuple[str, ...] = (
    "swipe_right",
    "swipe_left",
    "swipe_down",
    "swipe_up",
    "circle_cw",
    "circle_ccw",
    "grow",
    "shrink",
    "clap",
    "drum",
    "roll",
)

# (forward, backward): the backward class renders the forward one in reverse time.
DIRECTION_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5), (6, 7))
_REVERSED_OF = {b: a for a, b in DIRECTION_PAIRS}

SHAPES: tuple[str, ...] = ("disc", "square", "blob", "ring")

# Edge softness in pixels: shapes are anti-aliased so that sub-pixel motion changes
# intensity smoothly (a hard edge would make events arrive in frame-synchronous bursts).
_SOFT_PX = 1.5


@dataclass(frozen=True)
class _Shape:
    """One shape in units of its nominal radius ``r`` (pixels)."""

    kind: str
    r: float
    extent: float  # bounding radius / r
    ring_w: float  # ring width / r
    blob_offsets: np.ndarray  # [3, 2] disc centres / r
    blob_radii: np.ndarray  # [3] disc radii / r


def _draw_shape(rng: np.random.Generator, r: float) -> _Shape:
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    ring_w = float(rng.uniform(0.35, 0.55))
    ang = rng.uniform(0.0, 2 * np.pi, 3)
    dist = rng.uniform(0.2, 0.5, 3)
    offsets = np.stack([dist * np.cos(ang), dist * np.sin(ang)], axis=1)
    radii = rng.uniform(0.55, 0.8, 3)
    extent = {
        "disc": 1.0,
        "square": 0.85 * np.sqrt(2.0),
        "blob": float(np.max(dist + radii)),
        "ring": 1.0,
    }[kind]
    return _Shape(kind, float(r), float(extent), ring_w, offsets, radii)


def _signed_distance(
    shape: _Shape, dx: np.ndarray, dy: np.ndarray, scale: float, angle: float
) -> np.ndarray:
    """Signed distance in px (< 0 inside) of points (dx[None, :], dy[:, None]) from the centre."""
    r = shape.r * scale
    if shape.kind in ("disc", "ring"):
        d = np.sqrt(dx[None, :] ** 2 + dy[:, None] ** 2)
        if shape.kind == "disc":
            return d - r
        w = shape.ring_w * r
        return np.abs(d - (r - 0.5 * w)) - 0.5 * w
    c, s = np.cos(angle), np.sin(angle)
    # Rotate the sample points by -angle into the shape's frame.
    px = c * dx[None, :] + s * dy[:, None]
    py = -s * dx[None, :] + c * dy[:, None]
    if shape.kind == "square":
        h = 0.85 * r
        qx = np.abs(px) - h
        qy = np.abs(py) - h
        outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    # blob: union of three overlapping discs
    out = None
    for (ox, oy), rad in zip(shape.blob_offsets * r, shape.blob_radii * r):
        d = np.sqrt((px - ox) ** 2 + (py - oy) ** 2) - rad
        out = d if out is None else np.minimum(out, d)
    return out


@dataclass(frozen=True)
class _Track:
    """Per-frame state of one shape: centre (px), scale, rotation (rad), opacity, all [N]."""

    cx: np.ndarray
    cy: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    opacity: np.ndarray


def _progress(s: np.ndarray, s_a: float, s_b: float) -> np.ndarray:
    """0 before the active window [s_a, s_b], 1 after, linear within."""
    return np.clip((s - s_a) / (s_b - s_a), 0.0, 1.0)


def _tracks(
    label: int, s: np.ndarray, rng: np.random.Generator, height: int, width: int, shape: _Shape
) -> list[_Track]:
    """The shapes' tracks for class ``label`` at normalised times ``s`` in [0, 1]."""
    size = float(min(height, width))
    r = shape.r
    ext = shape.extent * r + 2 * _SOFT_PX  # fully outside the view beyond this
    ones = np.ones_like(s)
    angle0 = float(rng.uniform(0.0, 2 * np.pi))
    spin = float(rng.uniform(-1.5, 1.5))  # rad over the clip: the hand turns a little
    angle = angle0 + spin * s
    s_a = float(rng.uniform(0.0, 0.15))
    s_b = float(rng.uniform(0.8, 1.0))

    if label in (0, 2):  # swipe: enter on one side, leave on the other
        u = _progress(s, s_a, s_b)
        across = float(rng.uniform(0.3, 0.7))
        tilt = float(rng.uniform(-0.15, 0.15)) * size
        if label == 0:
            cx = -ext + u * (width + 2 * ext)
            cy = across * height + tilt * (u - 0.5)
        else:
            cy = -ext + u * (height + 2 * ext)
            cx = across * width + tilt * (u - 0.5)
        return [_Track(cx, cy, ones, angle, ones)]
    if label == 4:  # one full clockwise turn starting near the top
        u = _progress(s, s_a, s_b)
        cx0 = width * (0.5 + float(rng.uniform(-0.08, 0.08)))
        cy0 = height * (0.5 + float(rng.uniform(-0.08, 0.08)))
        rho = float(rng.uniform(0.22, 0.3)) * size
        # Image y points down, so increasing theta turns clockwise on screen.
        theta0 = -np.pi / 2 + float(rng.uniform(-np.pi / 3, np.pi / 3))
        theta = theta0 + 2 * np.pi * u
        return [_Track(cx0 + rho * np.cos(theta), cy0 + rho * np.sin(theta), ones, angle, ones)]
    if label == 6:  # grow from nothing, then fade out in place
        s_b = float(rng.uniform(0.7, 0.85))
        fade = 0.1
        u = _progress(s, s_a, s_b)
        cx0 = width * (0.5 + float(rng.uniform(-0.15, 0.15)))
        cy0 = height * (0.5 + float(rng.uniform(-0.15, 0.15)))
        g = float(rng.uniform(2.2, 3.2))
        opacity = np.clip(1.0 - (s - s_b) / fade, 0.0, 1.0)
        return [_Track(cx0 * ones, cy0 * ones, g * u, angle, opacity)]
    if label == 8:  # clap: two shapes meet in the middle and part, n times
        u = _progress(s, s_a, s_b)
        n = int(rng.integers(2, 4))
        cx0 = width * (0.5 + float(rng.uniform(-0.1, 0.1)))
        cy0 = height * float(rng.uniform(0.35, 0.65))
        d_max = float(rng.uniform(0.25, 0.35)) * size
        d_min = 1.05 * shape.extent * r
        d = d_min + (d_max - d_min) * (0.5 + 0.5 * np.cos(2 * np.pi * n * u))
        return [
            _Track(cx0 - d, cy0 * ones, ones, angle, ones),
            _Track(cx0 + d, cy0 * ones, ones, -angle, ones),
        ]
    if label == 9:  # drum: two shapes side by side beat up and down in anti-phase
        u = _progress(s, s_a, s_b)
        n = int(rng.integers(2, 4))
        cx0 = width * (0.5 + float(rng.uniform(-0.1, 0.1)))
        cy0 = height * float(rng.uniform(0.4, 0.6))
        half = float(rng.uniform(0.15, 0.25)) * size
        amp = float(rng.uniform(0.08, 0.14)) * size
        wave = amp * np.sin(2 * np.pi * n * u)
        return [
            _Track(cx0 - half * ones, cy0 + wave, ones, angle, ones),
            _Track(cx0 + half * ones, cy0 - wave, ones, -angle, ones),
        ]
    if label == 10:  # roll: two smaller shapes orbit a common centre
        u = _progress(s, s_a, s_b)
        n = int(rng.integers(2, 4))
        direction = 1.0 if rng.random() < 0.5 else -1.0
        cx0 = width * (0.5 + float(rng.uniform(-0.12, 0.12)))
        cy0 = height * (0.5 + float(rng.uniform(-0.12, 0.12)))
        small = 0.7
        rho = small * shape.extent * r * 1.1 + float(rng.uniform(0.02, 0.06)) * size
        theta = float(rng.uniform(0.0, 2 * np.pi)) + direction * 2 * np.pi * n * u
        sc = small * ones
        return [
            _Track(cx0 + rho * np.cos(theta), cy0 + rho * np.sin(theta), sc, angle, ones),
            _Track(cx0 - rho * np.cos(theta), cy0 - rho * np.sin(theta), sc, angle, ones),
        ]
    raise AssertionError(f"unhandled label {label}")  # labels are validated by the caller


def render_gesture(
    label: int,
    rng: np.random.Generator,
    *,
    height: int = 128,
    width: int = 128,
    duration_us: int = 1_000_000,
    fps: float = 300.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one random sample of gesture class ``label`` as intensity frames.

    Args:
        label: class index in ``range(len(GESTURE_CLASSES))``.
        rng: the only source of randomness; the same generator state gives the same clip.
        height, width: frame size in pixels (>= 16 each).
        duration_us: clip length in µs.
        fps: rendering rate; shapes move at most ~2-3 px per frame at 300 fps and 128 px.

    Returns:
        frames: [N, H, W] float32 linear intensities in (0, 1], N = round(duration * fps) + 1.
        times_us: [N] int64, from 0 to ``duration_us``.
    """
    if isinstance(label, bool) or int(label) != label or not 0 <= label < len(GESTURE_CLASSES):
        raise ValueError(f"label: expected an int in [0, {len(GESTURE_CLASSES)}), got {label!r}")
    label = int(label)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    for name, v in (("height", height), ("width", width)):
        if int(v) != v or v < 16:
            raise ValueError(f"{name}: expected an integer >= 16 pixels, got {v!r}")
    if not duration_us > 0:
        raise ValueError(f"duration_us: must be > 0, got {duration_us}")
    if not (fps > 0 and np.isfinite(fps)):
        raise ValueError(f"fps: must be a positive number of frames per second, got {fps}")
    n_frames = int(round(duration_us * 1e-6 * fps)) + 1
    if n_frames < 2:
        raise ValueError(f"fps: need at least 2 frames over {duration_us} µs, got fps={fps}")
    if duration_us < n_frames - 1:
        raise ValueError(
            f"fps: {fps} frames/s over {duration_us} µs leaves less than 1 µs between frames"
        )
    height, width = int(height), int(width)
    size = float(min(height, width))
    times = np.round(np.linspace(0.0, float(duration_us), n_frames)).astype(np.int64)
    s = times / float(duration_us)

    # --- appearance (same draws for every class) ---
    shape = _draw_shape(rng, float(rng.uniform(0.06, 0.1)) * size)
    bg_level = float(rng.uniform(0.12, 0.25))
    fg_level = bg_level * float(np.exp(rng.uniform(0.9, 1.3)))
    n_waves = 3
    wavelength = rng.uniform(6.0, 24.0, n_waves)
    direction = rng.uniform(0.0, 2 * np.pi, n_waves)
    phase = rng.uniform(0.0, 2 * np.pi, n_waves)
    amp = float(rng.uniform(0.04, 0.12)) / n_waves  # relative texture contrast per wave
    jitter_px = float(rng.uniform(0.0, 0.6))
    steps = rng.normal(0.0, 1.0, (n_frames, 2))

    # --- motion (class specific) ---
    rev = label in _REVERSED_OF
    base = _REVERSED_OF.get(label, label)
    tracks = _tracks(base, 1.0 - s if rev else s, rng, height, width, shape)

    # Camera jitter: a random walk normalised to an RMS of jitter_px, shifting everything.
    walk = np.cumsum(steps, axis=0)
    walk -= walk.mean(axis=0)
    walk *= jitter_px / max(float(np.sqrt((walk**2).mean())), 1e-9)
    if rev:
        walk = walk[::-1]  # so the backward class is the forward clip exactly reversed
    jx, jy = walk[:, 0], walk[:, 1]

    # Background texture as a sum of plane waves, shifted by the jitter: keep cos/sin
    # fields so each frame is a few axpys (cos(a - b) = cos a cos b + sin a sin b).
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    kx = (2 * np.pi / wavelength) * np.cos(direction)
    ky = (2 * np.pi / wavelength) * np.sin(direction)
    arg = kx[:, None, None] * xs[None, None, :] + ky[:, None, None] * ys[None, :, None]
    arg = arg + phase[:, None, None]
    cos_f = np.cos(arg).astype(np.float32)
    sin_f = np.sin(arg).astype(np.float32)
    shift = kx[None, :] * jx[:, None] + ky[None, :] * jy[:, None]  # [N, n_waves]
    cos_s = (bg_level * amp * np.cos(shift)).astype(np.float32)
    sin_s = (bg_level * amp * np.sin(shift)).astype(np.float32)

    frames = np.empty((n_frames, height, width), dtype=np.float32)
    for k in range(n_frames):
        f = frames[k]
        f.fill(bg_level)
        for m in range(n_waves):
            f += cos_s[k, m] * cos_f[m]
            f += sin_s[k, m] * sin_f[m]
        for tr in tracks:
            _paint(f, shape, tr, k, jx[k], jy[k], fg_level, xs, ys)
    np.clip(frames, 1e-3, 1.0, out=frames)
    return frames, times


def _paint(
    frame: np.ndarray,
    shape: _Shape,
    tr: _Track,
    k: int,
    jx: float,
    jy: float,
    fg: float,
    xs: np.ndarray,
    ys: np.ndarray,
) -> None:
    """Alpha-composite one shape of intensity ``fg`` into ``frame`` [H, W] (in place)."""
    scale = float(tr.scale[k])
    # A shape smaller than a couple of pixels covers a pixel only partly: fade it, so a
    # shape growing from (or shrinking to) nothing appears (vanishes) continuously.
    opacity = float(tr.opacity[k]) * min(1.0, scale * shape.r / (2 * _SOFT_PX))
    if opacity <= 0.0:
        return
    cx = float(tr.cx[k]) + jx
    cy = float(tr.cy[k]) + jy
    reach = shape.extent * shape.r * scale + _SOFT_PX
    height, width = frame.shape
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, width)
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return
    sd = _signed_distance(shape, xs[x0:x1] - cx, ys[y0:y1] - cy, scale, float(tr.angle[k]))
    alpha = np.clip(0.5 - sd / _SOFT_PX, 0.0, 1.0) * opacity
    region = frame[y0:y1, x0:x1]
    region += alpha.astype(np.float32) * (fg - region)


def make_gesture_events(
    label: int,
    rng: np.random.Generator,
    *,
    height: int = 128,
    width: int = 128,
    duration_us: int = 1_000_000,
    fps: float = 300.0,
    threshold: float = 0.2,
    threshold_sigma: float = 0.03,
    refractory_us: int = 100,
    noise_rate_hz: tuple[float, float] = (0.05, 0.3),
) -> np.ndarray:
    """One random sample of gesture ``label`` as DVS events (``render_gesture`` + ``simulate``).

    ``noise_rate_hz`` is the range (low, high) the sample's background rate per pixel is
    drawn from (uniform); the other simulator arguments are passed on. Returns an
    EVENT_DTYPE array sorted by ``t`` (µs in [0, duration_us]), x < width, y < height.
    """
    lo, hi = noise_rate_hz
    if not 0 <= lo <= hi:
        raise ValueError(
            f"noise_rate_hz: expected a range (low, high), 0 <= low <= high, got {noise_rate_hz}"
        )
    frames, times = render_gesture(
        label, rng, height=height, width=width, duration_us=duration_us, fps=fps
    )
    rate = float(rng.uniform(lo, hi))
    return simulate(
        frames,
        times,
        rng=rng,
        threshold=threshold,
        threshold_sigma=threshold_sigma,
        refractory_us=refractory_us,
        noise_rate_hz=rate,
    )
