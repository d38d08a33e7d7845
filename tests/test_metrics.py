"""Tests for brain3d.metrics: values against hand computations and reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brain3d.metrics import (
    accuracy,
    balanced_accuracy,
    classification_metrics,
    dice_per_sample,
    iou_per_sample,
    mae,
    pearson_r,
    regression_metrics,
    rmse,
    roc_auc,
    segmentation_metrics,
)

# ----------------------------------------------------------------------------- ROC AUC


def test_auc_known_value():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered correctly
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auc_accepts_tensors_and_column_shapes():
    scores = torch.tensor([[0.1], [0.4], [0.35], [0.8]])
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert roc_auc(scores.to(torch.bfloat16), labels.bool()) == pytest.approx(0.75)
    assert isinstance(roc_auc(scores, labels), float)


def test_auc_ties_count_half():
    # pos {0.5, 0.9} vs neg {0.5, 0.2}: pairs 0.5/0.5 -> 0.5, the other three -> 1
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [0, 1, 0, 1]) == pytest.approx(3.5 / 4)
    assert roc_auc([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 1]) == pytest.approx(0.5)


def test_auc_perfect_inverted_single_class():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(roc_auc([0.1, 0.2, 0.3], [0, 0, 0]))


def test_auc_matches_mann_whitney_on_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(20, 200))
        labels = rng.integers(0, 2, size=n)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(size=n) + 0.7 * labels, 1)  # rounding creates ties
        pos, neg = scores[labels == 1], scores[labels == 0]
        u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
        assert roc_auc(scores, labels) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_auc_invalid_inputs():
    with pytest.raises(ValueError, match=r"labels must be binary.*\[2\.0\]"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"same number of elements, got 3 and 2"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"scores must contain only finite values"):
        roc_auc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match=r"scores must not be empty"):
        roc_auc([], [])


# ----------------------------------------------------------------------------- accuracy

# 2 positives, 8 negatives. Positives: 0.9 (TP), 0.4 (FN). Negatives: 0.6 (FP), 7 x 0.1 (TN).
IMB_PROBS = [0.9, 0.4, 0.6] + [0.1] * 7
IMB_LABELS = [1, 1, 0] + [0] * 7


def test_accuracy_and_balanced_accuracy_imbalanced():
    assert accuracy(IMB_PROBS, IMB_LABELS) == pytest.approx(8 / 10)
    # sensitivity 1/2, specificity 7/8
    assert balanced_accuracy(IMB_PROBS, IMB_LABELS) == pytest.approx((0.5 + 7 / 8) / 2)


def test_accuracy_custom_threshold():
    # threshold 0.35: both positives found, the 0.6 negative still a false positive
    assert accuracy(IMB_PROBS, IMB_LABELS, threshold=0.35) == pytest.approx(9 / 10)
    assert balanced_accuracy(IMB_PROBS, IMB_LABELS, threshold=0.35) == pytest.approx((1.0 + 7 / 8) / 2)


def test_accuracy_threshold_is_strict():
    # a probability equal to the threshold is predicted negative
    assert accuracy([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert balanced_accuracy([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_balanced_accuracy_single_class_is_recall_of_present_class():
    assert balanced_accuracy([0.1, 0.7, 0.2], [0, 0, 0]) == pytest.approx(2 / 3)
    assert balanced_accuracy([0.9, 0.7, 0.2], [1, 1, 1]) == pytest.approx(2 / 3)


def test_accuracy_tensor_inputs():
    probs = torch.tensor(IMB_PROBS).reshape(-1, 1)
    labels = torch.tensor(IMB_LABELS, dtype=torch.float32).reshape(-1, 1)
    assert accuracy(probs, labels) == pytest.approx(0.8)
    assert balanced_accuracy(probs, labels) == pytest.approx(0.6875)


def test_accuracy_invalid_threshold():
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        accuracy([0.1], [0], threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be a float.*got '0.5'"):
        balanced_accuracy([0.1], [0], threshold="0.5")


# ----------------------------------------------------------------------------- regression


def test_mae_rmse_hand_values():
    pred = [1.0, 2.0, 3.0, 4.0]
    target = [2.0, 2.0, 5.0, 0.0]  # errors -1, 0, -2, 4
    assert mae(pred, target) == pytest.approx(7 / 4)
    assert rmse(pred, target) == pytest.approx(math.sqrt(21 / 4))
    assert mae(torch.tensor(pred).reshape(-1, 1), np.array(target)) == pytest.approx(7 / 4)


def test_pearson_hand_value():
    # centred x = [-1.5, -0.5, 0.5, 1.5], y = [-3, -1, 0, 4]: sxy = 11, sxx = 5, syy = 26
    r = pearson_r([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0])
    assert r == pytest.approx(11 / math.sqrt(5 * 26))
    assert pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_matches_numpy_corrcoef():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson_r(torch.from_numpy(x), y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_pearson_zero_variance_is_nan():
    assert math.isnan(pearson_r([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson_r([1.0, 2.0, 3.0], [0.1, 0.1, 0.1]))
    assert math.isnan(pearson_r([1.0], [2.0]))


def test_regression_invalid_inputs():
    with pytest.raises(ValueError, match=r"pred and target must have the same number of elements, got 2 and 3"):
        mae([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"target must contain only finite values"):
        rmse([1.0, 2.0], [1.0, float("inf")])


# ----------------------------------------------------------------------------- Dice / IoU per sample


def _hand_masks():
    pred = np.zeros((4, 1, 2, 2, 2), dtype=bool)
    target = np.zeros((4, 1, 2, 2, 2), dtype=bool)
    # sample 0: A = {0, 1}, B = {1, 2, 3}: |A∩B| = 1 -> Dice 2/5, IoU 1/4
    pred[0].reshape(-1)[[0, 1]] = True
    target[0].reshape(-1)[[1, 2, 3]] = True
    # sample 1: both empty
    # sample 2: prediction empty, target non-empty -> 0
    target[2].reshape(-1)[[4, 5]] = True
    # sample 3: identical -> 1
    pred[3].reshape(-1)[[6, 7]] = True
    target[3].reshape(-1)[[6, 7]] = True
    return pred, target


def test_dice_and_iou_per_sample_hand_values_numpy():
    pred, target = _hand_masks()
    dice = dice_per_sample(pred, target)
    iou = iou_per_sample(pred, target)
    assert isinstance(dice, np.ndarray) and dice.shape == (4,)
    np.testing.assert_allclose(dice, [0.4, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(iou, [0.25, 1.0, 0.0, 1.0])


def test_dice_and_iou_per_sample_torch_and_float_masks():
    pred, target = _hand_masks()
    dice = dice_per_sample(torch.from_numpy(pred), torch.from_numpy(target).float())
    assert isinstance(dice, torch.Tensor) and dice.shape == (4,)
    assert dice.tolist() == pytest.approx([0.4, 1.0, 0.0, 1.0])
    iou = iou_per_sample(torch.from_numpy(pred).long(), target.astype(np.uint8))
    assert iou.tolist() == pytest.approx([0.25, 1.0, 0.0, 1.0])


def test_dice_from_logits_threshold():
    logits = torch.tensor([2.0, -1.0, 0.3, -3.0]).reshape(1, 1, 2, 2, 1)
    mask = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 2, 2, 1)
    # prediction {0, 2}, target {0, 1}: Dice 2*1/4
    assert dice_per_sample(torch.sigmoid(logits) > 0.5, mask).tolist() == pytest.approx([0.5])


def test_empty_value_option():
    pred, target = _hand_masks()
    np.testing.assert_allclose(dice_per_sample(pred, target, empty_value=0.0), [0.4, 0.0, 0.0, 1.0])
    iou = iou_per_sample(pred, target, empty_value=float("nan"))
    assert math.isnan(iou[1])
    np.testing.assert_allclose(iou[[0, 2, 3]], [0.25, 0.0, 1.0])


def test_mask_metrics_invalid_inputs():
    with pytest.raises(ValueError, match=r"dice_per_sample: pred_mask must be binary"):
        dice_per_sample(np.full((1, 1, 2), 0.7), np.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match=r"iou_per_sample: pred_mask and target_mask must have the same shape"):
        iou_per_sample(np.zeros((2, 1, 2, 2, 2)), np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"at least 2 dims"):
        dice_per_sample(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"empty_value must be a float.*got None"):
        dice_per_sample(np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), empty_value=None)


# ----------------------------------------------------------------------------- task summaries


def test_classification_metrics_hand_values():
    logits = torch.tensor([[-2.0], [0.5], [0.0], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    out = classification_metrics(logits, labels)
    assert set(out) == {"auc", "accuracy", "balanced_accuracy"}
    assert out["auc"] == pytest.approx(0.75)
    # predictions (p > 0.5): [0, 1, 0, 1] -> 2 of 4 correct, sensitivity 1/2, specificity 1/2
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["balanced_accuracy"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in out.values())


def test_classification_metrics_auc_uses_logits_not_saturated_probs():
    # sigmoid(40) and sigmoid(50) are both 1.0 in float64; the logits still rank them
    out = classification_metrics(np.array([40.0, 50.0]), np.array([0, 1]))
    assert out["auc"] == 1.0


def test_regression_metrics_hand_values():
    out = regression_metrics(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([2.0, 4.0, 5.0, 9.0]))
    assert set(out) == {"mae", "rmse", "pearson_r"}
    # errors -1, -2, -2, -5
    assert out["mae"] == pytest.approx(10 / 4)
    assert out["rmse"] == pytest.approx(math.sqrt(34 / 4))
    assert out["pearson_r"] == pytest.approx(11 / math.sqrt(130))


def test_segmentation_metrics_means():
    out = segmentation_metrics([0.4, 1.0, 0.0, 1.0], np.array([0.25, 1.0, 0.0, 1.0]))
    assert out == pytest.approx({"dice": 2.4 / 4, "iou": 2.25 / 4})
    # a list of per-batch tensors, as a training loop collects them
    pred, target = _hand_masks()
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    dice = [dice_per_sample(p[:2], t[:2]), dice_per_sample(p[2:], t[2:])]
    iou = [iou_per_sample(p[:2], t[:2]), iou_per_sample(p[2:], t[2:])]
    assert segmentation_metrics(dice, iou) == pytest.approx({"dice": 0.6, "iou": 0.5625})


def test_segmentation_metrics_skips_nan_and_validates():
    out = segmentation_metrics([0.5, float("nan"), 1.0], [0.25, float("nan"), 1.0])
    assert out == pytest.approx({"dice": 0.75, "iou": 0.625})
    with pytest.raises(ValueError, match=r"same length.*got 3 and 2"):
        segmentation_metrics([0.5, 0.2, 1.0], [0.25, 1.0])
    with pytest.raises(ValueError, match=r"dice_values must not be empty"):
        segmentation_metrics([], [])
