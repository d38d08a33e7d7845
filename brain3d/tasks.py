"""What differs between kinds of head: one small class per kind (classification, regression, segmentation).

Each head of a run is a :class:`Task`: its name (the key of the model's outputs and of its metrics), the
manifest column it learns from, its loss and loss weight. The class owns what its kind does differently:
reading and encoding targets, the losses that fit it, its validation metrics (and the report's cases),
the prediction columns and files, and whether the split is stratified on it. A fourth kind of head is one
more class here, added to ``KINDS``. A segmentation head with ``num_classes`` K >= 2 (``task.num_classes``, or
``task.heads.<name>.num_classes``) is a :class:`MultiClassSegmentationTask`: same kind, its own losses, metrics
and outputs (:func:`task_class` picks the class).

A run's heads are a :class:`TaskSet`. A single-task run (``task=classification|regression|segmentation``)
has one head named after its kind, and batches carry ``"target"`` as one tensor, as they always have.
``task=multitask`` has several heads (``task.heads.<name>``): batches carry ``"target"`` and ``"labelled"``
as ``{head: tensor}``; a subject without a head's label has ``labelled=False`` there and that head's loss
leaves it out (:meth:`TaskSet.loss`), while the other heads still learn from it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from brain3d import evaluation, report
from brain3d import metrics as M
from brain3d.data.nifti import load_label_map, load_mask
from brain3d.data.preprocess import invert_geometry
from brain3d.errors import ConfigError
from brain3d.models.model import DEEP_SUFFIX


class Task:
    """One head. Subclasses set the class attributes and the methods their kind does differently.

    Args:
        name: the head's name: the key of the model's output dict, of checkpoints' head weights and of its
            metrics (``val_<name>_<metric>`` in a multi-task run).
        column: the manifest column of its targets (None: the kind's ``default_column``).
        loss_fn: the loss module (``forward(logits, target)`` -> scalar), or None where only predicting.
        weight: the head's weight in a multi-task run's total loss. Defaults to 1.0.
        prefix: put before its columns in predictions.csv and its file names (``sex_`` in a multi-task run,
            empty in a single-task one).
    """

    kind: ClassVar[str]
    losses: ClassVar[tuple[str, ...]]  # the loss options (configs/loss) that fit this kind
    default_column: ClassVar[str]
    metric: ClassVar[tuple[str, str]]  # the metric that picks best.pt by default, and "max" | "min"
    reads_mask: ClassVar[bool] = False  # its targets are mask files (same grid as the image), not cell values
    class_mapped: ClassVar[bool] = False  # its cells are labels mapped to class indices (Manifest.class_names)
    stratify: ClassVar[bool] = False  # the train/val split keeps its classes' proportions

    def __init__(self, name: str, column: str | None = None, loss_fn: torch.nn.Module | None = None,
                 weight: float = 1.0, prefix: str = ""):
        self.name = name
        self.column = column or self.default_column
        self.loss_fn = loss_fn
        self.weight = float(weight)
        self.prefix = prefix
        self.class_names: list[str] | None = None  # classification: class index -> label; [1] is positive
        self.target_mean, self.target_std = 0.0, 1.0  # regression: the training targets' scaling
        self.bias_correction: dict | None = None  # regression: refitted on each epoch's validation predictions

    # ---- targets ------------------------------------------------------------------------------------
    def encode(self, target: torch.Tensor) -> torch.Tensor:
        """A target as the head learns it (regression: standardised)."""
        return target

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's output in the target's own units (regression); logits otherwise."""
        return logits

    def fit_scaling(self, values: np.ndarray) -> None:
        """Learn what encoding needs from the training set's targets (regression: mean and std)."""

    @staticmethod
    def parse_label(raw: str, column: str, class_names: list[str] | None, problems: list[str]) -> float | None:
        """A manifest cell (not empty) as the target the head learns: here a finite number; else a problem
        ("column 'age': 'old' is not a finite number") and None."""
        try:
            target = float(raw)
        except ValueError:
            target = None
        if target is None or not math.isfinite(target):
            problems.append(f"column {column!r}: {raw!r} is not a finite number")
            return None
        return target

    @staticmethod
    def random_target(batch_size: int, spatial_shape, device) -> torch.Tensor:
        """A random batch of targets of this kind's shape, float32 as loaders give them (memory probes):
        (B, 1) standard-normal values here; 0/1 labels (classification), a binary mask (segmentation)."""
        return torch.randn((batch_size, 1), device=device)

    def after_validation(self, outputs: dict) -> None:
        """What the kind learns from a validation pass's outputs (regression: the brain-age bias correction)."""

    def summary_entries(self, val_targets: list) -> dict:
        """summary.json entries of the kind (classification: class names; regression: the mean-predictor
        baseline)."""
        return {}

    def state(self) -> dict:
        """What a checkpoint keeps of the head, to rebuild it for prediction (:func:`task_from_state`)."""
        return {"kind": self.kind, "column": self.column, "weight": self.weight, "prefix": self.prefix,
                "class_names": self.class_names, "target_mean": self.target_mean, "target_std": self.target_std,
                "bias_correction": self.bias_correction}

    # ---- validation ---------------------------------------------------------------------------------
    def new_outputs(self) -> dict:
        """An empty collection of one validation pass's outputs (filled by :meth:`collect`)."""
        return {"predictions": [], "targets": []}

    def collect(self, outputs: dict, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None,
                batch: dict, image: torch.Tensor, worst: report.WorstCases | None) -> None:
        """Add one batch: ``logits`` (B, 1), ``target`` (B, 1) raw; ``keep`` (B,) bool (None: every sample)
        marks the subjects that have this head's label. ``worst`` (report.html) gets those samples offered."""
        values = self.decode(logits.float()).cpu().reshape(-1)
        truth = target.float().cpu().reshape(-1)
        ids, (values, truth, image) = kept_samples(keep, batch, values, truth, image)
        outputs["predictions"].append(values)
        outputs["targets"].append(truth)
        if worst is not None:
            for b, (value, true) in enumerate(zip(values.tolist(), truth.tolist())):
                badness, scores = self.case_scores(value, true)
                worst.offer(badness, lambda b=b, scores=scores: {
                    "subject_id": ids[b], **scores,
                    "slices": report.orthogonal_slices(image[b, 0].float().cpu().numpy())})

    def case_scores(self, value: float, target: float) -> tuple[float, dict]:
        """(badness, caption values) of one validation subject for report.html."""
        raise NotImplementedError

    def parts(self, outputs: dict) -> dict[str, np.ndarray]:
        """The per-subject arrays of :meth:`collect` (flat), as distributed validation gathers them."""
        return {key: _flat(values) for key, values in outputs.items() if key in ("predictions", "targets")}

    def metrics(self, parts: dict[str, np.ndarray]) -> dict[str, float]:
        """The head's validation metrics from :meth:`parts` (merged over ranks)."""
        raise NotImplementedError

    # ---- prediction (brain3d-predict) -----------------------------------------------------------------
    def predict_subject(self, output: torch.Tensor, label, where: PredictionContext) -> tuple[dict, dict | None]:
        """One subject's prediction: ``output`` is the head's ensemble mean (probabilities, or values in
        target units), ``label`` the manifest's target (None: not evaluated). Returns (columns for
        predictions.csv, named with :attr:`prefix`; this subject's evaluation row, or None), writing any
        image the kind makes next to predictions.csv."""
        raise NotImplementedError

    def prediction_metrics(self, evaluated: list[dict], num_samples: int, threshold: float) -> dict:
        """metrics.json's entries for this head from the evaluation rows of :meth:`predict_subject`."""
        raise NotImplementedError

    def report_case(self, row: dict, evaluation: dict | None) -> tuple[float | None, dict]:
        """(badness, caption values) of a predicted subject for report.html (badness None: not scored)."""
        raise NotImplementedError

    def out_key(self, key: str) -> str:
        """A predictions.csv column of this head: ``key`` after :attr:`prefix` (``sex_probability``)."""
        return f"{self.prefix}{key}"


def kept_samples(keep: torch.Tensor | None, batch: dict, *tensors: torch.Tensor) -> tuple[list[str], tuple]:
    """The batch's samples that have this head's label: their subject ids, and each (B, ...) tensor cut to them
    (``keep`` (B,) bool, moved to each tensor's device; None: every sample)."""
    ids = [str(s) for s in batch["subject_id"]]
    if keep is None:
        return ids, tensors
    flags = keep.cpu().reshape(-1).tolist()
    return [s for s, k in zip(ids, flags) if k], tuple(t[keep.to(t.device)] for t in tensors)


class PredictionContext:
    """Where one subject's predictions go: its id, the input's native grid and the preprocessing to invert,
    the output folder, the decision threshold."""

    def __init__(self, subject_id: str, grid, info, out_dir: Path, threshold: float, save_like_input):
        self.subject_id, self.grid, self.info, self.out_dir = subject_id, grid, info, out_dir
        self.threshold, self.save_like_input = threshold, save_like_input
        self.mask: np.ndarray | None = None  # a segmentation head's written mask and the true one (report.html)
        self.true_mask: np.ndarray | None = None


class ClassificationTask(Task):
    """Binary classification (e.g. sex): one logit per volume; metrics auc, accuracy, balanced_accuracy."""

    kind = "classification"
    losses = ("bce",)
    default_column = "sex"
    metric = ("auc", "max")
    stratify = True
    class_mapped = True

    @staticmethod
    def parse_label(raw: str, column: str, class_names: list[str] | None, problems: list[str]) -> float | None:
        """A label as its class index: through ``class_names`` (two string labels, e.g. F / M), or 0 / 1."""
        target = None
        if class_names and class_names != ["0", "1"]:
            target = float(class_names.index(raw)) if raw in class_names else None
        elif raw in {"0", "1", "0.0", "1.0"}:
            target = float(raw)
        if target is None and class_names:
            problems.append(f"column {column!r}: label {raw!r} is not one of {class_names}")
        return target

    @staticmethod
    def random_target(batch_size: int, spatial_shape, device) -> torch.Tensor:
        return torch.randint(0, 2, (batch_size, 1), device=device).float()

    def case_scores(self, value: float, target: float) -> tuple[float, dict]:
        """``value``: the validation logit."""
        probability = 1.0 / (1.0 + math.exp(-value)) if value > -700 else 0.0
        return self._probability_case(probability, target)

    @staticmethod
    def _probability_case(probability: float, label: float) -> tuple[float, dict]:
        return abs(probability - label), {"probability": probability, "label": label}

    def metrics(self, parts: dict[str, np.ndarray]) -> dict[str, float]:
        return M.classification_metrics(parts["predictions"], parts["targets"])

    def summary_entries(self, val_targets: list) -> dict:
        if self.class_names is None:
            return {}
        return {"class_names": self.class_names, "positive_class": self.class_names[1]}

    def predict_subject(self, output: torch.Tensor, label, where: PredictionContext) -> tuple[dict, dict | None]:
        probability = float(output.reshape(-1)[0])
        row = {self.out_key("probability"): probability,
               self.out_key("predicted_class"): self.class_names[int(probability > where.threshold)]}
        if label is None:
            return row, None
        row[self.out_key("true_class")], row[self.out_key("target")] = self.class_names[int(label)], label
        return row, {"probability": probability, "target": label}

    def prediction_metrics(self, evaluated: list[dict], num_samples: int, threshold: float) -> dict:
        probs = np.array([r["probability"] for r in evaluated])
        labels = np.array([r["target"] for r in evaluated])
        metrics = evaluation.classification_report(probs, labels, threshold=threshold, num_samples=num_samples)
        return {**metrics, "positive_class": self.class_names[1]}

    def report_case(self, row: dict, evaluation: dict | None) -> tuple[float | None, dict]:
        if evaluation is None:
            return None, {"probability": row[self.out_key("probability")]}
        return self._probability_case(evaluation["probability"], evaluation["target"])


class RegressionTask(Task):
    """Regression (e.g. brain age): one value per volume, learned standardised with the training set's mean
    and std so a unit-scale head learns quickly; predictions and metrics (mae, rmse, pearson_r) are in the
    target's own units."""

    kind = "regression"
    losses = ("l1", "mse", "huber")
    default_column = "age"
    metric = ("mae", "min")

    def encode(self, target: torch.Tensor) -> torch.Tensor:
        return (target - self.target_mean) / self.target_std

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.target_std + self.target_mean

    def fit_scaling(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        self.target_mean, self.target_std = float(values.mean()), float(max(values.std(), 1e-6))

    def after_validation(self, outputs: dict) -> None:
        """The linear brain-age bias correction (as for SFCN) fitted on this epoch's validation predictions;
        kept in the checkpoint so brain3d-predict can report corrected ages (None when it cannot be fitted)."""
        try:
            self.bias_correction = evaluation.fit_bias_correction(outputs["predictions"], outputs["targets"])
        except ValueError:
            self.bias_correction = None

    def summary_entries(self, val_targets: list) -> dict:
        """The bar to beat: always predicting the training mean (``baseline_val_mae``), and the scaling."""
        targets = np.asarray(val_targets, dtype=np.float64)
        mae = float(np.abs(targets - self.target_mean).mean()) if len(targets) else None
        return {"target_mean": self.target_mean, "target_std": self.target_std, "baseline_val_mae": mae}

    def case_scores(self, value: float, target: float) -> tuple[float, dict]:
        return abs(value - target), {"prediction": value, "target": target}

    def metrics(self, parts: dict[str, np.ndarray]) -> dict[str, float]:
        return M.regression_metrics(parts["predictions"], parts["targets"])

    def predict_subject(self, output: torch.Tensor, label, where: PredictionContext) -> tuple[dict, dict | None]:
        """``prediction`` (and with the checkpoint's bias correction ``prediction_corrected``); with a target
        also ``brain_age_gap`` (prediction - target, and its corrected twin)."""
        value = float(output.reshape(-1)[0])
        row = {self.out_key("prediction"): value}
        corrected = None
        if self.bias_correction:
            corrected = float(evaluation.apply_bias_correction(np.array([value]), self.bias_correction)[0])
            row[self.out_key("prediction_corrected")] = corrected
        if label is None:
            return row, None
        row[self.out_key("target")], row[self.out_key("brain_age_gap")] = label, value - label
        if corrected is not None:
            row[self.out_key("brain_age_gap_corrected")] = corrected - label
        return row, {"prediction": value, "prediction_corrected": corrected, "target": label}

    def prediction_metrics(self, evaluated: list[dict], num_samples: int, threshold: float) -> dict:
        target = np.array([r["target"] for r in evaluated])
        metrics = evaluation.regression_report(np.array([r["prediction"] for r in evaluated]), target,
                                               num_samples=num_samples)
        if evaluated[0]["prediction_corrected"] is not None:
            corrected = np.array([r["prediction_corrected"] for r in evaluated])
            metrics["bias_corrected"] = evaluation.regression_report(corrected, target, num_samples=num_samples)
        return metrics

    def report_case(self, row: dict, evaluation: dict | None) -> tuple[float | None, dict]:
        if evaluation is None:
            return None, {"prediction": row[self.out_key("prediction")]}
        return self.case_scores(evaluation["prediction"], evaluation["target"])


class SegmentationTask(Task):
    """Binary segmentation (e.g. lesions): one logit per voxel, the target a mask file of the image's grid;
    metrics are the mean per-subject dice and iou at probability 0.5, and lesion-wise detection (connected
    components, brain3d.evaluation): ``lesion_f1`` the mean per-subject F1, ``lesion_f1_pooled`` the F1 of
    the lesion counts summed over the subjects."""

    kind = "segmentation"
    losses = ("dice_bce", "dice", "bce")
    default_column = "mask"
    metric = ("dice", "max")
    reads_mask = True
    num_classes = 1  # binary; MultiClassSegmentationTask: K labels plus background
    label_names: list[str] | None = None
    min_lesion_voxels = 0  # task.min_lesion_voxels: predicted components of fewer voxels are dropped from the mask

    def state(self) -> dict:
        return {**super().state(), "min_lesion_voxels": self.min_lesion_voxels}

    def predicted_mask(self, probability: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) bool mask of ``probability`` > 0.5, without the components of fewer than
        ``min_lesion_voxels`` voxels of each sample (brain3d.evaluation.remove_small_components)."""
        predicted = probability > 0.5
        if self.min_lesion_voxels <= 1:
            return predicted
        return self.without_small_components(predicted, evaluation.remove_small_components)

    def without_small_components(self, predicted: torch.Tensor, remove) -> torch.Tensor:
        """(B, 1, D, H, W) masks or label maps through ``remove(array, min_lesion_voxels)`` (brain3d.evaluation)
        sample by sample on the CPU, returned on ``predicted``'s device."""
        kept = [remove(m, self.min_lesion_voxels) for m in predicted[:, 0].cpu().numpy()]
        return torch.from_numpy(np.stack(kept))[:, None].to(predicted.device)

    def native_min_voxels(self, where: PredictionContext) -> int:
        """``min_lesion_voxels`` (voxels of the model's grid) in voxels of the input's own grid: the same volume
        in mm^3 (at least 1 where it is set)."""
        if self.min_lesion_voxels <= 1:
            return self.min_lesion_voxels
        model_voxel, input_voxel = np.prod(where.info.output_spacing_mm), np.prod(where.grid.voxel_size_mm)
        return max(1, int(round(self.min_lesion_voxels * model_voxel / input_voxel)))

    @staticmethod
    def random_target(batch_size: int, spatial_shape, device) -> torch.Tensor:
        return (torch.rand((batch_size, 1, *spatial_shape), device=device) > 0.5).float()

    def new_outputs(self) -> dict:
        return {"dice": [], "iou": [], "lesions": [], "preview": None}

    def collect(self, outputs: dict, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None,
                batch: dict, image: torch.Tensor, worst: report.WorstCases | None) -> None:
        """``logits`` and ``target`` (B, 1, D, H, W); per-subject dice and iou of the kept samples."""
        ids, (logits, target, image) = kept_samples(keep, batch, logits, target, image)
        if not ids:
            return
        probability = torch.sigmoid(logits.float())  # (B, 1, D, H, W)
        predicted, truth = self.predicted_mask(probability), target > 0.5
        dice = np.asarray(M.dice_per_sample(predicted, truth)).reshape(-1)
        outputs["dice"].append(dice)
        outputs["iou"].append(np.asarray(M.iou_per_sample(predicted, truth)).reshape(-1))
        for pred_b, true_b in zip(predicted[:, 0].cpu().numpy(), truth[:, 0].cpu().numpy()):
            counts = evaluation.lesion_detection(pred_b, true_b)
            outputs["lesions"].append([counts["lesion_tp"], counts["lesion_fp"], counts["lesion_fn"]])
        if worst is not None:
            for b, value in enumerate(dice.tolist()):
                worst.offer(1.0 - value, lambda b=b, value=value: {
                    "subject_id": ids[b], "dice": value,
                    "slices": report.orthogonal_slices(image[b, 0].float().cpu().numpy(),
                                                       truth=truth[b, 0].cpu().numpy(),
                                                       prediction=predicted[b, 0].cpu().numpy())})
        if outputs["preview"] is None:  # the TensorBoard overlay: the first validation subject's mid-slices
            outputs["preview"] = {"image": image[0, 0].float().cpu().numpy(), "target": target[0, 0].cpu().numpy(),
                                  "probability": probability[0, 0].cpu().numpy()}

    def parts(self, outputs: dict) -> dict[str, np.ndarray]:
        lesions = np.asarray(outputs["lesions"], dtype=np.int64).reshape(-1, 3)  # (subjects, [tp, fp, fn])
        return {"dice": _flat(outputs["dice"]), "iou": _flat(outputs["iou"]), "lesions": lesions}

    def metrics(self, parts: dict[str, np.ndarray]) -> dict[str, float]:
        if not len(parts["dice"]):
            return {"dice": float("nan"), "iou": float("nan"), "lesion_f1": float("nan"),
                    "lesion_f1_pooled": float("nan")}
        values = M.segmentation_metrics(parts["dice"], parts["iou"])
        lesions = np.asarray(parts["lesions"]).reshape(-1, 3)
        tp, fp, fn = lesions[:, 0], lesions[:, 1], lesions[:, 2]
        denom = 2 * tp + fp + fn  # a subject with no true and no predicted lesion scores 1, as in evaluation
        values["lesion_f1"] = float(np.mean(np.where(denom == 0, 1.0, 2 * tp / np.maximum(denom, 1))))
        total = int(denom.sum())
        values["lesion_f1_pooled"] = 1.0 if total == 0 else float(2 * tp.sum() / total)
        return values

    def predict_subject(self, output: torch.Tensor, label, where: PredictionContext) -> tuple[dict, dict | None]:
        """``<id>_<prefix>prob.nii.gz`` (float32) and ``<id>_<prefix>mask.nii.gz`` (uint8, probability >
        threshold) on the input's own grid; ``predicted_volume_ml``; with a true mask (``label``: its path)
        the per-subject metrics of brain3d.evaluation.segmentation_case_metrics."""
        probability = invert_geometry(output[0, 0].numpy(), where.info, "trilinear")  # on the input's RAS grid
        # without the components under task.min_lesion_voxels, converted to this grid's voxels (0: all kept)
        mask = evaluation.remove_small_components(probability > where.threshold,
                                                  self.native_min_voxels(where)).astype(np.uint8)
        stem = f"{where.subject_id}_{self.prefix}"
        where.save_like_input(probability.astype(np.float32), where.grid, where.out_dir / f"{stem}prob.nii.gz",
                              np.float32)
        where.save_like_input(mask, where.grid, where.out_dir / f"{stem}mask.nii.gz", np.uint8)
        where.mask = mask
        row = {self.out_key("predicted_volume_ml"): float(mask.sum() * np.prod(where.grid.voxel_size_mm) / 1000.0)}
        if label is None:
            return row, None
        where.true_mask, _ = load_mask(label)
        return row, evaluation.segmentation_case_metrics(mask, where.true_mask, where.grid.voxel_size_mm)

    def prediction_metrics(self, evaluated: list[dict], num_samples: int, threshold: float) -> dict:
        return {**evaluation.segmentation_report(evaluated, num_samples=num_samples), "threshold": threshold,
                "min_lesion_voxels": self.min_lesion_voxels}

    def report_case(self, row: dict, evaluation: dict | None) -> tuple[float | None, dict]:
        values = {"predicted_volume_ml": row.get(self.out_key("predicted_volume_ml"))}
        if evaluation is None:
            return None, values
        return 1.0 - float(evaluation["dice"]), {**values, "dice": float(evaluation["dice"])}


class MultiClassSegmentationTask(SegmentationTask):
    """Multi-class segmentation (``task.num_classes=K`` >= 2): the target is an integer label map of the image's
    grid (0 background, labels 1..K), the head gives K+1 logits per voxel, their softmax the probabilities and
    its argmax the predicted label map. Validation metrics: each label's mean per-subject Dice ``dice_<name>``
    (``data.label_names``, else ``label1..labelK``), ``dice`` their mean (what picks best.pt, as in binary runs)
    and ``iou`` the mean over the labels of their IoU. brain3d-predict writes the label map and the K+1
    probabilities on the input's grid and scores each label's Dice and HD95 and their means.

    Args:
        num_classes: K, the labels besides the background (2..255).
        label_names: the names of labels 1..K (None: ``label1..labelK``); see :func:`checked_label_names`.
    """

    losses = ("dice_ce",)

    def __init__(self, name: str, column: str | None = None, loss_fn: torch.nn.Module | None = None,
                 weight: float = 1.0, prefix: str = "", num_classes: int = 2, label_names: list[str] | None = None):
        super().__init__(name, column, loss_fn, weight, prefix)
        self.num_classes = int(num_classes)
        self.label_names = checked_label_names(label_names, self.num_classes)

    def state(self) -> dict:
        return {**super().state(), "num_classes": self.num_classes, "label_names": self.label_names}

    def new_outputs(self) -> dict:
        return {"dice": [], "iou": [], "preview": None}

    def collect(self, outputs: dict, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None,
                batch: dict, image: torch.Tensor, worst: report.WorstCases | None) -> None:
        """``logits`` (B, K+1, D, H, W), ``target`` (B, 1, D, H, W) labels; per kept subject and label the Dice
        and IoU of the argmax."""
        ids, (logits, target, image) = kept_samples(keep, batch, logits, target, image)
        if not ids:
            return
        probability = torch.softmax(logits.float(), dim=1)  # (B, K+1, D, H, W)
        predicted = probability.argmax(dim=1, keepdim=True)  # (B, 1, D, H, W) labels 0..K
        if self.min_lesion_voxels > 1:  # task.min_lesion_voxels: each label's small components become background
            predicted = self.without_small_components(predicted, evaluation.remove_small_label_components)
        truth = torch.round(target.float()).long()
        labels = range(1, self.num_classes + 1)
        dice = M.dice_per_class(predicted, truth, self.num_classes).numpy()  # (B, K)
        iou = np.stack([np.asarray(M.iou_per_sample(predicted == k, truth == k)) for k in labels], axis=1)
        outputs["dice"].append(dice)
        outputs["iou"].append(iou)
        if worst is not None:
            for b, value in enumerate(dice.mean(axis=1).tolist()):
                worst.offer(1.0 - value, lambda b=b, value=value: {
                    "subject_id": ids[b], "dice": value,
                    "slices": report.orthogonal_slices(image[b, 0].float().cpu().numpy(),
                                                       truth=(truth[b, 0] > 0).cpu().numpy(),
                                                       prediction=(predicted[b, 0] > 0).cpu().numpy())})
        if outputs["preview"] is None:  # the TensorBoard overlay: any label against the background
            outputs["preview"] = {"image": image[0, 0].float().cpu().numpy(),
                                  "target": (truth[0, 0] > 0).float().cpu().numpy(),
                                  "probability": (1.0 - probability[0, 0]).cpu().numpy()}

    def parts(self, outputs: dict) -> dict[str, np.ndarray]:
        k = self.num_classes
        return {key: (np.concatenate(outputs[key]).reshape(-1, k) if outputs[key] else np.zeros((0, k)))
                for key in ("dice", "iou")}  # (subjects, K) each

    def metrics(self, parts: dict[str, np.ndarray]) -> dict[str, float]:
        dice = np.asarray(parts["dice"], dtype=np.float64).reshape(-1, self.num_classes)
        iou = np.asarray(parts["iou"], dtype=np.float64).reshape(-1, self.num_classes)
        if not len(dice):
            return {"dice": float("nan"), "iou": float("nan"),
                    **{f"dice_{name}": float("nan") for name in self.label_names}}
        per_label = dice.mean(axis=0)  # (K,): each label's mean per-subject Dice
        return {"dice": float(per_label.mean()), "iou": float(iou.mean(axis=0).mean()),
                **{f"dice_{name}": float(v) for name, v in zip(self.label_names, per_label)}}

    def predict_subject(self, output: torch.Tensor, label, where: PredictionContext) -> tuple[dict, dict | None]:
        """``<id>_<prefix>prob.nii.gz``: the K+1 probabilities as one 4-D float32 image (X, Y, Z, K+1) on the
        input's grid, volume k the probability of label k (0: background); ``<id>_<prefix>mask.nii.gz``: the
        label map (uint8, the most probable label of each voxel), on the input's grid (shape and affine);
        ``predicted_volume_ml`` (every label) and ``predicted_volume_ml_<name>`` per label; with a true label map
        (``label``: its path) brain3d.evaluation.label_map_case_metrics."""
        probs = output[0].numpy()  # (K+1, D, H, W): the ensemble mean of the softmaxes
        native = np.stack([invert_geometry(p, where.info, "trilinear") for p in probs[1:]], axis=-1)  # (X, Y, Z, K)
        background = np.clip(1.0 - native.sum(axis=-1, keepdims=True), 0.0, 1.0)  # also 1 outside the crop
        native = np.concatenate([background, native], axis=-1).astype(np.float32)  # (X, Y, Z, K+1)
        labels = native.argmax(axis=-1).astype(np.uint8)  # (X, Y, Z) labels 0..K
        # each label's components under task.min_lesion_voxels (in this grid's voxels) become background
        labels = evaluation.remove_small_label_components(labels, self.native_min_voxels(where))
        stem = f"{where.subject_id}_{self.prefix}"
        where.save_like_input(native, where.grid, where.out_dir / f"{stem}prob.nii.gz", np.float32)
        where.save_like_input(labels, where.grid, where.out_dir / f"{stem}mask.nii.gz", np.uint8)
        where.mask = (labels > 0).astype(np.uint8)  # report.html draws any label against the background
        voxel_ml = float(np.prod(where.grid.voxel_size_mm)) / 1000.0
        row = {self.out_key("predicted_volume_ml"): float((labels > 0).sum() * voxel_ml),
               **{self.out_key(f"predicted_volume_ml_{name}"): float((labels == k).sum() * voxel_ml)
                  for k, name in enumerate(self.label_names, start=1)}}
        if label is None:
            return row, None
        true_labels, _ = load_label_map(label, self.num_classes)
        where.true_mask = (true_labels > 0).astype(np.uint8)
        return row, evaluation.label_map_case_metrics(labels, true_labels, where.grid.voxel_size_mm, self.label_names)

    def prediction_metrics(self, evaluated: list[dict], num_samples: int, threshold: float) -> dict:
        """brain3d.evaluation.label_map_report: ``dice``, ``iou``, ``hd95_mm`` (means over the labels) and each
        label's, with 95% bootstrap intervals; the label map is the argmax, so no threshold."""
        return {**evaluation.label_map_report(evaluated, self.label_names, num_samples=num_samples),
                "min_lesion_voxels": self.min_lesion_voxels}


KINDS: dict[str, type[Task]] = {cls.kind: cls for cls in (ClassificationTask, RegressionTask, SegmentationTask)}
SINGLE_TASKS = tuple(KINDS)  # task=<kind>: one head named after its kind
MULTITASK = "multitask"


MAX_CLASSES = 255  # label maps are stored as uint8
_LABEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a label's name goes into metric names and CSV columns


def checked_num_classes(value: Any, where: str = "task.num_classes") -> int:
    """``task.num_classes`` as an int: 1 (binary, the default) or K in 2..255 (K labels plus background)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLASSES:
        raise ConfigError(f"{where}={value!r} must be a whole number from 1 to {MAX_CLASSES}: 1 for a binary mask, "
                          "K >= 2 for a label map of K labels plus background")
    return value


def checked_min_lesion_voxels(value: Any, kind: str, num_classes: int, where: str) -> int:
    """``task.min_lesion_voxels`` (a multi-task head's ``task.heads.<name>.min_lesion_voxels``) as an int >= 0:
    predicted components of fewer voxels (of the grid the model sees) are dropped from the mask (a label map: label
    by label, to background)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}={value!r} must be a whole number >= 0 (0 keeps every predicted component)")
    if value and kind != "segmentation":
        raise ConfigError(f"{where}={value} is for a segmentation head, not {kind}")
    return value


def checked_label_names(names: Any, num_classes: int, where: str = "data.label_names") -> list[str]:
    """The names of labels 1..K: ``names`` checked (K of them, unique, letters / digits / ``_.-``), or
    ``label1..labelK`` for None."""
    if names is None:
        return [f"label{k}" for k in range(1, num_classes + 1)]
    if isinstance(names, (str, bytes)) or not hasattr(names, "__len__"):
        raise ConfigError(f"{where}={names!r} must be a list of {num_classes} names, e.g. {where}=[csf,gm,wm]")
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ConfigError(f"{where} has {len(names)} names ({', '.join(names)}) but task.num_classes={num_classes} "
                          f"needs {num_classes}, one per label 1..{num_classes}")
    bad = [n for n in names if not _LABEL_NAME.fullmatch(n)]
    if bad:
        raise ConfigError(f"{where}: {bad[0]!r} is not a usable label name (letters, digits, _ . - only: it names "
                          f"metrics such as val_dice_<name>)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where} names {', '.join(repeated)} more than once; each label needs its own name")
    return names


def task_class(kind: str, num_classes: int = 1) -> type[Task]:
    """The class of a head of ``kind``: :class:`MultiClassSegmentationTask` for a segmentation with
    ``num_classes`` >= 2, else ``KINDS[kind]``."""
    if kind == "segmentation" and num_classes > 1:
        return MultiClassSegmentationTask
    return KINDS[kind]


def single_task_losses(task_cfg: DictConfig | dict) -> tuple[list[str], str]:
    """The loss options a single-task run may use and what to call the task in a message: ``task.losses``
    (``regression``...), or a multi-class segmentation's (``segmentation with task.num_classes=3``)."""
    num_classes = checked_num_classes(task_cfg.get("num_classes", 1))
    if task_cfg["name"] == "segmentation" and num_classes > 1:
        return list(MultiClassSegmentationTask.losses), f"segmentation with task.num_classes={num_classes}"
    return list(task_cfg["losses"]), str(task_cfg["name"])


def _head_for_classes(head: Any, kind: str, num_classes: int, where: str) -> Any:
    """A segmentation head's module config with ``out_channels`` = K+1 for ``num_classes`` K >= 2 (the config's
    ``out_channels: 1`` means "as the task needs"); unchanged for a binary head or another kind."""
    if kind != "segmentation" or num_classes == 1:
        return head
    config = OmegaConf.to_container(head, resolve=True) if isinstance(head, DictConfig) else dict(head)
    if config.get("deep_supervision"):
        raise ConfigError(f"{where}.deep_supervision=true works with binary segmentation only (num_classes=1); "
                          f"with num_classes={num_classes} add {where}.deep_supervision=false")
    given = config.get("out_channels", 1)
    if given not in (1, num_classes + 1):
        raise ConfigError(f"{where}.out_channels={given} does not fit num_classes={num_classes}: a multi-class head "
                          f"gives {num_classes + 1} channels (the labels plus background); leave it at 1")
    config["out_channels"] = num_classes + 1
    return config


class TaskSet:
    """The heads of one run, in config order, and what the loop does with all of them at once.

    ``multi`` (task=multitask): batches carry ``{head: tensor}`` targets with ``labelled`` flags; otherwise
    the one head's target tensor, every sample labelled.
    """

    def __init__(self, tasks: list[Task], multi: bool):
        self.tasks = {t.name: t for t in tasks}
        self.multi = multi

    def __iter__(self):
        return iter(self.tasks.values())

    def __getitem__(self, name: str) -> Task:
        return self.tasks[name]

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    @property
    def kinds(self) -> set[str]:
        return {t.kind for t in self}

    @property
    def mask_task(self) -> Task | None:
        """The head that learns from mask files (at most one per run), or None."""
        return next((t for t in self if t.reads_mask), None)

    @property
    def mask_classes(self) -> int:
        """The labels besides the background the mask files hold: 1 (binary masks, or no mask head); K >= 2:
        integer label maps 0..K, read, resampled and augmented per label."""
        return self.mask_task.num_classes if self.mask_task is not None else 1

    @property
    def stratify_task(self) -> Task | None:
        """The head whose classes the train/val split balances (the first classification head), or None."""
        return next((t for t in self if t.stratify), None)

    def targets(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """``({head: raw target}, {head: labelled (B,) bool, or None for every sample})`` of a batch."""
        if not self.multi:
            (name,) = self.tasks
            return {name: batch["target"]}, {name: None}
        return dict(batch["target"]), {name: batch["labelled"][name].reshape(-1).bool() for name in self.tasks}

    def loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
             labelled: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the heads' losses, and each head's (float32 scalars).

        A head's loss is its loss module on the samples labelled for it only, so it is the mean over those
        (``labelled`` None: all); a head with no labelled sample in the batch adds 0 (kept in the graph, so
        every parameter still receives a gradient, as DistributedDataParallel expects).
        """
        per_head: dict[str, torch.Tensor] = {}
        for name, task in self.tasks.items():
            keep = labelled[name]
            head_logits, target = logits[name], targets[name]
            deep = logits.get(name + DEEP_SUFFIX)  # a deep-supervised head's coarser logits, or None
            if keep is not None and not bool(keep.all()):
                if not bool(keep.any()):
                    per_head[name] = sum(x.float().sum() for x in [head_logits, *(deep or [])]) * 0.0
                    continue
                head_logits, target = head_logits[keep], target[keep]
                deep = [x[keep] for x in deep] if deep else None
            target = task.encode(target)
            per_head[name] = task.loss_fn(head_logits, target)
            if deep:
                per_head[name] = deep_supervised_loss(task.loss_fn, per_head[name], deep, target)
        if not self.multi:
            return next(iter(per_head.values())), per_head
        total = sum(self.tasks[name].weight * value for name, value in per_head.items())
        return total, per_head

    def label_of(self, subject, task: Task):
        """A manifest subject's label for ``task``: its ``labels`` entry (multi-task; None: unlabelled), else the
        single task's mask path or target."""
        if self.multi:
            return subject.labels.get(task.name)
        return subject.mask if task.reads_mask else subject.target

    def labels(self, subjects, task: Task) -> list:
        """The labels ``task`` learns from among ``subjects`` (a multi-task head: those labelled for it)."""
        values = [self.label_of(s, task) for s in subjects]
        return [v for v in values if v is not None] if self.multi else values

    def record_key(self, name: str, metric: str) -> str:
        """The history / metrics.csv key of a head's validation metric: ``val_auc`` (single task) or
        ``val_sex_auc`` (multi-task; TensorBoard ``val/sex/auc``)."""
        return f"val_{name}_{metric}" if self.multi else f"val_{metric}"

    def state(self) -> dict:
        return {"multi": self.multi, "heads": {name: t.state() for name, t in self.tasks.items()}}


def deep_supervised_loss(loss_fn: torch.nn.Module, full_loss: torch.Tensor, deep_logits: list[torch.Tensor],
                         target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's deep supervision: ``(full_loss + 1/2 loss(logits/2) + 1/4 loss(logits/4)) / 1.75``, the weights
    halving with each coarser output and normalised to sum 1 (so the loss keeps the scale it has without).

    The coarse targets are the binary mask average-pooled to each output's grid: the lesion fraction of each
    block, a soft target that BCE and soft Dice take as is. A 3-voxel lesion stays a positive there, where
    nearest-neighbour downsampling (nnU-Net's) could drop it.

    Shapes: target (B, 1, D, H, W) float 0/1; deep_logits [(B, 1, D/2, H/2, W/2), (B, 1, D/4, H/4, W/4)].
    """
    total, weight_sum = full_loss, 1.0
    for level, coarse in enumerate(deep_logits, start=1):
        block = [full // part for full, part in zip(target.shape[2:], coarse.shape[2:])]  # 2 or 4 per axis
        coarse_target = torch.nn.functional.avg_pool3d(target.float(), kernel_size=block)  # lesion fraction
        weight = 0.5**level
        total = total + weight * loss_fn(coarse, coarse_target)
        weight_sum += weight
    return total / weight_sum


def single_task(kind: str, loss_fn: torch.nn.Module | None = None, target_mean: float = 0.0,
                target_std: float = 1.0) -> Task:
    """One head of ``kind``, named after it (as a single-task run has), with a regression's target scaling."""
    task = KINDS[kind](kind, None, loss_fn)
    task.target_mean, task.target_std = target_mean, target_std
    return task


def _flat(values: list) -> np.ndarray:
    """Per-sample values collected batch by batch (tensors or arrays) as one flat numpy array."""
    if not values:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v).reshape(-1) for v in values])


# ---- building from the config ------------------------------------------------------------------------
def loss_config(loss: Any) -> dict:
    """A head's ``loss``: the name of a configs/loss option (``bce``, ``l1``...) or a mapping with ``_target_``
    (and ``name``). Returns the option's mapping."""
    if isinstance(loss, (dict, DictConfig)):
        return OmegaConf.to_container(loss, resolve=True) if isinstance(loss, DictConfig) else dict(loss)
    from brain3d.cli import config_dir  # the packaged configs/ folder

    path = Path(config_dir()) / "loss" / f"{loss}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"loss {loss!r} is not a loss option; choose one of {', '.join(options)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def build_loss_fn(loss: Any, kind: str, where: str, num_classes: int = 1) -> torch.nn.Module:
    """Instantiate a loss after checking that it fits the head's kind (``where`` names the config key; a
    segmentation head with ``num_classes`` >= 2 takes the multi-class losses)."""
    options = loss_config(loss)
    name = options.pop("name", None)
    valid = task_class(kind, num_classes).losses
    if name is not None and name not in valid:
        what = f"{kind} with num_classes={num_classes}" if num_classes > 1 else kind
        raise ConfigError(f"{where}={name} does not fit a {what} head; valid losses for {what}: {', '.join(valid)}")
    return instantiate(options)


def head_specs(task_cfg: DictConfig | dict) -> dict[str, dict]:
    """``{head name: {"kind", "column", "loss", "weight", "num_classes", "head"}}`` of a task config, checked.

    task=<kind>: one head named after the kind (its column and loss are data.target_col and ``loss``).
    task=multitask: ``task.heads`` in order; ``kind`` is required, ``column`` defaults to the kind's, ``loss``
    to the kind's first, ``weight`` to 1.0; ``head`` (the head module's config) is required. ``num_classes``
    (task.num_classes, or a head's; default 1) K >= 2 makes a segmentation head multi-class: its ``head`` gets
    ``out_channels`` K+1 and its losses are the multi-class ones.
    """
    name = task_cfg["name"]
    if name in SINGLE_TASKS:
        num_classes = checked_num_classes(task_cfg.get("num_classes", 1))
        if num_classes > 1 and name != "segmentation":
            raise ConfigError(f"task.num_classes={num_classes} is for task=segmentation (label maps), not task={name}")
        return {name: {"kind": name, "column": None, "loss": None, "weight": 1.0, "num_classes": num_classes,
                       "min_lesion_voxels": checked_min_lesion_voxels(task_cfg.get("min_lesion_voxels"), name,
                                                                      num_classes, "task.min_lesion_voxels"),
                       "head": _head_for_classes(task_cfg["head"], name, num_classes, "task.head")}}
    if name != MULTITASK:
        raise ConfigError(f"task.name={name!r} is not one of {', '.join((*SINGLE_TASKS, MULTITASK))}")
    heads = task_cfg.get("heads") or {}
    if not heads:
        raise ConfigError("task=multitask needs at least one head in task.heads")
    specs: dict[str, dict] = {}
    for head, spec in heads.items():
        if spec is None:  # task.heads.age=null removes a head
            continue
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"task.heads.{head}.kind={kind!r} is not one of {', '.join(KINDS)}")
        if spec.get("head") is None:
            raise ConfigError(f"task.heads.{head}.head is missing: the head module's config (with _target_)")
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
            raise ConfigError(f"task.heads.{head}.weight={weight!r} must be a number >= 0")
        num_classes = checked_num_classes(spec.get("num_classes", 1), f"task.heads.{head}.num_classes")
        if num_classes > 1 and kind != "segmentation":
            raise ConfigError(f"task.heads.{head}.num_classes={num_classes} is for a segmentation head, not {kind}")
        specs[str(head)] = {"kind": kind, "column": spec.get("column") or KINDS[kind].default_column,
                            "loss": spec.get("loss") or task_class(kind, num_classes).losses[0],
                            "weight": float(weight), "num_classes": num_classes,
                            "min_lesion_voxels": checked_min_lesion_voxels(
                                spec.get("min_lesion_voxels"), kind, num_classes,
                                f"task.heads.{head}.min_lesion_voxels"),
                            "head": _head_for_classes(spec["head"], kind, num_classes, f"task.heads.{head}.head")}
    if not specs:
        raise ConfigError("task=multitask: every head of task.heads is removed; keep at least one")
    masks = [h for h, s in specs.items() if KINDS[s["kind"]].reads_mask]
    if len(masks) > 1:
        raise ConfigError(f"task=multitask supports one segmentation head per run; task.heads has {masks}")
    return specs


def head_configs(task_cfg: DictConfig | dict) -> dict[str, Any]:
    """``{head name: head module config}`` of a task config, for brain3d.models.model.build_model."""
    return {name: spec["head"] for name, spec in head_specs(task_cfg).items()}


def build_task_set(task_cfg: DictConfig, single_loss: torch.nn.Module | None = None,
                   data_cfg: DictConfig | dict | None = None) -> TaskSet:
    """The run's heads: task=<kind> gets ``single_loss`` (the ``loss`` group, already checked) and its column
    from ``data_cfg`` (data.mask_col for a mask, else data.target_col); multitask builds each head's loss. A
    multi-class segmentation head names its labels with data.label_names (checked: one name per label)."""
    specs = head_specs(task_cfg)
    multi = task_cfg["name"] == MULTITASK
    label_names = (data_cfg or {}).get("label_names")
    tasks = []
    for name, spec in specs.items():
        cls = task_class(spec["kind"], spec["num_classes"])
        if multi:
            loss_fn = build_loss_fn(spec["loss"], spec["kind"], f"task.heads.{name}.loss", spec["num_classes"])
            args = (name, spec["column"], loss_fn, spec["weight"], f"{name}_")
        else:
            args = (name, (data_cfg or {}).get("mask_col" if cls.reads_mask else "target_col"), single_loss)
        if spec["num_classes"] > 1:
            tasks.append(cls(*args, num_classes=spec["num_classes"],
                             label_names=checked_label_names(label_names, spec["num_classes"])))
        else:
            tasks.append(cls(*args))
        if spec["min_lesion_voxels"]:
            tasks[-1].min_lesion_voxels = spec["min_lesion_voxels"]
    if label_names is not None and not any(t.num_classes > 1 for t in tasks if t.reads_mask):
        raise ConfigError(f"data.label_names={list(label_names)} names the labels of a multi-class segmentation; "
                          "set task.num_classes=K (K >= 2 labels) or leave data.label_names null")
    return TaskSet(tasks, multi)


def task_set_from_checkpoint(state: dict) -> TaskSet:
    """The heads a checkpoint was trained with (target scaling, class names, bias correction), for prediction.
    Checkpoints written before multi-task training hold one head: ``task`` / ``head_name`` and its scaling."""
    if state.get("tasks"):
        tasks = []
        for name, saved in state["tasks"]["heads"].items():
            num_classes = saved.get("num_classes", 1)
            extra = {"num_classes": num_classes, "label_names": saved.get("label_names")} if num_classes > 1 else {}
            task = task_class(saved["kind"], num_classes)(name, saved["column"], None, saved.get("weight", 1.0),
                                                          saved.get("prefix", ""), **extra)
            task.class_names, task.bias_correction = saved.get("class_names"), saved.get("bias_correction")
            task.target_mean, task.target_std = saved.get("target_mean", 0.0), saved.get("target_std", 1.0)
            if saved.get("min_lesion_voxels"):
                task.min_lesion_voxels = int(saved["min_lesion_voxels"])
            tasks.append(task)
        return TaskSet(tasks, bool(state["tasks"]["multi"]))
    task = KINDS[state["task"]](state["head_name"])
    task.class_names, task.bias_correction = state.get("class_names"), state.get("bias_correction")
    task.target_mean, task.target_std = state.get("target_mean", 0.0), state.get("target_std", 1.0)
    return TaskSet([task], multi=False)
