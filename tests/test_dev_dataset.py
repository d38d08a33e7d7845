"""Tests for scripts/make_dev_dataset.py: a tiny dataset (6 subjects on a 32x40x32 reference grid, ~2 s) is
generated through the CLI, read back with nibabel and brain3d's loaders, checked against dataset.json, and
generated again to check that a seed gives identical data."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brain3d.data.manifest import load_manifest
from brain3d.data.nifti import load_mask, load_nifti

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_dev_dataset.py"
N, N_VAL = 6, 2
TINY = ["--num-subjects", str(N), "--num-val", str(N_VAL), "--reference-shape", "32", "40", "32", "--workers", "2"]


def _script():
    """The script as a module (for in-process calls of its main); registered in sys.modules, as its dataclasses
    need."""
    if "make_dev_dataset" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_dev_dataset", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_dev_dataset"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_dev_dataset"]


def _generate(out: Path, *extra: str) -> Path:
    """Run the script as a user would; returns the dataset folder."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *TINY, *extra], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{N}/{N} subjects" in proc.stdout  # the progress line
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    """(folder, manifest rows, dataset.json) of one tiny dataset."""
    out = _generate(tmp_path_factory.mktemp("dev") / "data", "--seed", "3")
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, json.loads((out / "dataset.json").read_text())


