"""Evaluation metrics for classification, regression and binary and multi-class segmentation.

Plain functions that accept torch tensors, numpy arrays or (for the 1-D metrics)
Python sequences. Scalar metrics return Python floats computed in float64;
``dice_per_sample`` / ``iou_per_sample`` return one value per sample, ``dice_per_class`` one per sample
and label.

Whether larger or smaller is better for checkpoint selection is the task config's
``task.monitor_mode``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "roc_auc",
    "accuracy",
    "balanced_accuracy",
    "mae",
    "rmse",
    "pearson_r",
    "dice_per_sample",
    "iou_per_sample",
    "dice_per_class",
    "classification_metrics",
    "regression_metrics",
    "segmentation_metrics",
]

# ----------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a tensor / array / sequence to a numpy array (floating tensors -> float64)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # numpy has no bf16
        return x.numpy()
    return np.asarray(x)


def _flat_float(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must contain only finite values, got NaN or inf.")
    return arr


def _flat_pair(a: Any, b: Any, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten two inputs to 1-D float64 and check they hold the same number of elements.

    Flattening (rather than broadcasting) means (N, 1) and (N,) can be mixed safely.
    """
    a_arr = _flat_float(a, name_a)
    b_arr = _flat_float(b, name_b)
    if a_arr.size != b_arr.size:
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of elements, "
            f"got {a_arr.size} and {b_arr.size}."
        )
    return a_arr, b_arr


def _binary_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    bad = ~np.isin(labels, (0.0, 1.0))
    if np.any(bad):
        raise ValueError(
            f"{name} must be binary (0/1 or bool), got values {np.unique(labels[bad])[:5].tolist()}."
        )
    return labels.astype(bool)


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a float in [0, 1], got {threshold!r}.")
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")
    return float(threshold)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties given the average of the ranks they span (as scipy's rankdata)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    starts = ends - counts + 1  # 1-based rank of its first member
    return ((starts + ends) / 2.0)[inverse.reshape(-1)]


# ----------------------------------------------------------------------------- classification


def roc_auc(scores: Any, labels: Any) -> float:
    """Binary ROC AUC via the Mann-Whitney U statistic.

    ``AUC = U / (n_pos * n_neg)`` where ``U`` is computed from the ranks of the
    scores, ties getting average ranks; a tied positive/negative pair counts 0.5.
    Any monotone transform of the scores (logits or probabilities) gives the same AUC.

    Args:
        scores: (N,) or (N, 1) real-valued scores, larger meaning "more positive".
        labels: same number of elements, binary (0/1 or bool).

    Returns:
        The AUC in [0, 1], or ``float("nan")`` when only one class is present.

    Raises:
        ValueError: when the inputs are empty, differ in size, contain NaN/inf, or
            ``labels`` is not binary.
    """
    scores_arr, labels_arr = _flat_pair(scores, labels, "scores", "labels")
    pos = _binary_labels(labels_arr)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores_arr)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(probs: Any, labels: Any, threshold: float = 0.5) -> float:
    """Fraction of correct predictions, predicting positive where ``probs > threshold``.

    Args:
        probs: (N,) or (N, 1) probabilities.
        labels: same number of elements, binary (0/1 or bool).
        threshold: decision threshold in [0, 1]; strictly greater is positive. Defaults to 0.5.

    Raises:
        ValueError: when the inputs are empty, differ in size, contain NaN/inf,
            ``labels`` is not binary, or ``threshold`` is outside [0, 1].
    """
    threshold = _check_threshold(threshold)
    probs_arr, labels_arr = _flat_pair(probs, labels, "probs", "labels")
    truth = _binary_labels(labels_arr)
    pred = probs_arr > threshold
    return float(np.mean(pred == truth))


def balanced_accuracy(probs: Any, labels: Any, threshold: float = 0.5) -> float:
    """Mean of sensitivity (recall of class 1) and specificity (recall of class 0).

    Predicts positive where ``probs > threshold``. When one class is absent from
    ``labels``, returns the recall of the class that is present.

    Args:
        probs: (N,) or (N, 1) probabilities.
        labels: same number of elements, binary (0/1 or bool).
        threshold: decision threshold in [0, 1]; strictly greater is positive. Defaults to 0.5.

    Raises:
        ValueError: when the inputs are empty, differ in size, contain NaN/inf,
            ``labels`` is not binary, or ``threshold`` is outside [0, 1].
    """
    threshold = _check_threshold(threshold)
    probs_arr, labels_arr = _flat_pair(probs, labels, "probs", "labels")
    truth = _binary_labels(labels_arr)
    pred = probs_arr > threshold
    recalls = []
    if truth.any():
        recalls.append(np.mean(pred[truth]))
    if (~truth).any():
        recalls.append(np.mean(~pred[~truth]))
    return float(np.mean(recalls))


# ----------------------------------------------------------------------------- regression


