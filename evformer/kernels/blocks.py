"""Argument blocks: how a Python call hands a Numba kernel to torch's OpenMP team.

A team trampoline (:mod:`evformer.kernels.omp_team`) is a C callback with one argument, the
address of an int64 array: slot 0 the chunk counter the team's threads draw from, slot 1
``nchunks``, then the kernel's sizes and flags, array addresses and float scalars (as the
bits of their float64 value). Each kernel declares its block once, by name::

    FORWARD = ArgBlock("forward", ints=("T", "R", "C"), arrays={"y": FLOAT}, floats=("tau",))

and both sides follow from that declaration: the Python caller fills it by keyword
(:meth:`ArgBlock.pack` checks every name, type, dtype and memory layout and raises before
any native code runs), and the trampoline reads ``a[ix.T]``, ``a[ix.y]``, ... with the
slot indices of :attr:`ArgBlock.ix` (a namedtuple of ints, compile-time constants of the
closure). A slot can no longer be off by one between packer and reader.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["FLOAT", "ArgBlock"]

#: dtype of an array slot that holds the kernel's own float dtype (float32 or float64)
FLOAT = "float"

_HEADER = ("counter", "nchunks")
_RESERVED = (*_HEADER, "n_slots")
_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
}
_KERNEL_DTYPES = (torch.float32, torch.float64)


class ArgBlock:
    """The int64 argument block of one kernel's trampoline (see the module docstring).

    ``ints``: sizes and flags (Python ints or bools); ``arrays``: name -> dtype of
    C-contiguous CPU arrays passed by address (:data:`FLOAT` for the kernel's float dtype,
    else a NumPy dtype); ``floats``: scalars, rounded to the kernel's dtype and stored as
    float64 bits. Slots follow the header in that order.
    """

    def __init__(
        self,
        name: str,
        *,
        ints: tuple[str, ...] = (),
        arrays: Mapping[str, object] | None = None,
        floats: tuple[str, ...] = (),
    ) -> None:
        arrays = dict(arrays or {})
        names = (*ints, *arrays, *floats)
        if len(set(names)) != len(names) or set(names) & set(_RESERVED):
            raise ValueError(f"block {name!r}: slot names must be unique, not {_RESERVED}")
        self.name = name
        self.ints = tuple(ints)
        self.arrays = {k: FLOAT if _is_float(v) else np.dtype(v) for k, v in arrays.items()}
        if not all(_is_float(v) or v in _TORCH_DTYPES for v in self.arrays.values()):
            known = [str(d) for d in _TORCH_DTYPES]
            raise ValueError(f"block {name!r}: array dtypes must be FLOAT or one of {known}")
        self.floats = tuple(floats)
        self.names = names
        self.size = len(_HEADER) + len(names)
        #: slot indices by name (and ``n_slots``, the block's length), for the trampoline
        self.ix = _slots_type(name, (*_HEADER, *names, "n_slots"))(*range(self.size), self.size)

    def __repr__(self) -> str:
        return f"ArgBlock({self.name!r}, slots={self.names})"

    def index(self, slot: str) -> int:
        """Position of ``slot`` in the block."""
        return getattr(self.ix, slot)

    def pack(self, nchunks: int, dtype: torch.dtype, **slots) -> np.ndarray:
        """The filled block for a kernel run in ``dtype`` (float32 or float64) split into
        ``nchunks`` chunks. Every declared slot must be given, by name; a missing or unknown
        name, a value of the wrong type or dtype, or a non-contiguous or non-CPU array raises
        TypeError / ValueError here, before any native code reads the block."""
        if set(slots) != set(self.names):
            missing = sorted(set(self.names) - set(slots))
            unknown = sorted(set(slots) - set(self.names))
            raise TypeError(
                f"block {self.name!r}: missing slots {missing}, unknown slots {unknown}; "
                f"it declares {list(self.names)}"
            )
        if dtype not in _KERNEL_DTYPES:
            raise TypeError(
                f"block {self.name!r}: kernel dtype must be float32 or float64, got {dtype}"
            )
        block = np.zeros(self.size, dtype=np.int64)
        ix = self.ix
        block[ix.nchunks] = _int(self.name, "nchunks", nchunks)
        for name in self.ints:
            block[getattr(ix, name)] = _int(self.name, name, slots[name])
        for name, want in self.arrays.items():
            want = dtype if _is_float(want) else _TORCH_DTYPES[want]
            block[getattr(ix, name)] = _address(self.name, name, slots[name], want)
        scalar = np.float32 if dtype == torch.float32 else np.float64
        for name in self.floats:
            value = slots[name]
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                raise TypeError(f"block {self.name!r}: slot {name!r} takes a float, got {value!r}")
            block[getattr(ix, name)] = np.float64(scalar(value)).view(np.int64)
        return block


def _is_float(dtype) -> bool:
    # not ``dtype == FLOAT``: NumPy reads the string "float" as float64 and says True
    return isinstance(dtype, str) and dtype == FLOAT


def _slots_type(name: str, fields: tuple[str, ...]) -> type:
    """The namedtuple type of a block's slot indices, kept as an attribute of this module.

    Why: Numba keys a trampoline's on-disk cache entry on the pickled values its closure
    captures; a namedtuple type that pickle can find by name pickles to the same bytes in
    every process (a dynamic one would not, and every run would recompile).
    """
    type_name = f"{name}_slots"
    cls = globals().get(type_name)
    if cls is None:
        cls = namedtuple(type_name, fields, module=__name__)
        globals()[type_name] = cls
    elif cls._fields != fields:
        raise ValueError(f"two argument blocks are named {name!r}; block names must be unique")
    return cls


def _int(block: str, name: str, value) -> int:
    if isinstance(value, (float, np.floating)) or not isinstance(
        value, (int, bool, np.integer, np.bool_)
    ):
        raise TypeError(f"block {block!r}: slot {name!r} takes an int, got {value!r}")
    return int(value)


def _address(block: str, name: str, value, dtype: torch.dtype) -> int:
    """Address of the C-contiguous CPU array ``value`` (tensor or ndarray) of ``dtype``."""
    if isinstance(value, torch.Tensor):
        got, contiguous, cpu = value.dtype, value.is_contiguous(), value.device.type == "cpu"
        address = value.data_ptr()
    elif isinstance(value, np.ndarray):
        got = _TORCH_DTYPES.get(value.dtype, value.dtype)
        contiguous, cpu = value.flags.c_contiguous, True
        address = value.ctypes.data
    else:
        raise TypeError(f"block {block!r}: slot {name!r} takes an array, got {type(value)}")
    if got != dtype:
        raise TypeError(f"block {block!r}: slot {name!r} takes {dtype} memory, got {got}")
    if not (contiguous and cpu):
        raise ValueError(f"block {block!r}: slot {name!r} needs a C-contiguous CPU array")
    return address
