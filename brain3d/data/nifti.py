"""Reading, writing and simple resampling of 3-D NIfTI volumes.

Every volume brain3d reads goes through :func:`load_nifti` / :func:`load_mask`, which
reorient to the closest canonical RAS orientation so that array axis 0 runs left->right,
axis 1 posterior->anterior and axis 2 inferior->superior whatever the on-disk layout.

Images are resampled with :func:`resize_volume` (trilinear), binary masks with :func:`resize_mask` (linear then
threshold, keeping every lesion) and the label maps of a multi-class segmentation (:func:`load_label_map`) with
:func:`resize_label_map` (per label, keeping every label's components); other label maps with
:func:`resize_volume`'s "nearest" mode.

Runtime dependencies: numpy, nibabel, torch; scipy (``ndimage.label``) only when :func:`resize_mask`
downsamples.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.filebasedimages import ImageFileError

__all__ = [
    "NiftiReadError",
    "load_nifti",
    "load_mask",
    "load_label_map",
    "load_mask_or_labels",
    "read_header_shape",
    "resize_volume",
    "resize_mask",
    "resize_label_map",
    "zscore_nonzero",
    "save_nifti",
    "NativeGrid",
    "load_nifti_with_grid",
    "to_native_orientation",
    "save_on_native_grid",
]

# Errors nibabel / gzip / zlib raise for missing, non-NIfTI or damaged files.  A truncated
# .gz reads its header fine and only fails here, once the data block is decompressed.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, nib.spatialimages.HeaderDataError)


class NiftiReadError(ValueError):
    """A file could not be read as a NIfTI volume (missing, not NIfTI, truncated...)."""


_GZIP_MAGIC = b"\x1f\x8b"
_SNIFF_BYTES = 544  # a NIfTI-2 header is 540 bytes, a NIfTI-1 header 348
_HEADER_SIZES = {348: "NIfTI-1", 540: "NIfTI-2"}  # sizeof_hdr, the header's first int32
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"\x89HDF", "an HDF5 file"),
               (b"NRRD", "an NRRD file"), (b"version https://git-lfs", "a Git LFS pointer; run git lfs pull"))


def _header_size(head: bytes) -> int | None:
    """348 or 540 when ``head`` starts like a NIfTI-1 / NIfTI-2 header (either byte order), else None."""
    if len(head) < 4:
        return None
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order)
        if size in _HEADER_SIZES:
            return size
    return None


def _describe(head: bytes) -> str:
    """What the first bytes of a file that has no NIfTI header look like, in a few words."""
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head[128:132] == b"DICM":
        return "a DICOM file; convert it to NIfTI first, e.g. with dcm2niix"
    for cut in range(4):  # a multi-byte character may be cut at the end of the sample
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in "\t\r\n" for c in text):
            first = " ".join(text.split())[:40]
            return f"text starting {first!r}" if first else "blank text"
        break
    return f"no NIfTI header; the first bytes are {head[:8].hex(' ')}"


def _diagnose(path: Path, exc: BaseException) -> str | None:
    """Why ``path`` cannot be read, from its first bytes: a one-line message naming the file, or None (e.g. a
    missing file) to report nibabel's own error. A file with gzip's magic bytes or a NIfTI header that still fails
    is truncated or damaged; one with neither is not a NIfTI file."""
    detail = f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no details'}"
    try:
        with open(path, "rb") as f:
            raw = f.read(_SNIFF_BYTES)
    except OSError:
        return None
    if not raw:
        return f"not a NIfTI file (the file is empty): {path}"
    compressed = raw.startswith(_GZIP_MAGIC)
    head = raw
    if compressed:
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(_SNIFF_BYTES)
        except (OSError, EOFError, zlib.error) as gz_exc:
            reason = " ".join(str(gz_exc).split()) or "no details"
            return f"truncated or damaged gzip file ({type(gz_exc).__name__}: {reason}): {path}"
    size = _header_size(head)
    name = path.name.lower()
    if size is None:
        if not (name.endswith((".nii", ".nii.gz")) or isinstance(exc, ImageFileError)):
            return None  # another format nibabel reads (.mgz, .hdr/.img...): nibabel's message says more
        what = _describe(head)
        if compressed:
            what = f"gzip-compressed {what}" if head else "an empty gzip file"
        return f"not a NIfTI file ({what}): {path}"
    if len(head) < size:
        return (f"truncated or damaged NIfTI file (the {_HEADER_SIZES[size]} header is cut short: {len(head)} of "
                f"{size} bytes): {path}")
    if name.endswith(".gz") and not compressed:
        return f"a NIfTI file that is not gzip-compressed although its name ends in .gz (rename it .nii): {path}"
    if name.endswith(".nii") and compressed:
        return f"a gzip-compressed NIfTI file whose name ends in .nii (rename it .nii.gz): {path}"
    return f"truncated or damaged NIfTI file ({detail}): {path}"


def _read_error(path: Path, exc: BaseException) -> NiftiReadError:
    """One line naming the file: "not a NIfTI file (<what it is>): <path>", "truncated or damaged ... file (<why>):
    <path>", else "cannot read NIfTI file <path>: <ExcType>: <reason>" (e.g. a missing file)."""
    message = _diagnose(Path(path), exc)
    if message is None:
        reason = " ".join(str(exc).split()) or "no details"
        message = f"cannot read NIfTI file {path}: {type(exc).__name__}: {reason}"
    return NiftiReadError(message)


