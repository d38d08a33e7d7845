"""Metrics for prediction / evaluation reports (after training, on a held-out set).

Plain functions: numpy arrays (or tensors / sequences) in, Python floats or dicts of
floats out. The point metrics are those of :mod:`brain3d.metrics` (imported, not
rewritten); this module adds

- percentile-bootstrap confidence intervals over subjects (:func:`bootstrap_ci`),
- sensitivity / specificity and a classification report,
- R^2, mean bias, the linear brain-age bias correction and a regression report,
- per-subject segmentation metrics on whole volumes in physical units: Dice, IoU,
  95th-percentile Hausdorff distance in mm (same values as MONAI's
  ``HausdorffDistanceMetric(percentile=95)`` called with ``spacing=`` whenever both
  masks are non-empty; a missed or spurious lesion counts as the image diagonal, see
  :func:`segmentation_case_metrics`), volumes in ml
  and lesion-wise detection counts (ATLAS-style connected components), and a
  segmentation report over subjects;
- the same per label of a multi-class segmentation (integer label maps), with their means over the labels
  (:func:`label_map_case_metrics`, :func:`label_map_report`).

Runtime dependency: scipy (``scipy.ndimage`` for connected components, binary
erosion and Euclidean distance transforms). MONAI is used only by the tests, as a
reference implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from brain3d.metrics import (
    _binary_labels,
    _check_threshold,
    _flat_float,
    _flat_pair,
    _to_numpy,
    accuracy,
    balanced_accuracy,
    dice_per_sample,
    iou_per_sample,
    mae,
    pearson_r,
    rmse,
    roc_auc,
)

__all__ = [
    "bootstrap_ci",
    "sensitivity",
    "specificity",
    "classification_report",
    "r2_score",
    "mean_bias",
    "regression_report",
    "fit_bias_correction",
    "apply_bias_correction",
    "brain_age_gap",
    "segmentation_case_metrics",
    "lesion_detection",
    "remove_small_components",
    "remove_small_label_components",
    "segmentation_report",
    "label_map_case_metrics",
    "label_map_report",
]

# |slope| below this makes the bias correction (pred - intercept) / slope meaningless.
_MIN_ABS_SLOPE = 1e-6


# ----------------------------------------------------------------------------- bootstrap


def _check_num_samples(num_samples: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    return int(num_samples)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    num_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``metric_fn(*arrays)`` over subjects.

    Each resample draws N subject indices with replacement and applies the *same*
    indices to every array (so paired inputs such as predictions and targets stay
    paired). Resamples on which the metric is NaN (e.g. AUC on a resample holding a
    single class) are skipped. The interval is given by the ``(1 - confidence) / 2``
    and ``(1 + confidence) / 2`` percentiles (linear interpolation) of the remaining
    resampled values.

    Args:
        metric_fn: function of the arrays returning a scalar, e.g. ``brain3d.metrics.mae``.
        arrays: one or more arrays (anything ``np.asarray`` accepts, or tensors), each
            of shape (N, ...), indexed along the first axis; all must have the same N.
        num_samples: number of bootstrap resamples. Defaults to 1000.
        seed: seed of the ``numpy.random.default_rng`` generator; the same seed gives
            the same interval. Defaults to 0.
        confidence: coverage of the interval, in (0, 1). Defaults to 0.95.

    Returns:
        ``(low, high)`` as Python floats; ``(nan, nan)`` when there are fewer than 2
        subjects or every resample gave NaN.

    Raises:
        ValueError: when no array is given, an array is 0-dimensional, the arrays differ
            in their number of subjects, ``num_samples`` is not a positive integer or
            ``confidence`` is not in (0, 1).
    """
    if not callable(metric_fn):
        raise ValueError(f"metric_fn must be callable, got {metric_fn!r}.")
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample, got none.")
    num_samples = _check_num_samples(num_samples)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}.")
    arrs = [_to_numpy(a) for a in arrays]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise ValueError(f"arrays[{i}] must have a subject axis (shape (N, ...)), got a scalar.")
    sizes = [a.shape[0] for a in arrs]
    if len(set(sizes)) != 1:
        raise ValueError(f"all arrays must have the same number of subjects (first axis), got {sizes}.")
    n = sizes[0]
    if n < 2:
        return float("nan"), float("nan")

    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(num_samples, n))  # (num_samples, N) subject indices
    values = []
    for idx in indices:
        value = float(metric_fn(*(a[idx] for a in arrs)))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    alpha = 1.0 - float(confidence)
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [100.0 * alpha / 2, 100.0 * (1 - alpha / 2)])
    return float(low), float(high)


