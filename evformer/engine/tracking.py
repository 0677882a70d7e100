"""Run-directory bookkeeping: ``metrics.jsonl``, the resolved config, the git revision and
optional TensorBoard scalars. Only rank 0 calls these."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from evformer._atomic import atomic_write_text

__all__ = ["MetricsLog", "TensorBoard", "atomic_write_text", "git_revision", "write_run_info"]


def _json_value(v: Any) -> Any:
    # JSON has no NaN/inf; null keeps every line parseable by strict readers
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


class MetricsLog:
    """``metrics.jsonl``: one JSON object per epoch, rewritten atomically on each append.

    :meth:`truncate` drops the lines of epochs at or after the one a resumed run restarts
    from, so a run killed after logging an epoch but before checkpointing it does not log
    that epoch twice.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}:{lineno}: not valid JSON ({e})") from e
        return rows

    def _write(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(_json_value(r), sort_keys=False) + "\n" for r in rows)
        atomic_write_text(self.path, text)

    def append(self, row: dict) -> None:
        self._write([*self.read(), row])

    def truncate(self, *, before_epoch: int) -> None:
        rows = self.read()
        kept = [r for r in rows if r.get("epoch", -1) < before_epoch]
        if len(kept) != len(rows):
            self._write(kept)


def git_revision(path: str | os.PathLike | None = None) -> dict:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` of the git checkout holding
    ``path`` (default: the evformer package)."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def write_run_info(run_dir: str | os.PathLike, *, config: dict, extra: dict | None = None) -> None:
    """Write ``config.yaml`` (the resolved configuration) and ``run_info.json`` (git
    revision, command line, versions, host) into ``run_dir``."""
    import yaml

    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(_json_value(config), sort_keys=False))
    info = {
        "git": git_revision(),
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    atomic_write_text(run_dir / "run_info.json", json.dumps(_json_value(info), indent=2) + "\n")


class TensorBoard:
    """Scalars to TensorBoard when the ``tensorboard`` package is installed, else nothing."""

    def __init__(self, log_dir: str | os.PathLike, *, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.writer = None
        else:
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
