"""Built-in brain-like phantoms: the default data source, so brain3d runs with no data.

Each subject is a T1-ish head in a RAS grid (axis 0: left->right, axis 1: posterior->
anterior, axis 2: inferior->superior): scalp, dark skull, CSF, a grey-matter ribbon with
sulci, white matter, two lateral ventricles and optional bright white-matter lesions,
deformed smoothly per subject, with a bias field and Gaussian noise.  The labels drive
the anatomy, so all three tasks are learnable:

* sex (0 = F, 1 = M): males have ~9 % larger head/brain radii (individual sd ~4 %, so the
  classes overlap a little) and a slightly longer, narrower head.
* age (years, 20-80): ventricles grow (x1.0 at 20 -> x1.8 at 80), the cortical ribbon
  thins, sulci widen and the brain shrinks a little inside a fixed skull.
* lesions: 0-6 bright blobs inside white matter only -> the binary segmentation target.

``num_classes=3`` writes the tissue label map instead of the lesion mask, for a multi-class segmentation
(``task.num_classes=3``): 1 CSF (sulci, fissure and ventricles), 2 grey matter, 3 white matter (lesions
included); ``num_classes=4`` keeps the lesions apart as label 4. The images are the same.

``channels=2`` adds a FLAIR-like scan of the same head on the same grid (its own bias field and noise): CSF
dark, grey matter brighter than white matter, lesions very bright; the T1-like scan then shows the lesions
only faintly (slightly darker than white matter, as T1 shows white-matter lesions), so the second channel
carries the information a lesion model needs.

Runtime dependencies: numpy (+ nibabel via :mod:`brain3d.data.nifti` for writing).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from brain3d.data.nifti import save_nifti

__all__ = [
    "GENERATOR_VERSION",
    "make_phantom",
    "make_synthetic_dataset",
    "synthetic_cache_dir",
    "tissue_label_map",
]

# Bump when the phantom changes: it is part of the cache folder name.
GENERATOR_VERSION = 1
FOV_MM = 192.0  # default field of view per axis (mm): voxel size = FOV / shape

# Tissue labels of the internal label map, and their mean T1-ish intensities.
BG, SCALP, SKULL, CSF, GM, WM, LESION = range(7)
_INTENSITY = np.array([0.0, 0.30, 0.05, 0.15, 0.55, 0.80, 1.20], dtype=np.float32)
# channels=2: the T1-like scan with faint (slightly hypointense) lesions, and the FLAIR-like scan.
_INTENSITY_T1_FAINT_LESIONS = np.array([0.0, 0.30, 0.05, 0.15, 0.55, 0.80, 0.74], dtype=np.float32)
_INTENSITY_FLAIR = np.array([0.0, 0.45, 0.05, 0.06, 0.65, 0.50, 1.30], dtype=np.float32)
CHANNEL_NAMES = {1: ("T1w",), 2: ("T1w", "FLAIR")}  # file suffixes; the manifest columns: image, flair
# num_classes >= 3: the tissue label map's labels (1..K) and their names, in label order.
TISSUE_LABELS = {3: ((CSF,), (GM,), (WM, LESION)), 4: ((CSF,), (GM,), (WM,), (LESION,))}
TISSUE_NAMES = {3: ("csf", "gm", "wm"), 4: ("csf", "gm", "wm", "lesion")}

_HEAD_RADII_MM = np.array([62.0, 74.0, 66.0])  # female head ellipsoid radii (x, y, z)
_VENTRICLE_RADII_MM = np.array([5.0, 17.0, 8.0])  # one lateral ventricle at 20 y (thin L-R, long P-A)


def _voxel_size(shape: tuple[int, int, int], voxel_size_mm) -> tuple[float, float, float]:
    """Per-axis voxel size (mm); default: a ~192 mm field of view on every axis."""
    if voxel_size_mm is None:
        return tuple(FOV_MM / n for n in shape)  # type: ignore[return-value]
    vox = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    if (vox <= 0).any():
        raise ValueError(f"voxel_size_mm must be positive, got {voxel_size_mm}")
    return tuple(float(v) for v in vox)  # type: ignore[return-value]


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 ints >= 8, got {shape}")
    return shape  # type: ignore[return-value]


def _affine(shape: tuple[int, int, int], vox: tuple[float, float, float]) -> np.ndarray:
    """RAS affine: diagonal voxel sizes, world origin (0, 0, 0) at the volume centre."""
    aff = np.diag([*vox, 1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * v for n, v in zip(shape, vox)]
    return aff


def _smooth_field(rng: np.random.Generator, X, Y, Z, amp: float, n_waves: int = 2) -> np.ndarray:
    """Sum of ``n_waves`` random low-frequency plane waves (wavelength 120-240 mm), sd ~amp."""
    out = np.zeros(X.shape, dtype=np.float32)
    for _ in range(n_waves):
        k = 2 * np.pi / rng.uniform(120.0, 240.0, 3) * rng.choice([-1.0, 1.0], 3)
        a = rng.normal(0.0, amp)
        out += np.float32(a) * np.sin(np.float32(k[0]) * X + np.float32(k[1]) * Y + np.float32(k[2]) * Z
                                      + np.float32(rng.uniform(0, 2 * np.pi)))
    return out


def _world_grid(shape: tuple[int, int, int], vox: tuple[float, float, float]) -> list[np.ndarray]:
    """World coordinates (mm) of every voxel centre, origin at the volume centre: 3 x (D, H, W) float32."""
    axes = [(np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2)) * np.float32(v) for n, v in zip(shape, vox)]
    return np.meshgrid(*axes, indexing="ij")


def _head_coordinates(rng: np.random.Generator, X, Y, Z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-subject pose and smooth deformation: head coordinates (Xh, Yh, Zh) in mm, each (D, H, W).

    Draws (in this order): shift, yaw/pitch, then three displacement fields (x, y, z)."""
    shift = rng.normal(0.0, 3.0, 3)  # head not exactly centred
    yaw, pitch = rng.normal(0.0, np.deg2rad(4.0), 2)  # small rotations about z and x
    X0, Y0, Z0 = X - np.float32(shift[0]), Y - np.float32(shift[1]), Z - np.float32(shift[2])
    cy, sy, cp, sp = (np.float32(f) for f in (np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)))
    Xr = cy * X0 + sy * Y0
    Yr = -sy * X0 + cy * Y0
    Yh = cp * Yr + sp * Z0
    Zh = -sp * Yr + cp * Z0
    del X0, Y0, Z0, Yr
    # Low-frequency displacement (~3 mm) so no two subjects share a shape.  The fields are evaluated at
    # (Xr, Yh, Zh) as they stand: the z field sees the already displaced Yh.
    Xh = Xr + _smooth_field(rng, Xr, Yh, Zh, 3.0)
    Yh = Yh + _smooth_field(rng, Xr, Yh, Zh, 3.0)
    Zh = Zh + _smooth_field(rng, Xr, Yh, Zh, 3.0)
    return Xh, Yh, Zh


