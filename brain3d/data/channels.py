"""Several input channels: which manifest columns a run reads, and every channel put on the first one's grid.

A run reads one image column (``data.image_col=image``, the default) or several (``data.image_col=[t1,flair]``):
co-registered scans of one subject, stacked in the listed order as the channels of one ``(C, D, H, W)`` input.
The first channel defines the grid: the mask must lie on it (brain3d.data.manifest checks that, as for one
channel), predictions are written back on it, and every other channel is brought onto it here.

**Grids.** A channel whose RAS grid is the first channel's (the same shape, and no voxel corner more than
:data:`SAME_GRID_MM` apart: float32 rounding of one affine stored twice) is used as it is. Any other channel
is resampled onto the first channel's grid in world coordinates (:func:`resample_to_grid`: trilinear,
0 outside the channel's field of view, so "nonzero" still means "head"), then preprocessed with the others.
Downsampling is plain trilinear sampling (no smoothing first), as brain3d's resize already is. Where the grids
differ by more than ``data.affine_tolerance`` mm, the start-up check (brain3d.data.manifest.load_manifest)
logs one warning per subject naming both files; a difference within the tolerance is resampled silently
(a shift of at most that much).

Runtime dependencies: numpy, scipy (``ndimage.affine_transform``), nibabel (through brain3d.data.nifti).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from brain3d.data.nifti import NativeGrid, load_nifti, load_nifti_with_grid

__all__ = ["SAME_GRID_MM", "SYNTHETIC_CHANNEL_COLUMNS", "checked_image_columns", "grid_distance_mm",
           "image_columns", "load_channels", "resample_to_grid"]

SAME_GRID_MM = 1e-4  # mm: two grids this close are one grid (no resampling)
SYNTHETIC_CHANNEL_COLUMNS = ("image", "flair")  # data=synthetic data.channels=2: the T1-like and the FLAIR-like scan


def checked_image_columns(value: Any) -> list[str]:
    """``data.image_col`` as a list of column names: one name (a string) or a non-empty list of distinct names.

    Raises:
        ValueError: anything else, naming the value and what is allowed.
    """
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, Sequence):  # a list, tuple or ListConfig
        names = list(value)
    else:
        names = []
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"data.image_col={value!r} must be a column name or a list of them, e.g. image or "
                         f"[t1,flair]")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"data.image_col={names} names column(s) {repeated} more than once: each channel is its "
                         f"own column")
    return [str(n) for n in names]


def image_columns(data_cfg: Any) -> list[str]:
    """The manifest columns a run reads as channels, in channel order.

    ``data.image_col`` as given (a name or a list), except where a source writes the columns itself and
    ``data.image_col`` keeps its default ``image``: ``data=synthetic data.channels=2`` reads
    :data:`SYNTHETIC_CHANNEL_COLUMNS`, and ``data=bids data.suffix=[T1w,FLAIR]`` reads ``image`` (the first
    suffix's file) then one column per further suffix, named after it (brain3d.data.sources.bids_manifest).

    Raises:
        ValueError: a bad ``data.image_col`` or ``data.channels``.
    """
    value = data_cfg.get("image_col", "image")
    value = "image" if value is None else value
    source = data_cfg.get("source")
    if source == "synthetic":
        channels = data_cfg.get("channels", 1)
        if isinstance(channels, bool) or channels not in (1, 2):
            raise ValueError(f"data.channels={channels!r} must be 1 (a T1-like scan) or 2 (T1-like and FLAIR-like)")
        if channels == 2 and value == "image":
            return list(SYNTHETIC_CHANNEL_COLUMNS)
    if source == "bids" and value == "image":
        suffixes = data_cfg.get("suffix", "T1w")
        if not isinstance(suffixes, str) and suffixes is not None and len(suffixes) > 1:
            return ["image", *[str(s) for s in list(suffixes)[1:]]]
    return checked_image_columns(value)


def grid_distance_mm(shape: Sequence[int], affine_a: np.ndarray, affine_b: np.ndarray) -> float:
    """How far apart (mm) the two affines put the same voxel of a ``shape`` grid: the largest distance over
    its 8 corner voxels (as brain3d.data.manifest.affine_distance_mm compares an image and its mask)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    diff = (np.asarray(affine_a, dtype=np.float64) @ corners - np.asarray(affine_b, dtype=np.float64) @ corners)[:3]
    return float(np.sqrt((diff ** 2).sum(axis=0)).max())


def resample_to_grid(volume: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                     target_affine: np.ndarray) -> np.ndarray:
    """``volume`` (voxel -> world ``affine``) sampled at every voxel centre of the ``shape`` grid with
    ``target_affine``: trilinear in world coordinates, 0 outside the volume.

    Target voxel ``t`` is world point ``target_affine @ t``, i.e. source voxel ``inv(affine) @ target_affine @ t``
    (``scipy.ndimage.affine_transform``, order 1, no prefilter). A grid shifted by a whole number of voxels gives
    the source values exactly, moved by that many voxels.

    Returns:
        float32 array of ``shape``.
    """
    to_source = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    out = ndimage.affine_transform(np.asarray(volume, dtype=np.float32), to_source[:3, :3], offset=to_source[:3, 3],
                                   output_shape=tuple(int(n) for n in shape), order=1, mode="constant", cval=0.0,
                                   prefilter=False)
    return out.astype(np.float32, copy=False)


def load_channels(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray, NativeGrid]:
    """Load one subject's channels (RAS), every one on the first channel's grid.

    Args:
        paths: the channels' NIfTI files, in channel order; one path loads exactly as
            :func:`~brain3d.data.nifti.load_nifti_with_grid` does.

    Returns:
        (image, affine, grid): image float32 ``(X, Y, Z)`` for one path, ``(C, X, Y, Z)`` for several; the first
        channel's RAS affine and :class:`~brain3d.data.nifti.NativeGrid` (predictions are written on it).

    Raises:
        NiftiReadError / ValueError: as :func:`~brain3d.data.nifti.load_nifti`, for any channel.
    """
    first, affine, grid = load_nifti_with_grid(paths[0])
    if len(paths) == 1:
        return first, affine, grid
    channels = [first]
    for path in paths[1:]:
        data, own_affine = load_nifti(path)
        if data.shape != first.shape or grid_distance_mm(first.shape, affine, own_affine) > SAME_GRID_MM:
            data = resample_to_grid(data, own_affine, first.shape, affine)
        channels.append(data)
    return np.stack(channels), affine, grid
