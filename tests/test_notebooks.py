"""Every notebook under notebooks/ runs top to bottom on the built-in demo data, executed
through a real Jupyter kernel (nbclient + ipykernel) as a user's Jupyter would run it.

The kernel is this interpreter (``sys.executable``: a kernelspec written for the test and
put first on ``JUPYTER_PATH``, so no other installed "python3" kernel is picked up) with
matplotlib's non-interactive Agg backend (``MPLBACKEND=Agg``). Each cell gets
``CELL_TIMEOUT`` seconds. The executed notebook is never written back: committed notebooks
carry no outputs, which the fast test below checks.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT = 120  # seconds per cell; a notebook is meant to run in well under 90 s in all
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in the kernel's tracebacks


def _jupyter():
    """``(nbformat, nbclient)``, or a failure saying how to install them: a missing
    Jupyter stack must not turn these tests into skips."""
    try:
        import ipykernel  # noqa: F401  (the kernel the client starts)
        import nbclient
        import nbformat
    except ImportError as e:
        missing = str(e)
    else:
        return nbformat, nbclient
    pytest.fail(
        f"executing the notebooks needs nbclient, nbformat and ipykernel ({missing}); "
        f'install the notebooks extra: pip install -e ".[notebooks]"',
        pytrace=False,
    )


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec running this interpreter, first on ``JUPYTER_PATH``."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "evformer tests",
        "language": "python",
        "env": {"MPLBACKEND": "Agg"},
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    work = tmp_path / "work"
    work.mkdir()
    return work


def _execute(nb, *, cwd: Path, name: str) -> None:
    """Run every cell of ``nb`` in one kernel; fail naming the notebook, the cell's index
    and first source lines, and the error."""
    nbformat, nbclient = _jupyter()
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    failed = None
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, index)
            except Exception as e:  # CellExecutionError, CellTimeoutError, DeadKernelError
                failed = index, cell, e
                break
    if failed is not None:  # outside the except: one report, not a chained traceback
        index, cell, e = failed
        head = "\n    ".join(cell.source.splitlines()[:4])
        error = _ANSI.sub("", str(e))
        pytest.fail(
            f"{name}: cell {index} failed ({type(e).__name__})\n    {head}\n{error}",
            pytrace=False,
        )


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4, path.name
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            # committed without outputs: the notebooks stay diffable and never go stale
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name}: cell {i} carries outputs; clear them before committing"
            )
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged, f'{path.name}: no code cell is tagged "parameters" (where real data goes)'


def test_kernel_is_this_python_with_agg(kernel_env):
    nbformat, _ = _jupyter()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, sys, matplotlib\n"
            "print(sys.executable, sys.prefix, matplotlib.get_backend(), os.getcwd(), sep='\\n')"
        )
    ]
    _execute(nb, cwd=kernel_env, name="kernel check")
    lines = "".join(o.get("text", "") for o in nb.cells[0].outputs).splitlines()
    assert lines[:2] == [sys.executable, sys.prefix] and lines[2].lower() == "agg"
    assert Path(lines[3]) == kernel_env  # notebooks run in a scratch folder


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env):
    nbformat, _ = _jupyter()
    nb = nbformat.read(path, as_version=4)
    _execute(nb, cwd=kernel_env, name=path.name)
