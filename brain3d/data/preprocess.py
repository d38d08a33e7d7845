"""Spacing-aware preprocessing: resample -> crop to the head -> centre crop/pad -> normalise.

The settings come from the Hydra group ``preprocess`` (a plain dict or a DictConfig):

===================  ==========================================================================
key                  meaning
===================  ==========================================================================
``mode``             ``"resize"`` (default, the historical behaviour: resample the whole RAS
                     volume to ``shape``; the voxel size changes and the aspect ratio is not
                     kept) or ``"spacing"`` (resample to a voxel size in mm, then crop/pad).
``spacing``          ``[sx, sy, sz]`` mm in RAS axis order, or null = keep the native spacing.
                     Mode "spacing" only (must be null in mode "resize").
``crop_foreground``  crop to the bounding box of the nonzero image voxels (after resampling)
                     plus ``foreground_margin`` voxels on each side, clipped to the volume.
                     Mode "spacing" only (must be false in mode "resize").
``foreground_margin``  voxels (int >= 0) added around the foreground box. Default 0.
``shape``            ``[D, H, W]`` or null. Mode "spacing": centre crop / zero-pad to this shape
                     after the foreground crop (null keeps the cropped size, which then varies per
                     subject). Mode "resize": the resize target (required).
``normalization``    ``"zscore"`` (mean/std of the nonzero voxels, background stays 0:
                     :func:`brain3d.data.nifti.zscore_nonzero`), ``"percentile"`` (see
                     :func:`percentile_nonzero`) or ``"none"`` (values kept; for tests / CT).
``percentiles``      ``[lo, hi]`` for "percentile", 0 <= lo < hi <= 100. Default [0.5, 99.5].
``name``             optional label (allowed so a YAML file may name itself); ignored.
===================  ==========================================================================

Missing keys take the defaults in :data:`DEFAULT_SETTINGS`; unknown keys are refused (a typo must not
silently change nothing).

Pipeline of :func:`preprocess_volume` (input: a RAS array as :func:`brain3d.data.nifti.load_nifti`
returns it, and its voxel size in mm in RAS order):

1. **Resample** to ``resampled_shape``: mode "resize": ``shape``; mode "spacing":
   ``round(ras_shape * voxel_size / spacing)`` (at least 1) per axis. Both use
   :func:`brain3d.data.nifti.resize_volume`, i.e. ``torch.nn.functional.interpolate`` on float32
   (images: trilinear, ``align_corners=False``). Binary 0/1 masks (what :func:`load_mask` returns) go
   through :func:`brain3d.data.nifti.resize_mask` on the same grid: downsampled axes linearly (the image's
   interpolation) then thresholded at >= 0.5, upsampled axes by nearest neighbour, and a lesion that would
   vanish (nearest-neighbour downsampling can delete a 3-voxel lesion; so can the threshold) gets its best
   output voxel back, so every 26-connected lesion survives. A multi-class segmentation's label maps
   (``num_classes`` K >= 2) go through :func:`brain3d.data.nifti.resize_label_map`: the same per label, every
   label kept. Masks with other values (label maps) keep ``nearest-exact``.
   torch was chosen over ``scipy.ndimage.zoom``: same kernel family, multi-threaded, ~20 ms for
   182x218x182 -> 121x145x121 on 2 CPU cores, and exactly the resampler the "resize" mode already
   used. The field of view is kept (the outer voxel corners stay in place), so the *effective*
   output spacing is ``ras_shape * voxel_size / resampled_shape``; it differs from the requested
   spacing by the rounding of the shape only (e.g. 182 mm at 1.5 mm -> 121 voxels of 1.504 mm).
   ``PreprocessInfo.output_spacing_mm`` records the effective spacing.
2. **Foreground crop** (optional): box of ``image != 0`` in the resampled image, widened by
   ``foreground_margin`` and clipped. An all-zero image is not cropped.
3. **Centre crop / pad** to ``shape`` (mode "spacing" with a shape): per axis, an excess of ``e``
   voxels removes ``e // 2`` at the start and the rest at the end; a shortfall of ``s`` voxels adds
   ``s // 2`` zeros before and the rest after. The crop is centred on the foreground box when step 2
   ran, else on the volume.
4. **Normalise** the output (padding included, which is zero and stays zero).

**Several channels** (``data.image_col=[t1,flair]``: a ``(C, X, Y, Z)`` input, every channel already on the
first channel's grid, brain3d.data.channels): steps 1 and 3 are one geometry for all channels; the foreground
box of step 2 is that of the voxels nonzero in ANY channel (a channel with a smaller field of view does not
crop the others); step 4 normalises each channel on its own (its own nonzero voxels, mean and sd). The output
is ``(C, D, H, W)``; one channel stays ``(D, H, W)``, exactly as before.

``PreprocessInfo`` records the geometry (steps 1-3) so :func:`invert_geometry` can put any output-space
array (a probability map, a predicted mask) back on the input RAS grid.

Runtime dependencies: numpy, torch (through :mod:`brain3d.data.nifti`).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from brain3d.data.nifti import resize_label_map, resize_mask, resize_volume, zscore_nonzero

__all__ = [
    "DEFAULT_SETTINGS",
    "MODES",
    "NORMALIZATIONS",
    "PreprocessInfo",
    "validate_settings",
    "settings_hash",
    "preprocess_volume",
    "invert_geometry",
    "output_affine",
    "foreground_bbox",
    "centre_crop_or_pad",
    "percentile_nonzero",
]

MODES = ("resize", "spacing")
NORMALIZATIONS = ("zscore", "percentile", "none")

DEFAULT_SETTINGS: dict[str, Any] = {
    "mode": "resize",
    "spacing": None,
    "crop_foreground": False,
    "foreground_margin": 0,
    "shape": None,
    "normalization": "zscore",
    "percentiles": [0.5, 99.5],
}
_IGNORED_KEYS = ("name",)


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


def _to_plain(settings: Any) -> dict:
    """A DictConfig (resolved) or any mapping -> a plain dict."""
    if settings is None:
        return {}
    try:  # omegaconf is a dependency of brain3d, but keep this module usable without it
        from omegaconf import DictConfig, OmegaConf

        if isinstance(settings, DictConfig):
            return OmegaConf.to_container(settings, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(settings, Mapping):
        raise ValueError(f"preprocess settings must be a mapping (dict / DictConfig), got {type(settings).__name__}")
    return {str(k): (list(v) if isinstance(v, (list, tuple, np.ndarray)) or _is_listconfig(v) else v)
            for k, v in settings.items()}


def _is_listconfig(value: Any) -> bool:
    try:
        from omegaconf import ListConfig
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, ListConfig)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"preprocess.{key}={value!r}: must be {allowed}")


def validate_settings(settings: Mapping | Any) -> dict:
    """Check preprocessing settings; return them as a canonical plain dict (defaults filled in).

    Canonical: every key of :data:`DEFAULT_SETTINGS` present; ``spacing`` / ``percentiles`` as lists of
    floats, ``shape`` as a list of ints; ``name`` dropped. Equal settings written differently
    (``[1, 1, 1]`` vs ``[1.0, 1.0, 1.0]``, a DictConfig vs a dict, a missing key vs its default) give
    equal dicts.

    Args:
        settings: a dict or DictConfig with keys among :data:`DEFAULT_SETTINGS` (and ``name``).

    Returns:
        The canonical settings dict.

    Raises:
        ValueError: naming the key, the value and what is allowed: an unknown key; ``mode`` not in
            :data:`MODES`; ``normalization`` not in :data:`NORMALIZATIONS`; ``spacing`` not 3 positive
            finite numbers (or null); ``shape`` not 3 positive ints (or null), or null with mode
            "resize"; ``spacing`` / ``crop_foreground`` set with mode "resize"; ``crop_foreground`` not a
            bool; ``foreground_margin`` not an int >= 0; ``percentiles`` not [lo, hi] with
            0 <= lo < hi <= 100.
    """
    raw = _to_plain(settings)
    unknown = sorted(k for k in raw if k not in DEFAULT_SETTINGS and k not in _IGNORED_KEYS)
    if unknown:
        raise ValueError(
            f"preprocess: unknown key(s) {unknown}; allowed keys: {', '.join([*DEFAULT_SETTINGS, *_IGNORED_KEYS])}"
        )
    s = {k: raw.get(k, v) for k, v in DEFAULT_SETTINGS.items()}

    if s["mode"] not in MODES:
        raise _bad("mode", s["mode"], f"one of {', '.join(MODES)}")
    if s["normalization"] not in NORMALIZATIONS:
        raise _bad("normalization", s["normalization"], f"one of {', '.join(NORMALIZATIONS)}")

    spacing = s["spacing"]
    if spacing is not None:
        if (
            not isinstance(spacing, (list, tuple))
            or len(spacing) != 3
            or not all(_is_number(v) and math.isfinite(float(v)) and float(v) > 0 for v in spacing)
        ):
            raise _bad("spacing", spacing, "null or 3 positive numbers in mm, e.g. [1.0, 1.0, 1.0]")
        spacing = [float(v) for v in spacing]
    shape = s["shape"]
    if shape is not None:
        if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_int(v) and int(v) > 0 for v in shape):
            raise _bad("shape", shape, "null or 3 positive ints, e.g. [128, 128, 128]")
        shape = [int(v) for v in shape]
    if not isinstance(s["crop_foreground"], (bool, np.bool_)):
        raise _bad("crop_foreground", s["crop_foreground"], "true or false")
    margin = s["foreground_margin"]
    if not _is_int(margin) or int(margin) < 0:
        raise _bad("foreground_margin", margin, "an int >= 0 (voxels)")
    pct = s["percentiles"]
    if (
        not isinstance(pct, (list, tuple))
        or len(pct) != 2
        or not all(_is_number(v) for v in pct)
        or not 0.0 <= float(pct[0]) < float(pct[1]) <= 100.0
    ):
        raise _bad("percentiles", pct, "[lo, hi] with 0 <= lo < hi <= 100, e.g. [0.5, 99.5]")

    if s["mode"] == "resize":
        if shape is None:
            raise _bad("shape", shape, "3 positive ints with mode=resize (the resize target [D, H, W])")
        if spacing is not None:
            raise _bad("spacing", s["spacing"], "null with mode=resize (use mode=spacing to resample to a voxel size)")
        if s["crop_foreground"]:
            raise _bad("crop_foreground", s["crop_foreground"], "false with mode=resize (use mode=spacing to crop)")

    return {
        "mode": str(s["mode"]),
        "spacing": spacing,
        "crop_foreground": bool(s["crop_foreground"]),
        "foreground_margin": int(margin),
        "shape": shape,
        "normalization": str(s["normalization"]),
        "percentiles": [float(pct[0]), float(pct[1])],
    }


def _hashable_settings(settings: Mapping | Any) -> dict:
    """Canonical settings with the values that cannot change the output blanked, so they do not split
    the cache: the margin without a foreground crop, the percentiles without percentile normalisation."""
    s = validate_settings(settings)
    if not s["crop_foreground"]:
        s["foreground_margin"] = None
    if s["normalization"] != "percentile":
        s["percentiles"] = None
    return s


def settings_hash(settings: Mapping | Any, extra: Any = None) -> str:
    """Stable sha1 (40 hex digits) of the canonical settings (+ ``extra``): a cache key component.

    The JSON is ``{"extra": extra, "settings": <canonical>}`` with sorted keys and no whitespace, so
    the hash depends on values only, not on key order, int/float spelling, dict vs DictConfig or
    omitted defaults. Values that cannot change the output (``foreground_margin`` without
    ``crop_foreground``, ``percentiles`` without ``normalization=percentile``) are left out.

    Args:
        settings: preprocessing settings (validated with :func:`validate_settings`).
        extra: anything JSON-serialisable (non-JSON objects such as paths are written with ``str``).

    Raises:
        ValueError: invalid settings.
    """
    payload = {"settings": _hashable_settings(settings), "extra": extra}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------
# Geometry record
# ---------------------------------------------------------------------------------------


def _ints(values: Sequence) -> tuple[int, int, int]:
    return tuple(int(v) for v in values)  # type: ignore[return-value]


@dataclass
class PreprocessInfo:
    """The geometry of one :func:`preprocess_volume` call (everything :func:`invert_geometry` needs).

    Attributes:
        ras_shape: shape of the input RAS array.
        resampled_shape: shape after step 1 (resampling).
        crop_start, crop_stop: the region of the resampled volume that was kept (foreground crop and
            centre crop combined), ``resampled[crop_start[i]:crop_stop[i]]`` per axis.
        pad_before: zeros added before that region per axis (centre pad); the region sits at
            ``output[pad_before[i] : pad_before[i] + crop_stop[i] - crop_start[i]]``.
        output_shape: shape of the preprocessed array.
        output_spacing_mm: effective voxel size of the output in mm (RAS order), i.e.
            ``ras_shape * input_voxel_size / resampled_shape``.
    """

    ras_shape: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    output_spacing_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("ras_shape", "resampled_shape", "crop_start", "crop_stop", "pad_before", "output_shape"):
            setattr(self, name, _ints(getattr(self, name)))
        self.output_spacing_mm = tuple(float(v) for v in self.output_spacing_mm)  # type: ignore[assignment]

    @property
    def pad_after(self) -> tuple[int, int, int]:
        """Zeros added after the kept region per axis."""
        return _ints(o - p - (b - a)
                     for o, p, a, b in zip(self.output_shape, self.pad_before, self.crop_start, self.crop_stop))

    def to_dict(self) -> dict[str, list]:
        """Plain lists of ints / floats (for JSON and torch checkpoints)."""
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence]) -> "PreprocessInfo":
        """Inverse of :meth:`to_dict` (extra keys are ignored)."""
        return cls(**{name: tuple(d[name]) for name in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------


def foreground_bbox(volume: np.ndarray, margin: int = 0) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, stop) of the bounding box of ``volume != 0`` widened by ``margin``, clipped to the volume.

    ``stop`` is exclusive. An all-zero volume gives the whole volume.
    """
    volume = np.asarray(volume)
    start, stop = [], []
    for axis in range(volume.ndim):
        others = tuple(a for a in range(volume.ndim) if a != axis)
        nz = np.flatnonzero(np.any(volume != 0, axis=others))
        n = volume.shape[axis]
        if nz.size == 0:
            return (0,) * volume.ndim, tuple(volume.shape)  # type: ignore[return-value]
        start.append(max(int(nz[0]) - margin, 0))
        stop.append(min(int(nz[-1]) + 1 + margin, n))
    return tuple(start), tuple(stop)  # type: ignore[return-value]