def _head_size(rng: np.random.Generator, sex: int) -> tuple[float, np.ndarray]:
    """(global scale of all radii, head ellipsoid radii (x, y, z) in mm): sex effect + individual variation."""
    size = (1.09 if sex == 1 else 1.0) * rng.normal(1.0, 0.04)
    aspect = rng.normal(1.0, 0.02, 3) * (np.array([0.98, 1.02, 1.0]) if sex == 1 else 1.0)
    return size, _HEAD_RADII_MM * size * aspect


def _ellipsoid_radius(Xh, Yh, Zh, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of every voxel: (D, H, W) float32."""
    return np.sqrt((Xh / np.float32(radii[0])) ** 2 + (Yh / np.float32(radii[1])) ** 2
                   + (Zh / np.float32(radii[2])) ** 2)


def _head_labels(shape: tuple[int, int, int], Xh, Yh, Zh, head_r: np.ndarray) -> np.ndarray:
    """(D, H, W) uint8 label map of the head shells: scalp, skull, and CSF filling the intracranial space."""
    labels = np.zeros(shape, dtype=np.uint8)
    rho_head = _ellipsoid_radius(Xh, Yh, Zh, head_r)
    labels[rho_head < 1.0] = SCALP
    labels[rho_head < 0.93] = SKULL
    labels[rho_head < 0.86] = CSF  # intracranial space; the brain is painted over it
    return labels


def _paint_brain(rng: np.random.Generator, labels: np.ndarray, Xh, Yh, Zh, head_r: np.ndarray, size: float,
                 af: float) -> tuple[np.ndarray, float]:
    """Paint GM, WM, sulci and the interhemispheric fissure into ``labels`` (in place).

    The brain shrinks with age inside the fixed skull (the gap fills with CSF).  Returns (rho, wm_edge): the
    normalised brain radius (D, H, W) and the GM/WM border in it, which place the lesions."""
    brain_r = head_r * 0.84 * (1.0 - 0.05 * af)
    rho = _ellipsoid_radius(Xh, Yh, Zh, brain_r)
    gm_mm = 7.0 * (1.0 - 0.3 * af) * size  # cortical ribbon thickness, thins with age
    wm_edge = 1.0 - gm_mm / brain_r.mean()  # GM/WM border in normalised radius
    # Gyral pattern: zero set of a sum of cosines (wavelength ~30 mm) = sulcal sheets.
    k = np.float32(2 * np.pi / rng.uniform(26.0, 34.0))
    ph = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    fold = np.cos(k * Xh + ph[0]) + np.cos(k * Yh + ph[1]) + np.cos(k * Zh + ph[2])  # in [-3, 3]
    brain = rho < 1.0
    labels[brain] = GM
    # WM reaches into gyri (|fold| large) and recedes under sulci (fold ~ 0).
    labels[rho < wm_edge + 0.04 * (np.abs(fold) / 3.0 - 0.3)] = WM
    # Sulci (CSF) cut through the ribbon; they widen with age.
    sulcus_w = 0.25 + 0.35 * af
    labels[brain & (rho > wm_edge) & (np.abs(fold) < sulcus_w)] = CSF
    # Interhemispheric fissure in the upper outer brain, widening with age.
    labels[brain & (np.abs(Xh) < 1.8 + 1.2 * af) & (rho > 0.6) & (Zh > -0.2 * brain_r[2])] = CSF
    return rho, wm_edge


def _paint_ventricles(rng: np.random.Generator, labels: np.ndarray, Xh, Yh, Zh, size: float, af: float) -> None:
    """Paint the two lateral ventricles (slightly curved ellipsoids that grow with age) as CSF, in place."""
    vent_r = _VENTRICLE_RADII_MM * size * (1.0 + 0.8 * af) * rng.normal(1.0, 0.08)
    zc = 8.0 * size - 0.006 * Yh**2  # centre line bends down towards the horns
    for side in (-1.0, 1.0):
        xc = side * (vent_r[0] + 1.5)  # beside the midline (septum between them)
        inside = (((Xh - xc) / vent_r[0]) ** 2 + ((Yh - 2.0 * size) / vent_r[1]) ** 2
                  + ((Zh - zc) / vent_r[2]) ** 2) < 1.0
        labels[inside] = CSF


def _paint_lesions(rng: np.random.Generator, labels: np.ndarray, rho: np.ndarray, wm_edge: float) -> np.ndarray:
    """Paint 0-6 bright ellipsoids, placed in and clipped to white matter, into ``labels`` (in place).

    Returns the lesion mask: (D, H, W) uint8, 1 = lesion."""
    shape = labels.shape
    wm = labels == WM
    n_lesions = 0 if rng.random() < 0.1 else int(rng.integers(1, 7))
    centres = np.flatnonzero(wm & (rho < wm_edge - 0.08))  # deep WM, away from the cortex
    scale = min(shape) / 64.0  # radius 2-5 voxels at 64^3, proportionally larger on finer grids
    for _ in range(n_lesions if centres.size else 0):
        c = np.unravel_index(rng.choice(centres), shape)
        r_vox = rng.uniform(2.0, 5.0) * scale * rng.uniform(0.7, 1.3, 3)  # per-axis radii (voxels)
        box, blob = _voxel_ellipsoid(c, r_vox, shape)
        labels[box][blob & wm[box]] = LESION  # WM only: never in CSF, GM or ventricles
    return (labels == LESION).astype(np.uint8)


def _voxel_ellipsoid(c, r_vox: np.ndarray, shape) -> tuple[tuple[slice, ...], np.ndarray]:
    """(bounding box slices, boolean ellipsoid on that box) of the ellipsoid centred on voxel ``c`` with per-axis
    radii ``r_vox`` (voxels), the box clipped to the grid: computed on the box only (cheap)."""
    lo = [max(int(ci - np.ceil(r)), 0) for ci, r in zip(c, r_vox)]
    hi = [min(int(ci + np.ceil(r)) + 1, n) for ci, r, n in zip(c, r_vox, shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    gi, gj, gk = np.ogrid[box]
    blob = ((gi - c[0]) / r_vox[0]) ** 2 + ((gj - c[1]) / r_vox[1]) ** 2 + ((gk - c[2]) / r_vox[2]) ** 2 <= 1.0
    return box, blob


def _intensity_image(rng: np.random.Generator, labels: np.ndarray, X, Y, Z,
                     intensity: np.ndarray = _INTENSITY) -> np.ndarray:
    """T1-ish image (D, H, W) float32 of a label map: tissue means (``intensity``, +-3 % per subject) x bias
    field + noise, head only (background exactly 0, head voxels >= 0.01)."""
    lut = intensity * rng.normal(1.0, 0.03, intensity.size).astype(np.float32)
    image = lut[labels]  # (D, H, W) float32
    bias = np.exp(_smooth_field(rng, X, Y, Z, 0.06, n_waves=3))  # smooth multiplicative, ~+-10 %
    head = labels > BG
    noise_sd = np.float32(rng.uniform(0.03, 0.05))
    noise = rng.standard_normal(labels.shape, dtype=np.float32) * noise_sd
    image = np.where(head, np.maximum(image * bias + noise, np.float32(0.01)), np.float32(0.0))
    return image.astype(np.float32, copy=False)


def make_phantom(
    shape: Sequence[int],
    sex: int,
    age: float,
    rng: np.random.Generator,
    voxel_size_mm: float | Sequence[float] | None = None,
    channels: int = 1,
    num_classes: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one brain-like T1-ish phantom and its lesion mask (or tissue label map).

    Args:
        shape: grid (D, H, W) = RAS axes (x: L->R, y: P->A, z: I->S); each >= 8.
        sex: 0 (female) or 1 (male).
        age: years; the generator is calibrated for 20-80 (clipped to 20-110).
        rng: the subject's random generator (all randomness comes from it).
        voxel_size_mm: scalar or per-axis voxel size; default 192 mm / shape per axis.
            The anatomy is defined in mm, so with the default the head fills the same
            fraction of any grid.
        channels: 1 (the T1-ish image) or 2: (T1-ish with faint lesions ~0.74, FLAIR-ish: scalp 0.45,
            skull 0.05, CSF 0.06, GM 0.65, WM 0.5, lesion 1.3), drawn from ``rng`` after the T1 image, so
            the anatomy and the T1 draws are those of ``channels=1``.
        num_classes: 1 (the lesion mask), 3 or 4: the tissue label map instead (:data:`TISSUE_LABELS`: CSF 1,
            GM 2, WM 3 with the lesions, or lesions 4); no extra draws, so the image is that of ``num_classes=1``.

    Returns:
        (image, mask): image float32 (D, H, W) (``channels=2``: (2, D, H, W)), background exactly 0,
        tissues ~ scalp 0.3, skull 0.05, CSF 0.15, GM 0.55, WM 0.8, lesion 1.2 (times a bias field, plus
        noise; head voxels kept >= 0.01 so "nonzero" == head); mask uint8 (D, H, W), 1 = lesion.

    Raises:
        ValueError: bad shape, sex, voxel size or channels.
    """
    if channels not in CHANNEL_NAMES:
        raise ValueError(f"channels must be 1 or 2, got {channels!r}")
    shape = _check_shape(shape)
    if sex not in (0, 1):
        raise ValueError(f"sex must be 0 or 1, got {sex!r}")
    vox = _voxel_size(shape, voxel_size_mm)
    af = float(np.clip((age - 20.0) / 60.0, 0.0, 1.5))  # "age fraction": 0 at 20 y, 1 at 80 y

    # The steps draw from ``rng`` in this fixed order (the cache and the tests depend on it): pose and
    # deformation, head size, gyral pattern, ventricle size, lesions, intensities.
    X, Y, Z = _world_grid(shape, vox)  # 3 x (D, H, W), mm
    Xh, Yh, Zh = _head_coordinates(rng, X, Y, Z)  # 3 x (D, H, W), mm, in the subject's head frame
    size, head_r = _head_size(rng, sex)
    labels = _head_labels(shape, Xh, Yh, Zh, head_r)  # (D, H, W) tissue label map, painted in place below
    rho, wm_edge = _paint_brain(rng, labels, Xh, Yh, Zh, head_r, size, af)
    _paint_ventricles(rng, labels, Xh, Yh, Zh, size, af)
    del Xh, Yh, Zh
    mask = _paint_lesions(rng, labels, rho, wm_edge)
    del rho
    if num_classes != 1:
        mask = tissue_label_map(labels, num_classes)
    if channels == 1:
        return _intensity_image(rng, labels, X, Y, Z), mask
    t1 = _intensity_image(rng, labels, X, Y, Z, _INTENSITY_T1_FAINT_LESIONS)
    return np.stack([t1, _intensity_image(rng, labels, X, Y, Z, _INTENSITY_FLAIR)]), mask


def _check_num_classes(num_classes: int) -> None:
    if num_classes != 1 and num_classes not in TISSUE_LABELS:
        raise ValueError(f"the synthetic phantoms have label maps for num_classes 3 (csf, gm, wm) or 4 (csf, gm, wm, "
                         f"lesion), or lesion masks (1); got num_classes={num_classes!r}")


def tissue_label_map(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The phantom's internal tissue labels as a label map of ``num_classes`` labels (:data:`TISSUE_LABELS`):
    (D, H, W) uint8, 0 everywhere else (background, scalp, skull)."""
    _check_num_classes(num_classes)
    out = np.zeros(labels.shape, dtype=np.uint8)
    for value, tissues in enumerate(TISSUE_LABELS[num_classes], start=1):
        out[np.isin(labels, tissues)] = value
    return out


def synthetic_cache_dir(root: str | os.PathLike, num_subjects: int, shape: Sequence[int], seed: int,
                        channels: int = 1, num_classes: int = 1) -> Path:
    """Cache folder of one synthetic dataset: ``root/n{num}_s{D}x{H}x{W}_seed{seed}_v{VERSION}`` (``_c2``
    appended for ``channels=2``).

    Args:
        root: parent folder of all synthetic caches.
        num_subjects, shape, seed, channels: the generator parameters.

    Returns:
        The folder path (not created).
    """
    d, h, w = (int(s) for s in shape)
    tail = "" if int(channels) == 1 else f"_c{int(channels)}"
    tail += "" if int(num_classes) == 1 else f"_labels{int(num_classes)}"  # tissue label maps instead of lesions
    return Path(root) / f"n{int(num_subjects)}_s{d}x{h}x{w}_seed{int(seed)}_v{GENERATOR_VERSION}{tail}"


def _check_dataset_args(out_dir: Path, num_subjects: int, shape: Sequence[int],
                        voxel_size_mm) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape, voxel size) checked; raises ValueError on bad parameters and FileExistsError when ``out_dir``
    holds something other than a dataset (the caller has already returned for an existing manifest)."""
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    shape = _check_shape(shape)
    vox = _voxel_size(shape, voxel_size_mm)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and has no manifest.csv; refusing to overwrite")
    return shape, vox


def _subject_labels(seed: int, i: int) -> tuple[np.random.Generator, int, float]:
    """(subject i's generator, sex, age): the generator has drawn the age and goes on to make the phantom."""
    rng = np.random.default_rng([seed, i])
    # Balanced sex: one F and one M per pair, the order drawn from the pair's own rng.
    flip = int(np.random.default_rng([seed, i // 2, 1]).integers(2))
    sex = (i % 2) ^ flip
    age = round(float(rng.uniform(20.0, 80.0)), 1)  # the label is exactly the truth used
    return rng, sex, age


def _write_subjects(folder: Path, num_subjects: int, shape: tuple[int, int, int], seed: int,
                    vox: tuple[float, float, float], channels: int = 1, num_classes: int = 1) -> list[tuple]:
    """Write every subject's image(s) and mask under ``folder``; returns the manifest rows
    (subject_id, image, [flair,] mask, sex, age) with paths relative to ``folder``."""
    affine = _affine(shape, vox)
    rows = []
    for i in range(num_subjects):
        rng, sex, age = _subject_labels(seed, i)
        image, mask = make_phantom(shape, sex, age, rng, vox, channels=channels, num_classes=num_classes)
        sid = f"sub-{i:04d}"
        scans = [image] if channels == 1 else list(image)
        scan_rels = [f"images/{sid}_{name}.nii.gz" for name in CHANNEL_NAMES[channels]]
        mask_rel = f"masks/{sid}_{'lesion' if num_classes == 1 else 'tissue'}.nii.gz"
        for scan, rel in zip(scans, scan_rels):
            save_nifti(scan, affine, folder / rel, dtype=np.float32)
        save_nifti(mask, affine, folder / mask_rel, dtype=np.uint8)
        rows.append((sid, *scan_rels, mask_rel, sex, f"{age:.1f}"))
    return rows


def _write_dataset_json(path: Path, num_subjects: int, shape: tuple[int, int, int], seed: int,
                        vox: tuple[float, float, float], channels: int = 1, num_classes: int = 1) -> None:
    """The generator parameters, beside the manifest."""
    with open(path, "w") as f:
        json.dump(
            {
                "num_subjects": int(num_subjects),
                "shape": list(shape),
                "seed": int(seed),
                "voxel_size_mm": list(vox),
                "GENERATOR_VERSION": GENERATOR_VERSION,
                **({"channels": int(channels)} if channels != 1 else {}),
                **({"num_classes": int(num_classes), "label_names": list(TISSUE_NAMES[num_classes])}
                   if num_classes != 1 else {}),
            },
            f,
            indent=2,
        )


def _write_manifest_csv(path: Path, rows: list[tuple], channels: int = 1) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject_id", "image", *(["flair"] if channels == 2 else []), "mask", "sex", "age"])
        writer.writerows(rows)


def _move_into_place(tmp: Path, out_dir: Path, manifest: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir`` (atomic; works onto an absent or empty folder); losing the
    race to a concurrent builder that finished first is fine."""
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not manifest.is_file():  # not a concurrent builder finishing first
            raise


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_subjects: int = 64,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    voxel_size_mm: float | Sequence[float] | None = None,
    channels: int = 1,
    num_classes: int = 1,
) -> Path:
    """Write a synthetic phantom dataset (a cache: reused if ``out_dir/manifest.csv`` exists).

    Layout: ``images/sub-XXXX_T1w.nii.gz`` (float32), ``masks/sub-XXXX_lesion.nii.gz``
    (uint8), ``manifest.csv`` (``subject_id,image,mask,sex,age``; paths relative to the
    manifest's folder; sex 0/1; age rounded to 0.1 y) and ``dataset.json`` (parameters).
    It is built in a temporary sibling folder and renamed into place, so a half-written
    dataset is never visible.  Deterministic: subject i uses
    ``np.random.default_rng([seed, i])`` (so subject i does not depend on num_subjects);
    sex is balanced within each pair of subjects (order shuffled per pair), age ~ U(20, 80).
    ``channels=2`` adds ``images/sub-XXXX_FLAIR.nii.gz`` (FLAIR-like, same grid) and a ``flair`` column after
    ``image`` (read both with ``data.image_col=[image,flair]``; :func:`make_phantom` says how the scans differ).

    Args:
        out_dir: the dataset folder (must be absent, empty or an existing dataset).
        num_subjects: number of subjects (>= 1).
        shape: grid (D, H, W).
        seed: dataset seed.
        voxel_size_mm: scalar or per-axis; default 192 mm / shape (a ~192 mm field of view).
        channels: 1 (T1-like) or 2 (T1-like and FLAIR-like).
        num_classes: 1 (lesion masks) or 3 / 4: ``masks/sub-XXXX_tissue.nii.gz`` tissue label maps in the ``mask``
            column instead (:func:`make_phantom`; label names in dataset.json).

    Returns:
        Path of ``out_dir/manifest.csv``.

    Raises:
        ValueError: bad parameters.
        FileExistsError: ``out_dir`` exists, is not empty and holds no manifest.csv.
    """
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    if manifest.is_file():
        return manifest  # cached
    shape, vox = _check_dataset_args(out_dir, num_subjects, shape, voxel_size_mm)
    if channels not in CHANNEL_NAMES:
        raise ValueError(f"channels must be 1 or 2, got {channels!r}")
    _check_num_classes(num_classes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        rows = _write_subjects(tmp, num_subjects, shape, seed, vox, channels, num_classes)
        _write_dataset_json(tmp / "dataset.json", num_subjects, shape, seed, vox, channels, num_classes)
        _write_manifest_csv(tmp / "manifest.csv", rows, channels)  # written last: marks completion
        _move_into_place(tmp, out_dir, manifest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
