"""Checkpoints that load with ``torch.load(weights_only=True)``, written atomically.

A training checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:

- ``model``, ``optimizer``, ``scheduler``, ``scaler``: the state dicts;
- ``epoch`` (0-based epoch in progress), ``step_in_epoch`` (global batches of it already
  trained), ``step`` (optimizer steps so far);
- ``rng``: per-rank global RNG states (Python ``random``, NumPy's legacy global state as a
  tensor, torch CPU and CUDA) -- third-party code may still draw from them;
- ``generators``: states of the trainer's own ``torch.Generator`` objects (Mixup/CutMix);
- ``config``: the resolved run configuration as a plain dict;
- anything else the trainer needs to continue (running sums of the epoch, best accuracy).

Nothing is pickled as a Python object, so checkpoints keep loading across versions and
with ``weights_only=True`` (the default since torch 2.6).
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evformer._atomic import atomic_write

FORMAT = "evformer.checkpoint"
VERSION = 1


def capture_rng_state() -> dict:
    """This process's global RNG states as weights-only-loadable values."""
    # the legacy global state is saved (not used): third-party code may draw from it
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of GPUs: restore what lines up
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through ``evformer._atomic.atomic_write`` (temporary file,
    fsync, rename): a killed process leaves either the old file or the new one, never a
    truncated one."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write a training checkpoint ``state`` (see the module docstring) atomically.

    The dict is tagged with a format name and version; it must hold only weights-only-
    loadable values, which is checked here so a bad value fails at save time, not at resume.
    """
    _check_plain(state, "checkpoint")
    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    trusted_types: Sequence[type] = (),
) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    ``trusted_types``: classes the weights-only unpickler may additionally rebuild, e.g.
    ``argparse.Namespace`` for the official Spikformer checkpoints, which store their
    command line that way (still no arbitrary code: only these classes are allowed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    why_not = _not_a_checkpoint(path)
    if why_not is not None:
        raise ValueError(
            f"{path} is not a checkpoint: {why_not}. torch.save writes a ZIP archive holding "
            "data.pkl; a truncated or partly downloaded file looks like this too: copy it again."
        )
    try:
        with torch.serialization.safe_globals(list(trusted_types)):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
        raise ValueError(
            f"cannot load checkpoint {path} with torch.load(weights_only=True): {e}. "
            "It pickles Python objects beyond tensors and plain containers; load it yourself "
            "if you trust it and save its state dict with torch.save(model_state, path)."
        ) from e
    except Exception as e:  # a damaged archive or stream
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); copy it again"
        ) from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, or None when it may be one."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"a damaged ZIP archive ({e})"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "a ZIP archive without the data.pkl torch.save writes"
        return None
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return None  # a pickle stream: torch's legacy (pre-1.6) format
    return f"neither torch.save's ZIP format nor a pickle ({size} bytes starting {head!r})"


def model_state_from(ckpt: dict, *, path: str | os.PathLike = "<checkpoint>") -> dict:
    """The model state dict inside an evformer checkpoint, or ``ckpt`` itself when it is
    already a plain state dict (name -> tensor)."""
    if ckpt.get("format") == FORMAT:
        return ckpt["model"]
    for key in ("model", "state_dict", "model_state"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(
        f"{path}: no model weights found (expected an evformer checkpoint or a state dict; "
        f"top-level keys: {sorted(ckpt)[:10]})"
    )


_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None))


def _check_plain(obj: object, where: str) -> None:
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not str/int")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}: checkpoints hold only tensors, numbers, strings, "
        "lists and dicts so they load with torch.load(weights_only=True); convert it first"
    )
