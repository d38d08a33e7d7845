"""Random 3-D patches for patch-based training (numpy only, safe inside DataLoader workers).

Patch training follows nnU-Net (Isensee et al. 2021, Nature Methods): most patches are
drawn uniformly from the volume, and a fraction (one third in nnU-Net) is forced to be
centred on a foreground voxel so that small lesions are seen often enough.

All functions take an explicit ``np.random.Generator``; seed it per item (e.g.
``np.random.default_rng([seed, epoch, index])``) so that the patches do not depend on
the number of workers.

The patch applies to the LAST ``len(patch_size)`` axes of an array, so (D, H, W) volumes
and channel-first (C, D, H, W) images are both accepted.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["sample_patch_start", "extract_patch", "foreground_coordinates", "mask_foreground_voxels",
           "sample_training_patch", "training_patch_start"]


def _as_patch_size(patch_size: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
    try:  # one integer (int, np.int64, ...) for every axis
        size = (operator.index(patch_size),) * ndim
    except TypeError:
        size = tuple(int(p) for p in patch_size)
    if len(size) != ndim:
        raise ValueError(f"patch_size {tuple(size)} must have {ndim} entries")
    if any(p <= 0 for p in size):
        raise ValueError(f"patch_size must be positive in every axis, got {size}")
    return size


def sample_patch_start(
    volume_shape: Sequence[int],
    patch_size: Sequence[int] | int,
    rng: np.random.Generator,
    foreground_coords: np.ndarray | None = None,
    foreground: bool = False,
) -> tuple[int, ...]:
    """Start index of a ``patch_size`` window inside a volume of ``volume_shape``.

    With ``foreground=True`` and a non-empty ``foreground_coords``, one foreground voxel is
    drawn uniformly and the patch is centred on it (start ``c - p // 2``), then clipped so
    the patch stays inside the volume; the drawn voxel is always inside the patch.
    Otherwise the start is uniform in ``[0, size - patch]`` per axis. Where the volume is
    not larger than the patch in an axis, the start is 0 there (:func:`extract_patch`
    pads after the volume).

    Args:
        volume_shape: spatial shape (D, H, W).
        patch_size: (pd, ph, pw), or one int for all axes.
        rng: source of randomness.
        foreground_coords: (N, 3) voxel coordinates, e.g. from :func:`foreground_coordinates`.
        foreground: centre the patch on a foreground voxel when coordinates are given.

    Returns:
        The start (one int per axis).

    Raises:
        ValueError: on a non-positive patch size, or coordinates not of shape (N, ndim).
    """
    shape = tuple(int(s) for s in volume_shape)
    patch = _as_patch_size(patch_size, len(shape))
    room = [max(0, s - p) for s, p in zip(shape, patch)]  # largest valid start per axis
    if foreground and foreground_coords is not None and len(foreground_coords) > 0:
        coords = np.asarray(foreground_coords)
        if coords.ndim != 2 or coords.shape[1] != len(shape):
            raise ValueError(f"foreground_coords must have shape (N, {len(shape)}), got {coords.shape}")
        centre = coords[rng.integers(len(coords))]
        return tuple(int(min(max(int(c) - p // 2, 0), r)) for c, p, r in zip(centre, patch, room))
    return tuple(int(rng.integers(0, r + 1)) if r > 0 else 0 for r in room)


def extract_patch(
    volume: np.ndarray, start: Sequence[int], patch_size: Sequence[int] | int, pad_value: float = 0
) -> np.ndarray:
    """A copy of ``volume[..., start:start + patch_size]``, padded after the volume's end.

    Only the patch region is read, so a read-only ``np.memmap`` works and stays cheap.
    The result is a plain ``np.ndarray`` (never a view of, or memmap into, ``volume``).

    Args:
        volume: array whose last ``len(start)`` axes are spatial, e.g. (D, H, W) or (C, D, H, W).
        start: start index per spatial axis (>= 0), e.g. from :func:`sample_patch_start`.
        patch_size: patch size per spatial axis, or one int for all axes.
        pad_value: value of voxels outside the volume. Defaults to 0.

    Returns:
        Array of shape ``volume.shape[:-n] + patch_size`` and ``volume.dtype``.

    Raises:
        ValueError: when ``start`` is negative, or the volume has fewer axes than the patch.
    """
    start = tuple(int(s) for s in start)
    patch = _as_patch_size(patch_size, len(start))
    if volume.ndim < len(start):
        raise ValueError(f"volume of shape {volume.shape} has fewer axes than the patch {patch}")
    if any(s < 0 for s in start):
        raise ValueError(f"patch start must be >= 0, got {start}")
    lead = volume.shape[: volume.ndim - len(start)]
    region = volume[(Ellipsis, *(slice(s, s + p) for s, p in zip(start, patch)))]
    if region.shape[len(lead):] == patch:
        return np.array(region, copy=True, subok=False)
    out = np.full(lead + patch, pad_value, dtype=volume.dtype)
    out[(Ellipsis, *(slice(0, n) for n in region.shape[len(lead):]))] = region
    return out


def foreground_coordinates(
    mask: np.ndarray, max_points: int = 10000, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """(N, ndim) int64 coordinates of the voxels with ``mask > 0``, at most ``max_points`` of them.

    Compute it once per subject (it reads the whole mask) and pass it to
    :func:`sample_training_patch` / :func:`sample_patch_start`.

    Args:
        mask: (D, H, W) array (a leading singleton channel axis is dropped).
        max_points: upper bound on N; above it a uniform subsample without replacement is
            kept (in increasing voxel order). Defaults to 10000.
        rng: generator or seed for the subsample; ``None`` means seed 0, so the result is
            deterministic. Defaults to None.

    Returns:
        int64 array of shape (N, ndim); (0, ndim) when the mask is empty.

    Raises:
        ValueError: when ``max_points`` is < 1.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    mask = np.asarray(mask)
    while mask.ndim > 3 and mask.shape[0] == 1:
        mask = mask[0]
    coords = np.argwhere(mask > 0).astype(np.int64, copy=False)
    if len(coords) > max_points:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
        keep = np.sort(rng.choice(len(coords), size=max_points, replace=False))
        coords = coords[keep]
    return coords


def sample_training_patch(
    image: np.ndarray,
    mask: np.ndarray | None,
    patch_size: Sequence[int] | int,
    rng: np.random.Generator,
    foreground_fraction: float = 0.33,
    foreground_coords: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One training patch: the same window cut from the image and the mask.

    With probability ``foreground_fraction`` the window is centred on a random foreground
    voxel (when the mask has any), otherwise it is uniform (nnU-Net's oversampling: one
    third of the patches forced to contain foreground). Both outputs are zero-padded
    after the volume where it is smaller than the patch.

    Args:
        image: (D, H, W) or (C, D, H, W) array (a memmap is fine).
        mask: array whose last 3 axes match the image's, e.g. (D, H, W) or (1, D, H, W);
            ``None`` (classification/regression) gives a uniform patch and ``None`` back.
        patch_size: (pd, ph, pw), or one int for all axes.
        rng: source of randomness (exactly one ``rng.random()`` draw decides the kind
            of patch, then one draw picks the start).
        foreground_fraction: probability of a foreground-centred patch, in [0, 1].
            Defaults to 0.33.
        foreground_coords: precomputed :func:`foreground_coordinates` of ``mask``; when
            ``None`` the foreground voxels are found in the mask (only when a foreground
            patch is drawn). Defaults to None.

    Returns:
        (image_patch, mask_patch), copies with the image's / mask's leading axes and
        dtypes (``mask_patch`` is ``None`` when ``mask`` is).

    Raises:
        ValueError: when ``foreground_fraction`` is outside [0, 1], or the image and mask
            spatial shapes differ.
    """
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
    if image.ndim < 3:
        raise ValueError(f"image needs 3 spatial axes, got shape {image.shape}")
    spatial = tuple(image.shape[-3:])
    patch = _as_patch_size(patch_size, 3)
    if mask is None:  # no labels: the same draws as an empty mask (one decision, one start)
        start = training_patch_start(spatial, patch, rng, foreground_fraction, has_mask=False)
        return extract_patch(image, start, patch), None
    if mask.ndim < 3 or tuple(mask.shape[-3:]) != spatial:
        raise ValueError(f"image spatial shape {spatial} differs from mask spatial shape {tuple(mask.shape[-3:])}")
    start = training_patch_start(spatial, patch, rng, foreground_fraction, has_mask=True,
                                 foreground_coords=foreground_coords if foreground_coords is not None else mask)
    return extract_patch(image, start, patch), extract_patch(mask, start, patch)


def mask_foreground_voxels(mask: np.ndarray) -> np.ndarray:
    """(N, 3) coordinates, in voxel order, of every voxel of a (D, H, W) or (C, D, H, W) mask where any
    channel is > 0 (all of them, unlike :func:`foreground_coordinates`, which may subsample)."""
    mask = np.asarray(mask)
    return np.argwhere((mask > 0).reshape(-1, *mask.shape[-3:]).any(axis=0))


def training_patch_start(
    spatial: Sequence[int],
    patch_size: Sequence[int] | int,
    rng: np.random.Generator,
    foreground_fraction: float,
    has_mask: bool,
    foreground_coords: np.ndarray | None = None,
) -> tuple[int, ...]:
    """The start of :func:`sample_training_patch`'s window, drawn with exactly its random numbers.

    One ``rng.random()`` decides whether the patch is centred on a foreground voxel (only with a mask),
    then one draw picks the start. ``foreground_coords`` is an (N, 3) array of foreground voxels, or the
    mask itself (its foreground is then found only when a foreground patch is drawn). Shared by the
    dataset (numpy arrays) and the memory-resident store (brain3d.data.resident), so both cut the same
    patches from the same seed.
    """
    want_foreground = bool(rng.random() < foreground_fraction) and has_mask
    coords = None
    if want_foreground:
        coords = np.asarray(foreground_coords) if foreground_coords is not None else None
        if coords is not None and coords.ndim != 2:  # a mask
            coords = mask_foreground_voxels(coords)
    return sample_patch_start(spatial, patch_size, rng, foreground_coords=coords, foreground=want_foreground)