def _with_ci(metric_fn: Callable[..., float], *arrays: Any, num_samples: int, seed: int) -> dict[str, float]:
    """``{"value", "ci_low", "ci_high"}``: the metric on all subjects and its bootstrap 95% CI."""
    low, high = bootstrap_ci(metric_fn, *arrays, num_samples=num_samples, seed=seed)
    return {"value": float(metric_fn(*arrays)), "ci_low": low, "ci_high": high}


# ----------------------------------------------------------------------------- classification


def _probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N,) float64 probabilities checked to lie in [0, 1] and (N,) bool labels."""
    p, y = _flat_pair(probs, labels, "probs", "labels")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"probs must be probabilities in [0, 1] (apply a sigmoid to logits first), "
            f"got values in [{p.min():.4g}, {p.max():.4g}]."
        )
    return p, _binary_labels(y)


def sensitivity(probs: Any, labels: Any, threshold: float = 0.5) -> float:
    """Sensitivity (recall of class 1, true-positive rate) ``TP / (TP + FN)``.

    Predicts positive where ``probs > threshold`` (strictly greater, as
    :func:`brain3d.metrics.accuracy`).

    Args:
        probs: (N,) or (N, 1) probabilities in [0, 1].
        labels: same number of elements, binary (0/1 or bool).
        threshold: decision threshold in [0, 1]. Defaults to 0.5.

    Returns:
        Sensitivity in [0, 1], or ``nan`` when ``labels`` holds no positive.

    Raises:
        ValueError: when the inputs are empty, differ in size, contain NaN/inf, ``probs``
            is outside [0, 1], ``labels`` is not binary, or ``threshold`` is outside [0, 1].
    """
    threshold = _check_threshold(threshold)
    p, truth = _probs_labels(probs, labels)
    if not truth.any():
        return float("nan")
    return float(np.mean(p[truth] > threshold))


def specificity(probs: Any, labels: Any, threshold: float = 0.5) -> float:
    """Specificity (recall of class 0, true-negative rate) ``TN / (TN + FP)``.

    Predicts positive where ``probs > threshold`` (strictly greater, as
    :func:`brain3d.metrics.accuracy`).

    Args:
        probs: (N,) or (N, 1) probabilities in [0, 1].
        labels: same number of elements, binary (0/1 or bool).
        threshold: decision threshold in [0, 1]. Defaults to 0.5.

    Returns:
        Specificity in [0, 1], or ``nan`` when ``labels`` holds no negative.

    Raises:
        ValueError: as :func:`sensitivity`.
    """
    threshold = _check_threshold(threshold)
    p, truth = _probs_labels(probs, labels)
    if truth.all():
        return float("nan")
    return float(np.mean(~(p[~truth] > threshold)))


def classification_report(
    probs: Any, labels: Any, threshold: float = 0.5, num_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Binary classification metrics with percentile-bootstrap 95% confidence intervals.

    AUC is computed on ``probs`` (any monotone score gives the same AUC); the other
    metrics predict positive where ``probs > threshold``. Every metric is bootstrapped
    with the same subject resamples (same ``seed``).

    Args:
        probs: (N,) or (N, 1) probabilities in [0, 1], e.g. ``sigmoid(logits)``.
        labels: same number of elements, binary (0/1 or bool).
        threshold: decision threshold in [0, 1]. Defaults to 0.5.
        num_samples: number of bootstrap resamples. Defaults to 1000.
        seed: bootstrap seed. Defaults to 0.

    Returns:
        ``{"n": N, "auc": {"value", "ci_low", "ci_high"}, "accuracy": {...},
        "balanced_accuracy": {...}, "sensitivity": {...}, "specificity": {...}}``.
        Values are NaN where undefined (e.g. AUC with a single class); CIs are NaN
        when N < 2.

    Raises:
        ValueError: as :func:`sensitivity`, or when ``num_samples`` is not a positive integer.
    """
    threshold = _check_threshold(threshold)
    num_samples = _check_num_samples(num_samples)
    p, truth = _probs_labels(probs, labels)
    y = truth.astype(np.float64)  # (N,)
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "auc": roc_auc,
        "accuracy": lambda a, b: accuracy(a, b, threshold),
        "balanced_accuracy": lambda a, b: balanced_accuracy(a, b, threshold),
        "sensitivity": lambda a, b: sensitivity(a, b, threshold),
        "specificity": lambda a, b: specificity(a, b, threshold),
    }
    report: dict[str, Any] = {"n": int(p.size)}
    for name, fn in fns.items():
        report[name] = _with_ci(fn, p, y, num_samples=num_samples, seed=seed)
    return report


# ----------------------------------------------------------------------------- regression


