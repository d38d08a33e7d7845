"""Dataset layouts (BIDS, Medical Segmentation Decathlon) -> manifest CSVs, and splits grouped by participant."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from brain3d.data.manifest import ManifestError, Subject, load_manifest, split_subjects
from brain3d.data.nifti import save_nifti
from brain3d.data.sources import bids_manifest, msd_manifest, source_manifest

from tests.conftest import CONFIG_DIR

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (8, 8, 8)


def write_image(path: Path, value: float = 1.0) -> Path:
    return save_nifti(np.full(SHAPE, value, np.float32), AFFINE, path)


def write_mask(path: Path, values=(0, 1)) -> Path:
    mask = np.zeros(SHAPE, np.uint8)
    for k, v in enumerate(values):
        mask[k] = v
    return save_nifti(mask, AFFINE, path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def bids(tmp_path) -> Path:
    """sub-01, sub-02: sessions ses-1 and ses-2; sub-03: no sessions. Masks in derivatives/lesions."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text(
        "participant_id\tsex\tage\tgroup\n"
        "sub-01\tF\t25\tpatient\n"
        "sub-02\tM\tn/a\tcontrol\n"
        "sub-03\tF\t40\tpatient\n"
    )
    deriv = root / "derivatives" / "lesions"
    for sub in ("sub-01", "sub-02"):
        for ses in ("ses-1", "ses-2"):
            write_image(root / sub / ses / "anat" / f"{sub}_{ses}_T1w.nii.gz")
            write_mask(deriv / sub / ses / "anat" / f"{sub}_{ses}_label-lesion_mask.nii.gz")
        (root / sub / "ses-1" / "anat" / f"{sub}_ses-1_T1w.json").write_text("{}")  # sidecars are not images
    write_image(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz")
    write_mask(deriv / "sub-03" / "anat" / "sub-03_label-lesion_mask.nii.gz")
    write_image(root / "sub-03" / "anat" / "sub-03_FLAIR.nii.gz")  # another suffix: not read
    return root


def test_bids_rows_ids_groups_targets_and_masks(bids, tmp_path):
    out = bids_manifest(bids, tmp_path / "out" / "m.csv", mask_suffix="mask", mask_root="derivatives/lesions")
    rows = read_csv(out)
    assert [r["subject_id"] for r in rows] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-02_ses-2", "sub-03"]
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-01", "sub-02", "sub-02", "sub-03"]
    assert [r["session"] for r in rows] == ["ses-1", "ses-2", "ses-1", "ses-2", "n/a"]
    assert [r["sex"] for r in rows] == ["F", "F", "M", "M", "F"]  # copied to every session
    assert [r["age"] for r in rows] == ["25", "25", "n/a", "n/a", "40"]
    assert [r["group"] for r in rows] == ["patient", "patient", "control", "control", "patient"]  # a target column
    assert rows[1]["image"] == str(bids / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz")
    assert rows[1]["mask"] == str(bids / "derivatives/lesions/sub-01/ses-2/anat/sub-01_ses-2_label-lesion_mask.nii.gz")
    assert rows[4]["mask"].endswith("sub-03_label-lesion_mask.nii.gz")
    assert all(Path(r["image"]).is_absolute() and Path(r["mask"]).is_absolute() for r in rows)

    seg = load_manifest(out, "segmentation", group_col="participant_id")
    assert [s.group for s in seg.subjects] == ["sub-01", "sub-01", "sub-02", "sub-02", "sub-03"]
    assert all(s.mask is not None for s in seg.subjects)
    with pytest.raises(ManifestError) as err:  # "n/a" is a missing target
        load_manifest(out, "regression", group_col="participant_id")
    assert err.value.problems == ["line 4 (sub-02_ses-1), column 'age': empty target",
                                  "line 5 (sub-02_ses-2), column 'age': empty target"]


def test_bids_masks_next_to_images_and_missing_mask_left_empty(bids, tmp_path):
    write_mask(bids / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_mask.nii.gz")
    rows = read_csv(bids_manifest(bids, tmp_path / "m.csv", mask_suffix="mask"))
    assert rows[0]["mask"].endswith("sub-01/ses-1/anat/sub-01_ses-1_mask.nii.gz")
    assert [r["mask"] for r in rows[1:]] == [""] * 4  # reported per row by load_manifest for segmentation
    assert "mask" not in read_csv(bids_manifest(bids, tmp_path / "m2.csv"))[0]


def test_bids_sessions_tsv_overrides_per_session(bids, tmp_path):
    (bids / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t25.0\nses-2\t27.5\n")
    rows = read_csv(bids_manifest(bids, tmp_path / "m.csv"))
    assert [r["age"] for r in rows] == ["25.0", "27.5", "n/a", "n/a", "40"]


def test_bids_layout_problems_name_the_path(bids, tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        bids_manifest(tmp_path / "nowhere", tmp_path / "m.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty / 'participants.tsv'} not found"):
        bids_manifest(empty, tmp_path / "m.csv")
    with pytest.raises(ValueError, match=r"3 participant\(s\) .* have no image .*_FLAIR2.*sub-01, sub-02, sub-03"):
        bids_manifest(bids, tmp_path / "m.csv", suffix="FLAIR2")
    (bids / "sub-04").mkdir()
    with pytest.raises(ValueError, match=r"subject folder\(s\) not listed in .*participants.tsv: sub-04"):
        bids_manifest(bids, tmp_path / "m.csv")
    (bids / "sub-04").rmdir()
    (bids / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\nsub-02\tM\nsub-03\tF\nsub-05\tM\n")
    with pytest.raises(ValueError, match=r"1 participant\(s\) .* have no image .*: sub-05"):
        bids_manifest(bids, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()  # nothing half-written



@pytest.fixture
def bids_no_tsv(tmp_path) -> Path:
    """A BIDS tree without participants.tsv: sub-01, sub-02 (no sessions), lesion masks in derivatives/lesions."""
    root = tmp_path / "bids_no_tsv"
    for sub in ("sub-02", "sub-01"):
        write_image(root / sub / "anat" / f"{sub}_T1w.nii.gz")
        write_mask(root / "derivatives" / "lesions" / sub / "anat" / f"{sub}_label-lesion_mask.nii.gz")
    return root


def data_cfg(source: str):
    """The ``data`` config of ``data=<source>`` as a run composes it (with configs/data/base/common.yaml's keys)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={source}"]).data
    OmegaConf.set_struct(cfg, False)
    return cfg


def bids_cfg(root: Path, cache: Path, **values):
    cfg = data_cfg("bids")
    cfg.root, cfg.cache_dir, cfg.mask_suffix, cfg.mask_root = str(root), str(cache), "mask", "derivatives/lesions"
    for key, value in values.items():
        cfg[key] = value
    return cfg


def test_bids_without_participants_tsv_for_segmentation(bids_no_tsv, tmp_path):
    cfg = bids_cfg(bids_no_tsv, tmp_path / "cache")
    out = source_manifest(cfg, task="segmentation")
    rows = read_csv(out)
    assert list(rows[0]) == ["subject_id", "participant_id", "session", "image", "mask"]  # no target columns
    assert [r["subject_id"] for r in rows] == ["sub-01", "sub-02"]  # the sub-* folders, in name order
    assert rows[1]["mask"] == str(bids_no_tsv / "derivatives/lesions/sub-02/anat/sub-02_label-lesion_mask.nii.gz")
    manifest = load_manifest(out, "segmentation", group_col=cfg.group_col)
    assert [s.group for s in manifest.subjects] == ["sub-01", "sub-02"] and all(s.mask for s in manifest.subjects)
    # prediction reads no target: any task goes without participants.tsv
    predict = load_manifest(source_manifest(cfg, task="classification", require_targets=False), "classification",
                            require_targets=False)
    assert len(predict.subjects) == 2


@pytest.mark.parametrize("task,target_col,column", [("classification", None, "sex"), ("regression", "score", "score")])
def test_bids_without_participants_tsv_needs_it_for_a_target(bids_no_tsv, tmp_path, task, target_col, column):
    cfg = bids_cfg(bids_no_tsv, tmp_path / "cache", target_col=target_col)
    tsv = bids_no_tsv / "participants.tsv"
    with pytest.raises(ValueError, match=rf"{tsv} not found: this task needs the target column '{column}'"):
        source_manifest(cfg, task=task)
    with pytest.raises(ValueError, match=f"{tsv} not found"):  # no task given: required, as before
        source_manifest(cfg)
    assert not (tmp_path / "cache" / "manifests").exists() or not list((tmp_path / "cache" / "manifests").iterdir())


def test_bids_without_participants_tsv_layout_problems(bids_no_tsv, tmp_path):
    (bids_no_tsv / "sub-03" / "anat").mkdir(parents=True)  # a folder without a T1w
    with pytest.raises(ValueError, match=r"1 participant\(s\) of .*no participants.tsv.* have no image .*: sub-03 "
                                         r"\(remove those folders"):
        bids_manifest(bids_no_tsv, tmp_path / "m.csv", require_participants=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no participants.tsv and no sub-\\* folder"):
        bids_manifest(empty, tmp_path / "m.csv", require_participants=False)
    (bids_no_tsv / "sub-03").rename(tmp_path / "sub-03")
    (bids_no_tsv / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\n")  # present: it is read
    with pytest.raises(ValueError, match=r"subject folder\(s\) not listed in .*participants.tsv: sub-02"):
        bids_manifest(bids_no_tsv, tmp_path / "m.csv", require_participants=False)

def grouped(n_groups: int, per_group: int, labels=None) -> list[Subject]:
    subs = []
    for g in range(n_groups):
        for k in range(per_group):
            target = float(labels[g]) if labels is not None else 0.0
            subs.append(Subject(f"sub-{g:02d}_ses-{k}", None, len(subs) + 1, target, group=f"sub-{g:02d}"))
    return subs


def sides(train, val) -> tuple[set[str], set[str]]:
    return {s.group for s in train}, {s.group for s in val}


def test_split_keeps_sessions_of_a_participant_together():
    subs = grouped(12, 2, labels=[0, 1] * 6)
    for seed in range(5):
        train, val = split_subjects(subs, 0.3, seed=seed, stratify=True)
        tr, va = sides(train, val)
        assert not tr & va and len(va) == 4 and len(val) == 8  # round(6 * 0.3) participants of each class
        assert sorted(s.target for s in val) == [0.0] * 4 + [1.0] * 4  # stratified by the group's label
    folds = [split_subjects(subs, 0.2, seed=0, stratify=True, num_folds=4, fold=k) for k in range(4)]
    for train, val in folds:
        tr, va = sides(train, val)
        assert not tr & va and len(va) == 3 and len(train) + len(val) == 24
    assert sorted(g for _, val in folds for g in sides([], val)[1]) == sorted({s.group for s in subs})


def test_split_column_moves_the_whole_group_and_refuses_a_straddling_one():
    subs = grouped(6, 2)
    subs[0].split = "val"  # sub-00_ses-0 fixed: sub-00_ses-1 follows it
    train, val = split_subjects(subs, 0.2, seed=0, stratify=False)
    assert {"sub-00_ses-0", "sub-00_ses-1"} <= {s.subject_id for s in val}
    assert not sides(train, val)[0] & sides(train, val)[1]
    subs[1].split = "train"
    with pytest.raises(ValueError,
                       match=r"group 'sub-00' has rows marked both train and val \(rows 1: val, 2: train\)"):
        split_subjects(subs, 0.2, seed=0, stratify=False)


def test_bids_manifest_splits_by_participant(bids, tmp_path):
    out = bids_manifest(bids, tmp_path / "m.csv")
    manifest = load_manifest(out, "classification", group_col="participant_id")
    for seed in range(4):
        train, val = split_subjects(manifest.subjects, 0.34, seed=seed, stratify=True)
        assert not sides(train, val)[0] & sides(train, val)[1]
        for k in range(3):
            train, val = split_subjects(manifest.subjects, 0.34, seed=seed, stratify=True, num_folds=3, fold=k)
            assert not sides(train, val)[0] & sides(train, val)[1] and len(sides(train, val)[1]) == 1


@pytest.fixture
def msd(tmp_path) -> Path:
    root = tmp_path / "Task04_Hippocampus"
    training = []
    for i in range(3):
        name = f"hippocampus_{i:03d}.nii.gz"
        write_image(root / "imagesTr" / name)
        write_mask(root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": 3, "training": training, "test": ["./imagesTs/hippocampus_100.nii.gz"],
    }))
    return root


def test_msd_manifest_absolute_paths_sidecar_and_loading(msd, tmp_path):
    out = msd_manifest(msd, tmp_path / "manifests" / "msd.csv")
    rows = read_csv(out)
    assert [r["subject_id"] for r in rows] == ["hippocampus_000", "hippocampus_001", "hippocampus_002"]
    assert rows[0]["image"] == str(msd / "imagesTr" / "hippocampus_000.nii.gz")  # "./" normalised away
    assert rows[2]["mask"] == str(msd / "labelsTr" / "hippocampus_002.nii.gz")
    sidecar = json.loads((tmp_path / "manifests" / "msd.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert sidecar["label_threshold"] == 0.5
    manifest = load_manifest(out, "segmentation")
    assert [s.mask.name for s in manifest.subjects] == [f"hippocampus_{i:03d}.nii.gz" for i in range(3)]

    write_mask(msd / "labelsTr" / "hippocampus_001.nii.gz", values=(0, 1, 2))  # a real MSD label map
    with pytest.raises(ManifestError, match=r"line 3 \(hippocampus_001\), column 'mask': .*values \[0, 1, 2\]"):
        load_manifest(out, "segmentation")
    assert len(load_manifest(out, "segmentation", mask_values="labels").subjects) == 3  # foreground = label > 0


def test_msd_layout_problems(msd, tmp_path):
    with pytest.raises(ValueError, match="only|not supported"):
        msd_manifest(msd, tmp_path / "m.csv", label_threshold=1.5)
    with pytest.raises(ValueError, match="dataset.json not found"):
        msd_manifest(tmp_path, tmp_path / "m.csv")
    (msd / "dataset.json").write_text(json.dumps({"name": "x", "training": []}))
    with pytest.raises(ValueError, match='no "training" list'):
        msd_manifest(msd, tmp_path / "m.csv")


def test_source_manifest_writes_to_the_cache_by_hash(bids, msd, tmp_path):
    cfg = data_cfg("bids")
    cfg.root, cfg.cache_dir = str(bids), str(tmp_path / "cache")
    first = source_manifest(cfg)
    assert first.parent == tmp_path / "cache" / "manifests" and first.suffix == ".csv"
    assert source_manifest(cfg) == first
    cfg.mask_suffix, cfg.mask_root = "mask", "derivatives/lesions"
    with_masks = source_manifest(cfg)
    assert with_masks != first and read_csv(with_masks)[0]["mask"]
    manifest = load_manifest(with_masks, "segmentation", group_col=cfg.group_col)
    assert manifest.subjects[0].group == "sub-01"

    msd_cfg = data_cfg("msd")
    msd_cfg.root, msd_cfg.cache_dir = str(msd), str(tmp_path / "cache")
    out = source_manifest(msd_cfg)
    assert out.with_suffix(".json").is_file() and len(read_csv(out)) == 3
    load_manifest(out, "segmentation", mask_values=msd_cfg.mask_values, group_col=msd_cfg.group_col,
                  on_error=msd_cfg.on_error, affine_tolerance=msd_cfg.affine_tolerance)

    msd_cfg.root = None
    with pytest.raises(ValueError, match="data=msd needs data.root=PATH"):
        source_manifest(msd_cfg)
    with pytest.raises(ValueError, match="data.source='nifti'"):
        source_manifest({"source": "nifti", "root": str(bids)})