def _open(path: str | os.PathLike) -> tuple[Path, nib.spatialimages.SpatialImage]:
    """nib.load with errors wrapped; reads the header only (data stays on disk)."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc
    return path, img


def _spatial_shape(path: Path, shape: Sequence[int]) -> tuple[int, int, int]:
    """The 3-D shape after dropping trailing singleton dims (X, Y, Z, 1 -> X, Y, Z).

    Raises:
        ValueError: the image is not 3-D (e.g. 2-D, or a true 4-D series with >1 volume).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise ValueError(
            f"{path}: expected a 3-D volume (a 4th dimension of size 1 is allowed), got shape {shape}"
        )
    return shape[:3]  # type: ignore[return-value]


def _load_ras(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, nib.spatialimages.SpatialImage]:
    """The body of :func:`load_nifti`; also returns the image as opened (before reorientation)."""
    path, original = _open(path)
    _spatial_shape(path, original.shape)  # checked from the header before reading any data
    try:
        img = nib.as_closest_canonical(original)  # flips/permutes the first 3 axes only
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies scl_slope / scl_inter
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc
    # Canonical reordering permutes spatial axes, so take the spatial shape after it.
    data = data.reshape(data.shape[:3])  # drop the singleton 4th dim: (X, Y, Z, 1) -> (X, Y, Z)
    return data, np.asarray(img.affine, dtype=np.float64), original


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3-D NIfTI volume reoriented to the closest canonical RAS orientation.

    Args:
        path: a .nii or .nii.gz file (anything nibabel reads as a spatial image works).

    Returns:
        (data, affine): data is a float32 array of shape (X, Y, Z) with scl_slope /
        scl_inter applied; affine is the 4x4 float64 voxel->RAS+ (mm) matrix of the
        reoriented array.

    Raises:
        NiftiReadError: the file is missing, not an image, or damaged (e.g. truncated .gz).
        ValueError: the image is not 3-D (a singleton 4th dimension is squeezed).
    """
    data, affine, _ = _load_ras(path)
    return data, affine


def load_mask(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a binary mask like :func:`load_nifti`, as uint8 (value > 0.5 -> 1, else 0).

    Args:
        path: a .nii or .nii.gz mask file.

    Returns:
        (mask, affine): uint8 array (X, Y, Z) of 0/1 in RAS orientation, 4x4 float64 affine.

    Raises:
        NiftiReadError: unreadable file.
        ValueError: not a 3-D volume.
    """
    data, affine = load_nifti(path)
    return (data > 0.5).astype(np.uint8), affine  # NaN > 0.5 is False -> 0


