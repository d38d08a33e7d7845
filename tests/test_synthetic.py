"""Tests for brain3d.data.synthetic: determinism, file layout, and that labels drive anatomy."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brain3d.data.nifti import load_mask, load_nifti
from brain3d.data.synthetic import (
    GENERATOR_VERSION,
    make_phantom,
    make_synthetic_dataset,
    synthetic_cache_dir,
)

N, SHAPE, SEED = 24, (48, 48, 48), 3
VOX = 192.0 / 48  # default voxel size: 4 mm


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One 24-subject 48^3 dataset, loaded: (manifest path, rows, images, masks, affines)."""
    root = tmp_path_factory.mktemp("synth")
    manifest = make_synthetic_dataset(synthetic_cache_dir(root, N, SHAPE, SEED), N, SHAPE, seed=SEED)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    images, masks, affines = [], [], []
    for row in rows:
        img, aff = load_nifti(manifest.parent / row["image"])
        mask, _ = load_mask(manifest.parent / row["mask"])
        images.append(img)
        masks.append(mask)
        affines.append(aff)
    return manifest, rows, np.stack(images), np.stack(masks), affines


def _central_box(shape, vox):
    """Central region (mm limits) that holds the ventricles but no cortex or sulci."""
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * vox for n in shape], indexing="ij")
    return (np.abs(x) < 25) & (np.abs(y) < 38) & (z > -20) & (z < 30)


def test_phantom_deterministic_and_typed():
    a = make_phantom((32, 32, 32), 1, 50.0, np.random.default_rng([7, 0]))
    b = make_phantom((32, 32, 32), 1, 50.0, np.random.default_rng([7, 0]))
    c = make_phantom((32, 32, 32), 1, 50.0, np.random.default_rng([8, 0]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.float32 and a[1].dtype == np.uint8 and a[0].shape == (32, 32, 32)
    img, _ = make_phantom((20, 24, 28), 0, 30.0, np.random.default_rng(0))  # non-cubic grid
    assert img.shape == (20, 24, 28)
    assert img[0, 0, 0] == 0 and img[10, 12, 14] > 0  # background 0, head in the middle


def test_dataset_deterministic_by_seed(tmp_path):
    m1 = make_synthetic_dataset(tmp_path / "a", 3, (32, 32, 32), seed=5)
    m2 = make_synthetic_dataset(tmp_path / "b", 3, (32, 32, 32), seed=5)
    m3 = make_synthetic_dataset(tmp_path / "c", 3, (32, 32, 32), seed=6)
    assert m1.read_text() == m2.read_text()
    rel = "images/sub-0001_T1w.nii.gz"
    np.testing.assert_array_equal(load_nifti(m1.parent / rel)[0], load_nifti(m2.parent / rel)[0])
    assert not np.array_equal(load_nifti(m1.parent / rel)[0], load_nifti(m3.parent / rel)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_manifest_and_files(dataset):
    manifest, rows, images, masks, affines = dataset
    with open(manifest, newline="") as f:
        assert next(csv.reader(f)) == ["subject_id", "image", "mask", "sex", "age"]
    assert len(rows) == N
    assert [r["subject_id"] for r in rows] == [f"sub-{i:04d}" for i in range(N)]
    sexes = [int(r["sex"]) for r in rows]
    assert set(sexes) == {0, 1} and sum(sexes) == N // 2  # balanced
    for r in rows:
        assert not r["image"].startswith("/") and not r["mask"].startswith("/")
        assert (manifest.parent / r["image"]).is_file() and (manifest.parent / r["mask"]).is_file()
        assert 20.0 <= float(r["age"]) <= 80.0 and r["age"] == f"{float(r['age']):.1f}"

    expected_aff = np.diag([VOX, VOX, VOX, 1.0])
    expected_aff[:3, 3] = -(48 - 1) / 2 * VOX  # origin at the volume centre
    img = nib.load(str(manifest.parent / rows[0]["image"]))
    assert img.shape == SHAPE and img.get_data_dtype() == np.float32
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.affine, expected_aff, atol=1e-5)
    assert nib.load(str(manifest.parent / rows[0]["mask"])).get_data_dtype() == np.uint8
    for aff in affines:
        np.testing.assert_allclose(aff, expected_aff, atol=1e-5)

    meta = json.loads((manifest.parent / "dataset.json").read_text())
    assert meta["num_subjects"] == N and meta["shape"] == list(SHAPE) and meta["seed"] == SEED
    assert meta["GENERATOR_VERSION"] == GENERATOR_VERSION
    np.testing.assert_allclose(meta["voxel_size_mm"], [VOX] * 3)
    assert manifest.parent.name == f"n{N}_s48x48x48_seed{SEED}_v{GENERATOR_VERSION}"


def test_lesions_binary_inside_brain_and_bright(dataset):
    _, _, images, masks, _ = dataset
    assert set(np.unique(masks)) <= {0, 1}
    with_lesion = masks.reshape(N, -1).any(axis=1)
    assert with_lesion.mean() >= 0.7  # most subjects have lesions
    for img, mask in zip(images[with_lesion], masks[with_lesion]):
        les = mask.astype(bool)
        ring = ndimage.binary_dilation(les, iterations=2) & ~les  # tissue around the lesions
        assert (img[les] > 0).all() and (img[ring] > 0).all()  # well inside the head
        assert np.median(img[ring]) > 0.6  # surrounded by white matter (~0.8), not CSF/scalp
        assert img[les].mean() > img[ring].mean() + 0.25  # lesions clearly brighter than WM


def test_head_larger_in_males(dataset):
    _, rows, images, _, _ = dataset
    sex = np.array([int(r["sex"]) for r in rows])
    head = (images > 0).reshape(N, -1).sum(axis=1)
    assert head[sex == 1].mean() > 1.05 * head[sex == 0].mean()  # expected ~1.3 (radii x1.09)


def test_ventricles_grow_with_age(dataset):
    _, rows, images, _, _ = dataset
    age = np.array([float(r["age"]) for r in rows])
    box = _central_box(SHAPE, VOX)
    csf = ((images > 0) & (images < 0.35) & box).reshape(N, -1).sum(axis=1)  # dark voxels deep in the brain
    assert np.corrcoef(csf, age)[0, 1] > 0.5


def test_cache_is_reused(dataset):
    manifest = dataset[0]
    image = manifest.parent / dataset[1][0]["image"]
    before = (manifest.stat().st_mtime_ns, image.stat().st_mtime_ns)
    again = make_synthetic_dataset(manifest.parent, N, SHAPE, seed=SEED)
    assert again == manifest
    assert (manifest.stat().st_mtime_ns, image.stat().st_mtime_ns) == before


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "something.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path / "data", 2, (16, 16, 16))
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert make_synthetic_dataset(tmp_path / "empty", 2, (16, 16, 16)).is_file()