def r2_score(pred: Any, target: Any) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot``.

    ``SS_res = sum((target - pred)**2)``, ``SS_tot = sum((target - mean(target))**2)``.
    Can be negative when the predictions are worse than predicting the mean.

    Args:
        pred: (N,) or (N, 1) predictions.
        target: same number of elements.

    Returns:
        R^2, or ``nan`` when ``target`` has zero variance (includes N = 1).

    Raises:
        ValueError: when the inputs are empty, differ in size, or contain NaN/inf.
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    if np.ptp(t) == 0:
        return float("nan")
    ss_res = float(np.sum((t - p) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    return float(1.0 - ss_res / ss_tot)


def mean_bias(pred: Any, target: Any) -> float:
    """Mean signed error ``mean(pred - target)`` (positive: over-estimation).

    Args:
        pred: (N,) or (N, 1) predictions.
        target: same number of elements.

    Raises:
        ValueError: when the inputs are empty, differ in size, or contain NaN/inf.
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    return float(np.mean(p - t))


def regression_report(pred: Any, target: Any, num_samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Regression metrics with percentile-bootstrap 95% confidence intervals.

    Args:
        pred: (N,) or (N, 1) predictions.
        target: same number of elements.
        num_samples: number of bootstrap resamples. Defaults to 1000.
        seed: bootstrap seed. Defaults to 0.

    Returns:
        ``{"n": N, "mae": {"value", "ci_low", "ci_high"}, "rmse": {...},
        "pearson_r": {...}, "r2": {...}, "mean_bias": {...}}``. ``pearson_r`` and ``r2``
        are NaN when undefined (zero variance); CIs are NaN when N < 2.

    Raises:
        ValueError: when the inputs are empty, differ in size, contain NaN/inf, or
            ``num_samples`` is not a positive integer.
    """
    num_samples = _check_num_samples(num_samples)
    p, t = _flat_pair(pred, target, "pred", "target")
    fns: dict[str, Callable[[Any, Any], float]] = {
        "mae": mae,
        "rmse": rmse,
        "pearson_r": pearson_r,
        "r2": r2_score,
        "mean_bias": mean_bias,
    }
    report: dict[str, Any] = {"n": int(p.size)}
    for name, fn in fns.items():
        report[name] = _with_ci(fn, p, t, num_samples=num_samples, seed=seed)
    return report


def fit_bias_correction(pred: Any, target: Any) -> dict[str, float]:
    """Fit the linear brain-age bias correction on a validation set.

    Brain-age predictions regress towards the mean age (young subjects over-estimated,
    old ones under-estimated). Following Cole et al. / de Lange & Cole (2020), Smith
    et al. (2019) and Peng et al. (2021, SFCN), fit by least squares
    ``pred = slope * target + intercept`` on a validation set (never on the test set),
    then correct test predictions with :func:`apply_bias_correction`,
    ``(pred - intercept) / slope``.

    Args:
        pred: (N,) or (N, 1) predicted ages of the validation subjects.
        target: same number of elements, their chronological ages.

    Returns:
        ``{"slope": float, "intercept": float}``.

    Raises:
        ValueError: when the inputs are empty, differ in size or contain NaN/inf, when
            there are fewer than 2 subjects, ``target`` has zero variance, or the fitted
            ``|slope| < 1e-6`` (the correction would divide by ~0).
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    if p.size < 2:
        raise ValueError(f"fit_bias_correction needs at least 2 subjects, got {p.size}.")
    if np.ptp(t) == 0:
        raise ValueError(f"fit_bias_correction needs targets with non-zero variance, got all equal to {t[0]!r}.")
    tc = t - t.mean()  # (N,)
    slope = float(np.sum(tc * (p - p.mean())) / np.sum(tc * tc))
    intercept = float(p.mean() - slope * t.mean())
    if abs(slope) < _MIN_ABS_SLOPE:
        raise ValueError(
            f"fitted slope {slope!r} is ~0 (|slope| < {_MIN_ABS_SLOPE}): the predictions do not "
            "depend on the target, so (pred - intercept) / slope is not a usable correction."
        )
    return {"slope": slope, "intercept": intercept}


def apply_bias_correction(pred: Any, correction: Mapping[str, float]) -> np.ndarray:
    """Apply a fitted brain-age bias correction: ``(pred - intercept) / slope``.

    Args:
        pred: (N,) or (N, 1) predicted ages (e.g. of the test set).
        correction: ``{"slope", "intercept"}`` from :func:`fit_bias_correction`.

    Returns:
        (N,) float64 corrected predictions.

    Raises:
        ValueError: when ``pred`` is empty or contains NaN/inf, or ``correction`` lacks
            ``"slope"`` / ``"intercept"``, holds non-finite values or ``|slope| < 1e-6``.
    """
    if not isinstance(correction, Mapping) or not {"slope", "intercept"} <= set(correction):
        raise ValueError(f"correction must be a dict with 'slope' and 'intercept', got {correction!r}.")
    try:
        slope = float(correction["slope"])
        intercept = float(correction["intercept"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"correction values must be numbers, got {correction!r}.") from err
    if not (math.isfinite(slope) and math.isfinite(intercept)) or abs(slope) < _MIN_ABS_SLOPE:
        raise ValueError(
            f"correction must have finite values and |slope| >= {_MIN_ABS_SLOPE}, got {correction!r}."
        )
    p = _flat_float(pred, "pred")  # (N,)
    return (p - intercept) / slope


def brain_age_gap(pred: Any, target: Any) -> np.ndarray:
    """Brain-age gap (brain-PAD / delta) ``pred - target`` per subject.

    Args:
        pred: (N,) or (N, 1) predicted (optionally bias-corrected) ages.
        target: same number of elements, chronological ages.

    Returns:
        (N,) float64 gaps (positive: the brain looks older than its age).

    Raises:
        ValueError: when the inputs are empty, differ in size, or contain NaN/inf.
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    return p - t


# ----------------------------------------------------------------------------- segmentation


def _binary_volume(mask: Any, name: str) -> np.ndarray:
    """A (X, Y, Z) bool array from a bool or 0/1 3-D array / tensor."""
    arr = _to_numpy(mask)
    if arr.ndim != 3:
        raise ValueError(
            f"{name} must be a 3-D (X, Y, Z) volume of one subject, got shape {tuple(arr.shape)} "
            "(squeeze batch/channel axes first)."
        )
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {arr.dtype}.")
    bad = ~np.isin(arr, (0, 1))
    if np.any(bad):
        raise ValueError(
            f"{name} must be binary (bool or 0/1; threshold probabilities first), "
            f"got values such as {np.unique(arr[bad])[:5].tolist()}."
        )
    return arr != 0


def _check_spacing(spacing_mm: Any) -> np.ndarray:
    """(3,) float64 voxel spacing in mm, all finite and > 0."""
    try:
        sp = np.asarray(_to_numpy(spacing_mm), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"spacing_mm must be 3 numbers (sx, sy, sz) in mm, got {spacing_mm!r}.") from err
    if sp.size != 3:
        raise ValueError(f"spacing_mm must be 3 numbers (sx, sy, sz) in mm, got {spacing_mm!r}.")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing_mm must be finite and > 0, got {spacing_mm!r}.")
    return sp


def _connectivity_structure(connectivity: int) -> np.ndarray:
    """3x3x3 structuring element: 6 -> faces, 18 -> faces+edges, 26 -> full cube."""
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity) if not isinstance(connectivity, bool) else None
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}.")
    return ndimage.generate_binary_structure(3, rank)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask XOR binary_erosion(mask)``.

    As MONAI's ``get_mask_edges``: scipy's default structuring element (6-connected
    cross) and voxels outside the array counted as background (``border_value=0``),
    so a mask touching the array border has its border voxels as edges.
    """
    return mask ^ ndimage.binary_erosion(mask)


def _image_diagonal_mm(shape: Sequence[int], spacing: np.ndarray) -> float:
    """Diagonal of the volume's extent in mm, ``sqrt(sum((shape_i * spacing_i)^2))``.

    No distance between two voxels of the volume can exceed it, so it is the worst
    possible HD95 of a subject; used when exactly one mask is empty.
    """
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * spacing) ** 2)))


def _hd95_mm(pred: np.ndarray, true: np.ndarray, spacing: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two (X, Y, Z) bool masks.

    Replicates ``monai.metrics.HausdorffDistanceMetric(percentile=95, directed=False,
    distance_metric="euclidean")`` with ``spacing=``: edges by XOR with the erosion,
    Euclidean distances (scaled by the spacing) from every edge voxel of one mask to the
    nearest edge voxel of the other, the 95th percentile (linear interpolation, as
    ``torch.quantile``) of each direction, and the larger of the two.

    Both empty -> 0.0. Exactly one empty -> the image diagonal in mm (the worst case;
    MONAI gives nan / inf there): a nan would be dropped from the mean over subjects,
    which flatters a model that misses lesions entirely.
    """
    pred_any, true_any = bool(pred.any()), bool(true.any())
    if not pred_any and not true_any:
        return 0.0
    if pred_any != true_any:
        return _image_diagonal_mm(pred.shape, spacing)
    # Crop to the bounding box of the union plus a 1-voxel margin (clipped to the array).
    # Every edge voxel lies in the box, so the nearest-edge distances are unchanged, and
    # the margin (or the array border, where border_value=0 applies) keeps the erosion exact.
    nz = np.nonzero(pred | true)
    box = tuple(slice(max(int(ix.min()) - 1, 0), min(int(ix.max()) + 2, n)) for ix, n in zip(nz, pred.shape))
    edges_pred = _edges(pred[box])  # (x, y, z) bool, cropped
    edges_true = _edges(true[box])
    # distance_transform_edt(~E) gives, at every voxel, the distance in mm to the nearest voxel of E
    d_pred_to_true = ndimage.distance_transform_edt(~edges_true, sampling=spacing)[edges_pred]  # (n_pred_edge,)
    d_true_to_pred = ndimage.distance_transform_edt(~edges_pred, sampling=spacing)[edges_true]  # (n_true_edge,)
    return float(max(np.percentile(d_pred_to_true, 95), np.percentile(d_true_to_pred, 95)))


