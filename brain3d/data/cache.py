"""A disk cache of preprocessed volumes: decode + preprocess once, memory-map on every read.

Layout (``key`` = :func:`cache_key`, 40 hex digits)::

    cache_dir/<key[:2]>/<key>.image.npy   float32, PreprocessInfo.output_shape
    cache_dir/<key[:2]>/<key>.mask.npy    uint8 (only when a mask was given)
    cache_dir/<key[:2]>/<key>.json        PreprocessInfo, source identities, settings; written LAST

**Keys.** The key is a sha1 over the resolved image path with its size and ``st_mtime_ns``, the same
for the mask (or None), :func:`brain3d.data.preprocess.settings_hash` of the settings and
:data:`CACHE_VERSION`. A rewritten or touched file (new size or mtime) or other settings therefore
give another key and are never served stale; old entries simply stop being used (delete the folder to
reclaim the space). A file rewritten with the same size *and* the same mtime to the nanosecond (only
possible on purpose, e.g. ``cp -p``/``rsync -t`` of different content, or on filesystems with coarse
timestamps within one tick) would not be noticed: change its mtime (``touch``) in that case.

**Atomic, lock-free filling.** Every file is written to a unique temporary name in the same folder
(``.<name>.tmp-<pid>-<random>``) and moved into place with :func:`os.replace`, which is atomic on POSIX
and Windows within one filesystem. The two ``.npy`` files go first and the ``.json`` last, and readers
only trust an entry whose ``.json`` exists, so a reader never sees a half-written entry. When several
processes (DataLoader workers, sweep jobs, ``brain3d-preprocess`` workers) miss the same key at once,
each computes the same content and replaces the files with identical bytes; whichever replace comes
last wins, and a reader that already memory-mapped an earlier file keeps its (identical) inode on
POSIX. No locks are needed; the only cost of a race is duplicated work. An entry that cannot be read
(e.g. an ``.npy`` lost in a crash before the data reached the disk) is treated as a miss and rebuilt.

**Forked processes.** A miss runs torch (``F.interpolate``). A process *forked* from a parent that has
already used torch's intra-op (OpenMP) threads hangs forever in its first multi-threaded torch op unless
it calls ``torch.set_num_threads(1)`` first. torch's DataLoader workers do this themselves and
``brain3d-preprocess`` does it in its pool initializer; do the same in any other forked worker.

Runtime dependencies: numpy, nibabel (through :mod:`brain3d.data.nifti`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from brain3d.data.nifti import load_mask, load_nifti_with_grid
from brain3d.data.preprocess import PreprocessInfo, preprocess_volume, settings_hash, validate_settings

__all__ = ["CACHE_VERSION", "CachePaths", "cache_key", "cache_paths", "ensure_cached", "cached_volume", "file_identity"]

log = logging.getLogger("brain3d.cache")

# Bump when the stored format or the preprocessing code changes what a key's content would be.
CACHE_VERSION = 1


def file_identity(path: str | os.PathLike | None) -> dict | None:
    """``{"path": resolved path, "size": bytes, "mtime_ns": ...}`` of a file; None for None.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    st = resolved.stat()
    return {"path": str(resolved), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _key_from_identities(image_id: dict, mask_id: dict | None, settings: Mapping | Any) -> str:
    payload = {"version": CACHE_VERSION, "image": image_id, "mask": mask_id, "settings": settings_hash(settings)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cache_key(image_path: str | os.PathLike, mask_path: str | os.PathLike | None, settings: Mapping | Any) -> str:
    """The cache key (sha1 hex) of one subject under ``settings`` (see the module docstring).

    Raises:
        FileNotFoundError: the image or mask does not exist.
        ValueError: invalid settings.
    """
    return _key_from_identities(file_identity(image_path), file_identity(mask_path), settings)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CachePaths:
    image: Path
    mask: Path
    meta: Path


def cache_paths(key: str, cache_dir: str | os.PathLike) -> CachePaths:
    """Where the entry ``key`` lives under ``cache_dir``."""
    folder = Path(cache_dir).expanduser() / key[:2]
    return CachePaths(folder / f"{key}.image.npy", folder / f"{key}.mask.npy", folder / f"{key}.json")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except PermissionError:
        # Windows refuses to replace a file another process has open (memory-mapped); that file holds
        # the same content, so keep it.
        if not path.exists():
            raise


def _write_atomic(path: Path, write) -> None:
    """``write(f)`` into a unique temp file next to ``path``, then os.replace; no temp file survives."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        _replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_entry(paths: CachePaths, key: str) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo] | None:
    """The entry as read-only memmaps, or None when it is absent or unusable (then it is rebuilt)."""
    if not paths.meta.is_file():
        return None
    try:
        meta = json.loads(paths.meta.read_text())
        if meta.get("key") != key or meta.get("cache_version") != CACHE_VERSION:
            raise ValueError("key or version mismatch")
        info = PreprocessInfo.from_dict(meta["info"])
        image = np.load(paths.image, mmap_mode="r", allow_pickle=False)
        mask = np.load(paths.mask, mmap_mode="r", allow_pickle=False) if meta["has_mask"] else None
        if image.shape != info.output_shape or (mask is not None and mask.shape != info.output_shape):
            raise ValueError("array shape differs from the recorded output shape")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        log.warning("cache entry %s unusable (%s); rebuilding it", paths.meta, err)
        return None
    return image, mask, info


def _build_entry(
    image_path: str | os.PathLike, mask_path: str | os.PathLike | None, settings: dict, cache_dir: str | os.PathLike
) -> str:
    """Load, preprocess and store one subject; return the key it was stored under."""
    for attempt in range(3):
        image_id, mask_id = file_identity(image_path), file_identity(mask_path)
        image_ras, ras_affine, grid = load_nifti_with_grid(image_id["path"])  # type: ignore[index]
        mask_ras = load_mask(mask_id["path"])[0] if mask_id is not None else None
        # A file rewritten while it was read would store new content under the old identity: re-read.
        if file_identity(image_path) == image_id and file_identity(mask_path) == mask_id:
            break
        log.warning("%s changed while it was read (attempt %d); reading it again", image_path, attempt + 1)
    image, mask, info = preprocess_volume(image_ras, grid.voxel_size_mm, settings, mask_ras)
    key = _key_from_identities(image_id, mask_id, settings)  # type: ignore[arg-type]
    paths = cache_paths(key, cache_dir)
    paths.meta.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(paths.image, lambda f: np.save(f, image, allow_pickle=False))
    if mask is not None:
        _write_atomic(paths.mask, lambda f: np.save(f, mask, allow_pickle=False))
    meta = {
        "cache_version": CACHE_VERSION,
        "key": key,
        "info": info.to_dict(),
        "has_mask": mask is not None,
        "image": image_id,
        "mask": mask_id,
        "settings": validate_settings(settings),
        "settings_hash": settings_hash(settings),
        "input_voxel_size_mm": [float(v) for v in grid.voxel_size_mm],
        "ras_affine": np.asarray(ras_affine, dtype=np.float64).tolist(),
        "created_unix": time.time(),
    }
    _write_atomic(paths.meta, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))  # LAST: entry complete
    return key


def ensure_cached(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike | None,
    settings: Mapping | Any,
    cache_dir: str | os.PathLike,
) -> tuple[str, bool]:
    """Make sure the entry exists; return ``(key, hit)`` without opening the arrays for the caller.

    ``hit`` is True when a complete, readable entry was already there.
    """
    settings = validate_settings(settings)
    key = cache_key(image_path, mask_path, settings)
    if _read_entry(cache_paths(key, cache_dir), key) is not None:
        return key, True
    return _build_entry(image_path, mask_path, settings, cache_dir), False


def cached_volume(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike | None,
    settings: Mapping | Any,
    cache_dir: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """The preprocessed image (and mask) of one subject, from the cache, filling it on a miss.

    On a miss the files are read with :func:`load_nifti_with_grid` / :func:`load_mask` (RAS, voxel size
    from the grid), preprocessed with :func:`brain3d.data.preprocess.preprocess_volume` and stored
    atomically (module docstring).

    Args:
        image_path: the image NIfTI file.
        mask_path: its mask file, or None.
        settings: preprocessing settings (dict or DictConfig; see :mod:`brain3d.data.preprocess`).
        cache_dir: the cache root (created when missing).

    Returns:
        (image, mask, info): read-only ``np.memmap`` arrays opened with ``np.load(..., mmap_mode="r")``
        (float32 image; uint8 mask or None) and the :class:`PreprocessInfo`. Copy with ``np.array`` before
        modifying (e.g. flips in a Dataset); the pages are shared through the OS page cache.

    Raises:
        FileNotFoundError: a missing file; NiftiReadError / ValueError: unreadable file or bad settings.
    """
    settings = validate_settings(settings)
    for _ in range(3):
        key = cache_key(image_path, mask_path, settings)
        paths = cache_paths(key, cache_dir)
        entry = _read_entry(paths, key)
        if entry is not None:
            return entry
        _build_entry(image_path, mask_path, settings, cache_dir)
    raise RuntimeError(f"cache: could not build a stable entry for {image_path} in {cache_dir} (is it being rewritten?)")
