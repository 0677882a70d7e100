"""AEDAT 3.1 / 2.0 readers and writers against hand-made bytes, spikingjelly and tonic."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evformer.events import (
    EVENT_DTYPE,
    AedatError,
    read_aedat,
    read_aedat2,
    read_aedat31,
    write_aedat2,
    write_aedat31,
)
from evformer.events import aedat as aedat_mod

H31 = (
    b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n"
    b"#Start-Time: 2017-02-08 12:33:40 (TZ+0100)\r\n#!END-HEADER\r\n"
)
H20 = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n"
PH = struct.Struct("<hhiiiiii")  # AEDAT 3.1 packet header, 28 bytes


def packet(etype, body, *, size=8, tsoff=4, ovf=0, capacity=None, number=None, valid=None):
    n = len(body) // size if size else 0
    capacity = n if capacity is None else capacity
    number = capacity if number is None else number
    valid = number if valid is None else valid
    return PH.pack(etype, 1, size, tsoff, ovf, capacity, number, valid) + body


def pol(*events):
    """Polarity-event bytes from (data word, timestamp) pairs."""
    return b"".join(struct.pack("<Ii", d, t) for d, t in events)


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_both(fn, path, **kw):
    """Read with both backends; they must agree on the array or on the error message."""
    results = []
    for backend in ("numba", "numpy"):
        try:
            results.append(fn(path, backend=backend, **kw))
        except AedatError as e:
            results.append(e)
    a, b = results
    if isinstance(a, AedatError) or isinstance(b, AedatError):
        assert type(a) is type(b) and str(a) == str(b)
        raise a
    assert a.dtype == EVENT_DTYPE and b.dtype == EVENT_DTYPE
    np.testing.assert_array_equal(a, b)
    return a


def events(rows):
    return np.array([tuple(r) for r in rows], dtype=EVENT_DTYPE)


def random_events(rng, n, *, t_max, sorted_=True, size=128):
    ev = np.empty(n, dtype=EVENT_DTYPE)
    t = rng.integers(0, t_max, n)
    ev["t"] = np.sort(t) if sorted_ else t
    ev["x"] = rng.integers(0, size, n)
    ev["y"] = rng.integers(0, size, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


def stable_sorted(ev):
    return ev[np.argsort(ev["t"], kind="stable")]


# ------------------------------------------------------------------ hand-made files


def test_aedat31_hand_crafted_bytes(tmp_path):
    data = H31
    data += packet(0, pol(((5 << 1) | 1, 100)))  # special event packet: skipped
    data += packet(
        1,
        pol(
            (0x00140053, 1000),  # x=10, y=20, ON, valid
            (0x00FE0000, 1500),  # x=127, y=0, OFF, NOT valid: dropped
            (0x000001FD, 2000),  # x=0, y=127, OFF, valid
        ),
        valid=2,
    )
    # Overflow 2; capacity 2 but eventNumber 1: the second slot is unused capacity.
    data += packet(1, pol((0x000A001B, 7), (0x00020007, 9)), ovf=2, number=1)
    data += packet(3, struct.pack("<Ii7f", 1, 3000, *([0.0] * 7)), size=36)  # IMU6: skipped
    path = write(tmp_path, "hand.aedat", data)
    want = events([(1000, 10, 20, 1), (2000, 0, 127, 0), ((2 << 31) | 7, 5, 6, 1)])
    np.testing.assert_array_equal(read_both(read_aedat31, path), want)
    np.testing.assert_array_equal(read_both(read_aedat, path), want)


def test_aedat31_misaligned_packets(tmp_path):
    # A non-polarity packet with a 3-byte event size shifts the alignment of what follows.
    data = H31 + packet(1, pol((0x00140053, 5)))
    data += packet(7, b"abc", size=3)
    data += packet(1, pol((0x000A001B, 6), (0x000001FD, 4)))
    path = write(tmp_path, "odd.aedat", data)
    want = events([(4, 0, 127, 0), (5, 10, 20, 1), (6, 5, 6, 1)])
    np.testing.assert_array_equal(read_both(read_aedat31, path), want)


def test_aedat2_hand_crafted_bytes_and_wrap(tmp_path):
    recs = [(0x0407, 10), (0x7FFE, 20), (0x0001, 0xFFFFFFF0), (0x0202, 5)]
    path = write(tmp_path, "hand2.aedat", H20 + b"".join(struct.pack(">II", a, t) for a, t in recs))
    # The last timestamp wrapped past 2**32: unwrapped, not sorted to the front.
    want = events([(10, 3, 4, 1), (20, 127, 127, 0), (4294967280, 0, 0, 1), (4294967301, 1, 2, 0)])
    np.testing.assert_array_equal(read_both(read_aedat2, path), want)
    np.testing.assert_array_equal(read_both(read_aedat, path), want)


def test_aedat2_skips_dvs128_special_events(tmp_path):
    # Bit 15 flags a DVS128 external-input (special) event: no pixel, skipped. Its
    # timestamp still counts for the wrap detection: here the special event carries
    # the counter's wrap, so the polarity event after it lies beyond 2**32.
    recs = [
        (0x8000, 3),  # special first
        (0x0407, 10),
        (0x8001 | (5 << 1), 0xFFFFFFF0),  # special, with pixel-like bits set
        (0x0001, 0xFFFFFFF8),
        (0xFFFF, 2),  # special, all low bits set; the counter wrapped
        (0x0202, 5),
        (0x8000, 6),  # special last
    ]
    body = b"".join(struct.pack(">II", a, t) for a, t in recs)
    path = write(tmp_path, "sync.aedat", H20 + body)
    want = events([(10, 3, 4, 1), (4294967288, 0, 0, 1), (4294967301, 1, 2, 0)])
    np.testing.assert_array_equal(read_both(read_aedat2, path), want)
    np.testing.assert_array_equal(read_both(read_aedat, path), want)
    # only special events: an empty stream
    only = write(tmp_path, "only.aedat", H20 + struct.pack(">II", 0x8000, 1) * 3)
    assert read_both(read_aedat2, only).shape == (0,)
    # disorder among the polarity events is reported at its record's byte offset
    recs = [(0x0407, 10), (0x8000, 12), (0x0202, 4)]
    body = b"".join(struct.pack(">II", a, t) for a, t in recs)
    path = write(tmp_path, "unsorted.aedat", H20 + body)
    with pytest.raises(AedatError) as e:
        read_both(read_aedat2, path, on_unsorted="raise")
    assert e.value.offset == len(H20) + 16
    np.testing.assert_array_equal(read_both(read_aedat2, path)["t"], [4, 10])


def test_empty_files(tmp_path):
    for data, fn in [
        (H31, read_aedat31),
        (H31 + packet(0, pol((5, 1))), read_aedat31),
        (H31 + packet(1, b""), read_aedat31),
        (H20, read_aedat2),
        (b"#!AER-DAT2.0", read_aedat2),  # header line without line end
    ]:
        path = write(tmp_path, "empty.aedat", data)
        got = read_both(fn, path)
        assert got.dtype == EVENT_DTYPE and got.shape == (0,)
        assert read_both(read_aedat, path).shape == (0,)
    for writer in (write_aedat31, write_aedat2):
        path = writer(tmp_path / "w.aedat", np.empty(0, EVENT_DTYPE))
        assert read_both(read_aedat, path).shape == (0,)


def test_long_headers_and_bare_newlines(tmp_path):
    # Headers longer than the 4 KiB first look, and '\n' instead of '\r\n'.
    comments = b"".join(b"# comment line %04d " % i + b"." * 40 + b"\r\n" for i in range(120))
    rec = struct.pack(">II", 0x0407, 10)
    path = write(tmp_path, "long2.aedat", H20 + comments + rec)
    np.testing.assert_array_equal(read_both(read_aedat, path), events([(10, 3, 4, 1)]))
    body = packet(1, pol((0x00140053, 1000)))
    path = write(tmp_path, "long31.aedat", H31[:-14] + comments + b"#!END-HEADER\r\n" + body)
    np.testing.assert_array_equal(read_both(read_aedat, path), events([(1000, 10, 20, 1)]))
    path = write(tmp_path, "lf31.aedat", H31.replace(b"\r\n", b"\n") + body)
    np.testing.assert_array_equal(read_both(read_aedat, path), events([(1000, 10, 20, 1)]))


# ------------------------------------------------------------------ writers + round trips


@st.composite
def streams(draw, *, t_max, size=128, max_n=300):
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(0, max_n))
    rng = np.random.default_rng(seed)
    ev = random_events(rng, n, t_max=t_max, sorted_=draw(st.booleans()), size=size)
    if draw(st.booleans()) and n > 3:  # many equal timestamps: tests sort stability
        ev["t"] = ev["t"] // max(1, t_max // 4)
    return ev, rng


@pytest.mark.filterwarnings("ignore::evformer.events.UnsortedEventsWarning")  # unsorted on purpose
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=streams(t_max=1 << 40),
    epp=st.integers(1, 64),
    extra=st.booleans(),
    with_invalid=st.booleans(),
)
def test_aedat31_round_trip(tmp_path, data, epp, extra, with_invalid):
    ev, rng = data
    invalid = rng.random(ev.size) < 0.2 if with_invalid else None
    path = write_aedat31(
        tmp_path / "rt.aedat", ev, events_per_packet=epp, extra_packets=extra, invalid=invalid
    )
    keep = ev if invalid is None else ev[~invalid]
    np.testing.assert_array_equal(read_both(read_aedat, path), stable_sorted(keep))


@pytest.mark.filterwarnings("ignore::evformer.events.UnsortedEventsWarning")  # unsorted on purpose
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=streams(t_max=1 << 31))
def test_aedat2_round_trip(tmp_path, data):
    ev, _ = data
    path = write_aedat2(tmp_path / "rt2.aedat", ev)
    np.testing.assert_array_equal(read_both(read_aedat, path), stable_sorted(ev))


def test_aedat2_round_trip_beyond_32_bits(tmp_path):
    rng = np.random.default_rng(1)
    ev = random_events(rng, 2000, t_max=1 << 20)
    # Sorted, gaps < 2**31 but the stream runs past several 2**32 counter wraps.
    ev["t"] = np.cumsum(rng.integers(0, 1 << 30, ev.size))
    assert ev["t"][-1] > 4 * (1 << 32)
    path = write_aedat2(tmp_path / "long.aedat", ev)
    np.testing.assert_array_equal(read_both(read_aedat2, path), ev)


def test_aedat31_more_packets_than_first_guess(tmp_path):
    # 5000 one-event packets: more than the reader's first packet-table size (4096).
    ev = random_events(np.random.default_rng(9), 5000, t_max=1 << 35)
    path = write_aedat31(tmp_path / "many.aedat", ev, events_per_packet=1, extra_packets=[0, 4999])
    np.testing.assert_array_equal(read_both(read_aedat31, path), ev)


def test_aedat31_writer_packet_structure(tmp_path):
    rng = np.random.default_rng(2)
    ev = random_events(rng, 50, t_max=1 << 20)
    ev["t"][20:] += (1 << 31) - (1 << 20)  # events 20.. have overflow 1 (some may not)
    ev["t"][35:] += 1 << 32
    ev["t"] = np.sort(ev["t"])
    path = write_aedat31(tmp_path / "p.aedat", ev, events_per_packet=8, source_name="DVS128")
    raw = path.read_bytes()
    lines = raw.split(b"\r\n")[:5]
    assert lines[0] == b"#!AER-DAT3.1" and lines[1] == b"#Format: RAW"
    assert lines[2] == b"#Source 1: DVS128" and lines[3].startswith(b"#Start-Time: ")
    assert lines[4] == b"#!END-HEADER"
    pos = raw.index(b"#!END-HEADER\r\n") + 14
    seen = 0
    while pos < len(raw):
        etype, src, size, tsoff, ovf, cap, num, valid = PH.unpack_from(raw, pos)
        assert (etype, size, tsoff) == (1, 8, 4) and cap == num == valid <= 8
        words = np.frombuffer(raw, "<u4", count=2 * num, offset=pos + 28).reshape(num, 2)
        # Every event of a packet shares the packet's overflow counter.
        np.testing.assert_array_equal(ev["t"][seen : seen + num] >> 31, ovf)
        np.testing.assert_array_equal(words[:, 1], ev["t"][seen : seen + num] & 0x7FFFFFFF)
        np.testing.assert_array_equal(words[:, 0] >> 17, ev["x"][seen : seen + num])
        seen += num
        pos += 28 + 8 * cap
    assert seen == ev.size


def test_writers_are_atomic(tmp_path, monkeypatch):
    ev = random_events(np.random.default_rng(3), 100, t_max=10**6)
    path = write_aedat31(tmp_path / "a.aedat", ev, extra_packets=True)
    before = path.read_bytes()

    def boom(i, t):
        raise RuntimeError("disk full")

    monkeypatch.setattr(aedat_mod, "_extra_packet", boom)
    with pytest.raises(RuntimeError):
        write_aedat31(path, ev[:10], extra_packets=True)
    assert path.read_bytes() == before  # the old file is untouched
    assert os.listdir(tmp_path) == ["a.aedat"]  # and no temporary file is left behind


def test_writer_validation(tmp_path):
    ev = events([(5, 1, 2, 1)])
    bad_t = events([(-1, 1, 2, 1)])
    with pytest.raises(ValueError, match=">= 0 µs"):
        write_aedat31(tmp_path / "x.aedat", bad_t)
    with pytest.raises(ValueError, match=">= 0 µs"):
        write_aedat2(tmp_path / "x.aedat", bad_t)
    with pytest.raises(ValueError, match="x must be in"):
        write_aedat2(tmp_path / "x.aedat", events([(5, 128, 2, 1)]))
    with pytest.raises(ValueError, match="polarity"):
        write_aedat2(tmp_path / "x.aedat", events([(5, 1, 2, 2)]))
    with pytest.raises(ValueError, match="invalid mask"):
        write_aedat31(tmp_path / "x.aedat", ev, invalid=np.zeros(2, bool))
    with pytest.raises(ValueError, match="extra_packets"):
        write_aedat31(tmp_path / "x.aedat", ev, extra_packets=[5])
    assert not list(tmp_path.iterdir())
    # A mapping of columns is accepted too.
    cols = {f: ev[f] for f in ("t", "x", "y", "p")}
    np.testing.assert_array_equal(read_aedat2(write_aedat2(tmp_path / "m.aedat", cols)), ev)


def test_writer_is_deterministic(tmp_path):
    ev = random_events(np.random.default_rng(4), 500, t_max=1 << 33)
    a = write_aedat31(tmp_path / "a.aedat", ev, extra_packets=True).read_bytes()
    b = write_aedat31(tmp_path / "b.aedat", ev, extra_packets=True).read_bytes()
    assert a == b


# ------------------------------------------------------------------ sort policy


def test_unsorted_policy(tmp_path):
    ev = events([(10, 1, 1, 1), (30, 2, 2, 0), (20, 3, 3, 1), (20, 4, 4, 0), (40, 5, 5, 1)])
    p31 = write_aedat31(tmp_path / "u31.aedat", ev)
    p20 = write_aedat2(tmp_path / "u20.aedat", ev)
    want = ev[[0, 2, 3, 1, 4]]  # stable: the two t=20 events keep their file order
    for path in (p31, p20):
        np.testing.assert_array_equal(read_both(read_aedat, path), want)
    header31 = p31.read_bytes().index(b"#!END-HEADER\r\n") + 14
    with pytest.raises(AedatError) as e:
        read_both(read_aedat31, p31, on_unsorted="raise")
    assert e.value.offset == header31 + 28 + 8 * 2 and "on_unsorted='sort'" in str(e.value)
    with pytest.raises(AedatError) as e:
        read_both(read_aedat2, p20, on_unsorted="raise")
    assert e.value.offset == p20.stat().st_size - 8 * 3
    sorted_path = write_aedat2(tmp_path / "s.aedat", want)
    np.testing.assert_array_equal(read_aedat2(sorted_path, on_unsorted="raise"), want)
    with pytest.raises(ValueError, match="on_unsorted"):
        read_aedat(sorted_path, on_unsorted="drop")
    with pytest.raises(ValueError, match="backend"):
        read_aedat(sorted_path, backend="cuda")
    with pytest.raises(ValueError, match="layout"):
        read_aedat2(sorted_path, layout="davis346")


# ------------------------------------------------------------------ errors


def assert_error(path, fn, offset, *words):
    with pytest.raises(AedatError) as e:
        read_both(fn, path)
    msg = str(e.value)
    assert path.name in msg and f"offset {offset}:" in msg, msg
    assert e.value.offset == offset and e.value.path == str(path)
    for w in words:
        assert w in msg, msg
    return e.value


D = len(H31)  # where the first packet starts in H31 files


@pytest.mark.parametrize(
    "name, body, offset, words",
    [
        ("trunc_header", packet(1, pol((3, 1))) + b"\0" * 10, D + 36, ["truncated", "10 bytes"]),
        ("trunc_body", packet(1, pol((3, 1), (3, 2)))[:-3], D, ["truncated packet body", "16"]),
        ("trunc_skipped", packet(0, pol((3, 1), (3, 2)))[:-1], D, ["truncated packet body"]),
        ("event_size", packet(1, b"\0" * 32, size=16), D, ["eventSize=16", "8 bytes"]),
        ("ts_offset", packet(1, pol((3, 1)), tsoff=0), D, ["eventTSOffset=0"]),
        ("number", packet(1, pol((3, 1)), number=2), D, ["eventNumber=2"]),
        ("capacity", packet(1, b"", capacity=-1), D, ["eventCapacity=-1"]),
        ("neg_size", packet(2, b"", size=-4), D, ["negative eventSize=-4"]),
        ("overflow", packet(1, pol((3, 1)), ovf=-1), D, ["eventTSOverflow=-1"]),
        ("neg_ts", packet(1, pol((3, 1), (3, -5))), D + 36, ["negative timestamp -5"]),
        # DAVIS346-style coordinates: x = 200 in a valid event (the invalid one is ignored).
        (
            "davis_xy",
            packet(1, pol((300 << 17, 1), ((200 << 17) | (5 << 2) | 1, 2))),
            D + 36,
            ["x=200, y=5", "not from a DVS128", "'DVS128'"],
        ),
    ],
)
def test_aedat31_errors(tmp_path, name, body, offset, words):
    path = write(tmp_path, f"{name}.aedat", H31 + packet(1, pol((3, 0))) + body)
    assert_error(path, read_aedat31, offset + 36, *words)  # +36: the valid first packet
    assert_error(path, read_aedat, offset + 36, *words)


def test_aedat31_damaged_source_line_still_gives_the_aedat_error(tmp_path):
    # a "#Source" header line without its colon (found by the fuzzer) is named as it
    # stands in the message, instead of crashing the error path with an IndexError
    header = H31.replace(b"#Source 1: DVS128", b"#Source 1 DAVIS")
    body = packet(1, pol((3, 0))) + packet(1, pol(((200 << 17) | (5 << 2) | 1, 2)))
    path = write(tmp_path, "src.aedat", header + body)
    start = len(header) + 36 + 28  # the second packet's event
    assert_error(path, read_aedat31, start, "x=200, y=5", "'#Source 1 DAVIS'")


def test_aedat31_davis346_file_is_rejected(tmp_path):
    rng = np.random.default_rng(5)
    ev = random_events(rng, 300, t_max=10**6, size=346)
    ev["y"] %= 260
    path = write_aedat31(tmp_path / "davis.aedat", ev, source_name="DAVIS346B")
    first = int(np.flatnonzero((ev["x"] >= 128) | (ev["y"] >= 128))[0])
    header = path.read_bytes().index(b"#!END-HEADER\r\n") + 14
    assert_error(path, read_aedat31, header + 28 + 8 * first, "'DAVIS346B'", "DVS128")


def test_header_errors(tmp_path):
    cases = [
        (b"", 0, "missing AEDAT header"),
        (b"hello world\n" + b"\0" * 16, 0, "missing AEDAT header"),
        (b"#!AER-DAT4.0\r\n" + b"\0" * 16, 0, "unsupported AEDAT version"),
        (b"#!AER-DAT3.0\r\n", 0, "unsupported AEDAT version"),
        (H31[:-14], len(H31) - 14, "not terminated"),  # no #!END-HEADER
        (H31[:-14] + b"\0" * 40, len(H31) - 14, "not terminated"),
        (H31[:-2], len(H31) - 14, "truncated"),  # END-HEADER without line end
    ]
    for i, (data, offset, words) in enumerate(cases):
        path = write(tmp_path, f"h{i}.aedat", data)
        assert_error(path, read_aedat, offset, words)
    p31 = write(tmp_path, "v31.aedat", H31)
    p20 = write(tmp_path, "v20.aedat", H20)
    assert_error(p31, read_aedat2, 0, "AEDAT 3.1 file", "read_aedat31")
    assert_error(p20, read_aedat31, 0, "AEDAT 2.0 file", "read_aedat2")


def test_aedat2_errors(tmp_path):
    good = struct.pack(">II", 0x0407, 10)
    # DAVIS layout: an APS sample (bit 31) and a DVS event at x = 200, y = 100.
    davis = struct.pack(">II", 0x80000000 | (7 << 12), 11) + struct.pack(
        ">II", (100 << 22) | (200 << 12) | (1 << 11), 12
    )
    path = write(tmp_path, "davis.aedat", H20 + good + davis)
    err = assert_error(path, read_aedat2, len(H20) + 8, "DAVIS", "0x80007000")
    assert "bits above bit 15" in err.reason
    path = write(tmp_path, "davis2.aedat", H20 + good + davis[8:])
    assert_error(path, read_aedat, len(H20) + 8, "x = bits 12-21 = 200", "y = bits 22-30 = 100")
    path = write(tmp_path, "trail.aedat", H20 + good * 3 + good[:5])
    assert_error(path, read_aedat2, len(H20) + 24, "truncated record", "5 trailing bytes")


def test_error_is_pickleable_value_error(tmp_path):
    path = write(tmp_path, "bad.aedat", b"nope")
    with pytest.raises(ValueError) as e:
        read_aedat(path)
    again = pickle.loads(pickle.dumps(e.value))
    assert isinstance(again, AedatError) and str(again) == str(e.value)
    assert (again.path, again.offset) == (str(path), 0)


# ------------------------------------------------------------------ spikingjelly and tonic


@pytest.fixture(scope="module")
def sj_utils():
    return pytest.importorskip("spikingjelly.datasets.utils")


@pytest.fixture(scope="module")
def sj_cifar():
    return pytest.importorskip("spikingjelly.datasets.cifar10_dvs")


def test_aedat31_matches_spikingjelly(tmp_path, sj_utils):
    rng = np.random.default_rng(6)
    ev = random_events(rng, 3000, t_max=1 << 34)  # crosses several 2**31 overflows
    invalid = rng.random(ev.size) < 0.1
    path = write_aedat31(
        tmp_path / "sj.aedat", ev, events_per_packet=200, extra_packets=True, invalid=invalid
    )
    sj = sj_utils.load_aedat_v3(path)
    # spikingjelly skips non-polarity packets too but keeps events without the valid bit.
    assert sj["t"].size == ev.size
    ours = read_aedat31(path)
    for f in ("t", "x", "y", "p"):
        np.testing.assert_array_equal(ours[f], sj[f][~invalid], err_msg=f)


def test_aedat2_matches_spikingjelly_cifar10dvs_orientation(tmp_path, sj_cifar):
    rng = np.random.default_rng(7)
    ev = random_events(rng, 3000, t_max=1 << 32)
    path = write_aedat2(tmp_path / "cifar10_cat_0.aedat", ev)
    sj = sj_cifar._load_origin_data(path)
    ours = read_aedat2(path)
    # spikingjelly transposes, flips both axes and inverts polarity; evformer stays in sensor
    # coordinates (the dataset layer applies spikingjelly's orientation).
    np.testing.assert_array_equal(sj["t"], ours["t"])
    np.testing.assert_array_equal(sj["x"], 127 - ours["y"])
    np.testing.assert_array_equal(sj["y"], 127 - ours["x"])
    np.testing.assert_array_equal(sj["p"], 1 - ours["p"])


def test_matches_tonic_raw_records(tmp_path):
    tio = pytest.importorskip("tonic.io")
    rng = np.random.default_rng(8)
    ev = random_events(rng, 2000, t_max=1 << 31)
    p31 = write_aedat31(tmp_path / "t31.aedat", ev, events_per_packet=100)
    # tonic 1.7's read_dvs_ibm / read_dvs_128 unpack its header function wrongly; call the
    # two stages they are made of.
    version, start, _ = tio.read_aedat_header_from_file(str(p31))
    assert version == 3.1
    raw = tio.get_aer_events_from_file(str(p31), version, start)
    ours = read_aedat31(p31)
    a = raw["address"]
    np.testing.assert_array_equal(raw["timeStamp"], ours["t"])
    np.testing.assert_array_equal((a >> 17) & 0x1FFF, ours["x"])
    np.testing.assert_array_equal((a >> 2) & 0x1FFF, ours["y"])
    np.testing.assert_array_equal((a >> 1) & 1, ours["p"])
    # tonic decodes every packet as polarity events: the extra packets show up as events.
    p_extra = write_aedat31(tmp_path / "t31x.aedat", ev, events_per_packet=100, extra_packets=True)
    raw = tio.get_aer_events_from_file(str(p_extra), version, start)
    assert raw.size > ev.size and read_aedat31(p_extra).size == ev.size

    p20 = write_aedat2(tmp_path / "t20.aedat", ev)
    version, start, _ = tio.read_aedat_header_from_file(str(p20))
    assert version == 2.0
    raw = tio.get_aer_events_from_file(str(p20), version, start)
    ours = read_aedat2(p20)
    a = raw["address"]
    np.testing.assert_array_equal(raw["timeStamp"], ours["t"])
    # tonic's read_dvs_128 calls bits 8-14 "x" and bits 1-7 "y": a transpose of ours.
    np.testing.assert_array_equal((a >> 8) & 0x7F, ours["y"])
    np.testing.assert_array_equal((a >> 1) & 0x7F, ours["x"])
    np.testing.assert_array_equal(a & 1, ours["p"])
