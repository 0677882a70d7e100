"""The kernels package: its import graph, the kernel-set interface and the argument blocks.

The argument blocks are what a Python call hands to native code; a wrong one must be a
Python exception before any native code runs, never a read of the wrong memory.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import evformer.kernels
from evformer.kernels import numba_lif, numba_sparse
from evformer.kernels.blocks import FLOAT, ArgBlock
from evformer.kernels.cpu import NumbaKernels, _run
from evformer.kernels.cuda import TritonKernels
from evformer.kernels.interface import EventDrivenKernels, KernelSet, get_kernels

PACKAGE = Path(evformer.kernels.__file__).parent


def _evformer_imports(path: Path) -> set[str]:
    """Every evformer module ``path`` imports, at any depth (lazy imports count)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from evformer.kernels import numba_lif`` imports a module
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] == "evformer"}


def _kernel_graph() -> dict[str, set[str]]:
    modules = {
        f"evformer.kernels.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"
    }
    return {name: _evformer_imports(path) & set(modules) for name, path in modules.items()}


def test_kernels_package_has_no_import_cycle():
    graph = _kernel_graph()
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack, node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*stack, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_kernels_import_nothing_of_models_and_types_nothing_of_evformer():
    for path in PACKAGE.glob("*.py"):
        imports = _evformer_imports(path)
        assert not {m for m in imports if m.startswith("evformer.models")}, path.name
        if path.stem == "types":
            assert imports == set(), imports


def _public_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(protocol, name))
        for name, value in vars(protocol).items()
        if isinstance(value, staticmethod)
    }


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_kernel_sets_implement_the_declared_interface(backend):
    kernels = get_kernels(backend)
    assert kernels.name == backend
    protocols = [KernelSet] + ([EventDrivenKernels] if kernels.event_driven else [])
    for protocol in protocols:
        for name, sig in _public_methods(protocol).items():
            impl = inspect.signature(getattr(kernels, name))
            assert list(impl.parameters) == list(sig.parameters), f"{backend}.{name}"
    if not kernels.event_driven:
        assert not any(hasattr(kernels, n) for n in _public_methods(EventDrivenKernels))


def test_kernel_set_flags():
    assert NumbaKernels.event_driven and not TritonKernels.event_driven


# -- argument blocks ----------------------------------------------------------------------------

BLOCK = ArgBlock(
    "test_block",
    ints=("n", "flag"),
    arrays={"x": FLOAT, "out": np.uint8, "acc": np.float64},
    floats=("tau",),
)


def _slots(**over):
    slots = {
        "n": 5,
        "flag": True,
        "x": torch.zeros(5),
        "out": torch.zeros(5, dtype=torch.uint8),
        "acc": np.zeros(3),
        "tau": 0.1,
    }
    slots.update(over)
    return slots


def test_block_packs_by_name_and_the_indices_read_it_back():
    s = _slots()
    block = BLOCK.pack(4, torch.float32, **s)
    ix = BLOCK.ix
    assert block.dtype == np.int64 and block.size == ix.n_slots == 2 + 6
    assert block[ix.counter] == 0 and block[ix.nchunks] == 4
    assert block[ix.n] == 5 and block[ix.flag] == 1
    assert block[ix.x] == s["x"].data_ptr() and block[ix.acc] == s["acc"].ctypes.data
    # floats: rounded to the kernel dtype, stored as float64 bits
    assert block[ix.tau :].view(np.float64)[0] == np.float64(np.float32(0.1))
    s64 = _slots(x=torch.zeros(5, dtype=torch.float64))
    assert BLOCK.pack(4, torch.float64, **s64)[ix.tau :].view(np.float64)[0] == 0.1
    assert sorted(BLOCK.ix[2:-1]) == list(range(2, 8))  # every slot once


@pytest.mark.parametrize(
    ("over", "error"),
    [
        ({"extra": 1}, TypeError),  # unknown slot
        ({"n": 2.0}, TypeError),  # a float in an int slot
        ({"tau": "0.1"}, TypeError),
        ({"tau": True}, TypeError),
        ({"x": torch.zeros(5, dtype=torch.float64)}, TypeError),  # not the kernel dtype
        ({"out": torch.zeros(5, dtype=torch.int32)}, TypeError),  # not the declared dtype
        ({"acc": np.zeros(3, dtype=np.float32)}, TypeError),
        ({"x": [0.0] * 5}, TypeError),  # not an array
        ({"x": torch.zeros(5, 2).t()}, ValueError),  # not contiguous
        ({"acc": np.zeros((3, 2))[:, 0]}, ValueError),
    ],
)
def test_block_rejects_a_wrong_slot(over, error):
    with pytest.raises(error, match="test_block"):
        BLOCK.pack(1, torch.float32, **_slots(**over))


def test_block_rejects_a_missing_slot_or_kernel_dtype():
    s = _slots()
    del s["acc"]
    with pytest.raises(TypeError, match="missing slots \\['acc'\\]"):
        BLOCK.pack(1, torch.float32, **s)
    with pytest.raises(TypeError, match="float32 or float64"):
        BLOCK.pack(1, torch.float16, **_slots())


def test_block_declarations_are_checked():
    with pytest.raises(ValueError, match="unique"):
        ArgBlock("dup", ints=("a",), floats=("a",))
    with pytest.raises(ValueError, match="unique"):
        ArgBlock("reserved", ints=("nchunks",))
    with pytest.raises(ValueError, match="array dtypes"):
        ArgBlock("odd_dtype", arrays={"x": np.float16})
    with pytest.raises(ValueError, match="block names must be unique"):
        ArgBlock("test_block", ints=("other",))


class _NoNativeCalls:
    def run(self, *args):  # pragma: no cover - reached only if the check failed
        raise AssertionError("a wrong block reached native code")


def test_a_wrong_block_raises_before_any_native_call(monkeypatch):
    def no_compile(*args):  # pragma: no cover - reached only if the check failed
        raise AssertionError("trampolines looked up for a wrong block")

    monkeypatch.setattr(numba_lif, "team_trampolines", no_compile)
    monkeypatch.setattr(numba_sparse, "team_trampolines", no_compile)
    y = torch.zeros(2, 3, 4)
    good = dict(
        T=2, R=3, C=4, y=y, scale=torch.ones(4), shift=torch.zeros(4), spikes=torch.empty_like(y),
        packed=torch.empty(1, 1, dtype=torch.uint8), prow=1, pcol=1, write_packed=False,
        tau=2.0, v_th=1.0, v_reset=0.0,
    )  # fmt: skip
    team = _NoNativeCalls()
    bad_slots = [
        {k: v for k, v in good.items() if k != "tau"},  # one slot short
        {**good, "alpha": 4.0},  # one slot too many
        {**good, "scale": torch.ones(4, dtype=torch.float64)},  # wrong dtype
        {**good, "packed": torch.empty(1, 1)},  # float memory in a uint8 slot
    ]
    for slots in bad_slots:
        with pytest.raises((TypeError, ValueError)):
            _run(team, numba_lif.FORWARD, torch.float32, 1, **slots)
    with pytest.raises(TypeError):
        _run(team, numba_lif.FORWARD, torch.float64, 1, **good)  # float32 arrays


def test_every_declared_block_is_unique_and_self_consistent():
    blocks = (*numba_lif.BLOCKS, *numba_sparse.BLOCKS)
    assert len({b.name for b in blocks}) == len(blocks)
    for b in blocks:
        assert b.size == len(b.ix) - 1 == 2 + len(b.names)
        assert [b.index(n) for n in b.names] == list(range(2, b.size))
