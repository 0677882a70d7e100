"""The event dtype and the column view that every kernel builds on."""

import numpy as np
import pytest

from evformer.events import EVENT_DTYPE, columns, from_columns, sort_events
from evformer.events.core import empty_events, is_sorted


def test_dtype_is_tonic_compatible_and_packed():
    assert EVENT_DTYPE.names == ("t", "x", "y", "p")
    assert EVENT_DTYPE["t"] == np.int64 and EVENT_DTYPE["x"] == np.int16
    assert EVENT_DTYPE["y"] == np.int16 and EVENT_DTYPE["p"] == np.int8
    assert EVENT_DTYPE.itemsize == 13  # packed: what the bandwidth figures assume


def test_columns_of_structured_array_are_views():
    ev = from_columns([1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 1, 0])
    cols = columns(ev)
    assert cols.n_events == 3 and len(cols) == 4
    cols.x[0] = 42  # a view: writes through
    assert ev["x"][0] == 42
    np.testing.assert_array_equal(cols.p, [0, 1, 0])


def test_columns_of_mapping_and_errors():
    m = {"t": np.arange(3), "x": np.zeros(3, np.int16), "y": np.ones(3, np.int16), "p": np.ones(3)}
    with pytest.raises(ValueError, match="field 'p' must be integer"):
        columns(m)
    m["p"] = np.ones(3, np.int8)
    assert columns(m).y.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="lacks key"):
        columns({"t": np.arange(3)})
    with pytest.raises(ValueError, match="different lengths"):
        columns({**m, "x": np.zeros(2, np.int16)})
    with pytest.raises(ValueError, match="plain"):
        columns(np.zeros(3))
    with pytest.raises(TypeError, match="list"):
        columns([1, 2, 3])


def test_sort_events_is_stable():
    ev = from_columns([3, 1, 3, 1], [0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 1, 1])
    assert not is_sorted(ev["t"])
    s = sort_events(ev)
    assert s["t"].tolist() == [1, 1, 3, 3]
    assert s["x"].tolist() == [1, 3, 0, 2]  # equal timestamps keep their order
    assert is_sorted(empty_events()["t"])


def test_parallel_numba_kernels_survive_fork():
    """A forked worker runs a parallel kernel after its parent ran one (DataLoader pattern)."""
    import os
    import subprocess
    import sys
    import textwrap

    # A fresh interpreter, so the threading layer is chosen there, as in a user's program.
    code = textwrap.dedent(
        """
        import multiprocessing as mp
        import numpy as np
        import evformer  # noqa: F401  (chooses the fork-safe threading layer)
        from numba import njit, prange

        @njit(parallel=True)
        def total(a):
            s = 0.0
            for i in prange(a.shape[0]):
                s += a[i]
            return s

        def child(_):
            return total(np.ones(10_000))

        if __name__ == "__main__":
            assert total(np.ones(10_000)) == 10_000
            with mp.get_context("fork").Pool(2) as pool:
                print(pool.map(child, range(2)))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "[10000.0, 10000.0]" in out.stdout
