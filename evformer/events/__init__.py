"""Event streams: the event dtype, AEDAT readers/writers, binning, augmentation, simulation.

This subpackage imports NumPy and Numba only (never torch), so data preparation
workers stay light. Names are imported lazily on first use.
"""

from __future__ import annotations

from evformer._lazy import lazy_exports
from evformer.events.core import EVENT_DTYPE, FIELDS, Columns, columns, from_columns, sort_events

# public name -> submodule that defines it (loaded on first access)
_LAZY = {
    # aedat.py
    "AedatError": "aedat",
    "UnsortedEventsWarning": "aedat",
    "read_aedat": "aedat",
    "read_aedat31": "aedat",
    "read_aedat2": "aedat",
    "write_aedat31": "aedat",
    "write_aedat2": "aedat",
    # frames.py
    "to_frames": "frames",
    "to_frames_batch": "frames",
    "count_dtype": "frames",
    # simulator.py (not simulate.py: importing a submodule binds its name on this
    # package, which would shadow the function `simulate`)
    "simulate": "simulator",
    "DVSSimulator": "simulator",
    # gestures.py
    "GESTURE_CLASSES": "gestures",
    "DIRECTION_PAIRS": "gestures",
    "render_gesture": "gestures",
    "make_gesture_events": "gestures",
    # augment.py
    "EventTransform": "augment",
    "drop_event": "augment",
    "drop_by_time": "augment",
    "drop_by_area": "augment",
    "spatial_jitter": "augment",
    "time_jitter": "augment",
    "flip_lr": "augment",
    "flip_ud": "augment",
    "flip_polarity": "augment",
    "time_reversal": "augment",
    "uniform_noise": "augment",
    "denoise": "augment",
    "refractory_period": "augment",
    "crop": "augment",
    "center_crop": "augment",
    "random_crop": "augment",
    "downsample": "augment",
    "DropEvent": "augment",
    "DropEventByTime": "augment",
    "DropEventByArea": "augment",
    "SpatialJitter": "augment",
    "TimeJitter": "augment",
    "RandomFlipLR": "augment",
    "RandomFlipUD": "augment",
    "RandomFlipPolarity": "augment",
    "RandomTimeReversal": "augment",
    "UniformNoise": "augment",
    "Denoise": "augment",
    "RefractoryPeriod": "augment",
    "CenterCrop": "augment",
    "RandomCrop": "augment",
    "Downsample": "augment",
    "Compose": "augment",
    "RandomChoice": "augment",
}

__all__ = ["EVENT_DTYPE", "FIELDS", "Columns", "columns", "from_columns", "sort_events", *_LAZY]


__getattr__ = lazy_exports(__name__, _LAZY)
