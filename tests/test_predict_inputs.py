"""brain3d-predict input=FILE|FOLDER (no manifest) and output_layout=bids (BIDS-derivatives names)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brain3d.data.inputs import InputError, bids_name, find_scans
from brain3d.data.synthetic import synthetic_cache_dir
from brain3d.errors import ConfigError
from brain3d.output_layout import OutputLayout, segmentation_desc
from brain3d.predict import USER_ERRORS

from tests.test_predict import predict_here, reoriented, run_predict, write_manifest


@pytest.fixture(scope="module")
def checkpoints(tiny_runs, cache_dir):
    """A tiny segmentation and classification model (conftest's tiny_runs), and debug=fast's synthetic scans."""
    paths = {task: tiny_runs[task] / "checkpoints" / "last.pt" for task in ("segmentation", "classification")}
    manifest = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0) / "manifest.csv"
    scans = [manifest.parent / r["image"] for r in csv.DictReader(open(manifest))]
    return paths, scans


def save_as(img: nib.Nifti1Image, path: Path) -> Path:
    """``img`` written to ``path`` (.nii or .nii.gz, by the name), parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def mixed_folder(scans: list[Path], folder: Path) -> dict[str, Path]:
    """Four scans as .nii and .nii.gz, each with its own orientation, voxel size or crop, plus files that are
    not scans; returns {expected id: file}."""
    variants = {"a_ras.nii.gz": ("RAS", None, None), "b_las.nii": ("LAS", None, None),
                "c_lps.nii.gz": ("LPS", (1.2, 1.0, 1.5), None),
                "d_psr.nii": ("PSR", None, (slice(2, 30), slice(0, 32), slice(4, 32)))}
    files = {}
    for scan, (name, (codes, zooms, crop)) in zip(scans, variants.items()):
        files[name.split(".")[0]] = save_as(reoriented(nib.load(scan), codes, zooms, crop), folder / name)
    (folder / "notes.txt").write_text("not a scan")
    (folder / "._a_ras.nii.gz").write_bytes(b"\0" * 16)  # a macOS resource fork, hidden
    (folder / "scan.json").write_text("{}")
    (folder / "sub").mkdir()
    save_as(nib.load(scans[0]), folder / "sub" / "nested.nii.gz")  # only BIDS folders are read below the top
    return files


def assert_on_grid(written: Path, source: Path, dtype) -> nib.Nifti1Image:
    img, src = nib.load(written), nib.load(source)
    assert img.shape == src.shape, written
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    assert img.get_data_dtype() == dtype, written
    return img


def test_a_folder_of_mixed_nifti_gets_one_output_per_file(checkpoints, tmp_path, caplog):
    paths, scans = checkpoints
    files = mixed_folder(scans, tmp_path / "scans")
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="brain3d.predict"):
        assert predict_here([f"checkpoint={paths['segmentation']}", f"input={tmp_path / 'scans'}",
                             f"output_dir={out}", "report_subjects=0"]) == {}
    # one prob and one mask per file, named from the file name, on that file's own grid
    assert sorted(p.name for p in out.glob("*.nii*")) == sorted(f"{i}_{k}.nii.gz" for i in files
                                                                 for k in ("prob", "mask"))
    for subject_id, source in files.items():
        prob = assert_on_grid(out / f"{subject_id}_prob.nii.gz", source, np.float32).get_fdata()
        mask = assert_on_grid(out / f"{subject_id}_mask.nii.gz", source, np.uint8).get_fdata()
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        np.testing.assert_array_equal(mask, prob > 0.5)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["subject_id"] for r in rows] == sorted(files)  # sorted by file name
    assert [r["image"] for r in rows] == [str(files[r["subject_id"]]) for r in rows]
    assert not (out / "metrics.json").exists()
    said = [r.getMessage() for r in caplog.records if "predictions only" in r.getMessage()]
    assert len(said) == 1 and "4 NIfTI file(s)" in said[0], caplog.text
    assert not any("no metrics.json:" in r.getMessage() for r in caplog.records)  # not a second time

    # the same masks as a manifest listing the same files (the manifest path is unchanged)
    listed = write_manifest(tmp_path / "m.csv", [{"subject_id": i, "image": str(p)} for i, p in files.items()])
    predict_here([f"checkpoint={paths['segmentation']}", f"data.manifest={listed}", f"output_dir={tmp_path / 'm'}",
                  "report_subjects=0"])
    for subject_id in files:
        np.testing.assert_array_equal(nib.load(tmp_path / "m" / f"{subject_id}_prob.nii.gz").get_fdata(),
                                      nib.load(out / f"{subject_id}_prob.nii.gz").get_fdata())
    assert "image" not in next(csv.DictReader(open(tmp_path / "m" / "predictions.csv")))


