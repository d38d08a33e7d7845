"""Checkpoints: atomic save, safe load, and where ``trainer.resume`` points.

A checkpoint holds only tensors and plain Python values (the config as a plain dict), so it loads with
``torch.load(..., weights_only=True)``: opening a checkpoint never runs code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then ``os.replace``.

    A crash (or SIGKILL) mid-write leaves the previous checkpoint intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ValueError: the file is not a readable brain3d checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, pickle with code, not a torch file
        raise ValueError(f"cannot load checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a brain3d checkpoint (missing 'model' or 'config')")
    return state


def resolve_resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """Turn ``trainer.resume`` into a checkpoint path.

    ``null`` -> None (fresh run); ``auto`` -> ``<run_dir>/checkpoints/last.pt`` when it exists, else None,
    so one command both starts and continues a run; any other value is a path that must exist.
    """
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={resume}: no such checkpoint file")
    return path


def remove_stale_temp_files(checkpoint_dir: Path) -> None:
    """Delete the temp files of :func:`save_checkpoint` left by a process killed mid-write (SIGKILL, OOM):
    the checkpoints themselves are intact, the temp files only take disk space."""
    if checkpoint_dir.is_dir():
        for tmp in checkpoint_dir.glob(".*.pt.*.tmp"):
            tmp.unlink(missing_ok=True)
