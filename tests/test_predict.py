"""brain3d-predict: outputs on each input's own grid, evaluation, ensembles, TTA, saliency."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from brain3d.data.nifti import load_mask
from brain3d.data.synthetic import synthetic_cache_dir

from tests.conftest import run_train, tiny_overrides


def run_predict(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "brain3d.predict", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"brain3d-predict failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def reoriented(img: nib.Nifti1Image, codes: str, zooms=None, crop=None) -> nib.Nifti1Image:
    """The same scan stored with axis codes ``codes`` (e.g. "LAS", "PSR"), optionally with other voxel sizes
    written in the header and some slices cropped, so shapes, affines and orientations all differ."""
    data = np.asanyarray(img.dataobj)
    affine = img.affine.copy()
    if crop:
        data = data[crop]
        affine[:3, 3] += affine[:3, :3] @ np.array([s.start or 0 for s in crop])
    if zooms is not None:
        affine[:3, :3] = affine[:3, :3] / np.abs(np.diag(affine[:3, :3])) * np.array(zooms)
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(affine)), axcodes2ornt(tuple(codes)))
    new = nib.Nifti1Image(apply_orientation(data, transform), affine @ inv_ornt_aff(transform, data.shape))
    new.set_qform(new.affine, code=1)
    new.set_sform(new.affine, code=1)
    return new


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A tiny model of each task, trained once for this module."""
    root = tmp_path_factory.mktemp("predict_runs")
    runs = {}
    for task in ("segmentation", "classification", "regression"):
        run_train([f"task={task}", *tiny_overrides(cache_dir), f"hydra.run.dir={root / task}"], cwd=root)
        runs[task] = root / task
    manifest = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0) / "manifest.csv"  # debug=fast's data
    return runs, manifest


def mixed_dataset(manifest: Path, folder: Path) -> Path:
    """Four synthetic subjects re-stored as RAS (original), LAS, LPS + anisotropic, PSR + cropped."""
    folder.mkdir()
    rows = list(csv.DictReader(open(manifest)))[:4]
    variants = [("RAS", None, None), ("LAS", None, None), ("LPS", (1.2, 1.0, 1.5), None),
                ("PSR", None, (slice(2, 30), slice(0, 32), slice(4, 32)))]
    out = []
    for row, (codes, zooms, crop) in zip(rows, variants):
        for col in ("image", "mask"):
            img = nib.load(manifest.parent / row[col])
            nib.save(reoriented(img, codes, zooms, crop), folder / f"{row['subject_id']}_{col}.nii.gz")
        out.append({**row, "image": f"{row['subject_id']}_image.nii.gz", "mask": f"{row['subject_id']}_mask.nii.gz"})
    # the LAS twin of subject 0, to compare predictions across orientations
    for col in ("image", "mask"):
        nib.save(reoriented(nib.load(folder / f"{rows[0]['subject_id']}_{col}.nii.gz"), "LAS"), folder / f"twin_{col}.nii.gz")
    out.append({**out[0], "subject_id": "twin", "image": "twin_image.nii.gz", "mask": "twin_mask.nii.gz"})
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    return path


def test_segmentation_outputs_overlay_each_input(trained, tmp_path):
    runs, manifest = trained
    data = mixed_dataset(manifest, tmp_path / "mixed")
    out = tmp_path / "pred"
    run_predict([f"checkpoint={runs['segmentation'] / 'checkpoints' / 'last.pt'}", f"data.manifest={data}",
                 f"output_dir={out}", "progress=false", "bootstrap_samples=50"], cwd=tmp_path)
    for row in csv.DictReader(open(data)):
        source = nib.load(data.parent / row["image"])
        for kind, dtype in (("prob", np.float32), ("mask", np.uint8)):
            written = nib.load(out / f"{row['subject_id']}_{kind}.nii.gz")
            assert written.shape == source.shape, (row["subject_id"], kind)
            np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
            assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
            assert written.get_data_dtype() == dtype
    # the LAS twin's mask, brought to RAS, equals the original's
    original, _ = load_mask(out / f"{next(csv.DictReader(open(data)))['subject_id']}_mask.nii.gz")
    twin, _ = load_mask(out / "twin_mask.nii.gz")
    np.testing.assert_array_equal(original, twin)

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dice", "iou", "hd95_mm", "abs_volume_diff_ml", "lesion_f1"):
        assert set(metrics[key]) == {"value", "ci_low", "ci_high"}, key
    assert metrics["n"] == 5
    per_subject = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(per_subject) == 5 and "hd95_mm" in per_subject[0] and "lesion_tp" in per_subject[0]


