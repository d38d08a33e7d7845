"""Manifest reading, label mapping and the subject split."""

from __future__ import annotations

import numpy as np
import pytest

from brain3d.data.manifest import ManifestError, Subject, load_manifest, split_subjects
from brain3d.data.nifti import save_nifti


@pytest.fixture
def images(tmp_path):
    for i in range(4):
        save_nifti(np.ones((8, 8, 8), np.float32), np.eye(4), tmp_path / "img" / f"s{i}.nii.gz")
    return tmp_path


def test_bids_participants_tsv_with_string_labels(images):
    tsv = images / "participants.tsv"
    tsv.write_text("participant_id\timage\tsex\n"
                   + "".join(f"sub-{i}\timg/s{i}.nii.gz\t{'F' if i % 2 else 'M'}\n" for i in range(4)))
    manifest = load_manifest(tsv, "classification")
    assert manifest.id_col == "participant_id"
    assert manifest.class_names == ["F", "M"]  # sorted; the second is the positive class
    assert [s.target for s in manifest.subjects] == [1.0, 0.0, 1.0, 0.0]
    assert manifest.subjects[0].image == images / "img" / "s0.nii.gz"  # relative to the manifest's folder
    flipped = load_manifest(tsv, "classification", positive_label="F")
    assert flipped.class_names == ["M", "F"] and [s.target for s in flipped.subjects] == [0.0, 1.0, 0.0, 1.0]


def test_label_problems_are_reported(images):
    csv = images / "m.csv"
    csv.write_text("subject_id,image,sex\n" + "".join(f"s{i},img/s{i}.nii.gz,{lab}\n" for i, lab in enumerate("ABCA")))
    with pytest.raises(ManifestError, match=r"exactly two distinct labels.*\['A', 'B', 'C'\]"):
        load_manifest(csv, "classification")
    csv.write_text("subject_id,image,age\ns0,img/s0.nii.gz,old\ns0,img/s1.nii.gz,30\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(csv, "regression")
    assert "line 2 (s0), column 'age': 'old' is not a finite number" in str(err.value)  # line 1: the header
    assert "line 3 (s0), column 'subject_id': subject id 's0' is already used on line 2" in str(err.value)
    assert err.value.problems and len(err.value.problems) == 2


def test_empty_manifest_and_bad_split_value(images):
    csv = images / "m.csv"
    csv.write_text("subject_id,image,age\n")
    with pytest.raises(ManifestError, match="no rows"):
        load_manifest(csv, "regression")
    csv.write_text("subject_id,image,age,split\ns0,img/s0.nii.gz,30,test\n")
    with pytest.raises(ManifestError, match="'test' is not one of train, val"):
        load_manifest(csv, "regression")


def subjects(labels):
    return [Subject(f"s{i}", None, i + 1, float(t)) for i, t in enumerate(labels)]


def test_stratified_split_is_seeded_and_keeps_class_balance():
    subs = subjects([0] * 30 + [1] * 10)
    train, val = split_subjects(subs, 0.2, seed=3, stratify=True)
    assert sorted(s.target for s in val) == [0.0] * 6 + [1.0] * 2
    assert len(train) == 32 and not {s.subject_id for s in train} & {s.subject_id for s in val}
    again, val_again = split_subjects(subs, 0.2, seed=3, stratify=True)
    assert [s.subject_id for s in val_again] == [s.subject_id for s in val]
    _, other = split_subjects(subs, 0.2, seed=4, stratify=True)
    assert [s.subject_id for s in other] != [s.subject_id for s in val]


def test_split_column_is_respected():
    subs = subjects([0, 1, 0, 1])
    for s, split in zip(subs, ["train", "val", "train", "train"]):
        s.split = split
    train, val = split_subjects(subs, 0.5, seed=0, stratify=True)
    assert [s.subject_id for s in val] == ["s1"] and len(train) == 3


def test_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="val_fraction"):
        split_subjects(subjects([0, 1]), 1.5, seed=0, stratify=False)
    with pytest.raises(ValueError, match="both need at least one"):
        split_subjects(subjects([0]), 0.5, seed=0, stratify=False)
