"""A disk cache of preprocessed volumes: decode + preprocess once, memory-map on every read.

Layout (``key`` = :func:`cache_key`, 40 hex digits)::

    cache_dir/<key[:2]>/<key>.image.npy   float32, PreprocessInfo.output_shape
    cache_dir/<key[:2]>/<key>.mask.npy    uint8 (only when a mask was given)
    cache_dir/<key[:2]>/<key>.json        PreprocessInfo, source identities, settings; written LAST

Training uses ``cache_dir = <data.cache_dir>/preprocessed``; the configs default ``data.cache_dir`` to
``$BRAIN3D_CACHE_DIR``, else ``~/.cache/brain3d`` (:func:`default_cache_root` for code without a config).

**Keys.** The key is a sha1 over the *content identity* (:func:`file_identity`) of the image and of the
mask (or None), :func:`brain3d.data.preprocess.settings_hash` of the settings and :data:`CACHE_VERSION`.
Several channels (``data.image_col=[t1,flair]``; the image is then a list of paths) put the list of their
identities, in channel order, where one image's identity goes: another order or another file is another key,
and one channel keeps the key it always had. Their entry holds a ``(C, D, H, W)`` image.
A multi-class segmentation's label map (``num_classes`` K >= 2: read with ``load_label_map`` and resampled per
label) adds K to the key, so it never shares an entry with the same file read as a binary mask; binary keys are
unchanged.
Neither the path nor the mtime is part of it, so data copied to another folder (``cp``, ``rsync``, a job's
local scratch on a cluster) finds the entries its original filled; a ``touch`` keeps the key too. Other
settings give another key; old entries simply stop being used (delete the folder to reclaim the space; it
is always safe, the cache is rebuilt on demand).

A content identity is the file size and a blake2b hash of a few sampled byte ranges: the whole file when
it is at most 256 KiB, else its first 64 KiB (the NIfTI header and the start of the data), 16 chunks of
4 KiB at evenly spaced fixed fractions of the rest and its last 4 KiB (:func:`_sample_ranges`) -- about
132 KiB read per file, whatever its size. What is and isn't detected:

* a changed size, header (affine, dtype, shape) or any sampled byte: always another key;
* ``.nii.gz``: the last 4 KiB hold the gzip trailer, a CRC32 and the length of the *whole* uncompressed
  data, so any change of the decompressed volume gives another key (bar a CRC32 collision);
* uncompressed ``.nii``: a same-size edit that touches none of the sampled ranges (e.g. a few voxels
  changed in place) is NOT noticed and the old entry is served; delete the entry (or the cache) then.

Hashing reads ~18 ranges per file, so each process memoizes identities by ``(resolved path, device, inode,
size, st_mtime_ns, st_ctime_ns)``: a repeated call costs one ``stat``. A change that keeps all six (only a
rewrite in place within one tick of a coarse ctime clock) would be served from the memo until the process
ends; any write, ``touch``, ``chmod`` or replace-by-rename (``rsync``, ``cp`` to a temp name) re-hashes.

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

import functools
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brain3d.data.channels import load_channels
from brain3d.data.nifti import load_mask_or_labels
from brain3d.data.preprocess import PreprocessInfo, preprocess_volume, settings_hash, validate_settings

__all__ = ["CACHE_VERSION", "CachePaths", "cache_key", "cache_paths", "cached_volume", "default_cache_root",
           "ensure_cached", "file_identity"]

log = logging.getLogger("brain3d.cache")

# Bump when the stored format, the key's inputs or the preprocessing code change what a key's content would be.
# 2: keys follow file content (size + sampled hash), no longer path + mtime.
# 3: binary masks are resampled with resize_mask (linear + threshold, every lesion kept), no longer nearest.
CACHE_VERSION = 3


def default_cache_root() -> Path:
    """The cache root for code without a config: ``$BRAIN3D_CACHE_DIR``, else ``~/.cache/brain3d``.

    The configs' ``data.cache_dir`` reads the same variable (``${oc.env:BRAIN3D_CACHE_DIR,'~/.cache/brain3d'}``),
    so one ``export`` moves everything (e.g. off a small home quota or onto a job's scratch). An empty value
    counts as unset here, but ``oc.env`` passes it on as an empty ``data.cache_dir``: unset it instead.
    """
    return Path(os.environ.get("BRAIN3D_CACHE_DIR") or "~/.cache/brain3d").expanduser()


# file_identity samples: files up to _WHOLE_LIMIT are hashed whole; larger ones by _HEAD bytes, _SAMPLES
# chunks of _CHUNK bytes at fixed fractions of the rest and the last _CHUNK bytes.
_WHOLE_LIMIT = 256 * 1024
_HEAD = 64 * 1024
_CHUNK = 4 * 1024
_SAMPLES = 16
_MEMO_SIZE = 65536


def _sample_ranges(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the byte ranges :func:`file_identity` hashes in a file of ``size`` bytes.

    Fixed fractions of the size (not random offsets), so every process and every copy reads the same bytes.
    """
    if size <= _WHOLE_LIMIT:
        return [(0, size)]
    span = size - _HEAD - _CHUNK  # where the interior chunks may start
    interior = [(_HEAD + span * (i + 1) // (_SAMPLES + 1), _CHUNK) for i in range(_SAMPLES)]
    return [(0, _HEAD), *interior, (size - _CHUNK, _CHUNK)]


def _content_hash(path: str, size: int) -> str:
    """blake2b of the sampled ranges: a few reads per file, never the whole of a large one."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for offset, length in _sample_ranges(size):
            f.seek(offset)
            digest.update(f.read(length))
    return digest.hexdigest()


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _memo_identity(path: str, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> dict:
    """The per-process memo behind :func:`file_identity`; the stat fields are its key (module docstring)."""
    return {"size": size, "blake2b": _content_hash(path, size)}


def file_identity(path: str | os.PathLike | None) -> dict | None:
    """``{"size": bytes, "blake2b": hash of sampled ranges}``: what a file holds, not where; None for None.

    The same for a copy anywhere (so copied data reuses the cache) and for a touched file; see the module
    docstring for which edits are detected. Memoized per process by path and stat fields, so a repeated call
    on an unchanged file costs one ``stat``.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    st = resolved.stat()
    identity = _memo_identity(str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return dict(identity)  # a copy: callers may not alter the memo


def _source_record(path: str | os.PathLike | None, identity: dict | None) -> dict | None:
    """What an entry's .json records of a source: its identity and the path it was first filled from."""
    if identity is None:
        return None
    return {"path": str(Path(path).expanduser().resolve()), **identity}  # type: ignore[arg-type]


ImagePaths = str | os.PathLike | Sequence[str | os.PathLike]  # one image file, or the channels' files in order


def _image_paths(image_path: ImagePaths) -> list[str | os.PathLike]:
    """One path -> [path]; the channels' paths as a list."""
    return [image_path] if isinstance(image_path, (str, os.PathLike)) else list(image_path)


def _image_identity(image_path: ImagePaths) -> dict | list[dict]:
    """The image's :func:`file_identity`; several channels': the list of theirs (one channel: its own, unlisted)."""
    paths = _image_paths(image_path)
    identities = [file_identity(p) for p in paths]
    return identities[0] if len(identities) == 1 else identities  # type: ignore[return-value]


def _key_from_identities(image_id: dict | list[dict], mask_id: dict | None, settings: Mapping | Any,
                         num_classes: int = 1) -> str:
    payload = {"version": CACHE_VERSION, "image": image_id, "mask": mask_id, "settings": settings_hash(settings)}
    if num_classes > 1:  # the mask read as a label map of K labels (resampled per label): never a binary entry
        payload["label_map_classes"] = int(num_classes)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cache_key(image_path: ImagePaths, mask_path: str | os.PathLike | None, settings: Mapping | Any,
              num_classes: int = 1) -> str:
    """The cache key (sha1 hex) of one subject under ``settings`` (see the module docstring); ``image_path`` is
    one file or the channels' files in channel order; ``num_classes`` >= 2: the mask is a multi-class label map.

    Raises:
        FileNotFoundError: the image or mask does not exist.
        ValueError: invalid settings.
    """
    return _key_from_identities(_image_identity(image_path), file_identity(mask_path), settings, num_classes)


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
        if image.shape[-3:] != info.output_shape or (mask is not None and mask.shape != info.output_shape):
            raise ValueError("array shape differs from the recorded output shape")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        log.warning("cache entry %s unusable (%s); rebuilding it", paths.meta, err)
        return None
    return image, mask, info


def _build_entry(
    image_path: ImagePaths, mask_path: str | os.PathLike | None, settings: dict, cache_dir: str | os.PathLike,
    num_classes: int = 1,
) -> str:
    """Load, preprocess and store one subject; return the key it was stored under."""
    sources = _image_paths(image_path)
    for attempt in range(3):
        image_id, mask_id = _image_identity(image_path), file_identity(mask_path)
        # one channel: load_nifti_with_grid; several: each on the first one's grid (brain3d.data.channels)
        image_ras, ras_affine, grid = load_channels([Path(p).expanduser().resolve() for p in sources])
        mask_ras = load_mask_or_labels(mask_path, num_classes)
        # A file rewritten while it was read would store new content under the old identity: re-read.
        if _image_identity(image_path) == image_id and file_identity(mask_path) == mask_id:
            break
        log.warning("%s changed while it was read (attempt %d); reading it again", image_path, attempt + 1)
    image, mask, info = preprocess_volume(image_ras, grid.voxel_size_mm, settings, mask_ras, num_classes)
    key = _key_from_identities(image_id, mask_id, settings, num_classes)  # type: ignore[arg-type]
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
        "image": (_source_record(sources[0], image_id) if len(sources) == 1 else  # several: one record each
                  [_source_record(p, i) for p, i in zip(sources, image_id)]),
        "mask": _source_record(mask_path, mask_id),
        "settings": validate_settings(settings),
        "settings_hash": settings_hash(settings),
        "input_voxel_size_mm": [float(v) for v in grid.voxel_size_mm],
        "ras_affine": np.asarray(ras_affine, dtype=np.float64).tolist(),
        "created_unix": time.time(),
    }
    _write_atomic(paths.meta, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))  # LAST: entry complete
    return key


def ensure_cached(
    image_path: ImagePaths,
    mask_path: str | os.PathLike | None,
    settings: Mapping | Any,
    cache_dir: str | os.PathLike,
    num_classes: int = 1,
) -> tuple[str, bool]:
    """Make sure the entry exists; return ``(key, hit)`` without opening the arrays for the caller.

    ``hit`` is True when a complete, readable entry was already there.
    """
    settings = validate_settings(settings)
    key = cache_key(image_path, mask_path, settings, num_classes)
    if _read_entry(cache_paths(key, cache_dir), key) is not None:
        return key, True
    return _build_entry(image_path, mask_path, settings, cache_dir, num_classes), False


def cached_volume(
    image_path: ImagePaths,
    mask_path: str | os.PathLike | None,
    settings: Mapping | Any,
    cache_dir: str | os.PathLike,
    num_classes: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """The preprocessed image (and mask) of one subject, from the cache, filling it on a miss.

    On a miss the files are read with :func:`load_nifti_with_grid` / :func:`load_mask` (RAS, voxel size
    from the grid), preprocessed with :func:`brain3d.data.preprocess.preprocess_volume` and stored
    atomically (module docstring).

    Args:
        image_path: the image NIfTI file, or the channels' files in channel order (brain3d.data.channels).
        mask_path: its mask file, or None.
        settings: preprocessing settings (dict or DictConfig; see :mod:`brain3d.data.preprocess`).
        cache_dir: the cache root (created when missing).
        num_classes: 1 (default): the mask is binary (:func:`load_mask`). K >= 2: a multi-class segmentation's
            label map (:func:`brain3d.data.nifti.load_label_map`, resampled per label), under its own key.

    Returns:
        (image, mask, info): read-only ``np.memmap`` arrays opened with ``np.load(..., mmap_mode="r")``
        (float32 image, ``(C, D, H, W)`` for several channels; uint8 mask or None) and the
        :class:`PreprocessInfo`. Copy with ``np.array`` before modifying (e.g. flips in a Dataset); the pages
        are shared through the OS page cache.

    Raises:
        FileNotFoundError: a missing file; NiftiReadError / ValueError: unreadable file or bad settings.
    """
    settings = validate_settings(settings)
    for _ in range(3):
        key = cache_key(image_path, mask_path, settings, num_classes)
        paths = cache_paths(key, cache_dir)
        entry = _read_entry(paths, key)
        if entry is not None:
            return entry
        _build_entry(image_path, mask_path, settings, cache_dir, num_classes)
    raise RuntimeError(
        f"cache: could not build a stable entry for {image_path} in {cache_dir} (is it being rewritten?)"
    )
