"""Event streams: the event dtype, AEDAT readers/writers, binning, augmentation, simulation.

This subpackage imports NumPy and Numba only (never torch), so data preparation
workers stay light. Names are imported lazily on first use.
"""

from __future__ import annotations

import importlib

from evformer.events.core import EVENT_DTYPE, FIELDS, Columns, columns, from_columns, sort_events

# public name -> submodule that defines it (loaded on first access)
_LAZY = {
    # aedat.py
    "AedatError": "aedat",
    "read_aedat": "aedat",
    "read_aedat31": "aedat",
    "read_aedat2": "aedat",
    "write_aedat31": "aedat",
    "write_aedat2": "aedat",
    # frames.py
    "to_frames": "frames",
    "to_frames_batch": "frames",
    # simulate.py
    "simulate": "simulate",
}

__all__ = ["EVENT_DTYPE", "FIELDS", "Columns", "columns", "from_columns", "sort_events", *_LAZY]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'evformer.events' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"evformer.events.{mod}"), name)
    globals()[name] = value
    return value