def load_label_map(path: str | os.PathLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label map (0 background, labels 1..``num_classes``) like :func:`load_nifti`, as uint8.

    Values within 1e-3 of an integer count as that integer (a float file written with scaling).

    Args:
        path: a .nii or .nii.gz label map.
        num_classes: K, the highest label allowed (at most 255).

    Returns:
        (labels, affine): uint8 array (X, Y, Z) of 0..K in RAS orientation, 4x4 float64 affine.

    Raises:
        NiftiReadError: unreadable file.
        ValueError: not a 3-D volume, or a value that is not an integer in 0..K (the message names the file).
    """
    data, affine = load_nifti(path)
    rounded = np.rint(data)
    bad = ~(np.abs(data - rounded) <= 1e-3) | (rounded < 0) | (rounded > num_classes)  # NaN is bad too
    if bad.any():
        values = np.unique(data[bad])
        raise ValueError(
            f"label map {path}: values must be integers 0..{num_classes} (0 background, labels 1..{num_classes}), "
            f"found {values[:8].tolist()}{' ...' if values.size > 8 else ''}"
        )
    return rounded.astype(np.uint8), affine


def load_mask_or_labels(path: str | os.PathLike | None, num_classes: int = 1) -> np.ndarray | None:
    """A segmentation target in RAS orientation: :func:`load_mask`'s 0/1 mask (``num_classes`` 1) or
    :func:`load_label_map`'s labels 0..K (``num_classes`` K >= 2); None for no path."""
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    return (load_label_map(path, num_classes) if num_classes > 1 else load_mask(path))[0]


def read_header_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """Spatial shape from the header alone (cheap: the data block is not read).

    The shape is given in RAS axis order, i.e. the shape :func:`load_nifti` would return
    (a permuted on-disk layout is permuted here too); a singleton 4th dim is dropped.

    Args:
        path: a .nii or .nii.gz file.

    Returns:
        (X, Y, Z) as ints.

    Raises:
        NiftiReadError: unreadable header.
        ValueError: not a 3-D volume.
    """
    path, img = _open(path)
    shape = _spatial_shape(path, img.shape)
    # io_orientation[i, 0] = the RAS axis that on-disk axis i maps to (same as load_nifti).
    ornt = nib.orientations.io_orientation(img.affine)
    if np.isnan(ornt).any():  # degenerate affine: no axis mapping, keep on-disk order
        return shape
    ras_shape = [0, 0, 0]
    for disk_axis, (ras_axis, _flip) in enumerate(ornt):
        ras_shape[int(ras_axis)] = shape[disk_axis]
    return tuple(ras_shape)  # type: ignore[return-value]


def _checked_resize_args(caller: str, volume, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(volume as an array, shape as 3 ints)`` for a resampler; ValueError naming ``caller`` for a non-3-D
    volume or a target shape that is not 3 positive ints."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{caller}: expected a 3-D array, got shape {volume.shape}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{caller}: target shape must be 3 positive ints, got {shape}")
    return volume, shape


def resize_volume(volume: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """Resample a whole 3-D array to ``shape`` (how brain3d fits volumes to ``data.shape``).

    This is plain whole-volume resampling: the field of view is kept, so the voxel size
    changes and the aspect ratio is NOT preserved when the shape ratios differ.  Proper
    spacing-aware preprocessing (resample to mm, then crop/pad) is a later addition.

    Args:
        volume: 3-D array (X, Y, Z).
        shape: target (X', Y', Z').
        mode: "trilinear" for images (align_corners=False) or "nearest" for label maps (torch
            "nearest-exact", so no new values appear). Binary masks go through :func:`resize_mask`
            instead: nearest-neighbour downsampling can delete a small lesion.

    Returns:
        The resampled array: float32 for "trilinear", the input dtype for "nearest".
        When the shape already matches, a copy with the same values (and dtype rules).

    Raises:
        ValueError: bad mode, non-3-D volume or a target shape that is not 3 positive ints.
    """
    if mode not in ("trilinear", "nearest"):
        raise ValueError(f"resize_volume: mode must be 'trilinear' or 'nearest', got {mode!r}")
    volume, shape = _checked_resize_args("resize_volume", volume, shape)
    out_dtype = np.float32 if mode == "trilinear" else volume.dtype
    if volume.shape == shape:
        return volume.astype(out_dtype, copy=True)
    # interpolate wants (N, C, X, Y, Z); float32 holds any uint8/int16 label exactly.
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if mode == "trilinear":
        out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    else:
        out = F.interpolate(t, size=shape, mode="nearest-exact")
    return out[0, 0].numpy().astype(out_dtype, copy=False)


_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as brain3d.evaluation counts lesions


def _check_binary(mask: np.ndarray) -> None:
    """Raise ValueError unless every value of ``mask`` is 0 or 1 (a label map must not be binarised silently)."""
    if mask.dtype == np.bool_ or mask.size == 0:
        return
    if np.issubdtype(mask.dtype, np.unsignedinteger):
        bad = mask.max() > 1
    else:
        bad = bool(np.any((mask != 0) & (mask != 1)))
    if bad:
        values = np.unique(mask)
        raise ValueError(
            f"resize_mask: expected a binary 0/1 mask, got values {values[:8].tolist()}"
            f"{' ...' if values.size > 8 else ''}; resample label maps with resize_volume(..., 'nearest')"
        )


def _axis_weights(n: int, m: int) -> np.ndarray:
    """The (m, n) float64 matrix ``W`` of :func:`resize_mask`'s 1-D resampling of an axis from n to m voxels.

    Output voxel ``j`` is ``sum_i W[j, i] * input[i]``. Downsampling (m < n): torch's linear weights
    (``align_corners=False``); upsampling: torch's "nearest-exact" (one 1 per row); m == n: the identity. The
    weights come from torch itself (interpolating the identity matrix), so they are exactly the ones it uses.
    """
    if m == n:
        return np.eye(n)
    eye = torch.eye(n, dtype=torch.float32).reshape(1, n, n, 1, 1)  # channel c = the unit vector e_c
    if m < n:
        out = F.interpolate(eye, size=(m, 1, 1), mode="trilinear", align_corners=False)
    else:
        out = F.interpolate(eye, size=(m, 1, 1), mode="nearest-exact")
    return out[0, :, :, 0, 0].numpy().T.astype(np.float64)


def _area_weights(n: int, m: int, rows: slice, cols: slice) -> np.ndarray:
    """``A[j, i]``: the length (in input voxels) of the overlap of output voxel j's extent ``[j n/m, (j+1) n/m)``
    with input voxel i's ``[i, i + 1)``, for the given rows and columns (the box-filter weights)."""
    s = n / m
    j = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None]
    i = np.arange(cols.start, cols.stop, dtype=np.float64)[None, :]
    return np.clip(np.minimum((j + 1) * s, i + 1) - np.maximum(j * s, i), 0.0, None)


def _footprint(a: int, b: int, n: int, m: int, weights: np.ndarray) -> slice:
    """The output voxels of an axis resampled from n to m that input voxels ``[a, b)`` map to: those whose extent
    overlaps ``[a, b)`` (the box mapped to output coordinates, never empty), widened to every output voxel that
    gives them a nonzero weight."""
    lo, hi = (a * m) // n, -((-b * m) // n)  # floor(a m / n), ceil(b m / n): exact integer arithmetic
    rows = np.flatnonzero(weights[:, a:b].any(axis=1))
    if rows.size:
        lo, hi = min(lo, int(rows[0])), max(hi, int(rows[-1]) + 1)
    return slice(max(lo, 0), min(hi, m))


def _separable(mats: Sequence[np.ndarray], block: np.ndarray) -> np.ndarray:
    """``sum_abc X[i, a] Y[j, b] Z[k, c] block[a, b, c]``: a separable 3-D resampling of a small block."""
    return np.einsum("ia,jb,kc,abc->ijk", mats[0], mats[1], mats[2], block, optimize=True)


def _keep_vanished_lesions(fg: np.ndarray, out: np.ndarray) -> int:
    """Give every 26-connected component of ``fg`` that has no foreground in ``out`` within its footprint one
    output blob, in place; returns how many were put back (the rule is described in :func:`resize_mask`)."""
    from scipy import ndimage  # imported here: only downsampling needs it

    labels, count = ndimage.label(fg, structure=_STRUCTURE_26)
    if count == 0:
        return 0
    in_shape, out_shape = fg.shape, out.shape
    weights = [_axis_weights(n, m) for n, m in zip(in_shape, out_shape)]
    vanished = []  # decided on the thresholded output before any voxel is put back
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        foot = tuple(_footprint(sl.start, sl.stop, n, m, w)
                     for sl, n, m, w in zip(box, in_shape, out_shape, weights))
        if not out[foot].any():
            vanished.append((k, box, foot))
    for k, box, foot in vanished:
        own = (labels[box] == k).astype(np.float64)  # this component only, not its neighbours
        value = _separable([w[f, sl] for w, f, sl in zip(weights, foot, box)], own)  # its interpolated field
        if not value.max() > 0:  # downsampling by more than 2x: linear interpolation skips some input voxels
            value = _separable([_area_weights(n, m, f, sl)
                                for n, m, f, sl in zip(in_shape, out_shape, foot, box)], own)
        best = np.unravel_index(int(np.argmax(value)), value.shape)
        chosen = value >= value[best] * (1.0 - 1e-6)  # ties (e.g. a voxel replicated by nearest upsampling)
        if chosen.sum() > 1:  # keep the tied voxels connected to the first maximum: one blob, not several
            pieces, _ = ndimage.label(chosen, structure=_STRUCTURE_26)
            chosen = pieces == pieces[best]
        out[foot][chosen] = 1
    return len(vanished)


def resize_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a binary 0/1 mask to ``shape`` on the grid :func:`resize_volume` gives the image, keeping every lesion.

    Per axis:

    * **downsampled** axes are interpolated linearly exactly as images are (torch ``trilinear``,
      ``align_corners=False``, on the 0/1 mask as float32), and the result is thresholded at >= 0.5, as
      :mod:`brain3d.augment` does for its warps: boundaries follow the image and a lesion filling half of an
      output voxel survives. A pure downsampling is ``resize_volume(mask, shape, "trilinear") >= 0.5``;
    * **upsampled** axes take the nearest voxel (torch ``nearest-exact``): every input voxel becomes the whole
      block of output voxels whose centres it contains, so nothing can be lost and a round trip back to the
      input grid with nearest is exact (linear + threshold would shrink a lone voxel to nothing: the centre
      weight of a 2x trilinear upsampling is 0.75**3 < 0.5);
    * axes of the same size are copied. The same shape returns the mask itself (as a uint8 copy).

    **Every lesion is kept.** A 26-connected component of the input (``scipy.ndimage.label``, as
    :mod:`brain3d.evaluation` counts lesions) whose footprint -- the output voxels its bounding box maps to
    (those whose extent overlaps it, plus those it gives an interpolation weight) -- holds no foreground after
    thresholding (e.g. a 3-voxel lesion downsampled 2x: at most 1/4 of any output voxel) gets the output voxel
    where its own interpolated value is highest (ties: the maximal voxels connected to the first), or, when that
    value is 0 everywhere (downsampling by more than 2x skips input voxels), the voxel its box-filter (area)
    weight is highest. So the number of lesions can only drop where two lesions merge at the coarser
    resolution. Only the vanished components cost work beyond one ``ndimage.label`` of the input: 182x218x182
    -> 96x112x96 takes ~0.1 s on 2 CPU cores with 50 lesions (~0.04 s of it the label), ~0.15 s with 800.

    Args:
        mask: 3-D array (X, Y, Z) of 0/1 (any numeric dtype or bool).
        shape: target (X', Y', Z').

    Returns:
        uint8 array of 0/1 of shape ``shape``.

    Raises:
        ValueError: a non-3-D mask, a value other than 0 and 1 (resample label maps with
            ``resize_volume(..., "nearest")``) or a target shape that is not 3 positive ints.
    """
    mask, shape = _checked_resize_args("resize_mask", mask, shape)
    _check_binary(mask)
    fg = mask != 0
    if mask.shape == shape:
        return fg.astype(np.uint8)
    t = torch.from_numpy(fg.astype(np.float32))[None, None]
    between = tuple(max(n, m) for n, m in zip(mask.shape, shape))  # upsampled axes done, downsampled ones not
    if between != mask.shape:
        t = F.interpolate(t, size=between, mode="nearest-exact")
    if between == shape:  # nothing downsampled: nearest only, which cannot lose a voxel
        return t[0, 0].numpy().astype(np.uint8)
    out = (F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0] >= 0.5).numpy()
    out = out.astype(np.uint8)
    if fg.any():
        _keep_vanished_lesions(fg, out)
    return out


def resize_label_map(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample an integer label map (0 background, labels 1..K) to ``shape`` per label, keeping every label.

    Each label's indicator and the background's are resampled as :func:`resize_mask` resamples a binary mask
    before its threshold (downsampled axes linearly, exactly as images are; upsampled axes by nearest
    neighbour), and every output voxel takes the class of highest value (ties: the lowest label, the
    background last, so a map with one label gives :func:`resize_mask`'s ``>= 0.5``). This is the one-hot
    resampling nnU-Net and batchgenerators use for label maps: boundaries follow the image's interpolation
    and no value appears that was not in the input. Then, as :func:`resize_mask` does for lesions, every
    26-connected component of a label that has no voxel of that label within its footprint gets its best
    output voxel back, labels with more voxels first: where two labels compete for one output voxel, the
    smaller label keeps it. So a small structure never vanishes.

    Args:
        labels: 3-D integer array (X, Y, Z) of labels 0..K (any integer or integer-valued dtype, K <= 255).
        shape: target (X', Y', Z').

    Returns:
        uint8 array of shape ``shape`` holding only labels of the input.

    Raises:
        ValueError: a non-3-D map, a negative or non-integer value, or a target shape that is not 3 positive ints.
    """
    labels, shape = _checked_resize_args("resize_label_map", labels, shape)
    if labels.size and (labels.min() < 0 or labels.max() > 255 or not np.array_equal(labels, np.rint(labels))):
        raise ValueError("resize_label_map: expected integer labels 0..255")
    labels = labels.astype(np.uint8)
    if labels.shape == shape:
        return labels.copy()
    present = [int(k) for k in np.unique(labels) if k != 0]
    out = np.zeros(shape, dtype=np.uint8)
    if not present:
        return out
    t = torch.from_numpy(np.stack([labels == k for k in present]).astype(np.float32))[None]  # (1, L, X, Y, Z)
    between = tuple(max(n, m) for n, m in zip(labels.shape, shape))  # upsampled axes done, downsampled ones not
    if between != labels.shape:
        t = F.interpolate(t, size=between, mode="nearest-exact")
    if between != shape:
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    fields = t[0]  # (L, X', Y', Z'): each label's resampled indicator
    background = 1.0 - fields.sum(dim=0, keepdim=True)  # the background's, by linearity
    best = torch.cat([fields, background]).argmax(dim=0).numpy()  # first maximum: the lowest label, background last
    out = np.where(best < len(present), np.asarray(present, dtype=np.uint8)[np.minimum(best, len(present) - 1)], 0)
    out = out.astype(np.uint8)
    if between == shape:  # nothing downsampled: nearest only, which cannot lose a voxel
        return out
    sizes = {k: int((labels == k).sum()) for k in present}
    for k in sorted(present, key=lambda k: -sizes[k]):  # the smallest label last: it wins a contested voxel
        own = (out == k).astype(np.uint8)
        _keep_vanished_lesions(labels == k, own)
        out[own == 1] = k
    return out


def zscore_nonzero(volume: np.ndarray) -> np.ndarray:
    """Z-score with the mean/std of the nonzero voxels (head/brain); background stays 0.

    Falls back to the whole-volume mean/std when fewer than 2 voxels are nonzero or their
    std is 0; a constant volume gives all zeros (never divides by 0).

    Args:
        volume: array of any shape (normally (X, Y, Z)).

    Returns:
        float32 array of the same shape.
    """
    v = np.asarray(volume, dtype=np.float64)  # float64 statistics: sums over ~10^7 voxels
    fg = v != 0
    if fg.sum() >= 2:
        vals = v[fg]
        std = vals.std()
        if std > 0:
            out = np.zeros(v.shape, dtype=np.float32)
            out[fg] = (vals - vals.mean()) / std
            return out
    std = v.std()
    if not std > 0:  # constant (or empty) volume
        return np.zeros(v.shape, dtype=np.float32)
    return ((v - v.mean()) / std).astype(np.float32)


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    dtype: np.dtype | type | str | None = None,
) -> Path:
    """Write an array as NIfTI-1 atomically (temp file in the same folder, then os.replace).

    qform and sform are both set to ``affine`` with code 1 (scanner).  Parent folders are
    created.  The temp file keeps the .nii/.nii.gz suffix (``name.tmp-<pid>.nii.gz``) so
    nibabel compresses it the same way.

    Args:
        array: the data (normally (X, Y, Z)).
        affine: 4x4 voxel->world (mm) matrix.
        path: destination, .nii or .nii.gz.
        dtype: on-disk dtype; default the array's dtype (bool -> uint8, int64 -> int32,
            since NIfTI-1 via nibabel refuses 64-bit ints without an explicit choice).

    Returns:
        The destination path.
    """
    path = Path(path)
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype in (np.int64, np.uint64):
        arr = arr.astype(np.int32)
    img = _nifti_image(arr, affine, qform_code=1, sform_code=1)
    return _save_atomic(img, path)


def _nifti_image(arr: np.ndarray, affine: np.ndarray, qform_code: int, sform_code: int) -> nib.Nifti1Image:
    """A NIfTI-1 image of ``arr`` (stored as its own dtype) with qform = sform = ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=int(qform_code))
    img.set_sform(affine, code=int(sform_code))
    img.set_data_dtype(arr.dtype)
    return img


def _save_atomic(img: nib.Nifti1Image, path: Path) -> Path:
    """nib.save to a temp file next to ``path`` (same .nii/.nii.gz suffix), then os.replace."""
    name = path.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{stem}.tmp-{os.getpid()}{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # failed mid-write: leave nothing half-written behind
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------------------
# Putting RAS-space results (probabilities, masks) back on the input file's own grid.
# ---------------------------------------------------------------------------------------

_RAS_ORNT = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass
class NativeGrid:
    """What is needed to write a RAS-space array back on an input file's own voxel grid.

    Attributes:
        shape: the file's spatial shape (X, Y, Z) in on-disk axis order (a singleton 4th
            dimension dropped).
        affine: the file's 4x4 float64 voxel->world affine (as nibabel reads it).
        ras_shape: the spatial shape after reorientation to RAS (what :func:`load_nifti`
            returns, i.e. ``shape`` permuted).
        header: the file's nibabel header (None when not available).
        voxel_size_mm: voxel sizes in mm in RAS axis order (the column norms of the RAS
            affine, i.e. the header zooms permuted like the axes).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ras_shape: tuple[int, int, int]
    header: object | None
    voxel_size_mm: tuple[float, float, float]


