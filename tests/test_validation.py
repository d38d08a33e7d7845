"""The extended manifest checks: NaN voxels, 4-D files, mask grids and values, groups across the split column,
on_error="skip", and the parallel header pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brain3d.data.manifest import ManifestError, _read_headers, load_manifest, read_header_info
from brain3d.data.nifti import NiftiReadError, save_nifti

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (8, 8, 8)


def image(path: Path, data=None, affine=AFFINE) -> str:
    save_nifti(np.ones(SHAPE, np.float32) if data is None else data, affine, path)
    return path.name


def mask(path: Path, values=(0, 1), affine=AFFINE, dtype=np.uint8) -> str:
    m = np.zeros(SHAPE, dtype)
    for k, v in enumerate(values):
        m[k] = v
    save_nifti(m, affine, path)
    return path.name


@pytest.fixture
def bad_manifest(tmp_path) -> Path:
    """Rows 1 and 8 are good; rows 2-7 each have one problem."""
    nan = np.ones(SHAPE, np.float32)
    nan[1, 2, 3] = np.nan
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0  # 2 mm along x
    rows = [
        ("s01", image(tmp_path / "s01.nii.gz"), mask(tmp_path / "s01_mask.nii.gz"), "", ""),
        ("s02", image(tmp_path / "s02.nii.gz", nan), mask(tmp_path / "s02_mask.nii.gz"), "", ""),
        ("s03", image(tmp_path / "s03.nii.gz", np.ones((*SHAPE, 3), np.float32)), mask(tmp_path / "s03_mask.nii.gz"),
         "", ""),
        ("s04", image(tmp_path / "s04.nii.gz"), mask(tmp_path / "s04_mask.nii.gz", affine=shifted), "", ""),
        ("s05", image(tmp_path / "s05.nii.gz"), mask(tmp_path / "s05_mask.nii.gz", values=(0, 1, 2)), "", ""),
        ("s06_ses-1", image(tmp_path / "s06a.nii.gz"), mask(tmp_path / "s06a_mask.nii.gz"), "train", "s06"),
        ("s06_ses-2", image(tmp_path / "s06b.nii.gz"), mask(tmp_path / "s06b_mask.nii.gz"), "val", "s06"),
        ("s08", image(tmp_path / "s08.nii.gz"), mask(tmp_path / "s08_mask.nii.gz"), "val", ""),
    ]
    path = tmp_path / "manifest.csv"
    path.write_text("subject_id,image,mask,split,group\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_every_new_problem_in_one_error_with_row_and_column(bad_manifest, tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(bad_manifest, "segmentation")
    problems = err.value.problems
    expected = [  # named by the file's line: the header is line 1, data row k is line k + 1
        f"line 3 (s02), column 'image': image has 1 NaN voxel(s) out of 512: {tmp_path / 's02.nii.gz'}",
        f"line 4 (s03), column 'image': {tmp_path / 's03.nii.gz'}: expected a 3-D volume, got a 4-D file with 3 "
        f"volumes (shape (8, 8, 8, 3))",
        "line 5 (s04), column 'mask': mask affine differs from image affine: the same voxel is 2 mm apart "
        "(data.affine_tolerance=0.001 mm)",
        "line 6 (s05), column 'mask': a binary segmentation mask must hold only 0 and 1, found 3 distinct values "
        "[0, 1, 2]",
        "line 7 (s06_ses-1), column 'split': group 's06' (column 'group') is in both train (lines 7) and val (lines 8)",
        "line 8 (s06_ses-2), column 'split': group 's06' (column 'group') is in both train (lines 7) and val (lines 8)",
    ]
    assert len(problems) == len(expected), problems
    for want, got in zip(expected, problems):
        assert got.startswith(want), (want, got)
    assert str(bad_manifest) in str(err.value)


def test_on_error_skip_keeps_the_good_subjects_and_lists_the_others(bad_manifest):
    manifest = load_manifest(bad_manifest, "segmentation", on_error="skip")
    assert [s.subject_id for s in manifest.subjects] == ["s01", "s08"]
    assert [(e["row"], e["line"], e["subject_id"]) for e in manifest.skipped] == [
        (2, 3, "s02"), (3, 4, "s03"), (4, 5, "s04"), (5, 6, "s05"), (6, 7, "s06_ses-1"), (7, 8, "s06_ses-2")]
    assert "NaN" in manifest.skipped[0]["problems"][0] and "3 volumes" in manifest.skipped[1]["problems"][0]
    assert all(len(e["problems"]) == len(e["reasons"]) == 1 for e in manifest.skipped)


def test_skipped_reasons_do_not_repeat_the_line_and_id(bad_manifest, tmp_path):
    """A skip warning ("skipped line 3 (s02): <reasons>") must not say the line and id twice."""
    skipped = load_manifest(bad_manifest, "segmentation", on_error="skip").skipped
    assert skipped[0]["reasons"] == [f"column 'image': image has 1 NaN voxel(s) out of 512: {tmp_path / 's02.nii.gz'}"]
    for e in skipped:
        for problem, reason in zip(e["problems"], e["reasons"]):
            assert problem == f"line {e['line']} ({e['subject_id']}), {reason}"
            assert reason.startswith("column ") and "line " not in reason.split(":")[0]
            assert f"({e['subject_id']})" not in reason


def test_skip_still_raises_for_manifest_problems_and_when_nothing_is_left(bad_manifest, tmp_path):
    with pytest.raises(ManifestError, match="column 'lesion' .* not found"):
        load_manifest(bad_manifest, "segmentation", mask_col="lesion", on_error="skip")
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,image,mask\ns02,s02.nii.gz,s02_mask.nii.gz\ns05,s05.nii.gz,s05_mask.nii.gz\n")
    with pytest.raises(ManifestError, match="every row has a problem"):
        load_manifest(bad, "segmentation", on_error="skip")
    with pytest.raises(ValueError, match="data.on_error='ignore'"):
        load_manifest(bad, "segmentation", on_error="ignore")


def test_checks_that_need_data_are_skipped_without_check_data(bad_manifest):
    with pytest.raises(ManifestError) as err:
        load_manifest(bad_manifest, "segmentation", check_data=False)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "line 4 (s03), column 'image'", "line 5 (s04), column 'mask'",
        "line 7 (s06_ses-1), column 'split'", "line 8 (s06_ses-2), column 'split'"]


def test_same_grid_in_another_orientation_and_a_singleton_4th_dim_are_fine(tmp_path):
    flipped = AFFINE.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 14.0  # x reversed on disk: the same voxel centres
    data = np.random.default_rng(0).random((*SHAPE, 1)).astype(np.float32)
    rows = [("a", image(tmp_path / "a.nii.gz", data), mask(tmp_path / "a_m.nii.gz", affine=flipped)),
            ("b", image(tmp_path / "b.nii.gz"), mask(tmp_path / "b_m.nii.gz", values=(0.0, 1.0), dtype=np.float32))]
    path = tmp_path / "m.csv"
    path.write_text("subject_id,image,mask\n" + "".join(",".join(r) + "\n" for r in rows))
    assert len(load_manifest(path, "segmentation").subjects) == 2
    assert len(load_manifest(path, "segmentation", affine_tolerance=0.0).subjects) == 2


def test_label_maps_and_group_that_is_the_target(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(f"subject_id,image,mask\na,{image(tmp_path / 'a.nii.gz')},{mask(tmp_path / 'am.nii.gz', (0, 3))}\n"
                    f"b,{image(tmp_path / 'b.nii.gz')},{mask(tmp_path / 'bm.nii.gz', (0, 0.5), dtype=np.float32)}\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path, "segmentation", mask_values="labels")
    assert err.value.problems == [f"line 3 (b), column 'mask': a label mask must hold non-negative integers, found 1 "
                                  f"other distinct values [0.5] in {tmp_path / 'bm.nii.gz'}"]
    path.write_text("subject_id,image,group\na,a.nii.gz,patient\nb,b.nii.gz,control\n")
    with pytest.raises(ManifestError, match="column 'group' is both the target"):
        load_manifest(path, "classification", target_col="group")
    manifest = load_manifest(path, "classification", target_col="group", group_col=None)
    assert [s.group for s in manifest.subjects] == [None, None]


def test_parallel_header_pass_over_many_files(tmp_path):
    """Exercises the threaded header pass (not timed)."""
    n = 200
    for i in range(n):
        image(tmp_path / f"s{i:03d}.nii.gz", np.full((4, 4, 4), i, np.float32))
    (tmp_path / "s150.nii.gz").write_bytes(b"not a nifti")
    path = tmp_path / "m.csv"
    path.write_text("subject_id,image,age\n" + "".join(f"s{i:03d},s{i:03d}.nii.gz,{20 + i % 50}\n" for i in range(n)))
    with pytest.raises(ManifestError) as err:
        load_manifest(path, "regression", check_data=False, num_threads=4)
    assert err.value.problems == [
        f"line 152 (s150), column 'image': not a NIfTI file (text starting 'not a nifti'): {tmp_path / 's150.nii.gz'}"]
    manifest = load_manifest(path, "regression", check_data=False, num_threads=4, on_error="skip")
    assert len(manifest.subjects) == n - 1 and (manifest.skipped[0]["row"], manifest.skipped[0]["line"]) == (151, 152)
    infos = _read_headers([tmp_path / f"s{i:03d}.nii.gz" for i in range(n)], num_threads=4)
    assert sum(isinstance(x, str) for x in infos) == 1 and infos[0].shape == (4, 4, 4)
    with pytest.raises(NiftiReadError):
        read_header_info(tmp_path / "missing.nii.gz")


def test_lines_are_the_files_lines_with_blank_lines_and_quoted_line_breaks(tmp_path):
    """Messages name the line an editor shows: blank lines and a quoted cell spanning lines are counted."""
    image(tmp_path / "a.nii.gz")
    (tmp_path / "notes.nii.gz").write_text("subject notes, not an image\n")
    path = tmp_path / "m.csv"
    path.write_text('subject_id,image,age,comment\n'  # line 1
                    'a,a.nii.gz,30,"two\nlines"\n'  # lines 2-3
                    '\n'  # line 4, blank
                    'b,missing.nii.gz,31,\n'  # line 5
                    ',a.nii.gz,32,\n'  # line 6: no id
                    'c,notes.nii.gz,33,\n'  # line 7
                    'a,a.nii.gz,x,\n'  # line 8
                    'd,a.nii.gz,34,,extra,cells,,\n')  # line 9: empty surplus cells are ignored
    with pytest.raises(ManifestError) as err:
        load_manifest(path, "regression")
    assert err.value.problems == [
        f"line 5 (b), column 'image': image file not found: {tmp_path / 'missing.nii.gz'}",
        "line 6, column 'subject_id': empty subject id",
        f"line 7 (c), column 'image': not a NIfTI file (text starting 'subject notes, not an image'): "
        f"{tmp_path / 'notes.nii.gz'}",
        "line 8 (a), column 'subject_id': subject id 'a' is already used on line 2",
        "line 8 (a), column 'age': 'x' is not a finite number",
        "line 9 (d), 2 cell(s) beyond the header's 4 columns: ['extra', 'cells'] (a value with the delimiter in it "
        "must be quoted)",
    ]
    skipped = load_manifest(path, "regression", on_error="skip").skipped
    assert [(e["row"], e["line"], e["subject_id"]) for e in skipped] == [
        (2, 5, "b"), (3, 6, ""), (4, 7, "c"), (5, 8, "a"), (6, 9, "d")]
    assert skipped[1]["reasons"] == ["column 'subject_id': empty subject id"]


def test_truncated_gzip_is_reported_as_truncated_not_as_not_nifti(tmp_path):
    image(tmp_path / "a.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32))
    blob = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])  # the header is intact: found by the data pass
    (tmp_path / "b.nii.gz").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(600))  # a PNG renamed .nii.gz
    path = tmp_path / "m.csv"
    path.write_text("subject_id,image,age\na,a.nii.gz,30\ncut,cut.nii.gz,31\nb,b.nii.gz,32\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(path, "regression")
    cut, png = err.value.problems
    assert cut.startswith("line 3 (cut), column 'image': truncated or damaged NIfTI file (EOFError: ")
    assert cut.endswith(f"): {tmp_path / 'cut.nii.gz'}") and "not a NIfTI" not in cut
    assert png == f"line 4 (b), column 'image': not a NIfTI file (a PNG image): {tmp_path / 'b.nii.gz'}"
