"""Segmentation validation metrics: lesion-wise detection (connected components) next to Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brain3d.evaluation import lesion_detection
from brain3d.tasks import single_task


def _logits(mask: np.ndarray) -> torch.Tensor:
    """(1, 1, D, H, W) logits that threshold to ``mask`` (+8 inside, -8 outside)."""
    return torch.from_numpy(np.where(mask, 8.0, -8.0).astype(np.float32))[None, None]


def test_validation_reports_lesion_f1_per_subject_and_pooled():
    task = single_task("segmentation")
    outputs = task.new_outputs()
    # subject a: two true lesions, one found, plus one false positive -> TP 1, FP 1, FN 1 -> F1 0.5
    true_a = np.zeros((16, 16, 16), bool)
    true_a[2:4, 2:4, 2:4] = True
    true_a[10:12, 10:12, 10:12] = True
    pred_a = np.zeros_like(true_a)
    pred_a[2:4, 2:4, 2:3] = True
    pred_a[6, 12, 2] = True
    # subject b: its one lesion found exactly -> F1 1; subject c: nothing true, nothing predicted -> F1 1
    true_b = np.zeros_like(true_a)
    true_b[5:8, 5:8, 5:8] = True
    empty = np.zeros_like(true_a)
    for pred, true, name in ((pred_a, true_a, "a"), (true_b, true_b, "b"), (empty, empty, "c")):
        task.collect(outputs, _logits(pred), torch.from_numpy(true.astype(np.float32))[None, None], None,
                     {"subject_id": [name]}, torch.zeros(1, 1, 16, 16, 16), None)
    metrics = task.metrics(task.parts(outputs))
    assert metrics["lesion_f1"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    # pooled: TP 2, FP 1, FN 1 over the three subjects -> 4 / 6
    assert metrics["lesion_f1_pooled"] == pytest.approx(4 / 6)
    assert lesion_detection(pred_a, true_a) == {"lesion_tp": 1, "lesion_fp": 1, "lesion_fn": 1, "lesion_f1": 0.5,
                                                "num_true_lesions": 2, "num_pred_lesions": 2}
    # the Dice is still the mean per-subject Dice (subject a: 2 * 4 overlapping voxels / (5 + 16))
    dice_a = 2 * 4 / (pred_a.sum() + true_a.sum())
    assert metrics["dice"] == pytest.approx((dice_a + 1.0 + 1.0) / 3, abs=1e-4)