def load_nifti_with_grid(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, NativeGrid]:
    """:func:`load_nifti` plus the :class:`NativeGrid` of the file.

    Args:
        path: a .nii or .nii.gz file.

    Returns:
        (data, affine, grid): data and affine exactly as :func:`load_nifti` returns them
        (float32 RAS array, float64 RAS affine); grid describes the on-disk layout.

    Raises:
        NiftiReadError: unreadable file.
        ValueError: not a 3-D volume.
    """
    data, affine, original = _load_ras(path)
    zooms = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    grid = NativeGrid(
        shape=tuple(int(s) for s in original.shape[:3]),  # type: ignore[arg-type]
        affine=np.array(original.affine, dtype=np.float64),
        ras_shape=tuple(int(s) for s in data.shape),  # type: ignore[arg-type]
        header=getattr(original, "header", None),
        voxel_size_mm=tuple(float(z) for z in zooms),  # type: ignore[arg-type]
    )
    return data, affine, grid


def _ras_to_native_ornt(grid: NativeGrid) -> np.ndarray:
    """The orientation transform from the RAS array back to the on-disk axis layout."""
    ornt = nib.orientations.io_orientation(grid.affine)  # what as_closest_canonical applied
    if np.isnan(ornt).any():
        raise ValueError(f"cannot reorient: degenerate affine\n{grid.affine}")
    return nib.orientations.ornt_transform(_RAS_ORNT, ornt)