def test_a_single_file(checkpoints, tmp_path):
    paths, scans = checkpoints
    scan = save_as(reoriented(nib.load(scans[1]), "LPI"), tmp_path / "in" / "patient 7.nii")
    out = tmp_path / "out"
    predict_here([f"checkpoint={paths['classification']}", f"input={scan}", f"output_dir={out}",
                  "report_subjects=0"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["subject_id"] == "patient 7" and rows[0]["image"] == str(scan)
    assert 0.0 <= float(rows[0]["probability"]) <= 1.0 and "true_class" not in rows[0]
    assert not (out / "metrics.json").exists()


def bids_tree(scans: list[Path], root: Path) -> dict[str, Path]:
    """sub-01 without sessions (.nii.gz, LAS), sub-02 with ses-1 (.nii, anisotropic), a description, a
    derivatives folder and a sidecar that must not be read."""
    files = {"sub-01_T1w": save_as(reoriented(nib.load(scans[0]), "LAS"), root / "sub-01/anat/sub-01_T1w.nii.gz"),
             "sub-02_ses-1_T1w": save_as(reoriented(nib.load(scans[1]), "RAS", (1.0, 1.3, 1.0)),
                                         root / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii")}
    (root / "sub-01/anat/sub-01_T1w.json").write_text("{}")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0",
                                                               "DatasetDOI": "doi:10.1234/toy"}))
    save_as(nib.load(scans[2]), root / "derivatives/old/sub-01/anat/sub-01_desc-old_mask.nii.gz")
    return files


EXPECTED_BIDS = {"sub-01_T1w": "sub-01/anat/sub-01_space-orig_desc-lesion",
                 "sub-02_ses-1_T1w": "sub-02/ses-1/anat/sub-02_ses-1_space-orig_desc-lesion"}


def test_a_bids_tree_with_the_bids_layout(checkpoints, tmp_path):
    paths, scans = checkpoints
    root = tmp_path / "bids"
    files = bids_tree(scans, root)
    out = root / "derivatives" / "brain3d"  # inside the dataset, as BIDS derivatives usually are
    predict_here([f"checkpoint={paths['segmentation']}", f"input={root}", f"output_dir={out}",
                  "output_layout=bids", "report_subjects=0"])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii*"))
    assert written == sorted(f"{stem}_{kind}.nii.gz" for stem in EXPECTED_BIDS.values() for kind in ("mask",
                                                                                                     "probseg"))
    for subject_id, stem in EXPECTED_BIDS.items():
        mask = assert_on_grid(out / f"{stem}_mask.nii.gz", files[subject_id], np.uint8).get_fdata()
        prob = assert_on_grid(out / f"{stem}_probseg.nii.gz", files[subject_id], np.float32).get_fdata()
        np.testing.assert_array_equal(mask, prob > 0.5)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["Name"] == "brain3d predictions of toy"
    assert description["GeneratedBy"][0]["Name"] == "brain3d" and description["GeneratedBy"][0]["Version"]
    assert description["SourceDatasets"] == [{"URL": root.resolve().as_uri(), "DOI": "doi:10.1234/toy"}]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [(r["subject_id"], r["participant_id"], r["session"]) for r in rows] == [
        ("sub-01_T1w", "sub-01", "n/a"), ("sub-02_ses-1_T1w", "sub-02", "ses-1")]

    # data=bids reads the same tree through a manifest: the same names (subject ids are the entity prefixes)
    again = tmp_path / "again"
    predict_here([f"checkpoint={paths['segmentation']}", "data=bids", f"data.root={root}",
                  f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={again}", "output_layout=bids",
                  "report_subjects=0"])
    assert sorted(str(p.relative_to(again)) for p in again.rglob("*.nii*")) == written


def test_classification_with_the_bids_layout_writes_predictions_csv(checkpoints, tmp_path):
    paths, scans = checkpoints
    root = tmp_path / "bids"
    bids_tree(scans, root)
    out = tmp_path / "out"
    predict_here([f"checkpoint={paths['classification']}", f"input={root / 'sub-02'}", f"output_dir={out}",
                  "output_layout=bids", "report_subjects=0"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [(r["subject_id"], r["participant_id"], r["session"]) for r in rows] == [
        ("sub-02_ses-1_T1w", "sub-02", "ses-1")]
    assert "probability" in rows[0] and not list(out.rglob("*.nii*"))
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"


def test_bids_names_keep_the_source_entities():
    parsed = bids_name("sub-02_ses-1_acq-mprage_run-2_T1w.nii.gz")
    assert parsed.entities == {"sub": "02", "ses": "1", "acq": "mprage", "run": "2"} and parsed.suffix == "T1w"
    for name in ("scan.nii.gz", "sub-01.nii", "sub-01_ses_T1w.nii", "sub-0_1_T1w.nii.gz", "T1w.nii"):
        assert bids_name(name) is None, name
    out = Path("/out")
    images = {"x": Path("sub-02_ses-1_acq-mprage_run-2_desc-preproc_T1w.nii.gz"), "y": Path("sub-03_FLAIR.nii")}
    layout = OutputLayout("bids", out, images, write=None, desc=segmentation_desc("mask"))
    assert layout.bids_path("x", out / "x_prob.nii.gz") == out / "sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_run-2_" \
                                                                "space-orig_desc-lesion_probseg.nii.gz"
    # a multi-task checkpoint's segmentation head names the desc; saliency maps are desc-gradcam
    assert layout.bids_path("y", out / "y_wmh_mask.nii.gz") == out / "sub-03/anat/sub-03_space-orig_desc-wmh_mask" \
                                                                      ".nii.gz"
    assert layout.bids_path("y", out / "y_saliency.nii.gz").name == "sub-03_space-orig_desc-gradcam_saliency.nii.gz"
    assert segmentation_desc("tumour_mask") == "tumourmask" and segmentation_desc(None) == "lesion"
    # a multi-class segmentation's label map is a BIDS dseg
    labels = OutputLayout("bids", out, images, write=None, desc=segmentation_desc(None, label_map=True), label_map=True)
    assert labels.bids_path("y", out / "y_mask.nii.gz").name == "sub-03_space-orig_desc-labels_dseg.nii.gz"
    assert labels.bids_path("y", out / "y_prob.nii.gz").name == "sub-03_space-orig_desc-labels_probseg.nii.gz"
    with pytest.raises(ConfigError, match="sub-03_T1w.nii and .*sub-03_FLAIR.nii would both be written as sub-03_"):
        OutputLayout("bids", out, {"a": Path("/d/sub-03_T1w.nii"), "b": Path("/d/sub-03_FLAIR.nii")}, write=None)


# --- errors: one line, exit 2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["with_manifest", "empty_folder"])
def test_input_errors_exit_2_with_one_line(checkpoints, tmp_path, case):
    paths, _ = checkpoints
    (tmp_path / "empty").mkdir()
    args = {"with_manifest": [f"input={tmp_path}", "data.manifest=m.csv"],
            "empty_folder": [f"input={tmp_path / 'empty'}"]}[case]
    proc = run_predict([f"checkpoint={paths['segmentation']}", f"output_dir={tmp_path / 'o'}", *args],
                       cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    expected = {"with_manifest": f"input={tmp_path} and data.manifest=m.csv both say what to predict",
                "empty_folder": f"input={tmp_path / 'empty'}: no .nii or .nii.gz file in the folder"}[case]
    assert lines[0].startswith(f"brain3d-predict: error: {expected}"), lines[0]


def predict_error(overrides: list[str]) -> str:
    """predict's error message, which brain3d-predict prints after "error: " with exit status 2 (USER_ERRORS)."""
    with pytest.raises(USER_ERRORS) as caught:
        predict_here(overrides)
    return str(caught.value)


def test_input_errors_name_the_path_or_files(checkpoints, tmp_path):
    paths, scans = checkpoints
    common = [f"checkpoint={paths['segmentation']}", f"output_dir={tmp_path / 'o'}"]
    missing = tmp_path / "nowhere"
    assert predict_error([*common, f"input={missing}"]) == f"input={missing}: no such file or folder"
    (tmp_path / "scan.mgz").write_bytes(b"x")
    assert predict_error([*common, f"input={tmp_path / 'scan.mgz'}"]) == (
        f"input={tmp_path / 'scan.mgz'} is not a NIfTI file (.nii or .nii.gz)")
    twins = tmp_path / "twins"
    save_as(nib.load(scans[1]), twins / "a.nii")
    shutil.copy(scans[0], twins / "a.nii.gz")
    message = predict_error([*common, f"input={twins}"])
    assert "\n" not in message and f"{twins / 'a.nii'} and {twins / 'a.nii.gz'} have the same id 'a'" in message
    files = mixed_folder(scans, tmp_path / "flat")
    message = predict_error([*common, f"input={tmp_path / 'flat'}", "output_layout=bids"])
    assert "\n" not in message and "output_layout=bids needs BIDS file names" in message
    assert f"{files['a_ras']} is not one" in message  # the first offending file, by sorted name
    assert predict_error([*common, f"input={twins}", "output_layout=nested"]) == (
        "output_layout='nested' is not one of flat, bids")


def test_unreadable_files_are_reported_together_or_skipped(checkpoints, tmp_path, caplog):
    paths, scans = checkpoints
    folder = tmp_path / "scans"
    save_as(nib.load(scans[0]), folder / "good.nii.gz")
    (folder / "text.nii").write_text("not an image")
    (folder / "cut.nii.gz").write_bytes(scans[1].read_bytes()[:2000])  # a truncated download
    common = [f"checkpoint={paths['segmentation']}", f"input={folder}", f"output_dir={tmp_path / 'o'}",
              "report_subjects=0"]
    with pytest.raises(InputError) as caught:
        predict_here(common)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"2 problem(s) in input={folder}:"
    assert lines[1].startswith("  - truncated or damaged") and lines[1].endswith(str(folder / "cut.nii.gz"))
    assert lines[2].startswith("  - not a NIfTI file") and lines[2].endswith(str(folder / "text.nii"))
    with caplog.at_level("WARNING", logger="brain3d.predict"):
        predict_here([*common, "data.on_error=skip"])
    assert [r["subject_id"] for r in csv.DictReader(open(tmp_path / "o" / "predictions.csv"))] == ["good"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 2 and str(folder / "cut.nii.gz") in skipped[0] and str(folder / "text.nii") in skipped[1]


def test_find_scans_reads_bids_anat_folders_only(tmp_path, checkpoints):
    _, scans = checkpoints
    root = tmp_path / "bids"
    files = bids_tree(scans, root)
    assert [(s.subject_id, s.path) for s in find_scans(str(root))] == sorted(files.items())
    assert [s.subject_id for s in find_scans(str(root / "sub-01"))] == ["sub-01_T1w"]
    assert [s.subject_id for s in find_scans(str(root / "sub-02" / "ses-1" / "anat"))] == ["sub-02_ses-1_T1w"]
