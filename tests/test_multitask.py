"""task=multitask: several heads on one backbone, losses masked for missing labels, per-head metrics, predict."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brain3d.data.dataset import VolumeDataset
from brain3d.data.manifest import load_manifest
from brain3d.data.synthetic import make_synthetic_dataset
from brain3d.losses import BCELoss, DiceLoss, L1Loss
from brain3d.tasks import (
    ClassificationTask,
    RegressionTask,
    SegmentationTask,
    TaskSet,
    build_task_set,
    head_specs,
)

from tests.conftest import read_summary, run_train, tiny_overrides
from tests.test_predict import run_predict

HEADS = [("sex", "classification", "sex"), ("age", "regression", "age"), ("lesion", "segmentation", "mask")]
HEADS_NAMES = [name for name, _, _ in HEADS]


def test_each_heads_loss_leaves_out_the_subjects_without_its_label():
    """Hand computation: BCE over the labelled samples 0 and 2 only, L1 of the standardised ages of 1 and 2,
    a head with no label in the batch adds exactly 0 (and gives its parameters a zero gradient)."""
    age = RegressionTask("age", loss_fn=L1Loss(), weight=0.5)
    age.target_mean, age.target_std = 50.0, 10.0
    tasks = TaskSet([ClassificationTask("sex", loss_fn=BCELoss(), weight=2.0), age,
                     SegmentationTask("lesion", loss_fn=DiceLoss())], multi=True)
    sex_logits = torch.tensor([[0.5], [3.0], [-1.0]], requires_grad=True)
    age_out = torch.tensor([[0.2], [1.0], [-0.5]], requires_grad=True)
    lesion_logits = torch.randn(3, 1, 4, 4, 4, requires_grad=True)
    targets = {"sex": torch.tensor([[1.0], [0.0], [0.0]]), "age": torch.tensor([[99.0], [62.0], [40.0]]),
               "lesion": torch.zeros(3, 1, 4, 4, 4)}
    labelled = {"sex": torch.tensor([True, False, True]), "age": torch.tensor([False, True, True]),
                "lesion": torch.tensor([False, False, False])}
    total, per_head = tasks.loss({"sex": sex_logits, "age": age_out, "lesion": lesion_logits}, targets, labelled)

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected_sex = (bce(0.5, 1.0) + bce(-1.0, 0.0)) / 2  # sample 1 (logit 3.0, unlabelled) left out
    expected_age = (abs(1.0 - (62 - 50) / 10) + abs(-0.5 - (40 - 50) / 10)) / 2  # sample 0 (age 99) left out
    assert per_head["sex"].item() == pytest.approx(expected_sex, rel=1e-6)
    assert per_head["age"].item() == pytest.approx(expected_age, rel=1e-6)
    assert per_head["lesion"].item() == 0.0
    assert total.item() == pytest.approx(2.0 * expected_sex + 0.5 * expected_age, rel=1e-6)
    total.backward()
    assert sex_logits.grad[1].item() == 0.0 and age_out.grad[0].item() == 0.0  # unlabelled: no gradient
    assert torch.count_nonzero(lesion_logits.grad) == 0
    assert sex_logits.grad[0].item() != 0.0 and age_out.grad[2].item() != 0.0


def test_a_fully_labelled_batch_gives_the_single_task_loss():
    tasks = TaskSet([RegressionTask("age", loss_fn=L1Loss())], multi=True)
    out, target = torch.randn(4, 1), torch.randn(4, 1)
    total, _ = tasks.loss({"age": out}, {"age": target}, {"age": torch.ones(4, dtype=torch.bool)})
    assert total.item() == pytest.approx(L1Loss()(out, target).item())


def _manifest_with_missing_labels(tmp_path: Path, num_subjects: int = 12, shape=(32, 32, 32),
                                  fraction: float = 0.3) -> tuple[Path, list[dict]]:
    """The synthetic data's manifest with ``fraction`` of the ages and of the masks removed (different rows)."""
    source = make_synthetic_dataset(tmp_path / "synthetic", num_subjects, shape, seed=0)
    with open(source) as f:
        rows = list(csv.DictReader(f))
    n = int(round(fraction * len(rows)))
    for r in rows[:n]:
        r["age"] = ""
    for r in rows[n:2 * n]:
        r["mask"] = ""
    for r in rows:  # absolute paths: the copy lives in another folder
        for col in ("image", "mask"):
            if r[col]:
                r[col] = str((source.parent / r[col]).resolve())
    out = tmp_path / "missing_labels.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out, rows


