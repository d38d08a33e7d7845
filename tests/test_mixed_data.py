"""Real-world files: mixed orientations, voxel sizes, dtypes and extensions train end to end; patch
training validates whole volumes larger than the patch by sliding windows."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from brain3d.data.synthetic import make_synthetic_dataset

from tests.conftest import read_summary, run_train, tiny_overrides

ORIENTATIONS = ["RAS", "LAS", "LPS"]
ZOOMS = [None, (1.2, 1.2, 1.5)]  # None: the phantom's own isotropic voxels; else scaled like 1.2x1.2x1.5 mm
DTYPES = ["int16", "uint8", "float32"]
EXTENSIONS = [".nii.gz", ".nii"]


def restore(data: np.ndarray, affine: np.ndarray, codes: str, zooms, dtype: str, is_mask: bool) -> nib.Nifti1Image:
    """The volume stored as a scanner might have: axis codes, voxel size, on-disk dtype and scaling."""
    affine = affine.copy()
    if zooms is not None:
        affine[:3, :3] = affine[:3, :3] * np.array(zooms)  # anisotropic voxels (relative to the phantom's)
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(affine)), axcodes2ornt(tuple(codes)))
    data = apply_orientation(data, transform)
    affine = affine @ inv_ornt_aff(transform, data.shape)
    if is_mask:
        img = nib.Nifti1Image(data.astype(np.uint8), affine)
    elif dtype == "int16":  # stored as integers with scl_slope / scl_inter, as many scanners write
        img = nib.Nifti1Image(np.round((data - 0.1) / 0.001).astype(np.int16), affine)
        img.header.set_slope_inter(0.001, 0.1)
    elif dtype == "uint8":
        img = nib.Nifti1Image(np.clip(data / data.max() * 255, 0, 255).astype(np.uint8), affine)
    else:
        img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def mixed_dataset(root: Path, num_subjects: int = 12) -> Path:
    source = make_synthetic_dataset(root / "phantoms", num_subjects, (32, 32, 32), seed=3)
    rows = []
    for i, row in enumerate(csv.DictReader(open(source))):
        # every orientation, voxel size, dtype and extension, in varied combinations
        codes, zooms, dtype, ext = ORIENTATIONS[i % 3], ZOOMS[i % 2], DTYPES[(i // 2) % 3], EXTENSIONS[(i // 3) % 2]
        out = {**row}
        for col in ("image", "mask"):
            img = nib.load(source.parent / row[col])
            name = f"{row['subject_id']}_{col}_{codes}_{dtype}{ext}"
            nib.save(restore(img.get_fdata(), img.affine, codes, zooms, dtype, col == "mask"), root / name)
            out[col] = name
        rows.append(out)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_mixed_orientations_sizes_dtypes_and_extensions_train(tmp_path, cache_dir):
    manifest = mixed_dataset(tmp_path / "data")
    kinds = {(nib.aff2axcodes(nib.load(tmp_path / "data" / r["image"]).affine),
              nib.load(tmp_path / "data" / r["image"]).get_data_dtype().name)
             for r in csv.DictReader(open(manifest))}
    assert len({k[0] for k in kinds}) == 3 and len({k[1] for k in kinds}) == 3
    for task in ("segmentation", "regression"):
        run_dir = tmp_path / task
        run_train([f"task={task}", *tiny_overrides(cache_dir), "data=nifti", f"data.manifest={manifest}",
                   "preprocess=spacing", "preprocess.spacing=[6,6,6]", "data.shape=[32,32,32]", "trainer.max_epochs=1",
                   f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        summary = read_summary(run_dir)
        assert summary["epochs_completed"] == 1 and np.isfinite(summary["final_val"]["loss"])


def test_patch_training_validates_larger_volumes_by_sliding_windows(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    # 32^3 volumes, 16^3 patches: every validation volume is larger than the patch in every axis
    run_train(["task=segmentation", *tiny_overrides(cache_dir), "data.patch_size=[16,16,16]",
               "trainer.sw_batch_size=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    summary = read_summary(run_dir)
    assert summary["epochs_completed"] == 2
    assert 0.0 <= summary["final_val"]["dice"] <= 1.0 and np.isfinite(summary["final_val"]["loss"])


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
def test_patch_size_must_fit_the_network(tmp_path, cache_dir):
    proc = run_train(["task=segmentation", *tiny_overrides(cache_dir), "data.patch_size=[20,16,16]",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "data.patch_size" in proc.stderr and "(16, 16, 16)" in proc.stderr
    proc = run_train(["task=classification", *tiny_overrides(cache_dir), "data.patch_size=[16,16,16]",
                      f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "data.patch_size is for segmentation" in proc.stderr
