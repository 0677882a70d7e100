"""Every notebook under notebooks/ runs top to bottom on the built-in demo data.

The code cells are executed in order in one namespace (as a kernel would), with
matplotlib's non-interactive Agg backend, so no Jupyter installation is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    for cell in code:
        # committed without outputs: the notebooks stay diffable and never go stale
        assert cell["outputs"] == [] and cell["execution_count"] is None, path.name
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    namespace: dict = {"__name__": "__main__"}
    try:
        for i, cell in enumerate(code):
            source = "".join(cell["source"])
            exec(compile(source, f"{path.name}[code cell {i}]", "exec"), namespace)
    finally:
        plt.close("all")