def mae(pred: Any, target: Any) -> float:
    """Mean absolute error ``mean(|pred - target|)``.

    Args:
        pred: (N,) or (N, 1) predictions.
        target: same number of elements.

    Raises:
        ValueError: when the inputs are empty, differ in size, or contain NaN/inf.
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    return float(np.mean(np.abs(p - t)))


def rmse(pred: Any, target: Any) -> float:
    """Root mean squared error ``sqrt(mean((pred - target)**2))``.

    Args:
        pred: (N,) or (N, 1) predictions.
        target: same number of elements.

    Raises:
        ValueError: when the inputs are empty, differ in size, or contain NaN/inf.
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    return float(np.sqrt(np.mean((p - t) ** 2)))


def pearson_r(pred: Any, target: Any) -> float:
    """Pearson correlation coefficient between ``pred`` and ``target``.

    Args:
        pred: (N,) or (N, 1) predictions.
        target: same number of elements.

    Returns:
        r in [-1, 1], or ``float("nan")`` when either input has zero variance
        (all values equal, which includes N = 1).

    Raises:
        ValueError: when the inputs are empty, differ in size, or contain NaN/inf.
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    if np.ptp(p) == 0 or np.ptp(t) == 0:
        return float("nan")
    pc = p - p.mean()
    tc = t - t.mean()
    denom = math.sqrt(float(np.sum(pc * pc)) * float(np.sum(tc * tc)))
    if denom == 0:
        return float("nan")
    return float(np.clip(np.sum(pc * tc) / denom, -1.0, 1.0))


# ----------------------------------------------------------------------------- segmentation


def _mask_counts(pred_mask: Any, target_mask: Any, fn: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Per-sample |A∩B|, |A|, |B| as int64 numpy arrays, plus whether a torch input was given."""
    as_torch = isinstance(pred_mask, torch.Tensor) or isinstance(target_mask, torch.Tensor)
    a = pred_mask if isinstance(pred_mask, torch.Tensor) else torch.as_tensor(np.asarray(pred_mask))
    b = target_mask if isinstance(target_mask, torch.Tensor) else torch.as_tensor(np.asarray(target_mask))
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: pred_mask and target_mask must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if a.ndim < 2:
        raise ValueError(
            f"{fn}: masks must be (B, 1, D, H, W) (at least 2 dims), got shape {tuple(a.shape)}."
        )
    b = b.to(a.device)
    bools = []
    for name, m in (("pred_mask", a), ("target_mask", b)):
        if m.dtype != torch.bool:
            if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"{fn}: {name} must be binary (bool or 0/1), got other values.")
            m = m != 0
        bools.append(m.reshape(m.shape[0], -1))
    a, b = bools
    inter = (a & b).sum(dim=1)
    size_a = a.sum(dim=1)
    size_b = b.sum(dim=1)
    return inter.cpu().numpy(), size_a.cpu().numpy(), size_b.cpu().numpy(), as_torch


def _check_empty_value(empty_value: float) -> float:
    if isinstance(empty_value, bool) or not isinstance(empty_value, (int, float)):
        raise ValueError(f"empty_value must be a float (e.g. 1.0, 0.0 or nan), got {empty_value!r}.")
    return float(empty_value)


def _ratio(num: np.ndarray, den: np.ndarray, empty_value: float, as_torch: bool) -> Any:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, empty_value, dtype=np.float64)
    nonzero = den > 0
    out[nonzero] = num[nonzero] / den[nonzero]
    return torch.from_numpy(out) if as_torch else out


def dice_per_sample(pred_mask: Any, target_mask: Any, empty_value: float = 1.0) -> Any:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of each sample of a batch of binary masks.

    Args:
        pred_mask: (B, 1, D, H, W) binary mask (bool or 0/1), e.g. ``sigmoid(logits) > 0.5``.
        target_mask: same shape, binary (bool or 0/1).
        empty_value: value for a sample whose prediction and target are both empty.
            Defaults to 1.0 (a correct empty prediction); use ``float("nan")`` to
            mark such samples for exclusion.

    Returns:
        (B,) float64 values in [0, 1]: a CPU ``torch.Tensor`` if either input is a
        tensor, else a numpy array. Counting runs on the input device.

    Raises:
        ValueError: when the shapes differ, have fewer than 2 dims, the masks are not
            binary, or ``empty_value`` is not a number.
    """
    empty_value = _check_empty_value(empty_value)
    inter, size_a, size_b, as_torch = _mask_counts(pred_mask, target_mask, "dice_per_sample")
    return _ratio(2 * inter, size_a + size_b, empty_value, as_torch)


def iou_per_sample(pred_mask: Any, target_mask: Any, empty_value: float = 1.0) -> Any:
    """Intersection over union ``|A∩B| / |A∪B|`` of each sample of a batch of binary masks.

    Args:
        pred_mask: (B, 1, D, H, W) binary mask (bool or 0/1), e.g. ``sigmoid(logits) > 0.5``.
        target_mask: same shape, binary (bool or 0/1).
        empty_value: value for a sample whose prediction and target are both empty.
            Defaults to 1.0 (a correct empty prediction).

    Returns:
        (B,) float64 values in [0, 1]: a CPU ``torch.Tensor`` if either input is a
        tensor, else a numpy array.

    Raises:
        ValueError: when the shapes differ, have fewer than 2 dims, the masks are not
            binary, or ``empty_value`` is not a number.
    """
    empty_value = _check_empty_value(empty_value)
    inter, size_a, size_b, as_torch = _mask_counts(pred_mask, target_mask, "iou_per_sample")
    return _ratio(inter, size_a + size_b - inter, empty_value, as_torch)


def dice_per_class(pred_labels: Any, target_labels: Any, num_classes: int, empty_value: float = 1.0) -> Any:
    """Dice of each label ``1..num_classes`` of each sample of a batch of integer label maps.

    Label ``k``'s Dice is :func:`dice_per_sample` of ``pred_labels == k`` and ``target_labels == k``, so a
    label absent from both a sample's prediction and target scores ``empty_value``.

    Args:
        pred_labels: (B, 1, D, H, W) integer labels 0..num_classes (0: background), e.g. ``softmax(logits).argmax(1)``
            with its channel axis kept.
        target_labels: same shape.
        num_classes: K, the labels besides the background.
        empty_value: value for a label absent from both. Defaults to 1.0.

    Returns:
        (B, K) float64: a CPU ``torch.Tensor`` if either input is a tensor, else a numpy array.

    Raises:
        ValueError: as :func:`dice_per_sample` (shapes), or ``num_classes`` < 1.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"dice_per_class: num_classes must be an int >= 1, got {num_classes!r}.")
    columns = [dice_per_sample(pred_labels == k, target_labels == k, empty_value) for k in range(1, num_classes + 1)]
    if isinstance(columns[0], torch.Tensor):
        return torch.stack(columns, dim=1)
    return np.stack(columns, axis=1)


