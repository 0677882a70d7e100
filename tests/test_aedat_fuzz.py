"""Fuzzing the AEDAT readers: any mutated file gives a valid stream or an AedatError.

Both backends (Numba kernels and the NumPy reference) must also agree: the same
array, or the same error message.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from evformer.events import EVENT_DTYPE, AedatError, read_aedat, write_aedat2, write_aedat31

# random and corrupted files are unsorted on purpose; the readers' warning is tested elsewhere
pytestmark = pytest.mark.filterwarnings("ignore::evformer.events.UnsortedEventsWarning")

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PH = struct.Struct("<hhiiiiii")
INT32 = st.integers(-(2**31), 2**31 - 1)


def outcome(path, backend):
    try:
        ev = read_aedat(path, backend=backend)
    except AedatError as e:
        assert e.path == str(path) and e.offset >= 0
        assert str(path) in str(e) and f"offset {e.offset}" in str(e)
        return ("error", str(e))
    # Anything returned is a well-formed, sorted DVS128 stream.
    assert isinstance(ev, np.ndarray) and ev.dtype == EVENT_DTYPE and ev.ndim == 1
    if ev.size:
        assert np.all(ev["t"][1:] >= ev["t"][:-1])
        assert ev["t"].min() >= 0
        assert ev["x"].min() >= 0 and ev["x"].max() < 128
        assert ev["y"].min() >= 0 and ev["y"].max() < 128
        assert set(np.unique(ev["p"])) <= {0, 1}
    return ("events", ev)


def check(path):
    a = outcome(path, "numba")
    b = outcome(path, "numpy")
    assert a[0] == b[0], (a, b)
    # Statistics (pytest --hypothesis-show-statistics): which outcomes the fuzzing reaches.
    event(a[0] if a[0] == "events" else re.sub(r"0x[0-9a-f]+|-?\d+", "#", a[1].split(": ")[2])[:28])
    if a[0] == "error":
        assert a[1] == b[1]
    else:
        np.testing.assert_array_equal(a[1], b[1])


@st.composite
def base_file(draw, version):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(0, 40))
    ev = np.empty(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(0, 1 << draw(st.sampled_from([20, 33])), n))
    ev["x"] = rng.integers(0, 128, n)
    ev["y"] = rng.integers(0, 128, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev, rng


def write_base(tmp_path, version, ev, rng):
    path = tmp_path / "f.aedat"
    if version == "3.1":
        write_aedat31(
            path,
            ev,
            events_per_packet=int(rng.integers(1, 10)),
            extra_packets=bool(rng.integers(0, 2)),
            invalid=rng.random(ev.size) < 0.2,
        )
    else:
        write_aedat2(path, ev)
    return path


def packet_starts(data: bytes) -> list[int]:
    pos = data.index(b"#!END-HEADER\r\n") + 14
    starts = []
    while pos + 28 <= len(data):
        starts.append(pos)
        _, _, size, _, _, cap, _, _ = PH.unpack_from(data, pos)
        pos += 28 + cap * size
    return starts + [len(data)]


@SETTINGS
@given(
    version=st.sampled_from(["3.1", "2.0"]),
    base=st.data(),
    flips=st.lists(
        st.tuples(st.booleans(), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
        max_size=6,
    ),
    cut=st.none() | st.floats(0, 1),
)
def test_byte_flips_and_truncations(tmp_path, version, base, flips, cut):
    ev, rng = base.draw(base_file(version))
    path = write_base(tmp_path, version, ev, rng)
    data = bytearray(path.read_bytes())
    body = len(data) - 8 * ev.size if version == "2.0" else data.index(b"#!END-HEADER") + 14
    for anywhere, where, xor in flips:
        # Most flips land after the header, where the decoding happens.
        lo = 0 if anywhere or body >= len(data) else body
        data[lo + int(where * (len(data) - lo))] ^= xor
    if cut is not None:
        data = data[: int(cut * len(data))]
    path.write_bytes(bytes(data))
    check(path)


@st.composite
def random_packet(draw):
    """A packet header with plausible-to-absurd fields, and a body that often fits it."""
    small = st.integers(0, 6)
    if draw(st.booleans()):  # plausible fields: the packet gets decoded or skipped
        etype = draw(st.sampled_from([0, 1, 1, 2, 3, 7]))
        size, tsoff = draw(st.sampled_from([(8, 4), (8, 4), (3, 4), (36, 4), (16, 0)]))
        ovf = draw(st.integers(0, 3))
        capacity = draw(small)
        number = draw(st.integers(0, capacity))
    else:
        etype = draw(st.sampled_from([-1, 0, 1, 300]) | st.integers(-(2**15), 2**15 - 1))
        size = draw(st.sampled_from([8, -8, 0, 3, 16, 36]) | INT32)
        tsoff = draw(st.sampled_from([4, 0]) | INT32)
        ovf = draw(st.sampled_from([0, 1, -1]) | INT32)
        capacity = draw(small | st.integers(-2, 6) | INT32)
        number = draw(small | st.integers(-2, 6) | INT32)
    header = PH.pack(etype, draw(st.integers(0, 3)), size, tsoff, ovf, capacity, number, 0)
    if 0 <= capacity * size <= 400 and draw(st.booleans()):
        if size == 8 and draw(st.booleans()):  # polarity-like words: x, y mostly in range
            words = [
                (draw(st.integers(0, 2**24 - 1)) | draw(st.integers(0, 1)), draw(INT32))
                for _ in range(capacity)
            ]
            body = b"".join(struct.pack("<Ii", d, t) for d, t in words)
        else:
            body = draw(st.binary(min_size=capacity * size, max_size=capacity * size))
    else:
        body = draw(st.binary(max_size=80))
    return header + body


@SETTINGS
@given(
    base=st.data(),
    packets=st.lists(random_packet(), min_size=1, max_size=3),
    where=st.floats(0, 1),
)
def test_random_packet_headers(tmp_path, base, packets, where):
    ev, rng = base.draw(base_file("3.1"))
    path = write_base(tmp_path, "3.1", ev, rng)
    data = path.read_bytes()
    starts = packet_starts(data)
    at = starts[min(int(where * len(starts)), len(starts) - 1)]
    path.write_bytes(data[:at] + b"".join(packets) + data[at:])
    check(path)


@SETTINGS
@given(
    base=st.data(),
    records=st.lists(
        st.tuples(st.integers(0, 0x7FFF) | st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        max_size=6,
    ),
    where=st.floats(0, 1),
    tail=st.just(b"") | st.binary(max_size=9),
)
def test_random_aedat2_records(tmp_path, base, records, where, tail):
    ev, rng = base.draw(base_file("2.0"))
    path = write_base(tmp_path, "2.0", ev, rng)
    data = path.read_bytes()
    start = len(data) - 8 * ev.size
    at = start + 8 * int(where * ev.size)
    extra = b"".join(struct.pack(">II", a, t) for a, t in records)
    path.write_bytes(data[:at] + extra + data[at:] + tail)
    check(path)