def to_native_orientation(ras_array: np.ndarray, grid: NativeGrid) -> np.ndarray:
    """Undo the RAS reorientation of :func:`load_nifti`: flips/permutes axes 0-2 only.

    Args:
        ras_array: array whose first 3 axes are in RAS order with shape ``grid.ras_shape``
            (extra trailing axes, if any, are carried along).
        grid: from :func:`load_nifti_with_grid`.

    Returns:
        The array in the file's on-disk axis order (shape ``grid.shape`` + trailing axes);
        same dtype; values are not resampled, only reordered.

    Raises:
        ValueError: the array's spatial shape is not ``grid.ras_shape``.
    """
    arr = np.asarray(ras_array)
    if arr.ndim < 3 or tuple(arr.shape[:3]) != tuple(grid.ras_shape):
        raise ValueError(
            f"to_native_orientation: expected an array of RAS shape {tuple(grid.ras_shape)}, got {arr.shape}"
        )
    out = nib.orientations.apply_orientation(arr, _ras_to_native_ornt(grid))
    return np.ascontiguousarray(out)


def _header_codes(header: object | None) -> tuple[int, int]:
    """(qform_code, sform_code) copied from a NIfTI header; (1, 1) when there is none.

    Codes are copied as they are, 0 included: an input with both codes 0 (no orientation
    information; nibabel then uses the pixdim-based fallback affine) gives an output that
    every reader interprets exactly as it interpreted the input.
    """
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
        return int(header["qform_code"]), int(header["sform_code"])
    return 1, 1


