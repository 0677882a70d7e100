"""evformer: event-camera datasets and spiking vision transformers."""

import os as _os

__version__ = "0.1.0"

# Numba's default threading layer on Linux wheels is GNU OpenMP, which kills a forked
# child (a DataLoader or preparation worker) that runs a parallel kernel after its parent
# ran one. The built-in "workqueue" layer survives fork; a user's explicit choice wins.
if "NUMBA_THREADING_LAYER" not in _os.environ:
    _os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    import sys as _sys

    if "numba" in _sys.modules:  # imported before evformer: its config is already read
        _sys.modules["numba"].config.THREADING_LAYER = "workqueue"