def test_manifest_columns_and_labels(dataset):
    out, rows, meta = dataset
    with open(out / "manifest.csv", newline="") as f:
        assert next(csv.reader(f)) == ["subject_id", "image", "mask", "sex", "age", "split"]
    assert len(rows) == N
    assert [r["subject_id"] for r in rows] == [f"sub-{i:04d}" for i in range(N)]
    assert sorted(r["sex"] for r in rows) == ["F"] * (N // 2) + ["M"] * (N // 2)  # balanced by pairs
    for r in rows:
        age = float(r["age"])
        assert 20.0 <= age <= 85.0 and r["age"] == f"{age:.1f}"
        assert (out / r["image"]).is_file() and (out / r["mask"]).is_file()
    assert sorted(r["split"] for r in rows).count("val") == N_VAL
    assert set(r["split"] for r in rows) == {"train", "val"}
    assert meta["generator_version"] and meta["options"]["num_subjects"] == N
    assert [s["subject_id"] for s in meta["subjects"]] == [r["subject_id"] for r in rows]


def test_files_grids_and_ground_truth(dataset):
    out, rows, meta = dataset
    orientations, dtypes = set(), set()
    for row, truth in zip(rows, meta["subjects"]):
        img, msk = nib.load(out / row["image"]), nib.load(out / row["mask"])
        assert img.shape == msk.shape == tuple(truth["storage"]["shape"])
        np.testing.assert_allclose(img.affine, msk.affine, atol=1e-5)
        orientations.add("".join(nib.aff2axcodes(img.affine)))
        dtypes.add(str(img.get_data_dtype()))
        assert "".join(nib.aff2axcodes(img.affine)) == truth["storage"]["orientation"]
        raw_mask = np.asanyarray(msk.dataobj)
        assert set(np.unique(raw_mask).tolist()) <= {0, 1}
        assert int(raw_mask.sum()) == truth["lesion_voxels"] == sum(les["voxels"] for les in truth["lesions"])
        # One piece per lesion (no stray voxels); on this coarse grid two lesions may touch.
        _, pieces = ndimage.label(raw_mask > 0, ndimage.generate_binary_structure(3, 3))
        assert pieces <= truth["lesion_count"] <= 5

        # brain3d's loaders give RAS arrays: the canonical affine has a positive diagonal and no permutation.
        data, affine = load_nifti(out / row["image"])
        mask, mask_affine = load_mask(out / row["mask"])
        assert nib.aff2axcodes(affine) == ("R", "A", "S") and data.dtype == np.float32
        np.testing.assert_allclose(affine, mask_affine, atol=1e-5)
        assert data.shape == mask.shape and int(mask.sum()) == truth["lesion_voxels"]
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() > 0
        # The head lies in the middle of the FOV: the central voxel is much brighter than a corner's noise.
        centre = tuple(slice(n // 3, n - n // 3) for n in data.shape)
        assert data[centre].mean() > 5 * data[:3, :3, :3].mean()
        if truth["storage"]["dtype"] == "int16_scaled":  # nibabel moves scl_slope / scl_inter to the dataobj
            assert img.get_data_dtype() == np.int16 and (img.dataobj.slope, img.dataobj.inter) != (1.0, 0.0)
    # The first subjects cycle through the storage variants (forced), so 6 subjects show them all.
    assert len(orientations) >= 2 and len(dtypes) >= 2


def test_load_manifest_accepts_the_dataset(dataset):
    out, rows, _ = dataset
    for task, target in (("classification", "sex"), ("regression", "age"), ("segmentation", None)):
        manifest = load_manifest(out / "manifest.csv", task, target_col=target, num_threads=2)
        assert len(manifest.subjects) == N and not manifest.skipped
        assert sum(s.split == "val" for s in manifest.subjects) == N_VAL
    assert load_manifest(out / "manifest.csv", "classification", target_col="sex").class_names == ["F", "M"]


def test_same_seed_same_data(dataset, tmp_path):
    """Per-subject generators: the same seed gives the same arrays whatever the number of workers."""
    out, rows, _ = dataset
    again = _generate(tmp_path / "again", "--seed", "3", "--workers", "1")  # one process: the same data
    other = tmp_path / "other"  # in-process, one subject: cheaper than another interpreter
    assert _script().main([str(other), "--seed", "4", "--num-subjects", "1", "--num-val", "0", "--workers", "1",
                           "--reference-shape", "32", "40", "32"]) == 0
    for row in rows:
        for col in ("image", "mask"):
            a, b = nib.load(out / row[col]), nib.load(again / row[col])
            assert a.get_data_dtype() == b.get_data_dtype()
            np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
    assert (out / "manifest.csv").read_text() == (again / "manifest.csv").read_text()
    first = rows[0]["image"]
    assert not np.array_equal(load_nifti(out / first)[0], load_nifti(other / first)[0])


def test_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        _script().main([str(tmp_path / "x"), "--num-subjects", "1"])
    assert exc.value.code != 0 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["keep.txt"]


def _ceiling_script():
    path = SCRIPT.parent / "dev_dataset_ceiling.py"
    spec = importlib.util.spec_from_file_location("dev_dataset_ceiling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_age_noise_zero_makes_age_a_function_of_the_parameters_and_the_ceiling_script_finds_it(tmp_path):
    out = _generate(tmp_path / "exact", "--seed", "4", "--age-noise", "0")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["options"]["age_noise"] == 0.0
    for s in meta["subjects"]:  # no individual noise: each age effect is its formula of the age
        years = s["age"] - 20.0
        assert s["anatomy"]["cortical_thickness_mm"] == pytest.approx(3.3 * (1.0 - 0.004 * years), rel=1e-9)
        assert s["anatomy"]["gm_intensity"] == pytest.approx(0.60 + 0.0015 * years, rel=1e-9)
    ceiling = _ceiling_script()
    report = ceiling.ceilings(out)
    assert report["age"]["cortical_thickness_mm_mae"] < 1e-6  # linear in age: a perfect fit
    assert report["age"]["mean_predictor_mae"] > 1.0
    assert ceiling.main([str(out), "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["age"] == pytest.approx(report["age"])


def test_ceiling_auc_and_discriminant_against_hand_values():
    ceiling = _ceiling_script()
    assert ceiling.auc(np.array([0.9, 0.8, 0.1, 0.8]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)  # 3.5/4
    x = np.array([[0.0], [1.0], [4.0], [5.0], [0.5], [4.5]])
    label = np.array([0, 0, 1, 1, 0, 1])
    train = np.array([True, True, True, True, False, False])
    # class means 0.5 and 4.5 on the train rows: the boundary is at 2.5, so val scores are w * (x - 2.5), w > 0
    scores = ceiling.lda_scores(x, label, train)
    assert scores[0] < 0 < scores[1] and scores[1] == pytest.approx(-scores[0])
