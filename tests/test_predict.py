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
from brain3d.errors import ConfigError


def run_predict(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "brain3d.predict", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
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
def trained(tiny_runs, cache_dir):
    """A tiny model of each task (conftest's tiny_runs, trained once for the session)."""
    runs = dict(tiny_runs)
    # debug=fast's data
    manifest = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0) / "manifest.csv"
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
        nib.save(reoriented(nib.load(folder / f"{rows[0]['subject_id']}_{col}.nii.gz"), "LAS"),
                 folder / f"twin_{col}.nii.gz")
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
    run_predict([f"checkpoint={ckpt}", "data=synthetic", f"data.cache_dir={manifest.parents[2]}",
                 "data.num_subjects=12", "data.shape=[32,32,32]", f"output_dir={single}", "progress=false",
                 "saliency=gradcam",
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
        assert (metrics[key]["ci_low"] <= metrics[key]["value"] <= metrics[key]["ci_high"]
                or np.isnan(metrics[key]["value"]))
    source = nib.load(manifest.parent / next(csv.DictReader(open(manifest)))["image"])
    saliency = nib.load(single / f"{rows[0]['subject_id']}_saliency.nii.gz")
    assert saliency.shape == source.shape and np.allclose(saliency.affine, source.affine)
    data = saliency.get_fdata()
    assert data.min() >= -1e-6 and data.max() <= 1 + 1e-6
    tta_rows = list(csv.DictReader(open(ensemble / "predictions.csv")))
    assert [r["subject_id"] for r in tta_rows] == [r["subject_id"] for r in rows]
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in tta_rows)


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
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
    plain.write_text("subject_id,image\n"
                     + "".join(f"{r['subject_id']},{manifest.parent / r['image']}\n" for r in rows))
    out = tmp_path / "out"
    run_predict([f"checkpoint={runs['segmentation'] / 'checkpoints' / 'best.pt'}", f"data.manifest={plain}",
                 f"output_dir={out}", "progress=false"], cwd=tmp_path)
    assert len(list(out.glob("*_mask.nii.gz"))) == 3 and not (out / "metrics.json").exists()


def test_predict_errors_are_clear(trained, tmp_path):
    runs, manifest = trained
    proc = run_predict([f"checkpoint={tmp_path / 'none.pt'}", f"data.manifest={manifest}",
                        f"output_dir={tmp_path / 'o'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    segmentation, regression = (runs[task] / "checkpoints" / "last.pt" for task in ("segmentation", "regression"))
    proc = run_predict([f"checkpoint=[{segmentation},{regression}]",
                        f"data.manifest={manifest}", f"output_dir={tmp_path / 'o'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "an ensemble needs checkpoints of one task" in proc.stderr


# --- column defaults, missing metrics, the training split, partial targets, skipped rows, 4-D inputs -----------


def predict_here(overrides: list[str]) -> dict:
    """``predict(cfg)`` in this process with configs/predict.yaml composed as the CLI would (fast, and caplog sees
    the log records)."""
    from hydra import compose, initialize_config_dir

    from brain3d.cli import config_dir
    from brain3d.predict import predict

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="predict",
                      overrides=["progress=false", "bootstrap_samples=20", "device=cpu", *overrides])
    return predict(cfg)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """A CSV with the union of the rows' keys as columns."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthetic_rows(manifest: Path, n: int) -> list[dict]:
    """The first ``n`` rows of the synthetic manifest with absolute paths (so a manifest elsewhere finds them)."""
    rows = list(csv.DictReader(open(manifest)))[:n]
    return [{**r, "image": str(manifest.parent / r["image"]), "mask": str(manifest.parent / r["mask"])} for r in rows]


def test_columns_default_to_the_checkpoints(trained, tmp_path):
    """A model trained on target column 'sex_at_birth' is evaluated on it without repeating data.target_col."""
    from brain3d.checkpoint import load_checkpoint, save_checkpoint

    runs, manifest = trained
    state = load_checkpoint(runs["classification"] / "checkpoints" / "last.pt", map_location="cpu")
    state["config"]["data"]["target_col"] = "sex_at_birth"
    ckpt = save_checkpoint(state, tmp_path / "renamed.pt")
    rows = [{"subject_id": r["subject_id"], "image": r["image"], "sex_at_birth": r["sex"]}
            for r in synthetic_rows(manifest, 4)]
    data = write_manifest(tmp_path / "m.csv", rows)
    metrics = predict_here([f"checkpoint={ckpt}", f"data.manifest={data}", f"output_dir={tmp_path / 'a'}"])
    assert metrics["n"] == 4 and (tmp_path / "a" / "metrics.json").exists()
    # an explicit data.target_col wins over the checkpoint's
    assert predict_here([f"checkpoint={ckpt}", f"data.manifest={data}", f"output_dir={tmp_path / 'b'}",
                         "data.target_col=sex"]) == {}


def test_no_metrics_json_says_why(trained, tmp_path, caplog):
    runs, manifest = trained
    ckpt = runs["segmentation"] / "checkpoints" / "last.pt"
    rows = synthetic_rows(manifest, 2)
    no_column = write_manifest(tmp_path / "no_mask.csv", [{k: r[k] for k in ("subject_id", "image")} for r in rows])
    empty = write_manifest(tmp_path / "empty_mask.csv", [{**r, "mask": ""} for r in rows])
    with caplog.at_level("WARNING", logger="brain3d.predict"):
        predict_here([f"checkpoint={ckpt}", f"data.manifest={no_column}", f"output_dir={tmp_path / 'a'}"])
        predict_here([f"checkpoint={ckpt}", f"data.manifest={empty}", f"output_dir={tmp_path / 'b'}"])
    assert not (tmp_path / "a" / "metrics.json").exists() and not (tmp_path / "b" / "metrics.json").exists()
    warnings = [r.getMessage() for r in caplog.records if "no metrics.json" in r.getMessage()]
    assert len(warnings) == 2, caplog.text
    assert "no column 'mask'" in warnings[0] and "checkpoint" in warnings[0]
    assert "column 'mask'" in warnings[1] and "empty in every row" in warnings[1]


def test_subjects_of_the_training_split_are_marked(trained, tmp_path, caplog):
    from brain3d.checkpoint import load_checkpoint

    runs, manifest = trained
    ckpt = runs["regression"] / "checkpoints" / "last.pt"
    seen = set(load_checkpoint(ckpt, map_location="cpu")["train_subject_ids"])
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="brain3d.predict"):
        metrics = predict_here([f"checkpoint={ckpt}", f"data.manifest={manifest}", f"output_dir={out}"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert 0 < len(seen) < len(rows)
    assert {r["subject_id"] for r in rows if r["in_training_split"] == "true"} == seen
    assert {r["in_training_split"] for r in rows} == {"true", "false"}
    assert metrics["num_in_training_split"] == len(seen)
    assert json.loads((out / "metrics.json").read_text())["num_in_training_split"] == len(seen)
    assert all(r["in_training_split"] in ("true", "false") for r in csv.DictReader(open(out / "metrics.csv")))
    assert any(f"{len(seen)} of {len(rows)} subjects" in r.getMessage() and "training split" in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_row_with_an_empty_target_is_predicted(trained, tmp_path):
    runs, manifest = trained
    rows = synthetic_rows(manifest, 3)
    rows[1]["age"] = ""
    data = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    metrics = predict_here([f"checkpoint={runs['regression'] / 'checkpoints' / 'last.pt'}", f"data.manifest={data}",
                            f"output_dir={out}"])
    predictions = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["subject_id"] for r in predictions] == [r["subject_id"] for r in rows]
    assert predictions[1]["target"] == "" and predictions[1]["prediction"] != ""
    assert metrics["n"] == 2  # metrics over the rows that have a target


def test_on_error_skip_logs_every_skipped_row(trained, tmp_path, caplog):
    runs, manifest = trained
    rows = synthetic_rows(manifest, 4)
    rows[1]["image"] = str(tmp_path / "missing_1.nii.gz")
    rows[3]["image"] = str(tmp_path / "missing_3.nii.gz")
    data = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="brain3d.predict"):
        predict_here([f"checkpoint={runs['classification'] / 'checkpoints' / 'last.pt'}", f"data.manifest={data}",
                      f"output_dir={out}", "data.on_error=skip"])
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped line")]
    assert len(skipped) == 2, caplog.text
    assert rows[1]["subject_id"] in skipped[0] and "missing_1" in skipped[0]
    assert rows[3]["subject_id"] in skipped[1] and "missing_3" in skipped[1]
    assert "skipped line 3 (" in skipped[0] and "line 3" not in skipped[0].split("): ", 1)[1]  # no repeated prefix


def test_a_4d_input_with_a_singleton_4th_axis_gets_4d_outputs(trained, tmp_path):
    runs, manifest = trained
    row = synthetic_rows(manifest, 1)[0]
    for col in ("image", "mask"):
        img = reoriented(nib.load(row[col]), "LAS")
        data = np.asanyarray(img.dataobj)[..., None]  # (X, Y, Z, 1)
        nib.save(nib.Nifti1Image(data, img.affine, img.header), tmp_path / f"4d_{col}.nii.gz")
    source = nib.load(tmp_path / "4d_image.nii.gz")
    assert len(source.shape) == 4 and source.shape[3] == 1
    data = write_manifest(tmp_path / "m.csv", [{**row, "image": "4d_image.nii.gz", "mask": "4d_mask.nii.gz"}])
    out = tmp_path / "out"
    predict_here([f"checkpoint={runs['segmentation'] / 'checkpoints' / 'last.pt'}", f"data.manifest={data}",
                  f"output_dir={out}"])
    for kind in ("prob", "mask"):
        written = nib.load(out / f"{row['subject_id']}_{kind}.nii.gz")
        assert written.shape == source.shape, kind
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)


def test_predictions_keep_the_manifests_id_column_name(trained, tmp_path):
    runs, manifest = trained
    rows = [{"participant_id": r["subject_id"], "image": r["image"], "age": r["age"]}
            for r in synthetic_rows(manifest, 2)]
    data = write_manifest(tmp_path / "participants.csv", rows)
    out = tmp_path / "out"
    predict_here([f"checkpoint={runs['regression'] / 'checkpoints' / 'last.pt'}", f"data.manifest={data}",
                  f"output_dir={out}"])
    for name in ("predictions.csv", "metrics.csv"):
        with open(out / name) as f:
            header = next(csv.reader(f))
        assert header[0] == "participant_id", (name, header)


def test_predict_averages_the_flips_the_checkpoint_was_validated_with(trained, tmp_path):
    """tta=null (the default) follows the checkpoint's trainer.val_flip_axes: a checkpoint validated with
    left-right flips is predicted as tta=[0] is, not as tta=false; tta=false and a wrong value as asked."""
    from brain3d.checkpoint import load_checkpoint, save_checkpoint

    runs, manifest = trained
    state = load_checkpoint(runs["regression"] / "checkpoints" / "last.pt", map_location="cpu")
    assert state["config"]["trainer"]["val_flip_axes"] == []
    state["config"]["trainer"]["val_flip_axes"] = [0]
    flipped = save_checkpoint(state, tmp_path / "flipped.pt")
    data = write_manifest(tmp_path / "m.csv", synthetic_rows(manifest, 3))

    def predictions(tta: str, checkpoint=flipped) -> tuple[list[float], dict]:
        out = tmp_path / f"out_{tta.strip('[]')}_{Path(checkpoint).stem}"
        metrics = predict_here([f"checkpoint={checkpoint}", f"data.manifest={data}", f"output_dir={out}",
                                f"tta={tta}"])
        return [float(r["prediction"]) for r in csv.DictReader(open(out / "predictions.csv"))], metrics

    default, metrics = predictions("null")
    left_right, _ = predictions("[0]")
    none, none_metrics = predictions("false")
    assert default == left_right and default != none
    assert metrics["tta"] is True and metrics["tta_flip_axes"] == [0]
    assert none_metrics["tta"] is False and none_metrics["tta_flip_axes"] == []
    unflipped, _ = predictions("null", runs["regression"] / "checkpoints" / "last.pt")
    assert unflipped == none  # a checkpoint validated without flips is predicted without them
    with pytest.raises(ConfigError, match=r"tta=\[3\] must list distinct spatial axes among 0, 1, 2"):
        predictions("[3]")