def test_manifest_reads_every_heads_label_and_an_empty_cell_is_no_problem(tmp_path):
    path, rows = _manifest_with_missing_labels(tmp_path)
    manifest = load_manifest(path, "multitask", heads=HEADS, check_data=False)
    assert len(manifest.subjects) == len(rows)
    by_id = {s.subject_id: s for s in manifest.subjects}
    for r in rows:
        s = by_id[r["subject_id"]]
        assert s.labels["age"] == (float(r["age"]) if r["age"] else None)
        assert (s.labels["lesion"] is None) == (r["mask"] == "") and s.mask == s.labels["lesion"]
        assert s.labels["sex"] == float(manifest.head_class_names["sex"].index(r["sex"]))
    # a value that is there is still checked, naming line and column; a missing column is refused
    rows[5]["age"] = "old"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c != "sex"])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "sex"} for r in rows)
    with pytest.raises(ValueError) as err:
        load_manifest(bad, "multitask", heads=HEADS, check_data=False)
    assert "column 'sex' (task.heads.sex.column) not found" in str(err.value)
    with pytest.raises(ValueError, match=r"line 7 \(sub-0005\), column 'age': 'old' is not a finite number"):
        load_manifest(bad, "multitask", heads=HEADS[1:], check_data=False)


def test_dataset_items_carry_each_heads_target_and_labelled_flag(tmp_path):
    path, rows = _manifest_with_missing_labels(tmp_path)
    manifest = load_manifest(path, "multitask", heads=HEADS, check_data=False)
    dataset = VolumeDataset(manifest.subjects, "multitask", {"mode": "resize", "shape": [32, 32, 32]},
                            heads=[(n, k) for n, k, _ in HEADS])
    no_age, no_mask = dataset[0], dataset[4]  # rows 0-3 lack the age, rows 4-7 the mask
    assert no_age["labelled"]["age"].item() == 0.0 and no_age["labelled"]["lesion"].item() == 1.0
    assert no_mask["labelled"]["lesion"].item() == 0.0 and no_mask["labelled"]["age"].item() == 1.0
    assert no_mask["target"]["lesion"].shape == (1, 32, 32, 32) and no_mask["target"]["lesion"].sum() == 0
    assert no_age["target"]["lesion"].sum() > 0  # the phantoms have lesions
    assert no_mask["target"]["age"].item() == pytest.approx(float(rows[4]["age"]))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(3, 6)])
    assert batch["labelled"]["age"].reshape(-1).tolist() == [0.0, 1.0, 1.0]


def test_heads_are_a_config_change_and_bad_heads_are_named():
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "task" / "multitask.yaml")
    cfg.heads.lesion.head.norm = "batch"
    assert list(head_specs(cfg)) == ["sex", "age", "lesion"]
    cfg.heads.age = None
    assert list(build_task_set(cfg).names) == ["sex", "lesion"]
    cfg.heads.bmi = {"kind": "regression", "column": "bmi", "loss": "mse", "weight": 0.5,
                     "head": dict(cfg.heads.sex.head)}
    tasks = build_task_set(cfg)
    assert tasks["bmi"].column == "bmi" and tasks["bmi"].weight == 0.5 and tasks["bmi"].kind == "regression"
    cfg.heads.bmi.loss = "dice"
    with pytest.raises(ValueError, match="task.heads.bmi.loss=dice does not fit a regression head"):
        build_task_set(cfg)
    cfg.heads.bmi.kind = "ordinal"
    with pytest.raises(ValueError, match="task.heads.bmi.kind='ordinal' is not one of classification"):
        build_task_set(cfg)


