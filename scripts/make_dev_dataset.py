#!/usr/bin/env python
"""A realistic development dataset of brain-like T1w MRI, for tuning training recipes before real data.

Closer to real scans than the built-in phantoms (:mod:`brain3d.data.synthetic`), and stored the way real
datasets are: every subject on its own native grid, orientation and dtype. Three tasks are learnable:

* sex (``F`` / ``M``, balanced): ``--variant size`` (default): males' brain and head are 10 % larger (sd 3 %
  between people) and relatively longer front to back. ``--variant overlap``: sex adds only 2 % to the size
  (size alone: AUC ~0.7) and males' cortical grey matter is 4 % brighter relative to white matter.
* age (years, uniform 20-85): the ventricles grow (x1 at 20 to ~x2.75 at 85), the cortex thins (-0.4 %/year),
  sulci and the interhemispheric fissure widen, grey matter brightens towards white matter (+0.15 %/year of WM)
  and the brain shrinks inside a fixed skull; each effect has its own individual noise (``--age-noise`` scales
  it: at 1, the default, even the true parameters predict age only to ~3 years MAE; at 0.3, to ~1 year).
* lesions: 0 (5 % of subjects) or 2-5 T1-hypointense white-matter blobs (periventricular and deep, never near
  the cortex), each 50-700 voxels of the 2 mm reference grid (log-uniform); the mask is on the image's grid.

Anatomy (head frame, mm, RAS: x left->right, y posterior->anterior, z inferior->superior; origin at the centre
of the cerebrum): scalp (fat-bright) and neck, skull with diploe, CSF under the skull, two cerebral hemispheres
(ellipsoid x smooth per-subject shape noise) split by the interhemispheric fissure, a 2.5-3.5 mm cortical
ribbon folded by CSF clefts (zero sheets of band-pass noise, reaching ~12 mm into the brain) plus the Sylvian
fissures, white matter and corpus callosum, curved lateral ventricles (frontal horn, body, atrium, occipital
and temporal horns), third and fourth ventricles, thalami, caudate, putamen and pallidum, a foliated
cerebellum under the tentorium, and the brainstem running into the spinal cord. Intensities are relative to
WM = 1 (GM ~0.6-0.7, CSF ~0.2, deep GM ~0.72-0.86, lesions 0.35-0.5).

Imaging: each subject's anatomy is drawn once on a fine grid in its head frame (half the reference voxel:
1 mm), with linear partial-volume ramps at every tissue boundary, then blurred by the native voxel's point
spread function and resampled (trilinear) onto the native grid through the head pose (rotation up to 8
degrees, translation a few mm). On that grid: a smooth multiplicative bias field (+-10-20 %), Rician noise
(sd 2-5 % of WM, background included, as in raw scans: the background is not exactly 0) and a global scanner
scale (uniform 300-3000).

Storage: voxel sizes 2 mm (most), 1.5 mm, 1x1x1.2 mm or 1x1x3 mm thick slices (the thick axis random);
orientations RAS, LAS, LPS, PIR, ASL, LIA; image dtypes uint8 (scaled to 0-255), int16, int16 with
scl_slope / scl_inter, uint16, float32, float64; masks uint8 (mostly), int16 or float32 0/1, always with the
image's shape and affine. The first subjects cycle through all orientations and dtypes, so even a tiny
dataset has them all.

Output (OUT_DIR): ``images/sub-XXXX_T1w.nii.gz``, ``masks/sub-XXXX_lesions.nii.gz``, ``manifest.csv``
(``subject_id,image,mask,sex,age,split``; paths relative to the manifest) and ``dataset.json`` (generator
version, options, per-subject ground truth: scale, age effects, pose, storage, lesions with their voxel
counts, tissue volumes). Deterministic: subject i draws everything from ``np.random.default_rng([seed, i])``
(storage from ``[seed, i, 1]``), so any number of workers writes identical data.

Takes ~2.5 s per subject and core at the default reference grid (200 subjects: ~4.5 min on 2 cores) and
~0.9 GB of disk per 200 subjects (the 1 mm grids stored as floats dominate).

Example:
    python scripts/make_dev_dataset.py /work/devdata/size --num-subjects 200 --seed 0
    python scripts/make_dev_dataset.py /work/devdata/overlap --num-subjects 200 --seed 1 --variant overlap
    python scripts/make_dev_dataset.py /work/devdata/clean --num-subjects 200 --seed 2 --age-noise 0.3
    python scripts/make_dev_dataset.py /tmp/tiny --num-subjects 6 --num-val 2 --reference-shape 32 40 32
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from brain3d.data.nifti import save_nifti

GENERATOR_VERSION = "brain3d-devdata-1"
FOV_MM = np.array([192.0, 224.0, 192.0])  # reference field of view (x, y, z)
REFERENCE_SHAPE = (96, 112, 96)  # 2 mm reference grid over FOV_MM
REFERENCE_VOXEL_MM = 2.0
HEAD_OFFSET_MM = np.array([0.0, -4.0, 14.0])  # world position of the head-frame origin before the pose
AGE_RANGE = (20.0, 85.0)

# --- Intensities relative to WM = 1.0 (T1-weighted). ---
WM, CSF = 1.0, 0.20
GM_YOUNG = 0.60  # cortical GM at 20 years; rises towards WM with age
GM_PER_YEAR = 0.0015  # x WM: GM/WM contrast falls with age
DEEP_GM = {"thalamus": 0.80, "caudate": 0.72, "putamen": 0.74, "pallidum": 0.86}
CEREBELLAR_GM, CEREBELLAR_WM, BRAINSTEM = 0.64, 0.95, 0.86
SCALP_FAT, MUSCLE, SKULL, DIPLOE, MARROW = 0.80, 0.45, 0.08, 0.35, 0.60

# --- Female young-adult template sizes (mm, head frame, scale 1). ---
CEREBRUM_RADII = np.array([67.0, 83.0, 56.0])  # x, y, z; the inferior half is flattened (see _cerebrum_rho)
SKULL_GAP_MM = 1.0  # CSF between brain and skull at 20 years
SKULL_MM, SCALP_MM = 6.0, 5.0
SULCAL_DEPTH_MM = 14.0
GYRAL_SIGMA_MM = 3.0  # band-pass noise scale of the folding pattern (sulci ~ 10-13 mm apart)

STORAGE_GRIDS = (  # (name, nominal voxel size (mm) with the odd axis last, weight)
    ("2mm", (2.0, 2.0, 2.0), 0.55),
    ("1.5mm", (1.5, 1.5, 1.5), 0.15),
    ("1x1x1.2mm", (1.0, 1.0, 1.2), 0.10),
    ("1x1x3mm", (1.0, 1.0, 3.0), 0.20),
)
ORIENTATIONS = ("RAS", "LPS", "PIR", "LAS", "ASL", "LIA")
IMAGE_DTYPES = ("int16", "float32", "uint8", "int16_scaled", "uint16", "float64")
MASK_DTYPES = ("uint8", "int16", "float32")
MASK_DTYPE_WEIGHTS = (0.7, 0.15, 0.15)
LESION_GAP_MM = 7.0  # white matter kept between lesions, so no grid merges two (3 mm slices included)


# =============================================================================================================
# Per-subject parameters
# =============================================================================================================


@dataclass
class Lesion:
    """One planned lesion: kind ("periventricular" / "deep"), target volume (mm^3), T1 intensity (x WM)."""

    kind: str
    target_mm3: float
    intensity: float
    centre_mm: list = field(default_factory=list)  # head frame, filled when placed
    fine_voxels: int = 0
    voxels: int = 0  # on the native grid (the mask)
    reference_voxels: float = 0.0  # voxels * native voxel volume / reference voxel volume


@dataclass
class Anatomy:
    """Everything drawn for one subject (sizes in mm, intensities x WM); stored in dataset.json."""

    sex: str
    age: float
    scale: float  # linear scale of head and brain (sex + individual)
    aspect: list  # per-axis (x, y, z) shape factor
    atrophy: float  # linear brain shrink inside the fixed skull (0 = none)
    ventricle_factor: float  # ventricle volume relative to a 20-year-old of the same scale
    cortical_thickness_mm: float
    sulcal_halfwidth_mm: float
    fissure_halfwidth_mm: float
    gm_intensity: float
    csf_intensity: float
    rotation_deg: list
    translation_mm: list
    lesions: list


def subject_labels(seed: int, index: int) -> tuple[np.random.Generator, str, float]:
    """(subject ``index``'s generator, sex "F"/"M", age in years rounded to 0.1): the age drawn is the truth used.

    Sex is balanced within each pair of subjects (the order drawn from the pair's own generator)."""
    rng = np.random.default_rng([seed, index])
    flip = int(np.random.default_rng([seed, index // 2, 2]).integers(2))
    sex = "FM"[(index % 2) ^ flip]
    age = round(float(rng.uniform(*AGE_RANGE)), 1)
    return rng, sex, age


def draw_anatomy(rng: np.random.Generator, sex: str, age: float, variant: str, age_noise: float = 1.0) -> Anatomy:
    """Draw the subject's anatomy parameters (the labels drive them; every effect has individual noise).

    ``age_noise`` scales the individual noise of every age effect (1: the default set, where even the true
    parameters predict age only to ~3 years MAE; 0.3: a set where ~1 year is reachable). The draws are the same
    for any value, so only the noise's size changes."""
    k = float(age_noise)
    male = sex == "M"
    years = age - AGE_RANGE[0]
    af = years / (AGE_RANGE[1] - AGE_RANGE[0])  # 0 at 20 years, 1 at 85
    if variant == "size":
        # a strong size cue, as in the set the learning-quality issue measured on (sex learnt to 0.98)
        scale = (1.10 if male else 1.0) * rng.normal(1.0, 0.03)
        aspect = rng.normal(1.0, 0.015, 3) * (np.array([0.99, 1.025, 1.0]) if male else 1.0)
        gm_sex = 1.0
    else:  # overlap: a small size effect, the rest of the cue is grey-matter contrast
        scale = (1.02 if male else 1.0) * rng.normal(1.0, 0.03)
        aspect = rng.normal(1.0, 0.015, 3)
        gm_sex = 1.04 if male else 1.0
    atrophy = max(0.0, 0.0004 * years * (1.0 + k * rng.normal(0.0, 0.15)) + k * rng.normal(0.0, 0.003))
    ventricle_factor = (1.0 + 1.75 * af**1.3) * float(np.exp(k * rng.normal(0.0, 0.12)))
    thickness = 3.3 * (1.0 - 0.004 * years) * (1.0 + k * rng.normal(0.0, 0.04))
    sulcal_hw = (0.25 + 0.45 * af) * (1.0 + k * rng.normal(0.0, 0.12))
    fissure_hw = (0.8 + 1.2 * af) * (1.0 + k * rng.normal(0.0, 0.12))
    gm = (GM_YOUNG + GM_PER_YEAR * years + k * rng.normal(0.0, 0.01)) * gm_sex
    csf = CSF * rng.normal(1.0, 0.08)
    rotation = np.clip(rng.normal(0.0, 3.0, 3), -8.0, 8.0)
    translation = np.clip(rng.normal(0.0, 2.5, 3), -6.0, 6.0)
    lesions = draw_lesions(rng)
    return Anatomy(sex, age, float(scale), [float(a) for a in aspect], float(atrophy), float(ventricle_factor),
                   float(thickness), float(sulcal_hw), float(fissure_hw), float(gm), float(csf),
                   [float(r) for r in rotation], [float(t) for t in translation], lesions)


def draw_lesions(rng: np.random.Generator) -> list[Lesion]:
    """0 lesions (5 %) or 2-5, volume log-uniform over 50-700 reference voxels (400-5600 mm^3 at 2 mm)."""
    if rng.random() < 0.05:
        return []
    ref_voxel_mm3 = REFERENCE_VOXEL_MM**3
    out = []
    for _ in range(int(rng.integers(2, 6))):
        kind = "periventricular" if rng.random() < 0.5 else "deep"
        volume = float(np.exp(rng.uniform(np.log(50.0), np.log(700.0)))) * ref_voxel_mm3
        out.append(Lesion(kind, volume, float(rng.uniform(0.35, 0.5))))
    return out


@dataclass
class Storage:
    """How one subject is stored: native grid, orientation, dtypes, and the scanner's signal parameters."""

    grid: str
    voxel_mm: list  # per world axis (x, y, z)
    shape: list  # on-disk array shape
    orientation: str  # nibabel axis codes of the on-disk axes, e.g. "PIR"
    dtype: str
    mask_dtype: str
    centre_mm: list  # world position of the grid centre
    noise_sd: float  # x WM
    bias_amplitude: float
    scanner_scale: float


def draw_storage(seed: int, index: int, mm_per_ref_mm: float) -> Storage:
    """Storage of subject ``index`` from its own generator ``[seed, index, 1]`` (independent of the anatomy).

    The first subjects cycle through every orientation and image dtype (a tiny dataset still has variety);
    voxel sizes are the nominal ones times ``mm_per_ref_mm`` (1 on the 2 mm reference grid)."""
    rng = np.random.default_rng([seed, index, 1])
    weights = np.array([w for _, _, w in STORAGE_GRIDS])
    name, nominal, _ = STORAGE_GRIDS[int(rng.choice(len(STORAGE_GRIDS), p=weights / weights.sum()))]
    vox = list(nominal)
    odd_axis = int(rng.integers(3))  # the thick (or 1.2 mm) axis
    vox[2], vox[odd_axis] = vox[odd_axis], vox[2]
    vox = [v * mm_per_ref_mm for v in vox]
    orientation = ORIENTATIONS[index] if index < len(ORIENTATIONS) else str(rng.choice(ORIENTATIONS))
    dtype = IMAGE_DTYPES[index] if index < len(IMAGE_DTYPES) else str(rng.choice(IMAGE_DTYPES))
    mask_dtype = str(rng.choice(MASK_DTYPES, p=MASK_DTYPE_WEIGHTS)) if index >= 3 else MASK_DTYPES[index]
    fov = FOV_MM + rng.uniform(-4.0, 4.0, 3)  # the same physical FOV +- a few mm
    world_shape = [max(8, int(round(f / v))) for f, v in zip(fov, vox)]
    codes = tuple(orientation)
    axes = [_axis_of(c) for c in codes]
    shape = [world_shape[a] for a in axes]
    return Storage(name, [float(v) for v in vox], shape, orientation, dtype, mask_dtype,
                   [float(c) for c in rng.uniform(-3.0, 3.0, 3)], float(rng.uniform(0.02, 0.05)),
                   float(rng.uniform(0.10, 0.20)), float(rng.uniform(300.0, 3000.0)))


def _axis_of(code: str) -> int:
    """World axis (0 x, 1 y, 2 z) of a nibabel axis code letter."""
    return {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}[code]


def native_affine(storage: Storage) -> np.ndarray:
    """4x4 voxel -> world (RAS mm) affine of the native grid: axis-aligned, permuted/flipped per the orientation,
    the grid centre at ``storage.centre_mm``."""
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for i, code in enumerate(storage.orientation):
        axis = _axis_of(code)
        sign = 1.0 if code in "RAS" else -1.0
        aff[axis, i] = sign * storage.voxel_mm[axis]
    centre_index = (np.array(storage.shape, dtype=float) - 1.0) / 2.0
    aff[:3, 3] = np.array(storage.centre_mm) - aff[:3, :3] @ centre_index
    return aff


# =============================================================================================================
# Fine grid and small field helpers
# =============================================================================================================


class FineGrid:
    """Axis-aligned grid in the head frame: ``origin`` (mm of voxel 0), isotropic ``step`` (mm), ``shape``."""

    def __init__(self, step: float):
        lo = -FOV_MM / 2 - HEAD_OFFSET_MM + np.array([4.0, 6.0, -6.0])  # head needs less room left/right
        hi = FOV_MM / 2 - HEAD_OFFSET_MM - np.array([4.0, 6.0, -6.0])
        lo[2] -= 4.0  # the neck runs out of the bottom of the FOV; pose may tilt it in
        self.step = float(step)
        self.origin = lo
        self.shape = tuple(int(np.ceil((b - a) / step)) + 1 for a, b in zip(lo, hi))

    def box(self, lo_mm: Sequence[float], hi_mm: Sequence[float]) -> tuple[slice, slice, slice]:
        """Slices of the voxels whose centres lie within [lo_mm, hi_mm] (clipped to the grid)."""
        out = []
        for axis in range(3):
            a = int(np.floor((lo_mm[axis] - self.origin[axis]) / self.step))
            b = int(np.ceil((hi_mm[axis] - self.origin[axis]) / self.step)) + 1
            out.append(slice(max(a, 0), min(max(b, 0), self.shape[axis])))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Head-frame coordinates (mm) of a box as 3 broadcastable float32 arrays (n, 1, 1), (1, m, 1), (1, 1, k)."""
        out = []
        for axis, s in enumerate(box):
            c = (self.origin[axis] + self.step * np.arange(s.start, s.stop)).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = c.size
            out.append(c.reshape(shape))
        return out


def elementwise(op: np.ufunc, arrays: Sequence) -> np.ndarray:
    """``op`` (np.maximum / np.minimum) folded over arrays that broadcast together (np.maximum.reduce would
    stack them and needs equal shapes)."""
    out = arrays[0]
    for a in arrays[1:]:
        out = op(out, a)
    return np.asarray(out)


def ramp(distance: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction (float32, 0-1) of a signed distance (mm, negative inside): a linear ramp over one
    fine voxel, the fraction of a voxel that a plane at that distance leaves inside."""
    return np.clip(np.float32(0.5) - distance / np.float32(width), 0.0, 1.0).astype(np.float32, copy=False)


def plane_waves(rng: np.random.Generator, coords: Sequence[np.ndarray], amplitude: float, wavelength: tuple,
                n_waves: int = 3) -> np.ndarray:
    """Smooth random field: sum of ``n_waves`` plane waves (wavelength drawn in ``wavelength`` mm), sd ~amplitude.

    ``coords`` are 3 broadcastable arrays (mm); returns float32 of their broadcast shape."""
    out = np.float32(0.0)
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        k = 2 * np.pi / rng.uniform(*wavelength) * direction / np.linalg.norm(direction)
        a = np.float32(amplitude * np.sqrt(2.0 / n_waves) * rng.normal(1.0, 0.2))
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        out = out + a * np.sin(np.float32(k[0]) * coords[0] + np.float32(k[1]) * coords[1]
                               + np.float32(k[2]) * coords[2] + phase)
    return np.asarray(out, dtype=np.float32)


def band_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Band-pass white noise (difference of Gaussians sigma and 2.5 sigma, in voxels), zero mean, unit sd: (shape)
    float32. Its zero sheets are a random maze with spacing ~4.4 sigma, the look of a gyral pattern."""
    white = rng.standard_normal(tuple(shape), dtype=np.float32)
    field_ = ndimage.gaussian_filter(white, sigma, mode="wrap") - ndimage.gaussian_filter(white, 2.5 * sigma,
                                                                                          mode="wrap")
    return ((field_ - field_.mean()) / field_.std()).astype(np.float32)


def ellipsoid_rho(coords: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) at broadcastable ``coords`` (mm): float32."""
    return np.sqrt(sum(((c - np.float32(m)) / np.float32(r)) ** 2 for c, m, r in zip(coords, centre, radii)))


def ellipsoid_distance(coords: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid: (rho - 1) x smallest radius."""
    return (ellipsoid_rho(coords, centre, radii) - np.float32(1.0)) * np.float32(min(radii))


def tube_distance(grid: FineGrid, box: tuple[slice, ...], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to a tube: the union of ellipsoids centred on ``points`` (n, 3) mm with
    axis radii ``radii`` (n, 3) mm, evaluated on ``box`` of ``grid`` (float32, box shape; 99 far from it).

    Each ellipsoid is evaluated on its own small neighbourhood only (cheap)."""
    size = tuple(s.stop - s.start for s in box)
    out = np.full(size, 99.0, dtype=np.float32)
    for centre, r in zip(points, radii):
        reach = r + 2.0 * grid.step + 1.0
        sub = grid.box(centre - reach, centre + reach)
        local = tuple(slice(max(s.start, b.start) - b.start, min(s.stop, b.stop) - b.start) for s, b in zip(sub, box))
        if any(sl.stop <= sl.start for sl in local):
            continue
        absolute = tuple(slice(sl.start + b.start, sl.stop + b.start) for sl, b in zip(local, box))
        d = ellipsoid_distance(grid.coords(absolute), centre, r)
        np.minimum(out[local], d, out=out[local])
    return out


def resample_curve(knots: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``step`` mm along a polyline through ``knots`` (k, m) (3 position columns + attributes),
    smoothed with a short moving average so the curve bends gently. Returns (positions (n, 3), attributes)."""
    seg = np.linalg.norm(np.diff(knots[:, :3], axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, arc[-1] + 1e-6, step)
    dense = np.stack([np.interp(t, arc, knots[:, j]) for j in range(knots.shape[1])], axis=1)
    width = max(1, int(round(6.0 / step)))  # ~6 mm smoothing of the corners
    if dense.shape[0] > 2 * width + 1:
        kernel = np.ones(2 * width + 1) / (2 * width + 1)
        padded = np.pad(dense, ((width, width), (0, 0)), mode="edge")
        dense = np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(dense.shape[1])], axis=1)
    return dense[:, :3], dense[:, 3:]


class Canvas:
    """The fine-grid T1 image, painted layer by layer (alpha compositing of partial-volume fractions), and the
    brain / ventricle fraction maps inside the intracranial box (for ground-truth volumes)."""

    def __init__(self, grid: FineGrid, icv_box: tuple[slice, ...]):
        self.grid = grid
        self.image = np.zeros(grid.shape, dtype=np.float32)
        self.icv_box = icv_box
        size = tuple(s.stop - s.start for s in icv_box)
        self.brain = np.zeros(size, dtype=np.float32)
        self.ventricles = np.zeros(size, dtype=np.float32)

    def paint(self, box: tuple[slice, ...], alpha: np.ndarray, value, tissue: str = "other") -> None:
        """Composite ``value`` (scalar or array) over ``box`` with partial-volume ``alpha``; ``tissue`` "brain",
        "ventricle" or "other" updates the fraction maps where ``box`` lies in the intracranial box."""
        region = self.image[box]
        region += alpha * (np.float32(value) - region) if np.isscalar(value) else alpha * (value - region)
        local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(box, self.icv_box))
        if any(sl.start < 0 or sl.stop > n for sl, n in zip(local, self.brain.shape)):
            return  # outside the intracranial box (scalp, neck): no volumes tracked
        for target, mine in ((self.brain, tissue == "brain"), (self.ventricles, tissue == "ventricle")):
            t = target[local]
            t += alpha * (np.float32(mine) - t)


# =============================================================================================================
# Anatomy on the fine grid
# =============================================================================================================


@dataclass
class Geometry:
    """Derived sizes of one subject (mm, head frame)."""

    s: float  # scale
    cerebrum_radii: np.ndarray  # young (skull-defining) radii
    shrink: float  # 1 - atrophy
    cerebellum_centre: np.ndarray
    cerebellum_radii: np.ndarray
    cc_centre_y: float
    cc_half_length: float
    cc_top: float


def make_geometry(an: Anatomy) -> Geometry:
    s = an.scale
    radii = CEREBRUM_RADII * s * np.array(an.aspect)
    return Geometry(s, radii, 1.0 - an.atrophy, np.array([0.0, -50.0, -42.0]) * s,
                    np.array([54.0, 32.0, 26.0]) * s, -2.0 * s, 36.0 * s, 24.0 * s)


def cerebrum_rho(coords: Sequence[np.ndarray], radii: np.ndarray, shape_noise: np.ndarray) -> np.ndarray:
    """Normalised radius of the cerebral envelope (1 on the surface): an ellipsoid narrower in front, flatter
    below, modulated by smooth per-subject ``shape_noise`` (float32, broadcast shape)."""
    x, y, z = coords
    rx = np.float32(radii[0]) * (np.float32(1.0) + np.float32(0.06) * y / np.float32(-radii[1]))  # wider behind
    rz = np.where(z < 0, np.float32(radii[2] * 0.8), np.float32(radii[2]))  # flatter inferior surface
    rho = np.sqrt((x / rx) ** 2 + (y / np.float32(radii[1])) ** 2 + (z / rz) ** 2)
    return rho * (np.float32(1.0) + shape_noise)


def radial_distance(rho: np.ndarray, coords: Sequence[np.ndarray], shrink: float = 1.0) -> np.ndarray:
    """Approximate signed distance (mm) to the surface rho = ``shrink`` along the ray from the origin."""
    r = np.sqrt(sum(c**2 for c in coords))
    return (rho - np.float32(shrink)) * r / np.maximum(rho, np.float32(1e-3))


def render_subject(an: Anatomy, rng: np.random.Generator, grid: FineGrid) -> tuple[Canvas, list, dict]:
    """Draw one subject's anatomy on the fine grid.

    Returns:
        (canvas, lesions, volumes): the painted canvas (noise-free, bias-free T1, x WM); for each placed lesion
        (its Lesion record, the fine-grid box slices, its partial-volume fraction on that box, float32);
        ground-truth volumes in ml (brain, ventricles, intracranial) from the fraction maps.
    """
    geo = make_geometry(an)
    step = grid.step
    full = tuple(slice(0, n) for n in grid.shape)
    shape_noise_coef = rng.integers(1 << 31)
    icv_hi = geo.cerebrum_radii * np.array([1.08, 1.12, 1.05]) + 6.0
    icv_box = grid.box([-icv_hi[0], -icv_hi[1], -80.0 * geo.s], icv_hi)
    canvas = Canvas(grid, icv_box)

    # --- Outer layers on the whole grid: scalp + neck, skull, intracranial CSF. The skull follows the young
    #     brain (it does not shrink with age); the intracranial space is the cerebrum and cerebellum envelopes.
    coords = grid.coords(full)
    shape_noise = plane_waves(np.random.default_rng(shape_noise_coef), coords, 0.025, (90.0, 180.0), 4)
    d_cerebrum_young = radial_distance(cerebrum_rho(coords, geo.cerebrum_radii, shape_noise), coords)
    d_cb_young = ellipsoid_distance(coords, geo.cerebellum_centre, geo.cerebellum_radii)
    d_icv = smooth_min(d_cerebrum_young, d_cb_young, 8.0) - np.float32(SKULL_GAP_MM)
    del d_cerebrum_young, d_cb_young
    skull_mm = SKULL_MM * geo.s * rng.normal(1.0, 0.08)
    scalp_mm = SCALP_MM * rng.normal(1.0, 0.12)
    d_neck = neck_distance(coords, geo.s)
    d_head = smooth_min(d_icv - np.float32(skull_mm + scalp_mm), d_neck, 12.0)
    del d_neck
    depth_skin = -d_head
    fat = np.clip(1.0 - (depth_skin - np.float32(0.7 * scalp_mm)) / np.float32(3.0), 0.0, 1.0)
    canvas.paint(full, ramp(d_head, step), MUSCLE + (SCALP_FAT - MUSCLE) * fat)
    del depth_skin, fat
    paint_neck_fat(canvas, rng, grid, d_head, geo)
    del d_head
    skull_local = np.float32(skull_mm) * (np.float32(1.0) + np.clip(-(coords[2] + np.float32(15.0 * geo.s))
                                                                    / np.float32(25.0), 0.0, 1.0))
    canvas.paint(full, ramp(d_icv - skull_local, step), skull_values(d_icv, skull_local))
    del skull_local
    canvas.paint(full, ramp(d_icv, step), an.csf_intensity)
    paint_spine(canvas, grid, geo, an)
    icv_alpha = ramp(d_icv[icv_box], step)
    del d_icv, coords, shape_noise

    # --- Cerebrum, deep structures, cerebellum and brainstem inside the intracranial box.
    coords = grid.coords(icv_box)
    shape_noise = plane_waves(np.random.default_rng(shape_noise_coef), coords, 0.025, (90.0, 180.0), 4)
    rho = cerebrum_rho(coords, geo.cerebrum_radii, shape_noise)
    del shape_noise
    d_tissue, thickness = paint_cerebrum(canvas, rng, grid, icv_box, coords, rho, geo, an)
    del rho
    d_vent, d_deep = paint_deep_structures(canvas, grid, icv_box, coords, geo, an)
    d_infratentorial = paint_cerebellum_and_brainstem(canvas, rng, grid, icv_box, geo, an)
    lesions = place_lesions(an, rng, grid, icv_box, coords, d_tissue, thickness, d_vent, d_deep, d_infratentorial)
    for lesion, box, alpha in lesions:
        canvas.paint(box, alpha, lesion.intensity, "brain")
    voxel_ml = step**3 / 1000.0
    volumes = {"brain_ml": float(canvas.brain.sum(dtype=np.float64) * voxel_ml),
               "ventricles_ml": float(canvas.ventricles.sum(dtype=np.float64) * voxel_ml),
               "intracranial_ml": float(icv_alpha.sum(dtype=np.float64) * voxel_ml)}
    return canvas, lesions, volumes


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum of two distance fields (polynomial, blend radius ``k`` mm): a union without a crease."""
    k = np.float32(k)
    h = np.clip(np.float32(0.5) + np.float32(0.5) * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (np.float32(1.0) - h)


def neck_distance(coords: Sequence[np.ndarray], s: float) -> np.ndarray:
    """Signed distance (mm) to the neck: an elliptic cylinder below the skull base, slightly tilted forward."""
    x, y, z = coords
    yc = np.float32(-18.0 * s) + np.float32(0.15) * (z + np.float32(40.0 * s))
    rxy = np.sqrt((x / np.float32(52.0 * s)) ** 2 + ((y - yc) / np.float32(58.0 * s)) ** 2)
    d_side = (rxy - np.float32(1.0)) * np.float32(52.0 * s)
    return np.maximum(d_side, z + np.float32(35.0 * s))


def paint_neck_fat(canvas: Canvas, rng: np.random.Generator, grid: FineGrid, d_head: np.ndarray,
                   geo: Geometry) -> None:
    """Fat between the neck muscles: bright patches where smooth noise is high, below the skull base."""
    box = grid.box([-80.0 * geo.s, -95.0 * geo.s, grid.origin[2]], [80.0 * geo.s, 60.0 * geo.s, -30.0 * geo.s])
    size = [s.stop - s.start for s in box]
    coarse = band_noise(rng, [max(4, n // 3) for n in size], 2.0)  # 3-voxel cells, patches ~2 cm
    fine = ndimage.zoom(coarse, [n / c for n, c in zip(size, coarse.shape)], order=1, output=np.float32)
    fine = fine[: size[0], : size[1], : size[2]]
    fade = np.clip((np.float32(-38.0 * geo.s) - grid.coords(box)[2]) / np.float32(8.0), 0.0, 1.0)
    alpha = np.clip((fine - np.float32(0.7)) * np.float32(2.0), 0.0, 1.0) * fade * ramp(d_head[box], grid.step)
    canvas.paint(box, alpha, SCALP_FAT)


def skull_values(d_icv: np.ndarray, skull_mm) -> np.ndarray:
    """Skull intensity: dark inner and outer tables, brighter fatty diploe in the middle of the bone
    (``skull_mm``: thickness, scalar or array)."""
    half = np.float32(0.5) * np.asarray(skull_mm, dtype=np.float32)
    middle = np.abs(d_icv - half) / half  # 0 mid-bone, 1 at the tables
    diploe = np.clip((np.float32(0.55) - middle) / np.float32(0.25), 0.0, 1.0)
    return np.float32(SKULL) + np.float32(DIPLOE - SKULL) * diploe


def paint_spine(canvas: Canvas, grid: FineGrid, geo: Geometry, an: Anatomy) -> None:
    """Below the skull base: vertebral bone (dark cortex, bright marrow) around the spinal canal (CSF)."""
    s = geo.s
    box = grid.box([-30 * s, -70 * s, grid.origin[2]], [30 * s, 10 * s, -55 * s])
    x, y, z = grid.coords(box)
    yc = np.float32(-34.0 * s) + np.float32(0.08) * (z + np.float32(60.0 * s))
    r = np.sqrt(x**2 + (y - yc) ** 2)
    below = np.clip((np.float32(-62.0 * s) - z) / np.float32(4.0), 0.0, 1.0)  # fades in under the skull base
    bone = ramp(r - np.float32(17.0 * s), grid.step) * below
    marrow = np.clip((np.float32(14.0 * s) - r) / np.float32(3.0), 0.0, 1.0)
    canvas.paint(box, bone, np.float32(SKULL) + np.float32(MARROW - SKULL) * marrow)
    canvas.paint(box, ramp(r - np.float32(9.0 * s), grid.step) * below, an.csf_intensity)
    canvas.paint(box, ramp(r - np.float32(6.0 * s), grid.step) * below, BRAINSTEM)  # the spinal cord


def paint_cerebrum(canvas: Canvas, rng: np.random.Generator, grid: FineGrid, box, coords, rho: np.ndarray,
                   geo: Geometry, an: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Paint the cortical GM (folded) and the WM of the cerebrum, the corpus callosum included.

    The tissue's signed distance to the pial boundary (negative in tissue) is the largest of: the shrunken
    envelope, the interhemispheric fissure, the sulcal clefts and the Sylvian fissures (each a CSF sheet with
    a half-width); GM fills the first ``thickness`` mm of tissue, WM the rest.

    Returns:
        (d_tissue, thickness): the pial distance (box shape, mm) and the local cortical thickness (mm), which
        place the lesions away from the cortex.
    """
    x, y, z = coords
    s = geo.s
    step = grid.step
    d_env = radial_distance(rho, coords, geo.shrink)
    d_env = np.maximum(d_env, -ellipsoid_distance(coords, (0.0, -6.0 * s, -52.0 * s), (20.0 * s, 28.0 * s,
                                                                                         22.0 * s)))
    depth = -d_env

    # Interhemispheric fissure: the mid-sagittal sheet, except under the corpus callosum arch (and below it).
    mid_x = plane_waves(rng, (np.float32(0.0), y, z), 1.2, (120.0, 220.0), 2)
    dy = np.abs(y - np.float32(geo.cc_centre_y))
    arch_top = np.float32(geo.cc_top) - np.float32(14.0 * s) * (dy / np.float32(geo.cc_half_length)) ** 2
    under_arch = np.maximum(np.minimum(arch_top - z, np.float32(geo.cc_half_length) - dy), np.float32(0.0))
    fissure_hw = np.float32(an.fissure_halfwidth_mm)
    d_fissure = np.sqrt((x - mid_x) ** 2 + under_arch**2) - fissure_hw  # >0 outside the CSF sheet
    depth = np.minimum(depth, d_fissure)  # depth below the nearest outer or medial surface

    # Sulcal clefts: zero sheets of band-pass noise, sampled on the nearest surface (so the sheets stand
    # perpendicular to it, like sulci), reaching from the surface down to a depth that varies between sulci.
    medial = np.clip((-d_env - d_fissure) / np.float32(6.0) + np.float32(0.5), 0.0, 1.0)  # 1 near the midline
    folds = folding_field(rng, coords, rho, x - mid_x, medial, geo)
    fold_grad = np.float32(folds[1])
    d_sheet = np.abs(folds[0]) / fold_grad
    sulcal_depth = np.float32(SULCAL_DEPTH_MM * s) * (1.0 + plane_waves(rng, coords, 0.3, (30.0, 70.0), 3))
    sulcal_depth *= np.float32(1.0) - np.float32(0.5) * medial  # medial sulci are shallower
    beyond = np.maximum(depth - sulcal_depth, np.float32(0.0))
    d_sulcus = np.sqrt(d_sheet**2 + beyond**2) - np.float32(an.sulcal_halfwidth_mm)
    del d_sheet, beyond, sulcal_depth, medial
    d_sylvian = sylvian_distance(rng, coords, depth, geo, an)
    d_tissue = elementwise(np.maximum, [d_env, -d_fissure, -d_sulcus, -d_sylvian])
    del d_env, d_fissure, d_sulcus, d_sylvian, depth

    thickness = np.float32(an.cortical_thickness_mm) * (np.float32(1.0) + np.float32(0.12) * folds[0])
    texture = np.float32(1.0) + np.float32(0.015) * folds[0]  # faint tissue texture (a few %)
    canvas.paint(box, ramp(d_tissue, step), np.float32(an.gm_intensity) * texture, "brain")
    canvas.paint(box, ramp(d_tissue + thickness, step), np.float32(WM) * texture, "brain")

    # Corpus callosum: a WM arch under the fissure, over the lateral ventricles (covers the cingulate GM line).
    cc_thick = np.float32(6.0 * s) + np.float32(3.5 * s) * (dy / np.float32(geo.cc_half_length)) ** 4
    inside_cc = elementwise(np.maximum, [z - (arch_top - fissure_hw - np.float32(0.3)),
                                         (arch_top - cc_thick) - z, dy - np.float32(geo.cc_half_length + 2.0)])
    lateral_fade = np.clip((np.float32(9.0 * s) - np.abs(x)) / np.float32(3.0), 0.0, 1.0)  # merges into the WM
    canvas.paint(box, ramp(inside_cc, step) * lateral_fade, np.float32(WM), "brain")
    return d_tissue, thickness


def folding_field(rng: np.random.Generator, coords, rho: np.ndarray, from_midline: np.ndarray, medial: np.ndarray,
                  geo: Geometry) -> tuple[np.ndarray, float]:
    """The gyral pattern: band-pass noise (unit sd) evaluated where each point projects onto the nearest brain
    surface: radially onto the envelope (blended 25 % back towards the point, so the sheets lean a little), or,
    by weight ``medial`` (0-1), along x onto the medial surface (``from_midline``: x - midline, mm).

    Returns (field on the box, float32; its typical tangential gradient magnitude in 1/mm)."""
    noise_step = 1.5
    half = geo.cerebrum_radii * 1.15 + 8.0
    n = [int(np.ceil(2 * h / noise_step)) + 1 for h in half]
    noise = band_noise(rng, n, GYRAL_SIGMA_MM * geo.s / noise_step)
    gx, gy, gz = np.gradient(noise, noise_step)
    typical_grad = float(np.sqrt(np.mean(gx**2 + gy**2 + gz**2) * 2.0 / 3.0))  # tangential part
    del gx, gy, gz
    blend = np.float32(0.75) / np.maximum(rho, np.float32(0.3)) + np.float32(0.25)
    x, y, z = coords
    # Medial projection: the two hemispheres' medial faces sample noise 12 mm apart (different patterns).
    x_medial = np.sign(from_midline) * (np.float32(12.0) + np.float32(0.25) * np.abs(from_midline))
    q = [x * blend + medial * (x_medial - x * blend), y * blend + medial * (y - y * blend),
         z * blend + medial * (z - z * blend)]
    index = [np.broadcast_to((c + np.float32(h)) / np.float32(noise_step), rho.shape) for c, h in zip(q, half)]
    out = ndimage.map_coordinates(noise, index, order=1, mode="nearest", output=np.float32)
    return out, typical_grad


def sylvian_distance(rng: np.random.Generator, coords, depth: np.ndarray, geo: Geometry,
                     an: Anatomy) -> np.ndarray:
    """Signed distance (mm) to the Sylvian fissures: a deep, gently wavy oblique CSF sheet on each side (rising
    towards the back), from the lateral surface to the insula ~22 mm in, over the middle of the hemisphere."""
    x, y, z = coords
    s = geo.s
    wave = plane_waves(rng, (np.abs(x), y, z), 2.0, (25.0, 45.0), 2)
    z_sheet = np.float32(-8.0 * s) - np.float32(0.30) * (y - np.float32(15.0 * s)) + wave
    along = np.maximum(np.abs(y - np.float32(-5.0 * s)) - np.float32(24.0 * s), np.float32(0.0))
    too_deep = np.maximum(depth - np.float32(22.0 * s), np.float32(0.0))
    lateral = np.maximum(np.float32(30.0 * s) - np.abs(x), np.float32(0.0))  # never near the midline
    d = np.sqrt((z - z_sheet) ** 2 + along**2 + too_deep**2 + lateral**2)
    return d - np.float32(an.sulcal_halfwidth_mm * 1.6 + 0.4)


def lateral_ventricle_knots(side: float, geo: Geometry, an: Anatomy) -> np.ndarray:
    """Knots (x, y, z, rx, ry, rz) in mm of one lateral ventricle's C-shaped centre line: frontal horn, body,
    atrium, then the temporal horn curving down and forwards; and the occipital horn (separate, returned after a
    NaN row). The cross-section grows with sqrt(ventricle_factor) (volume ~ cross-section); the medial walls stay
    beside the septum."""
    s = geo.s
    g = 1.2 * np.sqrt(an.ventricle_factor)  # 1.2: ~18 ml at 20 years (scale 1)
    septum = 1.2 * s
    cc_bottom = geo.cc_top - 6.0 * s
    rows = []
    for y, rx, rz, lift in ((32, 3.2, 4.5, -8), (20, 3.6, 5.0, -2), (5, 3.4, 4.2, 0), (-12, 3.6, 4.2, 0),
                            (-26, 5.0, 5.5, -4)):
        rxg, rzg = rx * s * g, rz * s * g
        yy = y * s
        arch = geo.cc_top - 14.0 * s * ((yy - geo.cc_centre_y) / geo.cc_half_length) ** 2
        top = min(cc_bottom, arch - 6.0 * s) + lift * s * 0.3
        diverge = 0.3 * max(0.0, -y - 4.0) * s  # the bodies and atria part towards the back
        rows.append((side * (septum + rxg + diverge), yy, top - rzg, rxg, 0.6 * (rxg + rzg), rzg))
    atrium = rows[-1]
    for x, y, z, r in ((22, -28, -4, 3.5), (27, -14, -14, 3.0), (29, 2, -20, 2.5), (28, 12, -22, 2.0)):
        rg = r * s * (0.45 + 0.35 * an.ventricle_factor)  # the temporal horn is slit-like when young
        rows.append((side * x * s, y * s, z * s, rg, rg * 1.3, rg * 0.6))
    occipital = [atrium, (side * 16 * s, -40 * s, atrium[2] - 2 * s, 2.6 * s * g, 3 * s * g, 3 * s * g),
                 (side * 14 * s, -50 * s, atrium[2] - 3 * s, 1.5 * s * g, 2 * s * g, 1.8 * s * g)]
    return np.array(rows), np.array(occipital)


def paint_deep_structures(canvas: Canvas, grid: FineGrid, box, coords, geo: Geometry,
                          an: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Paint the lateral and third ventricles (CSF) and the deep GM nuclei.

    Returns (d_vent, d_deep): signed distances (mm, box shape) to all ventricles and to the deep GM, which keep
    the lesions in white matter."""
    s = geo.s
    step = grid.step
    d_vent = np.full(canvas.brain.shape, 99.0, dtype=np.float32)
    for side in (-1.0, 1.0):
        for knots in lateral_ventricle_knots(side, geo, an):
            points, radii = resample_curve(knots, 1.0)
            np.minimum(d_vent, tube_distance(grid, box, points, radii), out=d_vent)
    canvas.paint(box, ramp(d_vent, step), an.csf_intensity, "ventricle")

    shrink = 1.0 - 0.5 * an.atrophy  # deep GM atrophies a little
    w3 = (1.2 + 1.6 * (an.ventricle_factor - 1.0) / 1.75) * s  # third ventricle half-width
    nuclei = (  # (name, centre (x, y, z) with x for the right side, radii) at scale 1
        ("thalamus", (w3 / s + 7.5, -12.0, 2.0), (7.5, 14.0, 8.0)),
        ("putamen", (24.0, 6.0, 0.0), (5.0, 14.0, 9.0)),
        ("pallidum", (18.5, 2.0, -1.0), (3.0, 8.0, 5.0)),
        ("caudate", (12.5, 20.0, 9.0), (5.0, 11.0, 8.0)),
    )
    d_deep = np.full(canvas.brain.shape, 99.0, dtype=np.float32)
    for name, centre, radii in nuclei:
        d = np.minimum(*(ellipsoid_distance(coords, (side * centre[0] * s, centre[1] * s, centre[2] * s),
                                            np.array(radii) * s * shrink) for side in (-1.0, 1.0)))
        if name == "caudate":  # the caudate body runs back along the ventricle's lateral wall
            tail = [tube_distance(grid, box, *resample_curve(np.array(
                [(side * 13.5 * s, 14 * s, 12 * s, 3.5 * s, 4 * s, 4 * s),
                 (side * 15.5 * s, -6 * s, 15 * s, 2.5 * s, 3 * s, 3 * s),
                 (side * 18 * s, -22 * s, 12 * s, 1.5 * s, 2 * s, 2 * s)]), 1.0)) for side in (-1.0, 1.0)]
            d = elementwise(np.minimum, [d, *tail])
        canvas.paint(box, ramp(d, step), DEEP_GM[name], "brain")
        np.minimum(d_deep, d, out=d_deep)
    d3 = ellipsoid_distance(coords, (0.0, -4.0 * s, -2.0 * s), (w3, 16.0 * s, 10.0 * s))
    canvas.paint(box, ramp(d3, step), an.csf_intensity, "ventricle")
    np.minimum(d_vent, d3, out=d_vent)
    return d_vent, d_deep


def paint_cerebellum_and_brainstem(canvas: Canvas, rng: np.random.Generator, grid: FineGrid, box,
                                   geo: Geometry, an: Anatomy) -> np.ndarray:
    """Paint the cerebellum (foliated: fan-shaped fissures around a transverse axis, GM lining, WM core), the
    brainstem with its cisterns, and the fourth ventricle, on the infratentorial part of ``box`` only.

    Returns the distance (mm, ``box`` shape; 99 outside the part) to these structures (keeps the lesions above
    the tentorium)."""
    s = geo.s
    step = grid.step
    c = geo.cerebellum_centre
    radii = geo.cerebellum_radii * geo.shrink
    lo = np.array([-radii[0] - 6.0, c[1] - radii[1] - 6.0, -1e3])
    hi = np.array([radii[0] + 6.0, 5.0 * s, 8.0 * s])
    sub = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(grid.box(lo, hi), box))
    local = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sub, box))
    coords = grid.coords(sub)
    x, y, z = coords
    vermis_notch = np.float32(1.0) - np.float32(0.15) * np.exp(-(x / np.float32(9.0 * s)) ** 2) * (y < c[1])
    rho = np.sqrt(((x - c[0]) / np.float32(radii[0])) ** 2
                  + ((y - c[1]) / (np.float32(radii[1]) * vermis_notch)) ** 2
                  + ((z - c[2]) / (np.float32(radii[2]) * np.where(z > c[2], np.float32(0.85), np.float32(1.0))))
                  ** 2)
    d_env = (rho - np.float32(1.0)) * np.float32(radii.min())
    del rho, vermis_notch
    canvas.paint(sub, ramp(d_env - np.float32(2.2), step), an.csf_intensity)  # tentorium / cisterna magna gap

    # Folia: fissures on planes through a transverse axis in front of the centre, perturbed smoothly.
    axis_y, axis_z = c[1] + 4.0 * s, c[2] + 2.0 * s
    ry, rz = y - np.float32(axis_y), z - np.float32(axis_z)
    r_yz = np.sqrt(ry**2 + rz**2)
    theta = np.arctan2(rz, ry) + plane_waves(rng, coords, 0.15, (15.0, 40.0), 4)
    spacing = np.float32(5.0 * s / 30.0)  # rad: ~5 mm apart 30 mm from the axis
    frac = theta / spacing
    d_sheet = np.abs(frac - np.round(frac)) * spacing * r_yz
    major = (np.round(frac).astype(np.int32) % 4) == 0  # every 4th fissure cuts deeper
    fissure_depth = np.where(major, np.float32(15.0 * s), np.float32(9.0 * s))
    beyond = np.maximum(-d_env - fissure_depth, np.float32(0.0))
    hub = np.maximum(np.float32(8.0 * s) - r_yz, np.float32(0.0))  # the medullary core: no fissures
    d_fissure = np.sqrt(d_sheet**2 + beyond**2 + hub**2) - np.float32(0.3 + 0.5 * an.sulcal_halfwidth_mm)
    d_tissue = np.maximum(d_env, -d_fissure)
    del d_sheet, beyond, hub, d_fissure, frac, theta, major, fissure_depth, ry, rz, r_yz
    canvas.paint(sub, ramp(d_tissue, step), np.float32(CEREBELLAR_GM), "brain")
    canvas.paint(sub, ramp(d_tissue + np.float32(1.7), step), np.float32(CEREBELLAR_WM), "brain")
    del d_tissue

    # Brainstem: midbrain -> pons (bulging forwards) -> medulla -> cord, leaning back as it descends.
    zs = np.array([-4.0, -16.0, -28.0, -40.0, -52.0, -66.0, -82.0])
    widths = (10.5, 11.0, 12.5, 11.0, 8.5, 7.0, 6.5)
    depths = (9.5, 10.0, 12.0, 10.0, 8.0, 6.5, 6.0)
    knots = np.array([(0.0, (-12.0 + 0.3 * zz + (3.5 if -40 < zz < -16 else 0.0)) * s, zz * s, rx * s, ry * s,
                       6.0 * s) for zz, rx, ry in zip(zs, widths, depths)])
    points, bs_radii = resample_curve(knots, 1.0)
    d_bs = tube_distance(grid, sub, points, bs_radii * geo.shrink)
    cistern = ramp(d_bs - np.float32(2.5), step) * np.clip((np.float32(-12.0 * s) - z) / np.float32(4.0), 0.0, 1.0)
    canvas.paint(sub, cistern, an.csf_intensity)
    canvas.paint(sub, ramp(d_bs, step), np.float32(BRAINSTEM), "brain")
    v4 = an.ventricle_factor**0.25
    d4 = ellipsoid_distance(coords, (0.0, c[1] + 17.0 * s, c[2] + 8.0 * s), np.array([4.5, 2.5, 6.0]) * s * v4)
    canvas.paint(sub, ramp(d4, step), an.csf_intensity, "ventricle")
    out = np.full(canvas.brain.shape, 99.0, dtype=np.float32)
    out[local] = elementwise(np.minimum, [d_env, d_bs, d4])
    return out


# =============================================================================================================
# Lesions
# =============================================================================================================


def place_lesions(an: Anatomy, rng: np.random.Generator, grid: FineGrid, box, coords, d_tissue: np.ndarray,
                  thickness: np.ndarray, d_vent: np.ndarray, d_deep: np.ndarray,
                  d_infra: np.ndarray) -> list[tuple[Lesion, tuple[slice, ...], np.ndarray]]:
    """Place the planned lesions in white matter (>= 4 mm inside the GM/WM border, >= 1.5 mm from ventricles and
    deep GM, above the tentorium), >= LESION_GAP_MM apart; periventricular ones centred within 6 mm of a ventricle, deep
    ones >= 8 mm from it. Each is an irregular blob: smooth noise added to an ellipsoid profile, thresholded at
    the value that gives the target volume, restricted to the allowed white matter, opened, one connected piece.

    Returns [(lesion, fine box, fraction float32 on that box)] for the lesions that found room."""
    step = grid.step
    wm_depth = -(d_tissue + thickness)  # mm inside the GM/WM border
    allowed = (wm_depth > 4.0) & (d_vent > 1.5) & (d_deep > 1.5) & (d_infra > 4.0)
    z = coords[2]
    allowed &= np.broadcast_to(z > np.float32(-25.0 * an.scale), allowed.shape)
    placed = []
    taken = np.zeros(allowed.shape, dtype=bool)
    for lesion in an.lesions:
        if lesion.kind == "periventricular":
            centres = allowed & (d_vent < 6.0)
        else:
            centres = allowed & (d_vent > 8.0) & (wm_depth > 6.0)
        centres &= ~taken
        flat = np.flatnonzero(centres)
        free = allowed & ~taken
        blob = None
        for _ in range(6 if flat.size else 0):  # a few centres: a blob may not fit where the WM is narrow
            centre = np.array(np.unravel_index(int(rng.choice(flat)), allowed.shape))
            blob_box, blob = lesion_blob(rng, lesion, centre, free, step)
            if blob is not None:
                break
        if blob is None:
            continue
        mark_surroundings(taken, blob_box, blob, max(1, int(round(LESION_GAP_MM / step))))
        alpha = ndimage.gaussian_filter(blob.astype(np.float32), 0.5)  # soft (partial-volume) edge
        absolute = tuple(slice(b.start + o.start, b.stop + o.start) for b, o in zip(blob_box, box))
        lesion.centre_mm = [float(grid.origin[a] + step * (centre[a] + box[a].start)) for a in range(3)]
        lesion.fine_voxels = int(blob.sum())
        placed.append((lesion, absolute, alpha))
    return placed


def mark_surroundings(taken: np.ndarray, box: tuple[slice, ...], blob: np.ndarray, margin: int) -> None:
    """Set ``taken`` (in place) on ``blob`` (on ``box`` of ``taken``) dilated by ``margin`` voxels, which may reach
    beyond the box."""
    big = tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, taken.shape))
    canvas = np.zeros(tuple(b.stop - b.start for b in big), dtype=bool)
    canvas[tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, big))] = blob
    struct = ndimage.generate_binary_structure(3, 1)
    taken[big] |= ndimage.binary_dilation(canvas, struct, iterations=margin)


def lesion_blob(rng: np.random.Generator, lesion: Lesion, centre: np.ndarray, allowed: np.ndarray,
                step: float) -> tuple[tuple[slice, ...], np.ndarray | None]:
    """(box slices within ``allowed``, boolean blob on that box) of about ``lesion.target_mm3``; (box, None)
    when there is too little room."""
    n_target = max(1, int(round(1.1 * lesion.target_mm3 / step**3)))  # 1.1: the opening and resampling trim it
    r_equiv = (3.0 * lesion.target_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    radii = r_equiv * np.exp(rng.normal(0.0, 0.25, 3)) * 1.25  # mm; noise trims the ellipsoid
    half = np.ceil(radii.max() * 1.6 / step).astype(int) + 2
    box = tuple(slice(max(int(c) - half, 0), min(int(c) + half + 1, n)) for c, n in zip(centre, allowed.shape))
    grids = np.ogrid[box]
    rho2 = sum(((g - c) * step / r) ** 2 for g, c, r in zip(grids, centre, radii))
    size = tuple(s.stop - s.start for s in box)
    noise = ndimage.gaussian_filter(rng.standard_normal(size), max(0.6, 0.35 * r_equiv / step))
    noise /= noise.std() + 1e-12
    profile = 1.0 - rho2 + 0.45 * noise
    room = allowed[box]
    values = np.where(room, profile, -np.inf)
    if np.count_nonzero(room) < n_target * 0.8:
        return box, None
    threshold = np.partition(values.ravel(), -n_target)[-n_target]
    blob = values >= max(threshold, -0.5)
    labels, _ = ndimage.label(blob)
    own = labels[tuple(int(c) - s.start for c, s in zip(centre, box))]
    if own == 0:
        return box, None
    # Open the blob (no one-voxel bridges, which a coarser grid would break into fragments) and keep the piece
    # around the centre.
    blob = ndimage.binary_opening(labels == own, iterations=max(1, int(round(1.0 / step))))
    labels, n = ndimage.label(blob)
    if n == 0:
        return box, None
    blob = labels == (1 + int(np.argmax(ndimage.sum(blob, labels, range(1, n + 1)))))
    if blob.sum() < 0.5 * n_target:
        return box, None
    return box, blob


# =============================================================================================================
# Imaging: resampling onto the native grid, bias, noise, storage
# =============================================================================================================


def pose_matrix(an: Anatomy) -> np.ndarray:
    """4x4 head frame -> world (mm): rotation (degrees about x, y, z) then translation (offset + the pose)."""
    ax, ay, az = np.deg2rad(an.rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    out[:3, 3] = HEAD_OFFSET_MM + np.array(an.translation_mm)
    return out


def native_to_fine(grid: FineGrid, pose: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """4x4 matrix: native voxel index -> fine-grid index (through world and the head frame)."""
    fine_affine = np.diag([grid.step] * 3 + [1.0])
    fine_affine[:3, 3] = grid.origin
    return np.linalg.inv(fine_affine) @ np.linalg.inv(pose) @ affine


def psf_sigma(storage: Storage, grid: FineGrid, pose: np.ndarray) -> np.ndarray:
    """Gaussian PSF sd (fine voxels) per head-frame axis for the native voxel: the variance of a box of the voxel's
    width minus that of the fine voxel's own partial-volume box (the pose rotation is small; ignored)."""
    vox_head = np.abs(pose[:3, :3].T) @ np.array(storage.voxel_mm)  # voxel extent along head axes (approx.)
    var = np.maximum(vox_head**2 - grid.step**2, 0.0) / 12.0
    return np.sqrt(var) / grid.step


def sample_native(volume: np.ndarray, matrix: np.ndarray, shape: Sequence[int], start: Sequence[int] = (0, 0, 0),
                  volume_start: Sequence[int] = (0, 0, 0), mode: str = "nearest") -> np.ndarray:
    """Trilinear samples of a fine-grid ``volume`` (which starts at fine index ``volume_start``) on the native
    voxels ``start + [0, shape)``: float32 of ``shape``."""
    offset = matrix[:3, :3] @ np.asarray(start, dtype=float) + matrix[:3, 3] - np.asarray(volume_start, dtype=float)
    return ndimage.affine_transform(volume, matrix[:3, :3], offset=offset, output_shape=tuple(shape), order=1,
                                    mode=mode, cval=0.0, output=np.float32)


def bias_field(rng: np.random.Generator, affine: np.ndarray, shape: Sequence[int], amplitude: float) -> np.ndarray:
    """Smooth multiplicative bias over the native grid (world-fixed, like a coil's): exp of smooth waves scaled so
    that its extremes over the central head are about +-``amplitude``. float32 of ``shape``."""
    idx = [np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) for i, n in
           enumerate(shape)]
    world = [sum(np.float32(affine[r, c]) * idx[c] for c in range(3)) + np.float32(affine[r, 3]) for r in range(3)]
    log_bias = plane_waves(rng, world, 1.0, (250.0, 500.0), 3)
    log_bias = log_bias + np.float32(rng.normal()) * world[2] / np.float32(150.0)  # a coil gradient along z
    centre = tuple(slice(n // 4, n - n // 4) for n in shape)
    spread = float(np.abs(log_bias[centre] - np.median(log_bias[centre])).max()) + 1e-6
    return np.exp(np.float32(np.log1p(amplitude) / spread) * (log_bias - np.float32(np.median(log_bias[centre]))))


def rician(rng: np.random.Generator, signal: np.ndarray, sd: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (sd ``sd`` per channel): Rician, >= 0 everywhere."""
    real = signal + np.float32(sd) * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = np.float32(sd) * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def make_native_image(canvas: Canvas, lesions: list, an: Anatomy, storage: Storage,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored image and mask on the native grid (on-disk axis order).

    Returns (image float32 in scanner units, mask uint8 0/1, affine 4x4); fills each lesion's voxel counts."""
    grid = canvas.grid
    affine = native_affine(storage)
    pose = pose_matrix(an)
    matrix = native_to_fine(grid, pose, affine)
    sigma = psf_sigma(storage, grid, pose)
    blurred = ndimage.gaussian_filter(canvas.image, sigma, mode="nearest", truncate=3.0)
    image = sample_native(blurred, matrix, storage.shape)
    del blurred
    image *= bias_field(rng, affine, storage.shape, storage.bias_amplitude)
    image = rician(rng, image, storage.noise_sd) * np.float32(storage.scanner_scale)

    mask = np.zeros(storage.shape, dtype=np.uint8)
    inverse = np.linalg.inv(matrix)
    ref_voxel_mm3 = REFERENCE_VOXEL_MM**3 * (grid.step / (REFERENCE_VOXEL_MM / 2.0)) ** 3
    for lesion, box, alpha in lesions:
        soft = ndimage.gaussian_filter(alpha, sigma, mode="constant", truncate=3.0)
        corners = np.array([[s.start - 1 if k == 0 else s.stop for s, k in zip(box, ks)] + [1.0]
                            for ks in np.ndindex(2, 2, 2)]).T
        native = (inverse @ corners)[:3]
        lo = np.maximum(np.floor(native.min(axis=1)).astype(int), 0)
        hi = np.minimum(np.ceil(native.max(axis=1)).astype(int) + 1, storage.shape)
        if np.any(hi <= lo):
            continue
        frac = sample_native(soft, matrix, hi - lo, lo, [s.start for s in box], mode="constant")
        inside = largest_component(frac >= 0.5)  # one piece per lesion: no stray partial-volume voxels
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        lesion.voxels = int(np.count_nonzero(inside & (mask[region] == 0)))
        lesion.reference_voxels = float(lesion.voxels * np.prod(storage.voxel_mm) / ref_voxel_mm3)
        mask[region] |= inside.astype(np.uint8)
    return image, mask, affine


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean array (the array itself when it is empty)."""
    labels, n = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    if n <= 1:
        return mask
    return labels == (1 + int(np.argmax(np.bincount(labels.ravel())[1:])))


def save_image(image: np.ndarray, affine: np.ndarray, path: Path, dtype: str) -> None:
    """Write the image as ``dtype``: uint8 rescaled to 0-255; int16 / uint16 rounded; "int16_scaled" as int16
    with scl_slope / scl_inter chosen by nibabel; float32 / float64 as they are."""
    if dtype == "int16_scaled":
        img = nib.Nifti1Image(image.astype(np.float32), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.set_data_dtype(np.int16)  # nibabel scales the floats into int16 and writes slope / intercept
        img.header.set_xyzt_units("mm", "sec")
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        return
    if dtype == "uint8":
        data = np.clip(np.round(image * np.float32(255.0 / float(image.max()))), 0, 255).astype(np.uint8)
    elif dtype in ("int16", "uint16"):
        info = np.iinfo(dtype)
        data = np.clip(np.round(image), info.min, info.max).astype(dtype)
    else:
        data = image.astype(dtype)
    save_nifti(data, affine, path)


# =============================================================================================================
# One subject, the dataset, the CLI
# =============================================================================================================


@dataclass
class Options:
    out_dir: str
    num_subjects: int
    seed: int
    variant: str
    num_val: int
    split: str
    reference_shape: tuple
    age_noise: float = 1.0

    @property
    def mm_per_ref_mm(self) -> float:
        """Voxel sizes scale with the reference grid's voxel (1 at 96x112x96 = 2 mm)."""
        ref_vox = FOV_MM / np.array(self.reference_shape, dtype=float)
        return float(np.exp(np.mean(np.log(ref_vox)))) / REFERENCE_VOXEL_MM


def generate_subject(args: tuple[Options, int]) -> dict:
    """Generate and write subject ``index``; returns its record for dataset.json and the manifest."""
    opts, index = args
    t0 = time.perf_counter()
    rng, sex, age = subject_labels(opts.seed, index)
    an = draw_anatomy(rng, sex, age, opts.variant, opts.age_noise)
    storage = draw_storage(opts.seed, index, opts.mm_per_ref_mm)
    grid = FineGrid(REFERENCE_VOXEL_MM / 2.0 * opts.mm_per_ref_mm)
    canvas, lesions, volumes = render_subject(an, rng, grid)
    image, mask, affine = make_native_image(canvas, lesions, an, storage, rng)
    del canvas
    sid = f"sub-{index:04d}"
    out = Path(opts.out_dir)
    image_rel, mask_rel = f"images/{sid}_T1w.nii.gz", f"masks/{sid}_lesions.nii.gz"
    save_image(image, affine, out / image_rel, storage.dtype)
    save_nifti(mask.astype(storage.mask_dtype), affine, out / mask_rel)
    placed = [lesion for lesion, _, _ in lesions]
    record = {
        "subject_id": sid, "image": image_rel, "mask": mask_rel, "sex": sex, "age": age,
        "anatomy": {k: v for k, v in asdict(an).items() if k != "lesions"},
        "storage": asdict(storage),
        "lesion_count": int(sum(1 for lesion in placed if lesion.voxels > 0)),
        "lesion_voxels": int(mask.sum(dtype=np.int64)),
        "lesions": [asdict(lesion) for lesion in placed],
        "lesions_not_placed": len(an.lesions) - len(placed),
        "volumes": volumes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return record


def assign_splits(records: list[dict], num_val: int, seed: int, mode: str) -> list[str]:
    """"train" / "val" per record: the last ``num_val`` (mode "last"), or a seeded selection stratified by sex and
    age quartile (mode "stratified": each stratum gives val its share, by largest remainder)."""
    n = len(records)
    num_val = max(0, min(num_val, n))
    if mode == "last":
        return ["train"] * (n - num_val) + ["val"] * num_val
    edges = np.linspace(*AGE_RANGE, 5)[1:-1]
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        strata.setdefault((r["sex"], int(np.searchsorted(edges, r["age"]))), []).append(i)
    keys = sorted(strata)
    quota = np.array([len(strata[k]) * num_val / n for k in keys])
    counts = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - counts), kind="stable")[: num_val - counts.sum()]:
        counts[j] += 1
    rng = np.random.default_rng([seed, 1_000_003])
    splits = ["train"] * n
    for k, c in zip(keys, counts):
        for i in rng.choice(strata[k], size=int(c), replace=False):
            splits[int(i)] = "val"
    return splits


def write_outputs(opts: Options, records: list[dict], seconds: float) -> None:
    """manifest.csv and dataset.json (the manifest last: it marks a finished dataset)."""
    out = Path(opts.out_dir)
    splits = assign_splits(records, opts.num_val, opts.seed, opts.split)
    for r, split in zip(records, splits):
        r["split"] = split
    meta = {
        "generator": "scripts/make_dev_dataset.py",
        "generator_version": GENERATOR_VERSION,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k != "out_dir"},
        "reference_grid": {"shape": list(opts.reference_shape), "fov_mm": FOV_MM.tolist(),
                           "voxel_mm": (FOV_MM / np.array(opts.reference_shape)).tolist()},
        "fine_grid_mm": REFERENCE_VOXEL_MM / 2.0 * opts.mm_per_ref_mm,
        "intensities_x_wm": {"wm": WM, "gm_at_20": GM_YOUNG, "gm_per_year": GM_PER_YEAR, "csf": CSF, **DEEP_GM},
        "generation_seconds": round(seconds, 1),
        "subjects": records,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject_id", "image", "mask", "sex", "age", "split"])
        for r in records:
            writer.writerow([r["subject_id"], r["image"], r["mask"], r["sex"], f"{r['age']:.1f}", r["split"]])


def parse_args(argv: Sequence[str] | None) -> tuple[Options, int]:
    """(options, number of worker processes) from the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="output folder (created; must be empty or absent unless --overwrite)")
    p.add_argument("--num-subjects", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=("size", "overlap"), default="size",
                   help="size: males 10%% larger; overlap: 2%% larger plus 4%% brighter GM (default: size)")
    p.add_argument("--num-val", type=int, default=50, help="subjects with split=val (default 50)")
    p.add_argument("--split", choices=("stratified", "last"), default="stratified",
                   help="val = a seeded selection stratified by sex and age quartile, or the last --num-val")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--reference-shape", type=int, nargs=3, default=list(REFERENCE_SHAPE), metavar=("X", "Y", "Z"),
                   help="reference grid over the 192x224x192 mm FOV (default 96 112 96 = 2 mm); every voxel size "
                        "scales with it, so a small shape makes a tiny, fast dataset (for tests)")
    p.add_argument("--age-noise", type=float, default=1.0,
                   help="scale of every age effect's individual noise (default 1; 0.3: age readable to ~1 year)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    a = p.parse_args(argv)
    if a.num_subjects < 1 or min(a.reference_shape) < 8 or a.workers < 1 or a.num_val < 0 or a.age_noise < 0:
        p.error("need --num-subjects >= 1, --workers >= 1, --num-val >= 0, --age-noise >= 0 and "
                "--reference-shape sides >= 8")
    out = Path(a.out_dir)
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        p.error(f"{out} is not empty (use --overwrite)")
    return Options(str(out), a.num_subjects, a.seed, a.variant, a.num_val, a.split,
                   tuple(a.reference_shape), a.age_noise), a.workers


def main(argv: Sequence[str] | None = None) -> int:
    opts, workers = parse_args(argv)
    out = Path(opts.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(opts, i) for i in range(opts.num_subjects)]
    records = []

    def progress(done: int) -> None:
        if done % 20 == 0 or done == opts.num_subjects:
            print(f"[make_dev_dataset] {done}/{opts.num_subjects} subjects, {time.perf_counter() - t0:.0f} s",
                  flush=True)

    if workers == 1:
        for job in jobs:
            records.append(generate_subject(job))
            progress(len(records))
    else:
        # fork shares the imported modules; each task is independent (own RNG), so the order of completion
        # does not matter and imap keeps the subjects in order.
        ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        with ctx.Pool(workers, maxtasksperchild=25) as pool:
            for record in pool.imap(generate_subject, jobs, chunksize=1):
                records.append(record)
                progress(len(records))
    write_outputs(opts, records, time.perf_counter() - t0)
    print(f"[make_dev_dataset] wrote {out / 'manifest.csv'} ({opts.num_subjects} subjects, "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
