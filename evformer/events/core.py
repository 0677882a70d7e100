"""The event array: one dtype for every stream evformer reads, bins or augments.

An event stream is a NumPy structured array of ``EVENT_DTYPE`` sorted by ``t``:

- ``t``: int64, microseconds
- ``x``: int16, column (indexes the width axis)
- ``y``: int16, row (indexes the height axis)
- ``p``: int8, polarity, 0 = OFF, 1 = ON

The field names are tonic's, so streams pass to and from tonic unchanged.
Kernels that want speed take the four fields as separate arrays ("columns");
``columns`` gives them without copying from either a structured array or a
mapping ``{"t", "x", "y", "p"}`` (the layout the dataset cache stores).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

EVENT_DTYPE = np.dtype([("t", np.int64), ("x", np.int16), ("y", np.int16), ("p", np.int8)])
FIELDS = ("t", "x", "y", "p")


class Columns(NamedTuple):
    """The four fields of a stream as 1-D arrays of equal length (views when possible)."""

    t: np.ndarray
    x: np.ndarray
    y: np.ndarray
    p: np.ndarray

    @property
    def n_events(self) -> int:
        """Number of events (``len()`` stays the tuple's length, 4)."""
        return int(self.t.shape[0])


def columns(events: np.ndarray | Mapping[str, np.ndarray], *, name: str = "events") -> Columns:
    """Return the fields ``t, x, y, p`` of ``events`` as 1-D arrays, without copying.

    ``events`` is a structured array with (at least) the fields of ``EVENT_DTYPE``,
    or a mapping with keys ``"t", "x", "y", "p"`` of 1-D arrays of one length.
    Field dtypes are not converted here (kernels accept any integer type);
    a missing field or mismatched lengths raise ``ValueError`` naming ``name``.
    """
    if isinstance(events, np.ndarray):
        if events.dtype.names is None:
            raise ValueError(
                f"{name}: expected a structured array with fields {FIELDS} "
                f"(dtype evformer.events.EVENT_DTYPE), got a plain {events.dtype} array"
            )
        missing = [f for f in FIELDS if f not in events.dtype.names]
        if missing:
            raise ValueError(f"{name}: structured array lacks field(s) {missing}")
        if events.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D event array, got shape {events.shape}")
        cols = [events[f] for f in FIELDS]
    elif isinstance(events, Mapping):
        missing = [f for f in FIELDS if f not in events]
        if missing:
            raise ValueError(f"{name}: mapping lacks key(s) {missing}; expected {FIELDS}")
        cols = [np.asarray(events[f]) for f in FIELDS]
        for f, c in zip(FIELDS, cols):
            if c.ndim != 1:
                raise ValueError(f"{name}[{f!r}]: expected a 1-D array, got shape {c.shape}")
        lengths = {f: c.shape[0] for f, c in zip(FIELDS, cols)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{name}: fields have different lengths {lengths}")
    else:
        raise TypeError(
            f"{name}: expected a structured event array or a mapping of field arrays, "
            f"got {type(events).__name__}"
        )
    for f, c in zip(FIELDS, cols):
        if not np.issubdtype(c.dtype, np.integer) and c.dtype != np.bool_:
            raise ValueError(f"{name}: field {f!r} must be integer, got {c.dtype}")
    return Columns(*cols)


def from_columns(t, x, y, p) -> np.ndarray:
    """Pack four equal-length 1-D arrays into a structured array of ``EVENT_DTYPE``."""
    t = np.asarray(t)
    n = t.shape[0]
    for f, c in zip(FIELDS[1:], (x, y, p)):
        if np.shape(c) != (n,):
            raise ValueError(f"field {f!r} has shape {np.shape(c)}, expected ({n},)")
    out = np.empty(n, dtype=EVENT_DTYPE)
    out["t"] = t
    out["x"] = x
    out["y"] = y
    out["p"] = p
    return out


def empty_events() -> np.ndarray:
    """A stream with no events."""
    return np.empty(0, dtype=EVENT_DTYPE)


def is_sorted(t: np.ndarray) -> bool:
    """True when timestamps never decrease (an empty or one-event stream is sorted)."""
    return bool(t.shape[0] < 2 or np.all(t[1:] >= t[:-1]))


def sort_events(events: np.ndarray) -> np.ndarray:
    """Return ``events`` stably sorted by ``t`` (a copy; already-sorted input is returned as is)."""
    if is_sorted(events["t"]):
        return events
    return events[np.argsort(events["t"], kind="stable")]
