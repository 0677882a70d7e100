"""evformer.events.frames against spikingjelly, tonic, a NumPy reference and hand counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spikingjelly.datasets.utils import (
    integrate_events_by_fixed_duration,
    integrate_events_by_fixed_frames_number,
)
from tonic.transforms import ToFrame

from evformer.events import EVENT_DTYPE, count_dtype, from_columns, to_frames, to_frames_batch
from evformer.events import frames as frames_module
from evformer.events.frames import _to_frames_reference

# Non-square frames so that a swapped x/y shows up.
H, W = 11, 17
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_stream(rng: np.random.Generator, n: int, span: int, *, t0: int = 0, height=H, width=W):
    """A sorted stream of n events over [t0, t0 + span] µs, in clusters (so gaps occur)."""
    if n == 0:
        return np.empty(0, dtype=EVENT_DTYPE)
    n_clusters = int(rng.integers(1, 6))
    centres = rng.integers(0, span + 1, n_clusters)
    widths = rng.integers(0, span // n_clusters + 2, n_clusters)
    which = rng.integers(0, n_clusters, n)
    t = centres[which] + rng.integers(0, widths[which] + 1)
    t = np.sort(np.clip(t, 0, span)) + t0
    return from_columns(
        t,
        rng.integers(0, width, n),
        rng.integers(0, height, n),
        rng.integers(0, 2, n),
    )


@st.composite
def streams(draw, max_events: int = 5000):
    n = draw(st.integers(0, max_events))
    span = draw(st.sampled_from([0, 3, 40, 1000, 10**5, 6 * 10**6]))
    t0 = draw(st.sampled_from([0, 17, 10**12]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_stream(rng, n, span, t0=t0)


def window_for(events: np.ndarray, n_windows: int, jitter: int) -> int:
    """A window (µs) giving about ``n_windows`` windows over the stream (keeps T small)."""
    # max - min, not last - first: the stream may be shuffled (a tiny span there gave
    # millions of 1 µs frames)
    span = int(events["t"].max() - events["t"].min()) if len(events) else 0
    return max(1, span // n_windows) + jitter


def as_dict(events: np.ndarray) -> dict[str, np.ndarray]:
    return {f: np.ascontiguousarray(events[f]) for f in ("t", "x", "y", "p")}


def add_events(frames: np.ndarray, k: int, events: np.ndarray) -> None:
    """Hand accumulation of ``events`` into frame ``k`` of [T, 2, H, W] ``frames``."""
    np.add.at(frames[k], (events["p"].astype(int), events["y"], events["x"]), 1)


# --------------------------------------------------------------------------- spikingjelly


@SETTINGS
@given(events=streams(), n_frames=st.integers(1, 20), structured=st.booleans())
def test_number_equals_spikingjelly(events, n_frames, structured):
    ours = to_frames(events if structured else as_dict(events), n_frames, "number", H, W)
    theirs = integrate_events_by_fixed_frames_number(as_dict(events), "number", n_frames, H, W)
    assert ours.shape == theirs.shape == (n_frames, 2, H, W)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, theirs)


@SETTINGS
@given(events=streams(), n_frames=st.integers(1, 20), structured=st.booleans())
def test_time_equals_spikingjelly_where_it_works(events, n_frames, structured):
    ours = to_frames(events if structured else as_dict(events), n_frames, "time", H, W)
    assert ours.shape == (n_frames, 2, H, W)
    assert ours.sum() == len(events)  # never a lost event
    try:
        theirs = integrate_events_by_fixed_frames_number(as_dict(events), "time", n_frames, H, W)
    except IndexError:
        # spikingjelly fails on any empty bin; ours then follows the documented rule
        np.testing.assert_array_equal(ours, _to_frames_reference(events, n_frames, "time", H, W))
        if len(events):  # ... which it does exactly when one of its windows is empty
            t = events["t"]
            dt = (t[-1] - t[0]) // n_frames
            edges = t[0] + dt * np.arange(n_frames + 1)
            assert (np.searchsorted(t, edges[1:]) == np.searchsorted(t, edges[:-1])).any()
        return
    np.testing.assert_array_equal(ours, theirs)


def test_time_equals_spikingjelly_on_a_dense_stream():
    # a realistic stream where spikingjelly works: every bin holds events
    rng = np.random.default_rng(1)
    n = 20_000
    t = np.sort(rng.integers(0, 6_000_000, n))
    events = from_columns(
        t, rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n)
    )
    for n_frames in (1, 7, 16):
        for split_by in ("number", "time"):
            theirs = integrate_events_by_fixed_frames_number(
                as_dict(events), split_by, n_frames, 128, 128
            )
            np.testing.assert_array_equal(to_frames(events, n_frames, split_by), theirs)


@SETTINGS
@given(events=streams(), n_windows=st.integers(1, 40), jitter=st.integers(0, 3))
def test_duration_equals_spikingjelly_where_it_works(events, n_windows, jitter):
    duration = window_for(events, n_windows, jitter)
    ours = to_frames(events, height=H, width=W, duration=duration)
    assert ours.sum() == len(events)
    # max - min, not last - first: the stream may be shuffled (a tiny span there gave
    # millions of 1 µs frames)
    span = int(events["t"].max() - events["t"].min()) if len(events) else 0
    assert ours.shape[0] == max(1, -(-span // duration))
    if span == 0:  # spikingjelly computes 0 frames and crashes
        return
    theirs = integrate_events_by_fixed_duration(as_dict(events), duration, H, W)
    np.testing.assert_array_equal(ours, theirs)


# --------------------------------------------------------------------------- tonic


def tonic_frames(events, **kwargs):
    out = ToFrame(sensor_size=(W, H, 2), **kwargs)(events.copy())
    assert out.shape[1:] == (2, H, W)  # tonic's layout for a non-empty stream
    return out.astype(np.int64)


@SETTINGS
@given(
    events=streams(max_events=2000).filter(len),
    event_count=st.integers(1, 300),
    overlap_fraction=st.floats(0, 0.99),
    include_incomplete=st.booleans(),
)
def test_event_count_equals_tonic(events, event_count, overlap_fraction, include_incomplete):
    overlap = int(overlap_fraction * event_count)
    kwargs = dict(event_count=event_count, overlap=overlap, include_incomplete=include_incomplete)
    ours = to_frames(events, height=H, width=W, **kwargs)
    np.testing.assert_array_equal(ours, tonic_frames(events, **kwargs))
    if include_incomplete:
        assert ours.sum() >= len(events)  # every event binned at least once


@SETTINGS
@given(
    events=streams(max_events=2000).filter(len),
    n_windows=st.integers(1, 40),
    jitter=st.integers(0, 3),
    overlap_fraction=st.floats(0, 0.99),
    include_incomplete=st.booleans(),
)
def test_time_window_equals_tonic(events, n_windows, jitter, overlap_fraction, include_incomplete):
    time_window = window_for(events, n_windows, jitter)
    overlap = int(overlap_fraction * time_window)
    kwargs = dict(time_window=time_window, overlap=overlap, include_incomplete=include_incomplete)
    ours = to_frames(events, height=H, width=W, **kwargs)
    theirs = tonic_frames(events, **kwargs)
    t = events["t"]
    span, stride = int(t[-1] - t[0]), time_window - overlap
    if include_incomplete and span >= time_window and (span - time_window) % stride == 0:
        # tonic's window count is one short here: its last window ends at t_last
        # (exclusive) and the events at t_last are lost. Ours adds the window that
        # holds them.
        assert ours.shape[0] == theirs.shape[0] + 1
        np.testing.assert_array_equal(ours[:-1], theirs)
        start = int(t[0]) + (ours.shape[0] - 1) * stride
        last = np.zeros((1, 2, H, W), np.int64)
        add_events(last, 0, events[(t >= start) & (t < start + time_window)])
        np.testing.assert_array_equal(ours[-1], last[0])
        assert (t == t[-1]).sum() <= ours[-1].sum()
    else:
        np.testing.assert_array_equal(ours, theirs)
    if include_incomplete:
        covered = np.zeros(len(events), bool)
        for k in range(ours.shape[0]):
            covered |= (t >= t[0] + k * stride) & (t < t[0] + k * stride + time_window)
        assert covered.all()


@SETTINGS
@given(events=streams(max_events=2000).filter(len), n_frames=st.integers(1, 20))
def test_n_time_bins_equals_tonic_plus_the_events_it_drops(events, n_frames):
    ours = to_frames(events, n_frames, "time", H, W)
    expected = tonic_frames(events, n_time_bins=n_frames)
    t = events["t"]
    # tonic's bins end at t0 + T * (span // T) (exclusive): the last event and the
    # floor remainder are dropped; ours puts them in the last frame.
    dropped = events[t >= t[0] + n_frames * ((t[-1] - t[0]) // n_frames)]
    assert len(dropped) >= 1
    add_events(expected, n_frames - 1, dropped)
    np.testing.assert_array_equal(ours, expected)


@SETTINGS
@given(events=streams(max_events=2000).filter(len), n_frames=st.integers(1, 20))
def test_n_event_bins_equals_tonic_plus_the_remainder(events, n_frames):
    ours = to_frames(events, n_frames, "number", H, W)
    expected = tonic_frames(events, n_event_bins=n_frames)
    # tonic drops the N - T * (N // T) remainder; ours puts it in the last frame
    add_events(expected, n_frames - 1, events[n_frames * (len(events) // n_frames) :])
    np.testing.assert_array_equal(ours, expected)


def test_tonic_empty_stream_layout_differs_ours_is_consistent():
    empty = np.empty(0, dtype=EVENT_DTYPE)
    theirs = ToFrame(sensor_size=(W, H, 2), n_time_bins=3)(empty)
    assert theirs.shape == (3, 2, W, H) and theirs.dtype == np.float64  # tonic's (T, P, W, H)
    ours = to_frames(empty, 3, "time", H, W)
    assert ours.shape == (3, 2, H, W) and ours.dtype == np.int32 and not ours.any()


# --------------------------------------------------------------------------- reference


@st.composite
def modes(draw):
    mode = draw(st.sampled_from(["number", "time", "duration", "time_window", "event_count"]))
    if mode in ("number", "time"):
        overlap = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
        return dict(n_frames=draw(st.integers(1, 12)), split_by=mode, overlap=overlap)
    if mode == "duration":
        return dict(duration=(draw(st.integers(1, 30)), draw(st.integers(0, 3))))
    if mode == "time_window":
        size = (draw(st.integers(1, 30)), draw(st.integers(0, 3)))
        # overlap up to 3/4 of a window: at most ~4x as many windows as without
        return dict(time_window=size, overlap=draw(st.floats(0, 0.75)),
                    include_incomplete=draw(st.booleans()))  # fmt: skip
    size = draw(st.integers(1, 500))
    return {
        mode: size,
        "overlap": draw(st.integers(0, 3 * size // 4)),
        "include_incomplete": draw(st.booleans()),
    }


@SETTINGS
@given(events=streams(), kwargs=modes(), shuffle=st.booleans(), structured=st.booleans())
def test_kernels_equal_numpy_reference(events, kwargs, shuffle, structured):
    if shuffle and len(events) > 1:
        events = events[np.random.default_rng(len(events)).permutation(len(events))]
    # durations and windows are drawn as (windows per span, jitter): a few frames each
    for key in ("duration", "time_window"):
        if key in kwargs:
            kwargs[key] = window_for(events, *kwargs[key])
    if "time_window" in kwargs:
        kwargs["overlap"] = int(kwargs["overlap"] * kwargs["time_window"])
    expected = _to_frames_reference(events, height=H, width=W, **kwargs)
    ours = to_frames(events if structured else as_dict(events), height=H, width=W, **kwargs)
    assert ours.dtype == expected.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)


# --------------------------------------------------------------------------- hand counts


def line_stream(n: int) -> np.ndarray:
    """Event i at t = i µs, pixel (x, y) = (i % W, (i // W) % H), ON."""
    i = np.arange(n)
    return from_columns(i, i % W, (i // W) % H, np.ones(n))


def per_frame(frames: np.ndarray) -> list[int]:
    return frames.sum(axis=(1, 2, 3)).tolist()


def test_overlap_by_hand():
    events = line_stream(100)
    # number: di = 25, extension rint(0.2 * 25) = 5 -> [0,30) [25,55) [50,80) [75,100)
    assert per_frame(to_frames(events, 4, "number", H, W, overlap=0.2)) == [30, 30, 30, 25]
    # time: dt = 99 // 4 = 24 µs, extension 12 -> [0,36) [24,60) [48,84) [72,99]
    assert per_frame(to_frames(events, 4, "time", H, W, overlap=0.5)) == [36, 36, 36, 28]
    # time_window 30 µs, overlap 10 -> stride 20; complete windows end by t_last = 99
    assert per_frame(to_frames(events, height=H, width=W, time_window=30, overlap=10)) == [30] * 4
    incomplete = to_frames(events, height=H, width=W, time_window=30, overlap=10,
                           include_incomplete=True)  # fmt: skip
    assert per_frame(incomplete) == [30, 30, 30, 30, 20]
    # event_count 40, overlap 15 -> stride 25
    assert per_frame(to_frames(events, height=H, width=W, event_count=40, overlap=15)) == [40] * 3
    assert per_frame(
        to_frames(events, height=H, width=W, event_count=40, overlap=15, include_incomplete=True)
    ) == [40, 40, 40, 25]


def test_time_window_include_incomplete_keeps_the_last_event():
    events = line_stream(91)  # t = 0..90 µs; (span - window) = 60 is a multiple of the stride
    kwargs = dict(time_window=30, overlap=10, include_incomplete=True)
    theirs = tonic_frames(events, **kwargs)
    assert per_frame(theirs) == [30, 30, 30, 30]  # windows up to [60, 90): t = 90 is lost
    ours = to_frames(events, height=H, width=W, **kwargs)
    assert per_frame(ours) == [30, 30, 30, 30, 11]  # plus [80, 110): t = 80..90
    np.testing.assert_array_equal(ours[:4], theirs)


def test_layout_channels_and_axes():
    events = from_columns([0, 1, 2], [3, 3, 16], [1, 1, 10], [0, 1, 1])
    frames = to_frames(events, 1, "number", H, W)
    assert frames[0, 0, 1, 3] == 1  # OFF at (x=3, y=1)
    assert frames[0, 1, 1, 3] == 1  # ON at (x=3, y=1)
    assert frames[0, 1, 10, 16] == 1  # x indexes width (17), y height (11)
    assert frames.sum() == 3


def test_gap_gives_empty_frames_where_spikingjelly_raises():
    t = np.array([0, 1, 2, 97, 98, 99, 100])
    events = from_columns(t, np.arange(7), np.zeros(7), np.ones(7))
    with pytest.raises(IndexError):
        integrate_events_by_fixed_frames_number(as_dict(events), "time", 10, H, W)
    # dt = 100 // 10 = 10: frame 0 = t in [0, 10), frames 1..8 empty, frame 9 = [90, end]
    assert per_frame(to_frames(events, 10, "time", H, W)) == [3, 0, 0, 0, 0, 0, 0, 0, 0, 4]


def test_fewer_events_than_frames_and_short_span_fill_the_last_frame():
    events = line_stream(5)  # 5 events over 4 µs
    for split_by in ("number", "time"):  # di = 0 / dt = 0
        assert per_frame(to_frames(events, 8, split_by, H, W)) == [0] * 7 + [5]
    np.testing.assert_array_equal(
        to_frames(events, 8, "number", H, W),
        integrate_events_by_fixed_frames_number(as_dict(events), "number", 8, H, W),
    )
    with pytest.raises(IndexError):  # spikingjelly: span 4 µs < 8 frames
        integrate_events_by_fixed_frames_number(as_dict(events), "time", 8, H, W)


@pytest.mark.parametrize(
    "kwargs, n_out",
    [
        (dict(n_frames=4, split_by="number"), 4),
        (dict(n_frames=4, split_by="time", overlap=0.5), 4),
        (dict(duration=1000), 1),
        (dict(time_window=1000, include_incomplete=True), 1),
        (dict(event_count=10, overlap=3), 1),
    ],
)
def test_empty_stream(kwargs, n_out):
    for empty in (np.empty(0, EVENT_DTYPE), {f: np.zeros(0, np.int64) for f in "txyp"}):
        frames = to_frames(empty, height=H, width=W, **kwargs)
        assert frames.shape == (n_out, 2, H, W)
        assert frames.dtype == np.int32
        assert not frames.any()


def test_one_pixel_40000_events_does_not_overflow():
    n = 40_000  # > 32767, where tonic's int16 frames wrap
    events = from_columns(np.arange(n) * 3, np.full(n, 5), np.full(n, 7), np.ones(n))
    for kwargs in (dict(n_frames=1), dict(n_frames=1, split_by="time"), dict(duration=10**6),
                   dict(time_window=10**6), dict(event_count=n)):  # fmt: skip
        frames = to_frames(events, height=H, width=W, **kwargs)
        assert frames.dtype == np.int32
        assert frames[0, 1, 7, 5] == n
        assert frames.sum() == n
    batch = to_frames_batch([events, events[:100]], 1, height=H, width=W)
    assert batch[0, 0, 1, 7, 5] == n and batch[1, 0, 1, 7, 5] == 100


def test_count_dtype_bounds():
    assert count_dtype(0) == np.int32
    assert count_dtype(2**31 - 1) == np.int32
    assert count_dtype(2**31) == np.int64


# --------------------------------------------------------------------------- input forms


@pytest.mark.parametrize("split_by", ["number", "time"])
def test_unsorted_input_is_sorted_not_dropped(split_by):
    rng = np.random.default_rng(3)
    events = make_stream(rng, 3000, 10**5)
    shuffled = events[rng.permutation(len(events))]
    before = shuffled.copy()
    for form in (shuffled, as_dict(shuffled)):
        frames = to_frames(form, 9, split_by, H, W)
        np.testing.assert_array_equal(frames, to_frames(events, 9, split_by, H, W))
        assert frames.sum() == len(events)
    np.testing.assert_array_equal(shuffled, before)  # the input is not sorted in place
    windows = dict(time_window=5000, overlap=1000, include_incomplete=True)
    np.testing.assert_array_equal(
        to_frames(shuffled, height=H, width=W, **windows),
        to_frames(events, height=H, width=W, **windows),
    )


def test_unsorted_stable_order_for_equal_timestamps():
    # equal timestamps keep their array order, which decides the 'number' bins
    events = from_columns([5, 5, 5, 5, 1, 1], [0, 1, 2, 3, 4, 5], np.zeros(6), np.ones(6))
    frames = to_frames(events, 3, "number", H, W)
    # sorted (stable): x = 4, 5 | 0, 1 | 2, 3
    assert frames[0, 1, 0, [4, 5]].tolist() == [1, 1]
    assert frames[1, 1, 0, [0, 1]].tolist() == [1, 1]
    assert frames[2, 1, 0, [2, 3]].tolist() == [1, 1]


@SETTINGS
@given(events=streams(max_events=2000), n_frames=st.integers(1, 10))
def test_structured_and_mapping_inputs_agree(events, n_frames):
    for split_by in ("number", "time"):
        a = to_frames(events, n_frames, split_by, H, W)
        b = to_frames(as_dict(events), n_frames, split_by, H, W)
        np.testing.assert_array_equal(a, b)


def test_other_integer_field_types():
    rng = np.random.default_rng(4)
    events = make_stream(rng, 500, 10**4)
    for t_type in (np.int32, np.uint64, ">i8"):  # ">i8": big-endian, as AEDAT 2.0 stores it
        cols = {
            "t": events["t"].astype(t_type),
            "x": events["x"].astype(np.uint8),
            "y": events["y"].astype(np.int64),
            "p": events["p"].astype(bool),
        }
        for kwargs in (dict(n_frames=5), dict(n_frames=5, split_by="time"), dict(duration=999)):
            np.testing.assert_array_equal(
                to_frames(cols, height=H, width=W, **kwargs),
                to_frames(events, height=H, width=W, **kwargs),
            )


def test_structured_arrays_of_other_layouts():
    # other field order, types, alignment and extra fields: the kernels read the records
    # directly when every field is numeric, else the field views; results are the same
    rng = np.random.default_rng(7)
    events = make_stream(rng, 800, 10**5)
    layouts = [
        np.dtype([("p", "?"), ("y", "<u2"), ("x", "<i4"), ("label", "<f4"), ("t", "<u8")]),
        np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "i1")], align=True),
        np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "i1"), ("tag", "U3")]),
        np.dtype([("t", ">i8"), ("x", ">u2"), ("y", ">i2"), ("p", "u1")]),  # big-endian
    ]
    for dtype in layouts:
        other = np.zeros(len(events), dtype=dtype)
        for f in ("t", "x", "y", "p"):
            other[f] = events[f]
        for kwargs in (dict(n_frames=5), dict(n_frames=5, split_by="time", overlap=0.25),
                       dict(time_window=7000, overlap=2000)):  # fmt: skip
            np.testing.assert_array_equal(
                to_frames(other, height=H, width=W, **kwargs),
                to_frames(events, height=H, width=W, **kwargs),
            )
        np.testing.assert_array_equal(
            to_frames_batch(other, 4, "time", H, W, offsets=[0, 300, 800]),
            to_frames_batch([events[:300], events[300:]], 4, "time", H, W),
        )
        shuffled = other[rng.permutation(len(other))]
        np.testing.assert_array_equal(
            to_frames(shuffled, 5, "number", H, W), to_frames(events, 5, "number", H, W)
        )


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("split_by", ["number", "time"])
@pytest.mark.parametrize("overlap", [0.0, 0.3])
def test_batch_equals_loop(split_by, overlap):
    rng = np.random.default_rng(5)
    streams_ = [make_stream(rng, int(n), 10**5) for n in (0, 1, 7, 2500, 400, 0, 3000)]
    streams_[3] = streams_[3][rng.permutation(2500)]  # one unsorted stream
    loop = np.stack([to_frames(s, 6, split_by, H, W, overlap=overlap) for s in streams_])
    batch = to_frames_batch(streams_, 6, split_by, H, W, overlap=overlap)
    assert batch.shape == (7, 6, 2, H, W) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, loop)
    # the dataset cache's form: concatenated columns + offsets [B + 1]
    offsets = np.cumsum([0] + [len(s) for s in streams_])
    concat = {f: np.concatenate([s[f] for s in streams_]) for f in ("t", "x", "y", "p")}
    np.testing.assert_array_equal(
        to_frames_batch(concat, 6, split_by, H, W, overlap=overlap, offsets=offsets), loop
    )
    np.testing.assert_array_equal(
        to_frames_batch(from_columns(*concat.values()), 6, split_by, H, W, overlap=overlap,
                        offsets=offsets),
        loop,
    )  # fmt: skip


