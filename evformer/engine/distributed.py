"""Process-group setup from ``torchrun`` environment variables and small collective helpers.

One process per device. ``torchrun --nproc_per_node=N -m evformer.recipes.X`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them
everything runs as a single process and the helpers below are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    machine, and the ``device`` it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, plots and checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str | torch.device | None, *, local_rank: int = 0) -> torch.device:
    """``None``/``"auto"``: ``cuda:<local_rank>`` when CUDA is available, else CPU. An explicit
    ``"cuda"`` without an index gets the local rank's GPU; an unavailable CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(
    device: str | torch.device | None = None, *, backend: str | None = None
) -> DistInfo:
    """Join the process group described by the ``torchrun`` variables, if any.

    The backend is NCCL on CUDA and gloo on CPU unless given. Each process uses
    ``cuda:<LOCAL_RANK>``. Idempotent: a second call returns the same information.
    """
    world_size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    dev = resolve_device(device, local_rank=local_rank)
    if world_size == 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with "
                "torchrun (it sets them) or set them yourself"
            )
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, *, op: str = "sum", device: torch.device | None = None):
    """Reduce ``tensor`` (``op``: ``"sum"`` or ``"max"``) over all processes and return the
    result on the tensor's original device (``tensor`` itself in one process).

    ``device`` is where the collective runs: NCCL reduces CUDA tensors only, gloo takes CPU
    tensors, so pass the process's compute device.
    """
    if not _active():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    work = tensor.to(device) if device is not None else tensor.clone()
    dist.all_reduce(work, op=ops[op])
    return work.to(tensor.device)


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if _active():
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process). Objects travel
    pickled between processes only; nothing pickled is ever written to disk."""
    if not _active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