def test_classification_predictions_ensemble_tta_and_saliency(trained, tmp_path):
    runs, manifest = trained
    ckpt = runs["classification"] / "checkpoints" / "last.pt"
    single, ensemble = tmp_path / "single", tmp_path / "ensemble"
    run_predict([f"checkpoint={ckpt}", "data=synthetic", f"data.cache_dir={manifest.parents[2]}", "data.num_subjects=12",
                 "data.shape=[32,32,32]", f"output_dir={single}", "progress=false", "saliency=gradcam",
                 "bootstrap_samples=50"], cwd=tmp_path)
    run_predict([f"checkpoint=[{ckpt},{ckpt}]", f"data.manifest={manifest}", f"output_dir={ensemble}",
                 "progress=false", "tta=true", "bootstrap_samples=50"], cwd=tmp_path)
    rows = list(csv.DictReader(open(single / "predictions.csv")))
    assert len(rows) == 12
    assert {"subject_id", "probability", "predicted_class", "true_class"} <= set(rows[0])
    for r in rows:
        assert 0.0 <= float(r["probability"]) <= 1.0
        assert r["predicted_class"] == ("1" if float(r["probability"]) > 0.5 else "0")
    metrics = json.loads((single / "metrics.json").read_text())
    for key in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity"):
        assert metrics[key]["ci_low"] <= metrics[key]["value"] <= metrics[key]["ci_high"] or np.isnan(metrics[key]["value"])
    source = nib.load(manifest.parent / next(csv.DictReader(open(manifest)))["image"])
    saliency = nib.load(single / f"{rows[0]['subject_id']}_saliency.nii.gz")
    assert saliency.shape == source.shape and np.allclose(saliency.affine, source.affine)
    data = saliency.get_fdata()
    assert data.min() >= -1e-6 and data.max() <= 1 + 1e-6
    tta_rows = list(csv.DictReader(open(ensemble / "predictions.csv")))
    assert [r["subject_id"] for r in tta_rows] == [r["subject_id"] for r in rows]
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in tta_rows)


def test_ensemble_of_identical_checkpoints_equals_one(trained, tmp_path):
    runs, manifest = trained
    ckpt = runs["regression"] / "checkpoints" / "last.pt"
    run_predict([f"checkpoint={ckpt}", f"data.manifest={manifest}", f"output_dir={tmp_path / 'a'}", "progress=false",
                 "bootstrap_samples=50"], cwd=tmp_path)
    run_predict([f"checkpoint=[{ckpt},{ckpt}]", f"data.manifest={manifest}", f"output_dir={tmp_path / 'b'}",
                 "progress=false", "bootstrap_samples=50"], cwd=tmp_path)
    a = list(csv.DictReader(open(tmp_path / "a" / "predictions.csv")))
    b = list(csv.DictReader(open(tmp_path / "b" / "predictions.csv")))
    np.testing.assert_allclose([float(r["prediction"]) for r in a], [float(r["prediction"]) for r in b], rtol=1e-5)
    assert "brain_age_gap" in a[0]
    assert float(a[0]["brain_age_gap"]) == pytest.approx(float(a[0]["prediction"]) - float(a[0]["target"]))
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert {"mae", "rmse", "pearson_r", "r2", "mean_bias"} <= set(metrics)


def test_manifest_without_targets_predicts_without_metrics(trained, tmp_path):
    runs, manifest = trained
    rows = list(csv.DictReader(open(manifest)))[:3]
    plain = tmp_path / "plain.csv"
    plain.write_text("subject_id,image\n" + "".join(f"{r['subject_id']},{manifest.parent / r['image']}\n" for r in rows))
    out = tmp_path / "out"
    run_predict([f"checkpoint={runs['segmentation'] / 'checkpoints' / 'best.pt'}", f"data.manifest={plain}",
                 f"output_dir={out}", "progress=false"], cwd=tmp_path)
    assert len(list(out.glob("*_mask.nii.gz"))) == 3 and not (out / "metrics.json").exists()


def test_predict_errors_are_clear(trained, tmp_path):
    runs, manifest = trained
    proc = run_predict([f"checkpoint={tmp_path / 'none.pt'}", f"data.manifest={manifest}", f"output_dir={tmp_path / 'o'}"],
                       cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    proc = run_predict([f"checkpoint=[{runs['segmentation'] / 'checkpoints' / 'last.pt'},{runs['regression'] / 'checkpoints' / 'last.pt'}]",
                        f"data.manifest={manifest}", f"output_dir={tmp_path / 'o'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "an ensemble needs checkpoints of one task" in proc.stderr
