"""Users' mistakes give one clear message naming file, row and column, a non-zero exit, and no training."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from brain3d.data.nifti import save_nifti

from tests.conftest import run_train

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def write_subject(folder: Path, sid: str, shape=(32, 32, 32), mask_shape=None) -> tuple[str, str]:
    rng = np.random.default_rng(abs(hash(sid)) % 2**32)
    image = rng.random(shape).astype(np.float32) + 0.1
    mask = (rng.random(mask_shape or shape) > 0.95).astype(np.uint8)
    save_nifti(image, AFFINE, folder / f"{sid}_T1w.nii.gz")
    save_nifti(mask, AFFINE, folder / f"{sid}_mask.nii.gz")
    return f"{sid}_T1w.nii.gz", f"{sid}_mask.nii.gz"


def write_manifest(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def train_nifti(tmp_path: Path, manifest: Path, task: str, *extra: str):
    run_dir = tmp_path / "run"
    proc = run_train([f"task={task}", "data=nifti", f"data.manifest={manifest}", "data.shape=[32,32,32]",
                      "backbone.width=0.125", "trainer.max_epochs=1", "trainer.progress=false", "data.num_workers=0",
                      f"hydra.run.dir={run_dir}", *extra], cwd=tmp_path, check=False)
    return proc, run_dir


@pytest.fixture
def dataset(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(6):
        write_subject(folder, f"sub-{i:02d}")
    return folder


def good_rows(n=6):
    return [[f"sub-{i:02d}", f"sub-{i:02d}_T1w.nii.gz", f"sub-{i:02d}_mask.nii.gz", "F" if i % 2 else "M",
             str(20 + 5 * i)] for i in range(n)]


HEADER = ["subject_id", "image", "mask", "sex", "age"]


def test_clean_nifti_manifest_trains_and_records_label_mapping(dataset, tmp_path):
    manifest = write_manifest(dataset / "manifest.csv", HEADER, good_rows())
    proc, run_dir = train_nifti(tmp_path, manifest, "classification")
    assert proc.returncode == 0, proc.stderr
    summary = (run_dir / "summary.json").read_text()
    assert '"positive_class": "M"' in summary and '"F"' in summary


def test_every_problem_reported_together_before_training(dataset, tmp_path):
    # line 3: missing image; line 4: truncated .gz; line 5: not NIfTI; line 6: empty target; line 7: mask shape differs
    # (line 1 is the header, line 2 the good sub-00)
    truncated = dataset / "sub-02_T1w.nii.gz"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (dataset / "sub-03_T1w.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file" * 100))
    write_subject(dataset, "sub-05", mask_shape=(32, 32, 16))
    rows = good_rows()
    rows[1][1] = "missing_T1w.nii.gz"
    rows[4][4] = ""
    manifest = write_manifest(dataset / "manifest.csv", HEADER, rows)
    for task in ("regression", "segmentation"):
        proc, run_dir = train_nifti(tmp_path, manifest, task)
        assert proc.returncode == 2
        err = proc.stderr
        assert "Traceback" not in err
        assert str(manifest) in err
        assert "line 3 (sub-01), column 'image': image file not found" in err
        # the report is printed once (not also by the console log handler), one problem per line, and logged
        assert (proc.stdout + err).count("line 3 (sub-01), column 'image'") == 1
        assert any(line.strip().startswith("- line 4 (sub-02)") for line in err.splitlines())
        assert "line 3 (sub-01), column 'image'" in (run_dir / "train.log").read_text()
        assert "line 4 (sub-02), column 'image': truncated or damaged NIfTI file (EOFError: " in err
        assert f"{dataset / 'sub-02_T1w.nii.gz'}" in err
        assert ("line 5 (sub-03), column 'image': not a NIfTI file (gzip-compressed text starting 'this is not a "
                "nifti filethis is not a ni'): ") in err and f"{dataset / 'sub-03_T1w.nii.gz'}" in err
        if task == "regression":
            assert "line 6 (sub-04), column 'age': empty target" in err
        else:
            assert ("line 7 (sub-05), column 'mask': mask shape (32, 32, 16) differs from image shape "
                    "(32, 32, 32)") in err
        assert not (run_dir / "checkpoints").exists(), "nothing may be trained on a bad dataset"


def test_missing_target_column_lists_columns(dataset, tmp_path):
    manifest = write_manifest(dataset / "manifest.csv", HEADER, good_rows())
    proc, _ = train_nifti(tmp_path, manifest, "classification", "data.target_col=diagnosis")
    assert proc.returncode != 0
    assert "column 'diagnosis' (data.target_col) not found" in proc.stderr
    assert "subject_id" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_manifest_file(tmp_path):
    proc, _ = train_nifti(tmp_path, tmp_path / "nope.csv", "classification")
    assert proc.returncode != 0
    assert "manifest file not found" in proc.stderr and "nope.csv" in proc.stderr


def test_unknown_group_option_lists_valid_ones(tmp_path):
    proc = run_train(["task=segmentaton"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "segmentaton" in out
    for option in ("classification", "regression", "segmentation"):
        assert option in out


def test_loss_that_does_not_fit_task_is_refused(tmp_path, cache_dir):
    proc = run_train(["task=classification", "loss=dice", f"data.cache_dir={cache_dir}", "debug=fast",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "loss=dice does not fit task=classification; valid losses for classification: bce" in proc.stderr


def test_bad_trainer_value_is_named(tmp_path, cache_dir):
    proc = run_train(["trainer.precision=fp8", f"data.cache_dir={cache_dir}", "debug=fast",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "trainer.precision='fp8' is not one of auto, bf16, fp16, fp32" in proc.stderr


def test_segmentation_shape_not_divisible_by_16_is_refused(tmp_path, cache_dir):
    proc = run_train(["task=segmentation", "data.shape=[40,40,40]", f"data.cache_dir={cache_dir}", "debug=fast",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "(40, 40, 40)" in proc.stderr and "(32, 32, 32)" in proc.stderr and "(48, 48, 48)" in proc.stderr


def test_value_refused_by_a_built_class_is_named(tmp_path, cache_dir):
    proc = run_train(["backbone.norm=batc", f"data.cache_dir={cache_dir}", "debug=fast",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "PlainBackbone" in proc.stderr and "batc" in proc.stderr and "instance" in proc.stderr
    assert "Traceback" not in proc.stderr