def segmentation_case_metrics(
    pred_mask: Any, true_mask: Any, spacing_mm: Sequence[float], connectivity: int = 26
) -> dict[str, Any]:
    """Voxel-wise, surface, volume and lesion-wise metrics of one subject's binary segmentation.

    Lesion-wise detection follows the ATLAS challenge: lesions are the connected
    components of each mask; a true lesion is detected (TP) when at least one of its
    voxels is predicted, missed (FN) otherwise; a predicted component touching no true
    voxel is a false positive (FP). ``lesion_f1 = 2 TP / (2 TP + FP + FN)``.

    Conventions for empty masks:

    - both empty: ``dice = iou = 1``, ``hd95_mm = 0``, ``lesion_f1 = 1``;
    - exactly one empty (a lesion missed entirely, or predicted where there is none):
      ``dice = iou = 0``, ``lesion_f1 = 0`` and ``hd95_mm`` = the worst case, the image
      diagonal ``sqrt(sum((shape_i * spacing_i)^2))`` in mm, with ``hd95_worst_case = 1``.
      There is no surface to measure a distance to (MONAI returns inf / nan), but a
      nan would drop the subject from the mean HD95 and flatter a model that misses.

    Args:
        pred_mask: (X, Y, Z) binary prediction (bool or 0/1).
        true_mask: (X, Y, Z) binary ground truth, same shape.
        spacing_mm: voxel spacing ``(sx, sy, sz)`` in mm, one per array axis in the
            same order (e.g. the first three NIfTI ``pixdim`` / ``header.get_zooms()``).
        connectivity: neighbourhood of the connected components: 26 (full 3x3x3 cube,
            default), 18, or 6 (faces only, scipy's default cross). Defaults to 26.

    Returns:
        ``{"dice", "iou", "hd95_mm", "pred_volume_ml", "true_volume_ml",
        "abs_volume_diff_ml"}`` as floats and ``{"lesion_tp", "lesion_fp", "lesion_fn",
        "num_true_lesions", "num_pred_lesions"}`` as ints, plus float ``"lesion_f1"`` and
        int ``"hd95_worst_case"`` (1 when ``hd95_mm`` is the worst-case diagonal, else 0).
        Volumes use ``prod(spacing_mm)`` mm^3 per voxel, 1 ml = 1000 mm^3.

    Raises:
        ValueError: when a mask is not 3-D or not binary, the shapes differ,
            ``spacing_mm`` is not 3 finite positive numbers, or ``connectivity`` is not
            6, 18 or 26.
    """
    pred, true = _checked_mask_pair(pred_mask, true_mask)  # (X, Y, Z) bool each
    spacing = _check_spacing(spacing_mm)  # (3,)
    structure = _connectivity_structure(connectivity)  # (3, 3, 3) bool

    # voxel overlap; dice/iou give 1.0 when both masks are empty
    dice = float(dice_per_sample(pred[None, None], true[None, None], empty_value=1.0)[0])
    iou = float(iou_per_sample(pred[None, None], true[None, None], empty_value=1.0)[0])
    pred_ml, true_ml = _volume_ml(pred, spacing), _volume_ml(true, spacing)
    lesions = _lesion_detection(pred, true, structure)
    return {
        "dice": dice,
        "iou": iou,
        "hd95_mm": _hd95_mm(pred, true, spacing),
        "hd95_worst_case": int(bool(pred.any()) != bool(true.any())),
        "pred_volume_ml": pred_ml,
        "true_volume_ml": true_ml,
        "abs_volume_diff_ml": abs(pred_ml - true_ml),
        **lesions,
    }