def save_on_native_grid(
    ras_array: np.ndarray,
    grid: NativeGrid,
    path: str | os.PathLike,
    dtype: np.dtype | type | str,
) -> Path:
    """Write a RAS-space array on the input file's own grid (atomic, like :func:`save_nifti`).

    The array is reoriented with :func:`to_native_orientation` and written with the
    ORIGINAL affine as qform and sform (codes copied from the input NIfTI header, else
    1), stored as ``dtype`` without scaling (scl_slope 1,
    scl_inter 0): cast yourself beforehand if rounding matters (e.g. threshold a
    probability map before asking for uint8).

    Args:
        ras_array: array of shape ``grid.ras_shape`` (e.g. probabilities or a 0/1 mask).
        grid: from :func:`load_nifti_with_grid`.
        path: destination .nii or .nii.gz (parents created).
        dtype: on-disk dtype, e.g. np.float32 for probabilities, np.uint8 for masks.

    Returns:
        The destination path.

    Raises:
        ValueError: the array's shape is not ``grid.ras_shape``.
    """
    arr = to_native_orientation(ras_array, grid).astype(dtype, copy=False)
    qform_code, sform_code = _header_codes(grid.header)
    img = _nifti_image(arr, grid.affine, qform_code=qform_code, sform_code=sform_code)
    if isinstance(grid.header, nib.Nifti1Header):
        img.header.set_xyzt_units(*grid.header.get_xyzt_units())
    img.header.set_slope_inter(1.0, 0.0)  # the array is stored as is
    return _save_atomic(img, Path(path))