def test_batch_of_no_streams():
    assert to_frames_batch([], 4, height=H, width=W).shape == (0, 4, 2, H, W)


def test_batch_errors_name_the_stream():
    rng = np.random.default_rng(6)
    good = make_stream(rng, 50, 1000)
    bad = good.copy()
    bad["y"][13] = H
    with pytest.raises(ValueError, match=r"streams\[1\].*'y' = 11 at event index 13"):
        to_frames_batch([good, bad], 3, height=H, width=W)
    shuffled = bad[::-1].copy()  # unsorted and bad: index in the stream as given
    with pytest.raises(ValueError, match=r"streams\[2\].*'y' = 11 at event index 36"):
        to_frames_batch([good, good, shuffled], 3, "time", H, W)
    with pytest.raises(TypeError, match="offsets"):
        to_frames_batch(good, 3, height=H, width=W)
    with pytest.raises(ValueError, match="offsets"):
        to_frames_batch(good, 3, height=H, width=W, offsets=[0, 60])
    with pytest.raises(ValueError, match="offsets"):
        to_frames_batch(good, 3, height=H, width=W, offsets=[0, 30, 20, 50])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("x", W, r"'x' = 17 at event index 4 .*width=17"),
        ("x", -1, r"'x' = -1 at event index 4"),
        ("y", H + 3, r"'y' = 14 at event index 4 .*height=11"),
        ("p", 2, r"'p' = 2 at event index 4 .*polarity"),
        ("p", -1, r"'p' = -1 at event index 4"),
    ],
)
def test_out_of_range_fields_raise(field, value, message):
    events = line_stream(10)
    events[field][4] = value
    for kwargs in (dict(n_frames=3), dict(n_frames=3, split_by="time"), dict(duration=3),
                   dict(time_window=2), dict(event_count=2)):  # fmt: skip
        for form in (events, as_dict(events)):
            with pytest.raises(ValueError, match=message):
                to_frames(form, height=H, width=W, **kwargs)
    # unsorted input: the index still refers to the events as given
    with pytest.raises(ValueError, match=message.replace("index 4", "index 5")):
        to_frames(events[::-1].copy(), 3, height=H, width=W)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, "exactly one of n_frames"),
        (dict(n_frames=4, duration=10), ValueError, "got n_frames, duration"),
        (dict(n_frames=0), ValueError, "n_frames must be positive"),
        (dict(n_frames=2.5), TypeError, "n_frames must be an integer"),
        (dict(n_frames=True), TypeError, "n_frames must be an integer"),
        (dict(n_frames=4, split_by="count"), ValueError, "split_by must be"),
        (dict(n_frames=4, overlap=1.0), ValueError, r"overlap with n_frames.*\[0, 1\)"),
        (dict(n_frames=4, overlap=-0.1), ValueError, "overlap"),
        (dict(n_frames=4, include_incomplete=True), ValueError, "include_incomplete"),
        (dict(time_window=100, split_by="time"), ValueError, "split_by applies to n_frames"),
        (dict(time_window=100, overlap=100), ValueError, r"overlap must be in \[0, time_window"),
        (dict(time_window=100.5), TypeError, "time_window must be an integer"),
        (dict(event_count=10, overlap=2.5), TypeError, "overlap must be an integer"),
        (dict(event_count=-3), ValueError, "event_count must be positive"),
        (dict(duration=100, overlap=10), ValueError, "overlap is not supported with duration"),
        (dict(n_frames=4, height=0), ValueError, "height must be positive"),
    ],
)
def test_argument_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        to_frames(line_stream(10), **kwargs)