def _checked_mask_pair(pred_mask: Any, true_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as (X, Y, Z) bool arrays of the same shape; ValueError otherwise."""
    pred = _binary_volume(pred_mask, "pred_mask")
    true = _binary_volume(true_mask, "true_mask")
    if pred.shape != true.shape:
        raise ValueError(
            f"pred_mask and true_mask must have the same shape, got {pred.shape} and {true.shape}."
        )
    return pred, true


def _volume_ml(mask: np.ndarray, spacing: np.ndarray) -> float:
    """Volume of an (X, Y, Z) bool mask in ml: voxels * prod(spacing) mm^3, 1 ml = 1000 mm^3."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return float(mask.sum()) * voxel_ml


def _check_min_voxels(min_voxels: int) -> int:
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, (int, np.integer)) or min_voxels < 0:
        raise ValueError(f"min_voxels must be an integer >= 0, got {min_voxels!r}.")
    return int(min_voxels)


def remove_small_components(mask: Any, min_voxels: int, connectivity: int = 26) -> np.ndarray:
    """``mask`` (any shape, 0/1 or bool) without its connected components of fewer than ``min_voxels`` voxels.

    Small speckles are what lowers lesion-wise F1 most (each is a false-positive lesion while adding almost
    nothing to Dice): on the development sets most predicted false positives were under 8 voxels of a 2 mm grid,
    while the smallest true lesion had 50. ``min_voxels`` 0 or 1 keeps everything. Components are 26-connected
    in 3-D (as :func:`lesion_detection` counts them); other ranks use the full neighbourhood of their rank.

    Returns:
        A bool array of ``mask``'s shape.
    """
    min_voxels = _check_min_voxels(min_voxels)
    mask = np.asarray(mask).astype(bool)
    if min_voxels <= 1 or not mask.any():
        return mask
    structure = (_connectivity_structure(connectivity) if mask.ndim == 3
                 else ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    labels, n = ndimage.label(mask, structure=structure)  # 0 = background, components 1..n
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)  # voxels per component; [0] the background
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def remove_small_label_components(labels: Any, min_voxels: int, connectivity: int = 26) -> np.ndarray:
    """An integer label map (0 background) whose components of fewer than ``min_voxels`` voxels, label by label
    (:func:`remove_small_components`), become background. Returns an array of ``labels``' shape and dtype."""
    labels = np.asarray(labels)
    min_voxels = _check_min_voxels(min_voxels)
    if min_voxels <= 1:
        return labels
    out = labels.copy()
    for k in np.unique(labels):
        if k == 0:
            continue
        own = labels == k
        out[own & ~remove_small_components(own, min_voxels, connectivity)] = 0
    return out


