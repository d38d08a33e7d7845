"""Tests for brain3d.evaluation: hand-computed values, empty-mask conventions and MONAI cross-checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from brain3d.evaluation import (
    apply_bias_correction,
    bootstrap_ci,
    brain_age_gap,
    classification_report,
    fit_bias_correction,
    mean_bias,
    r2_score,
    regression_report,
    segmentation_case_metrics,
    segmentation_report,
    sensitivity,
    specificity,
)
from brain3d.metrics import accuracy, balanced_accuracy, dice_per_sample, mae, roc_auc

CI_KEYS = {"value", "ci_low", "ci_high"}

# ----------------------------------------------------------------------------- classification


def test_sensitivity_specificity_by_hand():
    probs = [0.9, 0.8, 0.3, 0.5, 0.2, 0.1, 0.7]
    labels = [1, 1, 1, 1, 0, 0, 0]
    # positives: 0.9, 0.8 predicted positive; 0.3 and 0.5 not (strictly greater than 0.5)
    assert sensitivity(probs, labels) == pytest.approx(2 / 4)
    # negatives: 0.2, 0.1 predicted negative; 0.7 is a false positive
    assert specificity(probs, labels) == pytest.approx(2 / 3)
    # threshold 0.25: 0.3 and 0.5 become positive; among the negatives 0.2 and 0.1 stay negative, 0.7 stays positive
    assert sensitivity(probs, labels, threshold=0.25) == pytest.approx(1.0)
    assert specificity(probs, labels, threshold=0.25) == pytest.approx(2 / 3)
    assert isinstance(sensitivity(probs, labels), float)


def test_sensitivity_specificity_absent_class_is_nan():
    assert math.isnan(sensitivity([0.2, 0.9], [0, 0]))
    assert math.isnan(specificity([0.2, 0.9], [1, 1]))
    assert specificity([0.2, 0.9], [0, 0]) == pytest.approx(0.5)


def test_sensitivity_rejects_bad_inputs():
    with pytest.raises(ValueError, match="probs must be probabilities"):
        sensitivity([-2.0, 3.0], [0, 1])
    with pytest.raises(ValueError, match="binary"):
        specificity([0.2, 0.4], [0, 2])
    with pytest.raises(ValueError, match="same number of elements"):
        sensitivity([0.2, 0.4, 0.5], [0, 1])


def test_classification_report_structure_and_values():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, 60), 0, 1)
    rep = classification_report(probs, labels, num_samples=300)
    assert rep["n"] == 60
    assert set(rep) == {"n", "auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity"}
    assert rep["auc"]["value"] == pytest.approx(roc_auc(probs, labels))
    assert rep["accuracy"]["value"] == pytest.approx(accuracy(probs, labels))
    assert rep["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy(probs, labels))
    assert rep["sensitivity"]["value"] == pytest.approx(sensitivity(probs, labels))
    for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity"):
        entry = rep[name]
        assert set(entry) == CI_KEYS
        assert all(isinstance(v, float) for v in entry.values())
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


# ----------------------------------------------------------------------------- regression


def test_r2_and_mean_bias_by_hand():
    pred = [2.0, 2.0, 3.0, 5.0]
    target = [1.0, 2.0, 4.0, 4.0]
    # mean(target) = 2.75; SS_tot = 1.75^2 + 0.75^2 + 1.25^2 + 1.25^2 = 6.75; SS_res = 1 + 0 + 1 + 1 = 3
    assert r2_score(pred, target) == pytest.approx(1 - 3 / 6.75)
    assert mean_bias(pred, target) == pytest.approx((1 + 0 - 1 + 1) / 4)
    assert r2_score(target, target) == pytest.approx(1.0)
    assert math.isnan(r2_score([1.0, 2.0], [3.0, 3.0]))
    np.testing.assert_allclose(brain_age_gap(pred, target), [1.0, 0.0, -1.0, 1.0])


def test_bias_correction_recovers_linear_bias():
    age = np.linspace(20, 80, 41)
    pred = 0.7 * age + 15
    corr = fit_bias_correction(pred, age)
    assert corr["slope"] == pytest.approx(0.7, abs=1e-10)
    assert corr["intercept"] == pytest.approx(15.0, abs=1e-8)
    assert isinstance(corr["slope"], float) and isinstance(corr["intercept"], float)
    np.testing.assert_allclose(apply_bias_correction(pred, corr), age, atol=1e-8)
    # (N, 1) columns work too; the output is (N,)
    assert apply_bias_correction(pred[:, None], corr).shape == (41,)


def test_bias_correction_rejects_degenerate_fits():
    with pytest.raises(ValueError, match="at least 2"):
        fit_bias_correction([50.0], [40.0])
    with pytest.raises(ValueError, match="non-zero variance"):
        fit_bias_correction([50.0, 52.0], [40.0, 40.0])
    with pytest.raises(ValueError, match="slope"):
        fit_bias_correction([50.0, 50.0, 50.0], [30.0, 40.0, 50.0])
    with pytest.raises(ValueError, match="slope"):
        apply_bias_correction([50.0], {"slope": 0.0, "intercept": 1.0})
    with pytest.raises(ValueError, match="'slope' and 'intercept'"):
        apply_bias_correction([50.0], {"a": 1.0})


def test_regression_report_structure():
    rng = np.random.default_rng(1)
    age = rng.uniform(20, 80, 50)
    pred = age + rng.normal(0, 5, 50)
    rep = regression_report(pred, age, num_samples=300)
    assert rep["n"] == 50
    assert set(rep) == {"n", "mae", "rmse", "pearson_r", "r2", "mean_bias"}
    assert rep["mae"]["value"] == pytest.approx(mae(pred, age))
    for name in ("mae", "rmse", "pearson_r", "r2", "mean_bias"):
        assert set(rep[name]) == CI_KEYS
        assert rep[name]["ci_low"] <= rep[name]["value"] <= rep[name]["ci_high"]


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(2)
    target = rng.uniform(20, 80, 40)
    pred = target + rng.normal(0, 4, 40)
    low, high = bootstrap_ci(mae, pred, target, num_samples=500, seed=3)
    assert low <= mae(pred, target) <= high
    assert (low, high) == bootstrap_ci(mae, pred, target, num_samples=500, seed=3)
    assert (low, high) != bootstrap_ci(mae, pred, target, num_samples=500, seed=4)
    assert isinstance(low, float) and isinstance(high, float)


def test_bootstrap_ci_narrows_with_more_subjects():
    rng = np.random.default_rng(5)

    def width(n: int) -> float:
        target = rng.uniform(20, 80, n)
        pred = target + rng.normal(0, 5, n)
        low, high = bootstrap_ci(mae, pred, target, num_samples=500, seed=0)
        return high - low

    assert width(400) < width(20) / 2


def test_bootstrap_ci_skips_nan_resamples_and_small_n():
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1])  # many resamples hold one class -> AUC nan, skipped
    scores = np.linspace(0, 1, 8)
    low, high = bootstrap_ci(roc_auc, scores, labels, num_samples=200)
    assert 0.0 <= low <= high <= 1.0
    assert all(math.isnan(v) for v in bootstrap_ci(mae, [1.0], [2.0]))
    with pytest.raises(ValueError, match="same number of subjects"):
        bootstrap_ci(mae, [1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(mae, [1.0, 2.0], [1.0, 2.0], confidence=95)


# ----------------------------------------------------------------------------- segmentation: hand-made


def _lesion_example() -> tuple[np.ndarray, np.ndarray]:
    true = np.zeros((20, 20, 20), dtype=np.uint8)
    true[2:5, 2:5, 2:5] = 1  # A: 27 voxels, partly predicted
    true[10:13, 10:13, 10:13] = 1  # B: 27 voxels, one voxel predicted
    true[15:18, 2:5, 15:18] = 1  # C: 27 voxels, missed
    pred = np.zeros_like(true)
    pred[3:6, 3:6, 3:6] = 1  # overlaps A: 27 voxels
    pred[11, 11, 11] = 1  # inside B: 1 voxel
    pred[2:4, 15:18, 15:18] = 1  # spurious: 2*3*3 = 18 voxels
    return pred, true


def test_lesion_wise_detection_by_hand():
    pred, true = _lesion_example()
    m = segmentation_case_metrics(pred, true, (1.0, 1.0, 1.0))
    assert (m["num_true_lesions"], m["num_pred_lesions"]) == (3, 3)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (2, 1, 1)
    assert m["lesion_f1"] == pytest.approx(4 / 6)
    # voxel overlap: |A∩P| = 2^3 = 8, plus the single voxel in B
    assert m["dice"] == pytest.approx(2 * 9 / (81 + 46))
    assert m["iou"] == pytest.approx(9 / (81 + 46 - 9))


def test_volumes_in_ml_with_anisotropic_spacing():
    pred, true = _lesion_example()
    m = segmentation_case_metrics(pred, true, (1.0, 1.0, 2.0))  # 2 mm^3 per voxel
    assert m["true_volume_ml"] == pytest.approx(81 * 2 / 1000)  # 0.162 ml
    assert m["pred_volume_ml"] == pytest.approx(46 * 2 / 1000)  # 0.092 ml
    assert m["abs_volume_diff_ml"] == pytest.approx(0.07)


def test_hd95_by_hand_uses_spacing_per_axis():
    pred = np.zeros((10, 10, 12), dtype=bool)
    true = np.zeros_like(pred)
    pred[5, 5, 5] = True
    true[5, 5, 8] = True  # 3 voxels apart along the last axis
    assert segmentation_case_metrics(pred, true, (1.0, 1.0, 2.0))["hd95_mm"] == pytest.approx(6.0)
    assert segmentation_case_metrics(pred, true, (2.0, 2.0, 1.0))["hd95_mm"] == pytest.approx(3.0)
    assert segmentation_case_metrics(true, true, (1.0, 1.0, 2.0))["hd95_mm"] == 0.0


def test_diagonal_touching_voxels_depend_on_connectivity():
    true = np.zeros((10, 10, 10), dtype=bool)
    true[4, 4, 4] = True
    true[5, 5, 5] = True  # touches (4, 4, 4) only by a corner
    assert segmentation_case_metrics(true, true, (1, 1, 1), connectivity=26)["num_true_lesions"] == 1
    assert segmentation_case_metrics(true, true, (1, 1, 1), connectivity=6)["num_true_lesions"] == 2
    # with 6-connectivity a prediction of one voxel detects one lesion and misses the other
    pred = np.zeros_like(true)
    pred[4, 4, 4] = True
    m6 = segmentation_case_metrics(pred, true, (1, 1, 1), connectivity=6)
    m26 = segmentation_case_metrics(pred, true, (1, 1, 1), connectivity=26)
    assert (m6["lesion_tp"], m6["lesion_fn"]) == (1, 1)
    assert (m26["lesion_tp"], m26["lesion_fn"]) == (1, 0)


def test_both_empty():
    empty = np.zeros((8, 8, 8), dtype=bool)
    m = segmentation_case_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert m["dice"] == 1.0 and m["iou"] == 1.0
    assert m["hd95_mm"] == 0.0
    assert m["lesion_f1"] == 1.0
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (0, 0, 0)
    assert m["pred_volume_ml"] == 0.0 and m["abs_volume_diff_ml"] == 0.0


def test_empty_prediction_with_lesions():
    _, true = _lesion_example()  # (20, 20, 20)
    m = segmentation_case_metrics(np.zeros_like(true), true, (1.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert m["hd95_mm"] == pytest.approx(math.sqrt(3 * 20.0**2))  # worst case: the image diagonal
    assert m["hd95_worst_case"] == 1
    assert m["lesion_fn"] == 3 and m["lesion_tp"] == 0 and m["lesion_fp"] == 0
    assert m["lesion_f1"] == 0.0
    # and the reverse: prediction only
    m = segmentation_case_metrics(true, np.zeros_like(true), (1.0, 1.0, 1.0))
    assert m["lesion_fp"] == 3 and m["hd95_mm"] == pytest.approx(math.sqrt(3 * 20.0**2))
    assert m["hd95_worst_case"] == 1


def test_missed_lesion_hd95_is_the_image_diagonal_in_mm():
    true = np.zeros((10, 20, 30), dtype=bool)
    true[4:6, 4:6, 4:6] = True
    # extent 10*1.5 = 15 mm, 20*1 = 20 mm, 30*2 = 60 mm -> sqrt(225 + 400 + 3600) = 65 mm
    m = segmentation_case_metrics(np.zeros_like(true), true, (1.5, 1.0, 2.0))
    assert m["hd95_mm"] == pytest.approx(65.0)
    assert m["hd95_worst_case"] == 1
    # a hit, however poor, is measured and not flagged; both empty stays 0 and not flagged
    pred = np.zeros_like(true)
    pred[5, 5, 5] = True
    assert segmentation_case_metrics(pred, true, (1.5, 1.0, 2.0))["hd95_worst_case"] == 0
    empty = segmentation_case_metrics(np.zeros_like(true), np.zeros_like(true), (1.5, 1.0, 2.0))
    assert empty["hd95_mm"] == 0.0 and empty["hd95_worst_case"] == 0


def test_segmentation_case_metrics_validation():
    a = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="same shape"):
        segmentation_case_metrics(a, np.zeros((4, 4, 5), dtype=bool), (1, 1, 1))
    with pytest.raises(ValueError, match="3-D"):
        segmentation_case_metrics(a[None], a[None], (1, 1, 1))
    with pytest.raises(ValueError, match="binary"):
        segmentation_case_metrics(np.full((4, 4, 4), 0.7), a, (1, 1, 1))
    with pytest.raises(ValueError, match="> 0"):
        segmentation_case_metrics(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 numbers"):
        segmentation_case_metrics(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="connectivity"):
        segmentation_case_metrics(a, a, (1, 1, 1), connectivity=8)


def test_segmentation_report():
    pred, true = _lesion_example()
    rows = [
        {"subject": "s1", **segmentation_case_metrics(pred, true, (1.0, 1.0, 1.0))},
        {"subject": "s2", **segmentation_case_metrics(np.zeros_like(true), true, (1.0, 1.0, 1.0))},
        {"subject": "s3", **segmentation_case_metrics(true, true, (1.0, 1.0, 1.0))},
    ]
    rep = segmentation_report(rows, num_samples=200)
    assert rep["n"] == 3
    assert "subject" not in rep
    assert set(rep["dice"]) == CI_KEYS
    assert rep["dice"]["value"] == pytest.approx((rows[0]["dice"] + 0.0 + 1.0) / 3)
    # s2 missed every lesion: its hd95 is the worst case (image diagonal), counted in the mean
    assert rows[1]["hd95_mm"] == pytest.approx(math.sqrt(3 * 20.0**2))
    assert rep["hd95_mm"]["value"] == pytest.approx((rows[0]["hd95_mm"] + math.sqrt(3 * 20.0**2) + 0.0) / 3)
    assert rep["hd95_worst_case_subjects"] == 1 and isinstance(rep["hd95_worst_case_subjects"], int)
    assert "hd95_worst_case" not in rep  # the flag is counted, not averaged
    assert rep["lesion_tp_total"] == 2 + 0 + 3
    assert rep["lesion_fp_total"] == 1
    assert rep["lesion_fn_total"] == 1 + 3 + 0
    assert rep["lesion_f1_pooled"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 4))
    assert rep["dice"]["ci_low"] <= rep["dice"]["value"] <= rep["dice"]["ci_high"]
    with pytest.raises(ValueError, match="non-empty"):
        segmentation_report([])
    with pytest.raises(ValueError, match="numeric keys"):
        segmentation_report([rows[0], {"dice": 1.0}])


# ----------------------------------------------------------------------------- MONAI cross-checks


def _random_case(rng: np.random.Generator, shape=(24, 28, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Union of 1-3 random ellipsoids for truth; truth perturbed (shifted, blobs added/removed) for prediction."""
    grid = np.indices(shape).astype(np.float64)  # (3, X, Y, Z)

    def blobs(n: int) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        for _ in range(n):
            centre = rng.uniform(-1, np.array(shape) + 0.0)  # may sit on or past the border
            radii = rng.uniform(1.0, 6.0, 3)
            m |= (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
        return m

    true = np.zeros(shape, dtype=bool)
    while not true.any():
        true = blobs(int(rng.integers(1, 4)))
    pred = np.roll(true, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
    pred |= blobs(int(rng.integers(0, 3)))
    pred &= ~blobs(int(rng.integers(0, 2)))
    if not pred.any():
        pred[tuple(rng.integers(0, s) for s in shape)] = True
    return pred, true


def test_dice_and_hd95_match_monai():
    monai = pytest.importorskip("monai")
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    rng = np.random.default_rng(2024)
    spacings = [(1.0, 1.0, 1.0), (1.0, 1.5, 2.0), (0.8, 0.8, 3.0), (2.0, 1.0, 1.2)]
    dice_metric = DiceMetric(include_background=True, reduction="none")
    hd_metric = HausdorffDistanceMetric(
        include_background=True, percentile=95, distance_metric="euclidean", reduction="none"
    )
    for case in range(12):
        pred, true = _random_case(rng)
        spacing = spacings[case % len(spacings)]
        ours = segmentation_case_metrics(pred, true, spacing)
        y_pred = torch.from_numpy(pred[None, None].astype(np.float32))  # (1, 1, X, Y, Z)
        y = torch.from_numpy(true[None, None].astype(np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_dice = dice_metric(y_pred, y).item()
            ref_hd = hd_metric(y_pred, y, spacing=spacing).item()
        assert ours["dice"] == pytest.approx(ref_dice, abs=1e-4), f"case {case}"
        assert ours["hd95_mm"] == pytest.approx(ref_hd, abs=1e-4), f"case {case} spacing {spacing}"
        # the training-time Dice agrees as well
        assert float(dice_per_sample(pred[None, None], true[None, None])[0]) == pytest.approx(ref_dice, abs=1e-4)
    assert monai is not None


def test_hd95_matches_monai_for_masks_filling_the_border():
    pytest.importorskip("monai")
    from monai.metrics import HausdorffDistanceMetric

    true = np.zeros((12, 10, 8), dtype=bool)
    true[:, :, :4] = True  # touches five faces of the array
    pred = np.ones_like(true)  # the whole array
    spacing = (1.0, 1.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            torch.from_numpy(pred[None, None].astype(np.float32)),
            torch.from_numpy(true[None, None].astype(np.float32)),
            spacing=spacing,
        ).item()
    assert segmentation_case_metrics(pred, true, spacing)["hd95_mm"] == pytest.approx(ref, abs=1e-4)


def test_auc_with_ties_matches_monai():
    pytest.importorskip("monai")
    from monai.metrics import compute_roc_auc

    rng = np.random.default_rng(7)
    for _ in range(10):
        n = int(rng.integers(10, 60))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]  # both classes present
        scores = rng.integers(0, 5, n) / 4.0  # few distinct values -> many ties
        ref = compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(labels))
        assert roc_auc(scores, labels) == pytest.approx(float(ref), abs=1e-4)