def centre_crop_or_pad(
    start: Sequence[int], stop: Sequence[int], shape: Sequence[int] | None
) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """Fit the region ``[start, stop)`` to ``shape`` about its centre.

    Per axis, with ``n = stop - start`` and target ``t``: ``n > t`` keeps ``[start + (n - t) // 2,
    ... + t)``; ``n < t`` keeps the region and pads ``(t - n) // 2`` zeros before (the rest after).

    Returns:
        (new_start, new_stop, pad_before, output_shape); ``shape`` None keeps the region as it is.
    """
    new_start, new_stop, pad_before, out = [], [], [], []
    for i, (a, b) in enumerate(zip(start, stop)):
        n = b - a
        t = n if shape is None else int(shape[i])
        if n > t:
            a = a + (n - t) // 2
            b = a + t
            pad = 0
        else:
            pad = (t - n) // 2
        new_start.append(int(a))
        new_stop.append(int(b))
        pad_before.append(int(pad))
        out.append(int(t))
    return tuple(new_start), tuple(new_stop), tuple(pad_before), tuple(out)  # type: ignore[return-value]


def percentile_nonzero(volume: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Percentile normalisation of the nonzero voxels; background stays 0.

    ``lo, hi = np.percentile(volume[volume != 0], percentiles)`` (numpy's default linear
    interpolation, computed in float64); every nonzero voxel becomes ``(clip(v, lo, hi) - lo) / (hi -
    lo)``, so the foreground lies in [0, 1] (voxels at or below ``lo`` become 0, at or above ``hi`` 1)
    and zero voxels stay exactly 0. When ``hi == lo`` (fewer than 2 distinct nonzero values) or there
    is no nonzero voxel, the result is all zeros (never divides by 0, like
    :func:`brain3d.data.nifti.zscore_nonzero`).

    Returns:
        float32 array of the input's shape.
    """
    v = np.asarray(volume)
    out = np.zeros(v.shape, dtype=np.float32)
    fg = v != 0
    if not fg.any():
        return out
    vals = v[fg].astype(np.float64)
    lo, hi = np.percentile(vals, [float(percentiles[0]), float(percentiles[1])])
    if not hi > lo:
        return out
    out[fg] = (np.clip(vals, lo, hi) - lo) / (hi - lo)
    return out


def _normalise(volume: np.ndarray, settings: dict) -> np.ndarray:
    if settings["normalization"] == "zscore":
        return zscore_nonzero(volume)
    if settings["normalization"] == "percentile":
        return percentile_nonzero(volume, settings["percentiles"])
    return np.asarray(volume, dtype=np.float32)


def _place(region: np.ndarray, pad_before: Sequence[int], out_shape: Sequence[int], dtype) -> np.ndarray:
    out = np.zeros(tuple(out_shape), dtype=dtype)
    out[tuple(slice(p, p + n) for p, n in zip(pad_before, region.shape))] = region
    return out


def preprocess_volume(
    image_ras: np.ndarray,
    voxel_size_mm: Sequence[float],
    settings: Mapping | Any,
    mask_ras: np.ndarray | None = None,
    num_classes: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """Run the pipeline (module docstring) on one RAS image and, optionally, its mask.

    Args:
        image_ras: 3-D array (X, Y, Z) in RAS order, as :func:`brain3d.data.nifti.load_nifti` returns, or 4-D
            (C, X, Y, Z): several channels on one grid (:func:`brain3d.data.channels.load_channels`).
        voxel_size_mm: its voxel size in mm, RAS order (``NativeGrid.voxel_size_mm``).
        settings: preprocessing settings (validated here).
        mask_ras: optional 3-D array of the image's shape, cast to uint8: normally :func:`load_mask`'s 0/1
            mask, resampled with :func:`brain3d.data.nifti.resize_mask` (linear + threshold, no lesion lost);
            a label map (values above 1) is resampled with nearest neighbour, so no new values appear.
        num_classes: 1 (default): the mask as above. K >= 2: ``mask_ras`` is a multi-class segmentation's label
            map (:func:`brain3d.data.nifti.load_label_map`, labels 0..K), resampled per label with
            :func:`brain3d.data.nifti.resize_label_map` (no label lost).

    Returns:
        (image, mask, info): float32 image of shape ``info.output_shape`` (``(C, *info.output_shape)`` for a
        4-D input); uint8 mask of that shape or None; the :class:`PreprocessInfo`. With mode "resize" and
        normalization "zscore" the image equals ``zscore_nonzero(resize_volume(image_ras, shape, "trilinear"))``,
        brain3d's first preprocessing.

    Raises:
        ValueError: invalid settings, an image neither 3-D nor 4-D, a bad voxel size or a mask of another shape.
    """
    s = validate_settings(settings)
    image = np.asarray(image_ras)
    if image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[0] < 1):
        raise ValueError(f"preprocess_volume: expected a 3-D image (X, Y, Z) or channels (C, X, Y, Z), got shape "
                         f"{image.shape}")
    several = image.ndim == 4
    channels = image if several else image[None]  # (C, X, Y, Z)
    image = channels[0]  # the grid's shape, for the mask check
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if vox.size != 3 or not np.all(np.isfinite(vox)) or not np.all(vox > 0):
        raise ValueError(f"preprocess_volume: voxel_size_mm must be 3 positive numbers, got {voxel_size_mm!r}")
    if mask_ras is not None:
        mask_ras = np.asarray(mask_ras)
        if mask_ras.shape != image.shape:
            raise ValueError(f"preprocess_volume: mask shape {mask_ras.shape} differs from image shape {image.shape}")
    ras_shape = _ints(image.shape)

    # 1. resample
    if s["mode"] == "resize":
        resampled_shape = _ints(s["shape"])
    else:
        target = vox if s["spacing"] is None else np.asarray(s["spacing"], dtype=np.float64)
        resampled_shape = _ints(max(1, int(round(n * v / t))) for n, v, t in zip(ras_shape, vox, target))
    resampled = np.stack([resize_volume(c, resampled_shape, "trilinear") for c in channels])  # (C, ...) float32
    mask_r = None
    if mask_ras is not None:
        mask8 = mask_ras.astype(np.uint8, copy=False)
        if num_classes > 1:  # a multi-class segmentation's labels: per label, every label kept
            mask_r = resize_label_map(mask8, resampled_shape)
        elif mask8.size and mask8.max() > 1:  # a label map: no new values
            mask_r = resize_volume(mask8, resampled_shape, "nearest")
        else:  # binary (load_mask's 0/1): keeps every lesion
            mask_r = resize_mask(mask8, resampled_shape)
    spacing_out = tuple(float(n * v / r) for n, v, r in zip(ras_shape, vox, resampled_shape))

    # 2. foreground crop, 3. centre crop / pad
    if s["crop_foreground"]:
        start, stop = foreground_bbox((resampled != 0).any(axis=0), s["foreground_margin"])  # any channel's
    else:
        start, stop = (0, 0, 0), resampled_shape
    shape = s["shape"] if s["mode"] == "spacing" else None
    start, stop, pad_before, out_shape = centre_crop_or_pad(start, stop, shape)
    info = PreprocessInfo(ras_shape, resampled_shape, start, stop, pad_before, out_shape, spacing_out)
    region = tuple(slice(a, b) for a, b in zip(start, stop))
    mask_out = _place(mask_r[region], pad_before, out_shape, np.uint8) if mask_r is not None else None

    # 4. normalise, each channel on its own
    out = np.stack([_normalise(_place(c[region], pad_before, out_shape, np.float32), s) for c in resampled])
    return np.ascontiguousarray(out if several else out[0], dtype=np.float32), mask_out, info


def invert_geometry(volume: np.ndarray, info: PreprocessInfo, mode: str) -> np.ndarray:
    """Map an output-space array back onto the input RAS grid (undo steps 3, 2 and 1).

    The array's region ``[pad_before, pad_before + crop size)`` is put back at
    ``[crop_start, crop_stop)`` of a zero volume of ``info.resampled_shape`` (padding dropped,
    everything outside the crop 0), which is then resampled to ``info.ras_shape`` with
    :func:`brain3d.data.nifti.resize_volume` (the exact inverse mapping of step 1's grid).

    Args:
        volume: 3-D array of shape ``info.output_shape`` (e.g. a probability map or a 0/1 mask).
        info: from :func:`preprocess_volume` (or :meth:`PreprocessInfo.from_dict`).
        mode: "trilinear" for probabilities / intensities (float32 result) or "nearest" for masks and
            labels (the input dtype is kept, no new values appear). "nearest" is not
            :func:`brain3d.data.nifti.resize_mask`: going back to a native grid is normally an upsampling,
            which nearest does without loss, but where the preprocessing upsampled (a native voxel coarser
            than the target spacing) it downsamples and may drop a small component. brain3d's predictions
            invert the probability map ("trilinear") and threshold it on the native grid.

    Returns:
        Array of shape ``info.ras_shape``.

    Raises:
        ValueError: bad mode, or the array's shape is not ``info.output_shape``.
    """
    if mode not in ("trilinear", "nearest"):
        raise ValueError(f"invert_geometry: mode must be 'trilinear' or 'nearest', got {mode!r}")
    arr = np.asarray(volume)
    if arr.shape != tuple(info.output_shape):
        raise ValueError(f"invert_geometry: expected an array of shape {tuple(info.output_shape)}, got {arr.shape}")
    size = [b - a for a, b in zip(info.crop_start, info.crop_stop)]
    region = arr[tuple(slice(p, p + n) for p, n in zip(info.pad_before, size))]
    dtype = np.float32 if mode == "trilinear" else arr.dtype
    resampled = np.zeros(tuple(info.resampled_shape), dtype=dtype)
    resampled[tuple(slice(a, b) for a, b in zip(info.crop_start, info.crop_stop))] = region
    return resize_volume(resampled, info.ras_shape, mode)


def output_affine(ras_affine: np.ndarray, info: PreprocessInfo) -> np.ndarray:
    """The voxel -> world (mm) affine of the preprocessed array, given the input's RAS affine.

    Useful to save a preprocessed volume as NIfTI (e.g. to look at it): output voxel ``o`` is
    resampled voxel ``o - pad_before + crop_start``, whose centre is input voxel
    ``(r + 0.5) * ras_shape / resampled_shape - 0.5`` (``align_corners=False``).
    """
    scale = np.asarray(info.ras_shape, dtype=np.float64) / np.asarray(info.resampled_shape, dtype=np.float64)
    offset = np.asarray(info.crop_start, dtype=np.float64) - np.asarray(info.pad_before, dtype=np.float64)
    out_to_in = np.eye(4)
    out_to_in[:3, :3] = np.diag(scale)
    out_to_in[:3, 3] = (offset + 0.5) * scale - 0.5
    return np.asarray(ras_affine, dtype=np.float64) @ out_to_in