def lesion_detection(pred_mask: Any, true_mask: Any, connectivity: int = 26) -> dict[str, Any]:
    """Lesion-wise counts of one subject (``lesion_tp``, ``lesion_fp``, ``lesion_fn``, ``lesion_f1``,
    ``num_true_lesions``, ``num_pred_lesions``) on 0/1 or bool volumes of one shape, as
    :func:`segmentation_case_metrics` counts them (training validation uses it on every subject)."""
    pred, true = _checked_mask_pair(pred_mask, true_mask)
    return _lesion_detection(pred, true, _connectivity_structure(connectivity))


def _lesion_detection(pred: np.ndarray, true: np.ndarray, structure: np.ndarray) -> dict[str, Any]:
    """ATLAS-style lesion counts on connected components, in segmentation_case_metrics' key order.

    A true component is a TP when the prediction touches it, an FN otherwise; a predicted
    component touching no true voxel is an FP. ``lesion_f1`` is 1.0 when both masks are empty.
    """
    true_lab, n_true = ndimage.label(true, structure=structure)  # (X, Y, Z) int, 0 = background
    pred_lab, n_pred = ndimage.label(pred, structure=structure)
    true_hit = np.unique(true_lab[pred])  # true components touched by the prediction (0: background)
    pred_hit = np.unique(pred_lab[true])  # predicted components touching the truth (0: background)
    tp = int(np.count_nonzero(true_hit))
    fn = int(n_true) - tp
    fp = int(n_pred) - int(np.count_nonzero(pred_hit))
    denom = 2 * tp + fp + fn
    lesion_f1 = 1.0 if denom == 0 else 2.0 * tp / denom
    return {
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_f1": float(lesion_f1),
        "num_true_lesions": int(n_true),
        "num_pred_lesions": int(n_pred),
    }


# Per-subject 0/1 flags that the report counts (under the mapped key) instead of averaging.
_COUNTED_FLAGS = {"hd95_worst_case": "hd95_worst_case_subjects"}


