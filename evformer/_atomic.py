"""The one atomic file write evformer uses (checkpoints, metrics, plots, AEDAT files, caches).

A write goes to a temporary file in the target's folder (``os.replace`` is atomic only
within one file system), is flushed and fsynced, renamed onto the target, and the folder is
fsynced so the rename itself survives a power cut. An exception inside the write removes
the temporary file; a killed process leaves at most a temporary file, never a truncated
target: readers see the old file or the new one. Torch-free, so ``evformer.events`` can
use it.

Temporary files are named ``<name>.tmp-<pid>-<8 hex>``: the pid lets
:func:`remove_stale_temps` tell a dead writer's leftovers from a live one's.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "remove_stale_temps",
    "temp_path",
]


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name for ``path`` in its folder: ``<name>.tmp-<pid>-<8 hex>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for the caller to write (e.g. with h5py); on a normal exit
    fsync it, rename it onto ``path`` and fsync the folder; on an exception delete it.

    The folder of ``path`` is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        # Make the rename durable; not possible everywhere (Windows cannot open folders).
        with contextlib.suppress(OSError):
            _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: a file object (``"wb"``, or ``"w"``
    for UTF-8 text) on a temporary file that replaces ``path`` only when the block ends
    without an exception (see :func:`atomic_path`)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes | memoryview]) -> Path:
    """Write ``data`` (bytes, or an iterable of byte chunks) to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            for chunk in data:
                f.write(chunk)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete temporary files of ``path`` left by writers that no longer run."""
    path = Path(path)
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(path.name) + 5 :].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except PermissionError:
            pass  # alive, owned by someone else