def test_integral_float_arguments_are_accepted():
    events = line_stream(100)
    np.testing.assert_array_equal(
        to_frames(events, height=H, width=W, time_window=1e1),
        to_frames(events, height=H, width=W, time_window=10),
    )


def test_bad_containers_raise():
    with pytest.raises(ValueError, match="lacks key"):
        to_frames({"t": np.zeros(3), "x": np.zeros(3)}, 2)
    with pytest.raises(ValueError, match="must be integer"):
        to_frames({f: np.zeros(3) for f in "txyp"}, 2)


def _error_message(events, *args) -> str | None:
    """The message of the ValueError that ``to_frames(events, *args)`` raises, or None."""
    try:
        to_frames(events, *args)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("x_type", [np.int16, np.uint16, np.int32, np.int64, np.uint8])
def test_long_column_streams_check_every_block(x_type):
    # Column input is checked block by block (_BLOCK events from the start of each
    # frame's run) before the counting: a bad value or a disorder deep in a later block,
    # right at a block's or a frame's start or end, or after an earlier disorder, is
    # still found with the index of the first bad event, exactly as the record path
    # (checked event by event) finds it. Two frames of 35000 events: blocks start at
    # 0, B and 35000, 35000 + B (B = 32768).
    rng = np.random.default_rng(11)
    n = 70_001
    B = frames_module._BLOCK
    events = make_stream(rng, n, 10**6)
    counts = to_frames(events, 2, "number", H, W)
    edges = (0, 1, B - 1, B, B + 1, 34_999, 35_000, 35_001, 50_000, 35_000 + B, n - 1)
    for where in edges:
        cases = [("x", W), ("y", H), ("p", 2), ("x", -1), ("p", -1), ("t", -1), ("t", 1)]
        for field, value in cases:
            if field != "t" and value < 0 and np.dtype(x_type).kind == "u":
                continue
            bad = events.copy()
            if field == "t":
                # one event far out of order: before the first or after the last
                bad["t"][where] = bad["t"][0] - 10**6 if value < 0 else bad["t"][-1] + 10**6
            else:
                bad[field][where] = value
            cols = {f: np.ascontiguousarray(bad[f]) for f in ("t", "x", "y", "p")}
            cols["x"] = cols["x"].astype(x_type)
            cols["y"] = cols["y"].astype(x_type)
            cols["p"] = cols["p"].astype(x_type)
            for split_by in ("number", "time"):
                expected = _error_message(bad, 2, split_by, H, W)
                got = _error_message(cols, 2, split_by, H, W)
                assert got == expected
                if field == "t":
                    assert got is None
                    np.testing.assert_array_equal(
                        to_frames(cols, 2, split_by, H, W), to_frames(bad, 2, split_by, H, W)
                    )
                else:
                    assert f"at event index {where} " in got
    # sorted and clean: the same counts from every column type
    cols = {f: np.ascontiguousarray(events[f]).astype(x_type) for f in ("x", "y", "p")}
    cols["t"] = events["t"]
    np.testing.assert_array_equal(to_frames(cols, 2, "number", H, W), counts)


def test_negative_coordinates_fail_on_frames_wider_than_their_type():
    # int16 x = -30000 (35536 as uint16) must fail also when the width exceeds 2**15
    # (the block check compares the unsigned maxima against min(width, 2**15) for signed
    # 16-bit columns)
    n = 40_000
    cols = {
        "t": np.arange(n, dtype=np.int64),
        "x": np.full(n, 5, dtype=np.int16),
        "y": np.zeros(n, dtype=np.int16),
        "p": np.ones(n, dtype=np.int8),
    }
    cols["x"][20_000] = -30_000
    with pytest.raises(ValueError, match=r"'x' = -30000 at event index 20000"):
        to_frames(cols, 2, "number", height=1, width=40_000)
    cols["x"][20_000] = 32_767
    frames = to_frames(cols, 2, "number", height=1, width=40_000)
    assert frames[1, 1, 0, 32_767] == 1 and frames.sum() == n