@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory, cache_dir):
    """A tiny multi-task run on a manifest with 30% of the ages and 30% of the masks removed."""
    tmp = tmp_path_factory.mktemp("multitask")
    manifest, rows = _manifest_with_missing_labels(tmp)
    run_dir = tmp / "run"
    run_train(["task=multitask", *tiny_overrides(cache_dir), "data=nifti", f"data.manifest={manifest}",
               "data.shape=[32,32,32]", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"], cwd=tmp)
    return run_dir, manifest, rows


def test_a_multitask_run_reports_each_head(multitask_run):
    run_dir, _, rows = multitask_run
    summary = read_summary(run_dir)
    assert summary["task"] == "multitask" and set(summary["heads"]) == {"sex", "age", "lesion"}
    split = {r["subject_id"]: r["split"] for r in csv.DictReader(open(run_dir / "split.csv"))}
    train_rows = [r for r in rows if split[r["subject_id"]] == "train"]
    assert summary["heads"]["age"]["num_train_labelled"] == sum(1 for r in train_rows if r["age"])
    assert summary["heads"]["lesion"]["num_train_labelled"] == sum(1 for r in train_rows if r["mask"])
    assert set(summary["heads"]["sex"]["final_val"]) == {"auc", "accuracy", "balanced_accuracy"}
    assert set(summary["heads"]["lesion"]["final_val"]) == {"dice", "iou", "lesion_f1", "lesion_f1_pooled"}
    val_ages = [float(r["age"]) for r in rows if split[r["subject_id"]] == "val" and r["age"]]
    assert summary["heads"]["age"]["baseline_val_mae"] == pytest.approx(
        float(np.mean(np.abs(np.array(val_ages) - summary["heads"]["age"]["target_mean"]))))
    header = next(csv.reader(open(run_dir / "metrics.csv")))
    assert {"val_sex_auc", "val_age_mae", "val_lesion_dice", "val_loss"} <= set(header)
    # each head's train loss: the mean over its labelled training samples
    assert {"train_sex_loss", "train_age_loss", "train_lesion_loss", "train_loss"} <= set(header)
    last = summary["history"][-1]
    assert all(math.isfinite(last[f"train_{head}_loss"]) and last[f"train_{head}_loss"] > 0 for head in HEADS_NAMES)
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/sex/auc", "val/age/mae", "val/lesion/dice", "val/loss", "train/loss", "train/age/loss"} <= tags
    assert [e.step for e in events.Scalars("val/age/mae")] == [1, 2]


def test_predict_from_a_multitask_checkpoint_writes_every_head(multitask_run, tmp_path):
    run_dir, manifest, rows = multitask_run
    out = tmp_path / "pred"
    run_predict([f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"data.manifest={manifest}",
                 f"output_dir={out}", "progress=false", "device=cpu"], cwd=tmp_path)
    predicted = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(predicted) == len(rows)
    expected = {"sex_probability", "sex_predicted_class", "age_prediction", "lesion_predicted_volume_ml"}
    assert expected <= set(predicted[0])
    by_id = {r["subject_id"]: r for r in predicted}
    for r in rows:  # a subject without an age is predicted, its age not evaluated
        assert (by_id[r["subject_id"]]["age_target"] == "") == (r["age"] == "")
    image = nib.load(str(Path(rows[0]["image"])))
    written = nib.load(str(out / f"{rows[0]['subject_id']}_lesion_mask.nii.gz"))
    assert written.shape == image.shape and np.allclose(written.affine, image.affine)
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "multitask" and set(metrics["heads"]) == {"sex", "age", "lesion"}
    assert metrics["heads"]["age"]["n"] == sum(1 for r in rows if r["age"])
    assert metrics["heads"]["lesion"]["n"] == sum(1 for r in rows if r["mask"])
    assert metrics["heads"]["sex"]["n"] == len(rows)


def test_each_head_starts_as_it_would_alone():
    """Heads are initialised from the random state the backbone left: a multi-task model's lesion head has the
    single-task segmentation head's weights, and adding a head changes no other head's."""
    from brain3d.models.model import build_model

    backbone = {"_target_": "brain3d.models.backbones.PlainBackbone", "width": 0.125}
    seg = {"_target_": "brain3d.models.heads.SegmentationHead", "out_channels": 1}
    pooled = {"_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 1}
    torch.manual_seed(3)
    single = build_model(backbone, seg, head_name="segmentation")
    torch.manual_seed(3)
    multi = build_model(backbone, {"sex": pooled, "age": pooled, "lesion": seg})
    torch.manual_seed(3)
    fewer = build_model(backbone, {"age": pooled, "lesion": seg})
    for name, value in single.heads["segmentation"].state_dict().items():
        assert torch.equal(value, multi.heads["lesion"].state_dict()[name])
    for name, value in fewer.state_dict().items():
        assert torch.equal(value, multi.state_dict()[name])


def test_each_heads_train_loss_is_its_mean_over_labelled_samples_and_survives_a_checkpoint():
    from brain3d.engine import EpochProgress

    progress = EpochProgress()
    # step 0: age loss 0.5 over 3 labelled samples; step 1: 2.0 over 1; step 2: no labelled sample (loss 0)
    for step, (age_loss, count) in enumerate([(0.5, 3), (2.0, 1), (0.0, 0)]):
        progress.add_loss(step, ["a"] * 4, torch.tensor(1.0 + step), 4,
                          {"age": (torch.tensor(age_loss), torch.tensor(count))})
    state = EpochProgress.from_dict(progress.to_dict())  # a mid-epoch checkpoint and its resume
    assert state.loss_sum == pytest.approx(4 * (1.0 + 2.0 + 3.0))
    total, labelled = state.head_sums["age"]
    assert labelled == 4 and total / labelled == pytest.approx((0.5 * 3 + 2.0 * 1) / 4)