def _means_and_counts(case_rows: list[dict], keys: list[str], flags: dict[str, str], num_samples: int,
                      seed: int) -> dict[str, Any]:
    """Per numeric ``key`` of the rows, the NaN-mean over subjects with its bootstrap CI; the 0/1 ``flags``
    (``{flag: count_key}``) counted instead, as ``count_key`` (0 where no row has the flag)."""
    report: dict[str, Any] = {}
    for key in keys:
        if key in flags:
            continue
        column = np.array([float(row[key]) for row in case_rows], dtype=np.float64)  # (N,)
        report[key] = _with_ci(_nan_mean, column, num_samples=num_samples, seed=seed)
    for flag, count_key in flags.items():
        report[count_key] = int(sum(int(row[flag]) for row in case_rows)) if flag in keys else 0
    return report


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating, np.bool_))


def _nan_mean(x: np.ndarray) -> float:
    """Mean of the non-NaN entries of a 1-D array; NaN when all are NaN (no warning)."""
    kept = x[~np.isnan(x)]
    return float(kept.mean()) if kept.size else float("nan")


def _numeric_keys(case_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numeric keys of per-subject rows (in the first row's order), which every row must share."""
    if isinstance(case_rows, Mapping) or not isinstance(case_rows, Sequence) or len(case_rows) == 0:
        raise ValueError(
            f"case_rows must be a non-empty list of dicts (one per subject), got {type(case_rows).__name__}."
        )
    keys: list[str] | None = None
    for i, row in enumerate(case_rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"case_rows[{i}] must be a dict, got {type(row).__name__}.")
        row_keys = [k for k, v in row.items() if _is_number(v)]
        if keys is None:
            keys = row_keys
        elif set(row_keys) != set(keys):
            raise ValueError(
                f"case_rows[{i}] has numeric keys {sorted(row_keys)}, but case_rows[0] has {sorted(keys)}."
            )
    assert keys is not None
    return keys


def segmentation_report(
    case_rows: Sequence[Mapping[str, Any]], num_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Summarise per-subject segmentation metrics with bootstrap 95% confidence intervals.

    Args:
        case_rows: one dict per subject, e.g. from :func:`segmentation_case_metrics`
            (extra non-numeric entries such as a subject id are ignored). Every row must
            have the same numeric keys, including ``"lesion_tp"``, ``"lesion_fp"`` and
            ``"lesion_fn"``.
        num_samples: number of bootstrap resamples. Defaults to 1000.
        seed: bootstrap seed. Defaults to 0.

    Returns:
        ``{"n": N}``, then for every numeric key of the rows the mean over subjects
        ignoring NaN as ``{"value", "ci_low", "ci_high"}`` (bootstrap of the NaN-mean;
        the mean ``hd95_mm`` includes the worst-case diagonal of subjects with exactly
        one empty mask), then ``"hd95_worst_case_subjects"`` (int, how many subjects
        got that worst case; the 0/1 ``hd95_worst_case`` flag is counted, not averaged;
        0 when the rows have no such flag), then
        ``"lesion_tp_total"``, ``"lesion_fp_total"``, ``"lesion_fn_total"`` (ints) and
        ``"lesion_f1_pooled" = 2 TP / (2 TP + FP + FN)`` from the totals (1.0 when all
        totals are 0).

    Raises:
        ValueError: when ``case_rows`` is empty or not a list of dicts, the rows differ in
            their numeric keys, a lesion count key is missing, or ``num_samples`` is not a
            positive integer.
    """
    num_samples = _check_num_samples(num_samples)
    keys = _numeric_keys(case_rows)
    missing = [k for k in ("lesion_tp", "lesion_fp", "lesion_fn") if k not in keys]
    if missing:
        raise ValueError(
            f"case_rows lack the lesion count keys {missing} (rows of segmentation_case_metrics have them)."
        )

    report: dict[str, Any] = {"n": len(case_rows),
                              **_means_and_counts(case_rows, keys, _COUNTED_FLAGS, num_samples, seed)}
    totals = {k: int(round(sum(float(row[k]) for row in case_rows))) for k in ("lesion_tp", "lesion_fp", "lesion_fn")}
    report["lesion_tp_total"] = totals["lesion_tp"]
    report["lesion_fp_total"] = totals["lesion_fp"]
    report["lesion_fn_total"] = totals["lesion_fn"]
    denom = 2 * totals["lesion_tp"] + totals["lesion_fp"] + totals["lesion_fn"]
    report["lesion_f1_pooled"] = 1.0 if denom == 0 else 2.0 * totals["lesion_tp"] / denom
    return report


# ----------------------------------------------------------------------------- multi-class segmentation


def _label_volume(labels: Any, name: str, num_classes: int) -> np.ndarray:
    """A (X, Y, Z) int64 array of labels 0..num_classes from an integer-valued 3-D array / tensor."""
    arr = _to_numpy(labels)
    if arr.ndim != 3:
        raise ValueError(
            f"{name} must be a 3-D (X, Y, Z) label map of one subject, got shape {tuple(arr.shape)} "
            "(squeeze batch/channel axes first)."
        )
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}.")
    bad = ~np.isin(arr, np.arange(num_classes + 1))
    if np.any(bad):
        raise ValueError(
            f"{name} must hold the labels 0..{num_classes}, got values such as {np.unique(arr[bad])[:5].tolist()}."
        )
    return arr.astype(np.int64)


def label_map_case_metrics(pred_labels: Any, true_labels: Any, spacing_mm: Sequence[float],
                           label_names: Sequence[str]) -> dict[str, Any]:
    """Per-label and mean metrics of one subject's multi-class segmentation.

    Label ``k`` (1..K, K = ``len(label_names)``; 0 is the background) is scored on the binary masks
    ``pred == k`` and ``true == k`` with :func:`segmentation_case_metrics`' conventions: Dice and IoU 1 when the
    label is in neither, 0 when in one only; HD95 in mm as MONAI's ``HausdorffDistanceMetric(percentile=95)``
    with ``spacing=`` when in both, 0 in neither, the image diagonal (``hd95_worst_case_<name>`` = 1) in one only.

    Args:
        pred_labels: (X, Y, Z) predicted labels 0..K.
        true_labels: (X, Y, Z) true labels 0..K, same shape.
        spacing_mm: voxel spacing ``(sx, sy, sz)`` in mm, one per array axis.
        label_names: the names of labels 1..K, in order (they name the keys).

    Returns:
        ``{"dice", "iou", "hd95_mm"}``: the means over the K labels; then per label ``name``: ``dice_<name>``,
        ``iou_<name>``, ``hd95_mm_<name>``, ``pred_volume_ml_<name>``, ``true_volume_ml_<name>`` (floats) and
        ``hd95_worst_case_<name>`` (int 0/1).

    Raises:
        ValueError: a map not 3-D or with a value outside 0..K, different shapes, bad spacing, no label names.
    """
    names = [str(n) for n in label_names]
    if not names:
        raise ValueError("label_names must name at least one label.")
    pred = _label_volume(pred_labels, "pred_labels", len(names))
    true = _label_volume(true_labels, "true_labels", len(names))
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels and true_labels must have the same shape, got {pred.shape} and {true.shape}.")
    spacing = _check_spacing(spacing_mm)
    per_label: dict[str, Any] = {}
    means: dict[str, list[float]] = {"dice": [], "iou": [], "hd95_mm": []}
    for k, name in enumerate(names, start=1):
        p, t = pred == k, true == k
        dice = float(dice_per_sample(p[None, None], t[None, None], empty_value=1.0)[0])
        iou = float(iou_per_sample(p[None, None], t[None, None], empty_value=1.0)[0])
        hd95 = _hd95_mm(p, t, spacing)
        for key, value in (("dice", dice), ("iou", iou), ("hd95_mm", hd95)):
            per_label[f"{key}_{name}"] = value
            means[key].append(value)
        per_label[f"hd95_worst_case_{name}"] = int(bool(p.any()) != bool(t.any()))
        per_label[f"pred_volume_ml_{name}"] = _volume_ml(p, spacing)
        per_label[f"true_volume_ml_{name}"] = _volume_ml(t, spacing)
    return {**{key: float(np.mean(values)) for key, values in means.items()}, **per_label}


def label_map_report(case_rows: Sequence[Mapping[str, Any]], label_names: Sequence[str], num_samples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Summarise :func:`label_map_case_metrics` rows over subjects with bootstrap 95% confidence intervals.

    Returns:
        ``{"n": N, "label_names": [...]}``, then for every numeric key of the rows (``dice``, ``iou``,
        ``hd95_mm`` -- the means over the labels -- and each label's ``dice_<name>``, ``hd95_mm_<name>``...)
        the NaN-mean over subjects as ``{"value", "ci_low", "ci_high"}``; the 0/1 ``hd95_worst_case_<name>``
        flags are counted instead, as ``hd95_worst_case_subjects_<name>`` (int).

    Raises:
        ValueError: empty or inconsistent rows, or a bad ``num_samples``.
    """
    num_samples = _check_num_samples(num_samples)
    keys = _numeric_keys(case_rows)
    flags = {f"hd95_worst_case_{name}": f"hd95_worst_case_subjects_{name}" for name in label_names}
    return {"n": len(case_rows), "label_names": [str(n) for n in label_names],
            **_means_and_counts(case_rows, keys, flags, num_samples, seed)}
