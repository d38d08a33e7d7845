"""``task.min_lesion_voxels``: predicted components under N voxels dropped from the mask, in validation (its
Dice and lesion-wise F1), in the checkpoint, in brain3d-predict (converted to the input's voxels) and in the
export sidecar; the errors for the settings it does not fit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from brain3d.checkpoint import load_checkpoint
from brain3d.data.synthetic import synthetic_cache_dir
from brain3d.errors import ConfigError
from brain3d.evaluation import remove_small_components, remove_small_label_components
from brain3d.export import head_entry
from brain3d.tasks import (
    MultiClassSegmentationTask,
    SegmentationTask,
    build_task_set,
    head_specs,
    task_set_from_checkpoint,
)

from tests.conftest import run_train, tiny_overrides
from tests.test_predict import predict_here, synthetic_rows, write_manifest


def three_components() -> np.ndarray:
    """A 10^3 mask with a 1-voxel, a 3-voxel (diagonal steps: one 26-connected component) and a 5-voxel
    component."""
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[1, 1, 1] = 1
    mask[5, 5, 5] = mask[6, 6, 6] = mask[7, 7, 7] = 1  # corners touch only: 26-connected
    mask[1, 6:9, 8] = 1
    mask[2, 6:8, 8] = 1
    return mask


def test_remove_small_components_keeps_exactly_the_components_of_at_least_n_voxels():
    mask = three_components()
    assert remove_small_components(mask, 0).sum() == 9  # 0 and 1 keep everything
    assert remove_small_components(mask, 1).sum() == 9
    kept = remove_small_components(mask, 2)
    assert kept.dtype == bool and kept.sum() == 8 and not kept[1, 1, 1]  # the single voxel goes
    assert remove_small_components(mask, 3).sum() == 8  # the diagonal chain is one component of 3
    kept = remove_small_components(mask, 4)
    assert kept.sum() == 5 and kept[1, 6:9, 8].all() and kept[2, 6:8, 8].all()
    assert remove_small_components(mask, 6).sum() == 0
    assert remove_small_components(np.zeros((4, 4, 4)), 5).sum() == 0
    with pytest.raises(ValueError, match="min_voxels must be an integer >= 0"):
        remove_small_components(mask, -1)


def test_a_label_map_loses_each_labels_small_components_to_the_background():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # label 1: 8 voxels
    labels[5, 5, 5] = 1  # label 1: 1 voxel
    labels[2, 0:2, 0] = 2  # label 2: 2 voxels touching label 1's block (another label: its own component)
    labels[7:9, 7:9, 7] = 2  # label 2: 4 voxels
    cleaned = remove_small_label_components(labels, 3)
    assert cleaned.dtype == np.uint8
    assert (cleaned == 1).sum() == 8 and cleaned[5, 5, 5] == 0
    assert (cleaned == 2).sum() == 4 and (cleaned[2, 0:2, 0] == 0).all()
    np.testing.assert_array_equal(remove_small_label_components(labels, 0), labels)
    # validation of a multi-class head scores the cleaned argmax
    task = MultiClassSegmentationTask("segmentation", num_classes=2)
    task.min_lesion_voxels = 3
    logits = torch.from_numpy(np.stack([labels == k for k in range(3)]).astype(np.float32) * 10)[None]
    target = torch.from_numpy(cleaned.astype(np.float32))[None, None]
    outputs = task.new_outputs()
    task.collect(outputs, logits, target, None, {"subject_id": ["s1"]}, target, None)
    assert task.metrics(task.parts(outputs))["dice"] == pytest.approx(1.0)


def validation_metrics(min_voxels: int, prob: np.ndarray, truth: np.ndarray) -> dict:
    task = SegmentationTask("segmentation")
    task.min_lesion_voxels = min_voxels
    outputs = task.new_outputs()
    logits = torch.logit(torch.from_numpy(prob).float().clamp(1e-4, 1 - 1e-4))[None, None]  # (1, 1, D, H, W)
    target = torch.from_numpy(truth).float()[None, None]
    task.collect(outputs, logits, target, None, {"subject_id": ["s1"]}, target, None)
    return task.metrics(task.parts(outputs))


def test_validation_scores_the_mask_without_its_speckles():
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[2:5, 2:5, 2:5] = 1  # one 27-voxel lesion
    prob = np.full(truth.shape, 0.1)
    prob[2:5, 2:5, 3:5] = 0.9  # 18 of its voxels found
    prob[9, 9, 9] = prob[9, 9, 10] = 0.8  # a 2-voxel false positive
    plain = validation_metrics(0, prob, truth)
    # by hand: TP 1, FP 1, FN 0 -> F1 2/3; Dice 2*18 / (20 + 27)
    assert plain["lesion_f1"] == pytest.approx(2 / 3)
    assert plain["dice"] == pytest.approx(36 / 47)
    cleaned = validation_metrics(3, prob, truth)
    assert cleaned["lesion_f1"] == pytest.approx(1.0)
    assert cleaned["dice"] == pytest.approx(36 / 45)
    # a threshold above the true lesion's predicted size drops it too: a missed lesion (F1 0)
    assert validation_metrics(19, prob, truth)["lesion_f1"] == pytest.approx(0.0)


def test_the_setting_in_model_voxels_becomes_the_same_volume_on_the_inputs_grid():
    task = SegmentationTask("segmentation")
    task.min_lesion_voxels = 4
    where = SimpleNamespace(info=SimpleNamespace(output_spacing_mm=(2.0, 2.0, 2.0)),
                            grid=SimpleNamespace(voxel_size_mm=(1.0, 1.0, 1.0)))
    assert task.native_min_voxels(where) == 32  # 4 voxels of 8 mm^3 = 32 voxels of 1 mm^3
    where.grid.voxel_size_mm = (2.0, 2.0, 4.0)
    assert task.native_min_voxels(where) == 2
    where.grid.voxel_size_mm = (4.0, 4.0, 4.0)
    assert task.native_min_voxels(where) == 1  # never 0 where it is set


def segmentation_cfg(**extra) -> dict:
    return {"name": "segmentation", "num_classes": 1, "head": {"_target_": "brain3d.models.heads.SegmentationHead",
                                                               "out_channels": 1}, **extra}


def test_the_task_carries_the_setting_into_its_checkpoint_state():
    tasks = build_task_set(segmentation_cfg(min_lesion_voxels=4), None, {"mask_col": "mask"})
    state = {"tasks": tasks.state()}
    assert state["tasks"]["heads"]["segmentation"]["min_lesion_voxels"] == 4
    assert next(iter(task_set_from_checkpoint(state))).min_lesion_voxels == 4
    assert next(iter(build_task_set(segmentation_cfg(), None, {}))).min_lesion_voxels == 0


@pytest.mark.parametrize("cfg, message", [
    (segmentation_cfg(min_lesion_voxels=-2), r"task.min_lesion_voxels=-2 must be a whole number >= 0"),
    (segmentation_cfg(min_lesion_voxels=2.5), r"task.min_lesion_voxels=2.5 must be a whole number >= 0"),
    ({"name": "multitask", "heads": {"sex": {"kind": "classification", "min_lesion_voxels": 4, "head": {
        "_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 1}}}},
     r"task.heads.sex.min_lesion_voxels=4 is for a segmentation head, not classification"),
])
def test_settings_it_does_not_fit_are_clear_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        head_specs(cfg)


def test_a_run_saves_the_setting_and_predict_and_export_apply_it(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_train(["task=segmentation", "task.min_lesion_voxels=3", *tiny_overrides(cache_dir),
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    checkpoint = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(checkpoint)
    assert state["tasks"]["heads"]["segmentation"]["min_lesion_voxels"] == 3
    entry = head_entry(next(iter(task_set_from_checkpoint(state))), 0.5)
    assert entry["min_lesion_voxels"] == 3 and "fewer than 3 voxels" in entry["apply"]

    manifest = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0) / "manifest.csv"
    rows = synthetic_rows(manifest, 2)
    subset = write_manifest(tmp_path / "two.csv", rows)

    def predicted(out: str, *extra: str) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
        predict_here([f"checkpoint={checkpoint}", f"data.manifest={subset}", f"output_dir={tmp_path / out}",
                      *extra])
        metrics = json.loads((tmp_path / out / "metrics.json").read_text())
        masks = [np.asanyarray(nib.load(tmp_path / out / f"{r['subject_id']}_mask.nii.gz").dataobj) for r in rows]
        probs = [np.asanyarray(nib.load(tmp_path / out / f"{r['subject_id']}_prob.nii.gz").dataobj) for r in rows]
        return metrics, masks, probs

    metrics, masks, probs = predicted("pred")  # the checkpoint's 3
    assert metrics["min_lesion_voxels"] == 3
    for mask, prob in zip(masks, probs):  # the probabilities stay as they are; the mask is theirs, cleaned
        expected = remove_small_components(prob > 0.5, 3)  # the synthetic grid is the model's (32^3, same voxels)
        np.testing.assert_array_equal(mask.astype(bool), expected)
    metrics, masks, _ = predicted("pred_all", "min_lesion_voxels=10000000")  # the command line wins
    assert metrics["min_lesion_voxels"] == 10000000
    assert all(m.sum() == 0 for m in masks)
