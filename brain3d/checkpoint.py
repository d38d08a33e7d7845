"""Checkpoints: atomic save, safe load, where ``trainer.resume`` points, and which config keys a resume may change.

A checkpoint holds only tensors and plain Python values (the config as a plain dict), so it loads with
``torch.load(..., weights_only=True)``: opening a checkpoint never runs code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_atomically(path: str | Path, write: Callable[[str], None], readable_by_others: bool = False) -> Path:
    """``write(temp name)`` into a temp file in ``path``'s folder, fsync, then ``os.replace`` it onto ``path``.

    A crash (or SIGKILL) mid-write leaves the previous file intact, never a truncated one; a ``write`` that
    raises leaves no temp file. ``readable_by_others``: the permissions a new file gets from the umask (usually
    rw-r--r--, for an exported model meant to be shared) instead of the temp file's rw-------.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        fd = os.open(tmp_name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if readable_by_others:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path, readable_by_others: bool = False) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`write_atomically`): a crash mid-write leaves the previous
    checkpoint intact, never a truncated one."""
    return write_atomically(path, lambda tmp: torch.save(state, tmp), readable_by_others)


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


# Keys a resumed run may change: where and how fast it runs, how long, what it logs. Everything else (model,
# task, loss, data and its split, preprocessing, augmentation, optimizer, schedule kind) defines the run: a
# resume with other values would continue some other run's weights under a config that does not describe them.
RESUME_FREE_KEYS = (
    "output_dir", "trainer.resume", "trainer.max_epochs", "trainer.max_time", "trainer.val_every_n_epochs",
    "trainer.early_stopping", "trainer.epochs_per_run", "trainer.progress",
    "trainer.progress_interval_s", "trainer.device", "trainer.precision", "trainer.log_images",
    "trainer.checkpoint_every_n_steps", "trainer.log_every_n_steps", "trainer.compile", "trainer.channels_last",
    "trainer.cudnn_benchmark", "trainer.grad_checkpointing", "trainer.sync_batchnorm", "trainer.sw_overlap",
    "trainer.sw_batch_size", "trainer.sw_device", "trainer.debug_step_sleep", "data.cache_dir", "data.cache",
    "data.num_workers", "data.resident", "data.resident_max_fraction", "data.check_data", "data.manifest",
    "data.root", "data.mask_root", "data.on_error", "data.batch_size_max", "data.batch_size_max_fraction",
    "data.batch_size_budget_mb", "trainer.report", "trainer.report_subjects",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (compared whole)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(saved: dict, current: dict, free_keys=RESUME_FREE_KEYS) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every dotted key whose value differs between two plain config
    dicts, leaving out ``free_keys`` and the keys below them. A key the current config lacks reads as
    ``<absent>``; keys only the current config has are left out (added by a newer brain3d, whose defaults keep
    the old behaviour, so a run started before an upgrade still resumes)."""
    old, new = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(old):
        if any(key == free or key.startswith(free + ".") for free in free_keys):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            differences.append((key, a, b))
    return differences
