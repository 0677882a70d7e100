"""The one atomic write (evformer._atomic): an exception or a kill during a write leaves
the old file intact; every writer in evformer goes through it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from evformer._atomic import (
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temps,
)

PACKAGE = Path(__file__).resolve().parents[1] / "evformer"


def test_write_replaces_and_creates_the_folder(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    assert atomic_write_text(path, "one\n") == path
    assert path.read_text() == "one\n"
    atomic_write_bytes(path, [b"tw", memoryview(b"o\n")])
    assert path.read_bytes() == b"two\n"
    with atomic_write(path, "w") as f:
        f.write("three: µs\n")
    assert path.read_text(encoding="utf-8") == "three: µs\n"
    assert os.listdir(path.parent) == ["f.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(path, "a"):
            pass


@pytest.mark.parametrize("form", ["file", "path"])
def test_exception_keeps_the_old_file_and_leaves_no_temp(tmp_path, form):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        if form == "file":
            with atomic_write(path) as f:
                f.write(b"new, half written")
                raise RuntimeError("disk full")
        else:
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"new, half written")
                raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(KeyboardInterrupt):  # not only Exception: any interruption
        with atomic_write(path) as f:
            f.write(b"new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


_KILL = textwrap.dedent(
    """
    import sys, time
    from evformer._atomic import atomic_write
    with atomic_write(sys.argv[1]) as f:
        f.write(b"new " * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)  # killed here, mid-write
    """
)


def test_kill_during_a_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert path.read_bytes() == b"old"
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith("f.bin.tmp-")
    assert leftovers[0].stat().st_size == 4000  # the dead writer's partial file
    remove_stale_temps(path)  # its pid is gone: the next writer cleans up
    assert os.listdir(tmp_path) == ["f.bin"]


def test_stale_temps_of_live_processes_are_kept(tmp_path):
    path = tmp_path / "f.bin"
    mine = tmp_path / f"f.bin.tmp-{os.getpid()}-abcdef01"
    mine.write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f"f.bin.tmp-{proc.pid}-abcdef01"
        live.write_bytes(b"")
        time.sleep(0.05)
        remove_stale_temps(path)
        assert mine.exists() and live.exists()
    finally:
        proc.kill()
        proc.wait()
    remove_stale_temps(path)
    assert not live.exists()


def test_every_writer_uses_the_helper():
    """No other module renames files into place (one atomic write, not five)."""
    offenders = []
    for py in PACKAGE.rglob("*.py"):
        if py.name == "_atomic.py":
            continue
        text = py.read_text(encoding="utf-8")
        if re.search(r"os\.(replace|rename)\(|tempfile\.mkstemp", text):
            offenders.append(str(py.relative_to(PACKAGE)))
    assert offenders == []