# ----------------------------------------------------------------------------- task summaries


def classification_metrics(logits: Any, labels: Any) -> dict[str, float]:
    """AUC, accuracy and balanced accuracy from concatenated epoch logits.

    AUC is computed on the logits directly (the sigmoid is monotone, and this avoids
    ties from saturation); accuracy and balanced accuracy threshold ``sigmoid(logits)``
    at 0.5.

    Args:
        logits: (N, 1) or (N,) raw model outputs.
        labels: same number of elements, binary (0/1 or bool).

    Returns:
        ``{"auc", "accuracy", "balanced_accuracy"}``; ``"auc"`` is NaN when only one
        class is present.

    Raises:
        ValueError: as :func:`roc_auc` and :func:`accuracy`.
    """
    logits_arr, labels_arr = _flat_pair(logits, labels, "logits", "labels")
    probs = torch.sigmoid(torch.from_numpy(logits_arr)).numpy()
    return {
        "auc": roc_auc(logits_arr, labels_arr),
        "accuracy": accuracy(probs, labels_arr),
        "balanced_accuracy": balanced_accuracy(probs, labels_arr),
    }


def regression_metrics(pred: Any, target: Any) -> dict[str, float]:
    """MAE, RMSE and Pearson r from concatenated epoch predictions.

    Args:
        pred: (N, 1) or (N,) predictions.
        target: same number of elements.

    Returns:
        ``{"mae", "rmse", "pearson_r"}``; ``"pearson_r"`` is NaN when either input has
        zero variance.

    Raises:
        ValueError: when the inputs are empty, differ in size, or contain NaN/inf.
    """
    p, t = _flat_pair(pred, target, "pred", "target")
    return {"mae": mae(p, t), "rmse": rmse(p, t), "pearson_r": pearson_r(p, t)}


def _nan_mean(values: Any, name: str) -> float:
    arr = _to_numpy(values)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty.")
    kept = arr[~np.isnan(arr)]
    return float(kept.mean()) if kept.size else float("nan")


def segmentation_metrics(dice_values: Any, iou_values: Any) -> dict[str, float]:
    """Mean per-subject Dice and IoU.

    Typical use: per batch, ``dice_per_sample(torch.sigmoid(logits) > 0.5, mask)``
    and ``iou_per_sample(...)``, collected over the epoch, then summarised here
    (no whole volumes are kept).

    Args:
        dice_values: per-subject Dice values (list, numpy array or tensor, any shape;
            flattened). NaN entries (``empty_value=nan``) are left out of the mean.
        iou_values: per-subject IoU values, same number as ``dice_values``.

    Returns:
        ``{"dice": mean Dice, "iou": mean IoU}`` (NaN if every value is NaN).

    Raises:
        ValueError: when either input is empty, non-numeric, or the two differ in length.
    """
    if isinstance(dice_values, (list, tuple)) and dice_values and isinstance(dice_values[0], torch.Tensor):
        dice_values = torch.cat([v.reshape(-1).cpu() for v in dice_values])
    if isinstance(iou_values, (list, tuple)) and iou_values and isinstance(iou_values[0], torch.Tensor):
        iou_values = torch.cat([v.reshape(-1).cpu() for v in iou_values])
    n_dice = _to_numpy(dice_values).size
    n_iou = _to_numpy(iou_values).size
    if n_dice != n_iou:
        raise ValueError(
            f"dice_values and iou_values must have the same length (one per subject), "
            f"got {n_dice} and {n_iou}."
        )
    return {"dice": _nan_mean(dice_values, "dice_values"), "iou": _nan_mean(iou_values, "iou_values")}
