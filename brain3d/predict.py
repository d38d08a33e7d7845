"""``brain3d-predict``: rebuild models from checkpoints, predict every subject of a manifest, write the
results back on each input's own grid, and evaluate them when the manifest has targets.

Read top to bottom: load the checkpoint(s) (they alone define model, preprocessing, class mapping and
target scaling), read the manifest, then per subject: load (RAS) -> preprocess exactly as in training ->
predict (optionally flip-TTA, several checkpoints averaged) -> map back to the input file's grid and
orientation -> write. Last, ``predictions.csv`` and, with targets, ``metrics.json`` and ``metrics.csv`` (else
one warning saying why not). Manifest columns default to those the checkpoint was trained with; subjects of
its training split are flagged ``in_training_split``.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from tqdm.auto import tqdm

from brain3d import evaluation, report
from brain3d.checkpoint import load_checkpoint
from brain3d.cli import config_dir, keys_help, progress_mode, report_user_error, run_command
from brain3d.data.manifest import TASK_TARGET_COLS, Manifest, ManifestError
from brain3d.data.nifti import NativeGrid, load_mask, load_nifti_with_grid, save_on_native_grid
from brain3d.data.preprocess import invert_geometry, preprocess_volume, validate_settings
from brain3d.errors import ConfigError
from brain3d.hardware import resolve_device, resolve_precision
from brain3d.inference import predict_outputs
from brain3d.models.model import build_model
from brain3d.saliency import grad_cam
from brain3d.sliding_window import sliding_window_inference
from brain3d.train import read_manifest

log = logging.getLogger("brain3d.predict")


def load_models(paths: list[str], device: torch.device) -> tuple[list[torch.nn.Module], list[dict]]:
    """Rebuild each checkpoint's model from its stored config; all must share task and input shape.

    Raises:
        ConfigError: checkpoints of different tasks, input shapes or class mappings.
    """
    models, states = [], []
    for path in paths:
        state = load_checkpoint(path, map_location="cpu")
        config = state["config"]
        model = build_model(config["backbone"], config["task"]["head"], head_name=state["head_name"])
        model.load_state_dict(state["model"])
        models.append(model.to(device).eval())
        states.append({k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")})
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        for what, get in (("task", lambda s: s["task"]),
                          ("data.shape", lambda s: list(s["config"]["data"]["shape"] or [])),
                          ("preprocessing", lambda s: s["config"].get("preprocess")),
                          ("class mapping", lambda s: s.get("class_names"))):
            if get(state) != get(first):
                raise ConfigError(f"checkpoint {path} has {what} {get(state)}, but {paths[0]} has {get(first)}: "
                                  "an ensemble needs checkpoints of one task, input shape and class mapping")
    return models, states


# The manifest columns predict reads; None in predict.yaml means "the checkpoint's" (see manifest_columns).
COLUMN_KEYS = ("id_col", "image_col", "target_col", "mask_col")
# load_manifest's own defaults, for checkpoints whose config lacks a key (None: id and target chosen by task).
COLUMN_FALLBACKS = {"id_col": None, "image_col": "image", "target_col": None, "mask_col": "mask"}


def manifest_columns(data_cfg: DictConfig, train_data: dict) -> tuple[dict, dict]:
    """The column names to read (``{key: name}``) and where each came from (``{key: phrase}``, for messages).

    predict.yaml sets ``data.id_col/image_col/target_col/mask_col`` to null, meaning "as in training", so a
    model trained on a column named e.g. ``diagnosis`` is evaluated on ``diagnosis`` without repeating
    data.target_col (the data groups' own defaults, image / mask, could not tell "set" from "default"). A value
    given on the command line wins; a checkpoint without the key falls back to load_manifest's default.
    """
    columns, origins = {}, {}
    for key in COLUMN_KEYS:
        what = key[:-len("_col")]
        if data_cfg.get(key) is not None:
            columns[key], origins[key] = str(data_cfg[key]), f"data.{key}"
        elif train_data.get(key) is not None:
            columns[key], origins[key] = str(train_data[key]), f"the checkpoint's {what} column"
        else:
            columns[key], origins[key] = COLUMN_FALLBACKS[key], f"the default {what} column"
    return columns, origins


def no_metrics_reason(manifest: Manifest, task: str, columns: dict, origins: dict) -> str:
    """Why no metrics.json is written, as one log line: a silently missing file looks like a bug, and the
    usual cause (a column named otherwise than in training) is fixed by one override."""
    key = "mask_col" if task == "segmentation" else "target_col"
    name = columns[key] or TASK_TARGET_COLS[task]
    origin = origins[key] if columns[key] else f"the default target column of {task}"
    if name not in manifest.columns:
        return (f"no metrics.json: the manifest has no column {name!r} ({origin}); predictions only "
                f"(data.{key}=NAME names the column to evaluate on)")
    return f"no metrics.json: column {name!r} ({origin}) is empty in every row; predictions only"


def training_subject_ids(states: list[dict], paths: list[str]) -> set[str] | None:
    """The ids of the subjects the checkpoints were trained on: the union over an ensemble (each member has
    seen its own training split). None when a checkpoint predates ``train_subject_ids``: unknown, not "none"."""
    seen: set[str] = set()
    for path, state in zip(paths, states):
        if state.get("train_subject_ids") is None:
            log.info("checkpoint %s does not record its training split: in_training_split is left empty", path)
            return None
        seen.update(str(s) for s in state["train_subject_ids"])
    return seen


def warn_training_subjects(subject_ids: list[str], seen: set[str] | None) -> None:
    """One warning when subjects the model was trained on are predicted: their metrics are optimistic."""
    overlap = [s for s in subject_ids if seen and s in seen]
    if overlap:
        shown = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
        log.warning("%d of %d subjects were in the checkpoint's training split (%s): the model has seen them, so "
                    "their predictions and metrics are optimistic; in_training_split=true marks them in "
                    "predictions.csv and metrics.csv", len(overlap), len(subject_ids), shown)


def count_in_training(rows: list[dict]) -> int | None:
    """How many of the evaluated rows the model was trained on (None: the checkpoint does not say)."""
    flags = [r["in_training_split"] for r in rows]
    return None if any(f is None for f in flags) else int(sum(flags))


def log_skipped(manifest: Manifest) -> None:
    """data.on_error=skip: one warning per left-out row (as brain3d-train), so no subject vanishes unnoticed."""
    for skipped in manifest.skipped:
        log.warning("skipped line %s (%s): %s", skipped["line"], skipped["subject_id"] or "no id",
                    "; ".join(skipped["reasons"]))


def save_like_input(ras_array: np.ndarray, grid: NativeGrid, path: Path, dtype) -> None:
    """:func:`save_on_native_grid` with the input's trailing singleton axes put back: an (X, Y, Z, 1) input gets
    (X, Y, Z, 1) outputs, so tools that check an overlay's shape against its image accept them."""
    extra = tuple(grid.header.get_data_shape()[3:]) if hasattr(grid.header, "get_data_shape") else ()
    save_on_native_grid(ras_array.reshape(ras_array.shape + extra), grid, path, dtype)


def predict(cfg: DictConfig) -> dict:
    """Predict (and evaluate) as ``cfg`` says; return the metrics dict (empty without targets)."""
    paths = ([str(p) for p in cfg.checkpoint] if isinstance(cfg.checkpoint, (list, ListConfig))
             else [str(cfg.checkpoint)])
    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    precision, amp_dtype, _ = resolve_precision(cfg.precision, device)
    if cfg.saliency not in (None, "gradcam"):
        raise ConfigError(f"saliency={cfg.saliency!r} is not one of null, gradcam")
    models, states = load_models(paths, device)
    task, head = states[0]["task"], states[0]["head_name"]
    shape = states[0]["config"]["data"]["shape"]
    class_names = states[0].get("class_names")
    if cfg.saliency and task == "segmentation":
        raise ConfigError("saliency=gradcam is for classification and regression checkpoints")
    log.info("%d checkpoint(s), task %s, input shape %s, device %s, precision %s, tta %s",
             len(models), task, shape, device, precision, cfg.tta)

    columns, origins = manifest_columns(cfg.data, states[0]["config"].get("data") or {})
    manifest = read_manifest(cfg.data, task, require_targets=False, class_names=class_names, **columns)
    log_skipped(manifest)
    id_col = manifest.id_col  # predictions.csv keeps the manifest's name (e.g. participant_id)
    seen = training_subject_ids(states, paths)
    warn_training_subjects([s.subject_id for s in manifest.subjects], seen)
    # The checkpoint's preprocessing, applied exactly as in training (older checkpoints: resize to data.shape).
    train_config = states[0]["config"]
    settings = validate_settings(train_config.get("preprocess") or {"mode": "resize", "shape": list(shape)})
    patch_size = train_config["data"].get("patch_size")

    rows, case_rows = [], []
    worst = report.WorstCases(int(cfg.get("report_subjects", 16)))  # report.html: the worst subjects' slices
    for subject in tqdm(manifest.subjects, desc="predict", disable=progress_mode(cfg.progress) != "bars",
                        dynamic_ncols=True):
        image_ras, _, grid = load_nifti_with_grid(subject.image)
        image, _, info = preprocess_volume(image_ras, grid.voxel_size_mm, settings)
        x = torch.from_numpy(image)[None, None]  # (1, 1, D, H, W); stays on the CPU for sliding windows
        # One model at a time: each checkpoint maps its own outputs back (its own target scaling).
        outputs = []
        for model, state in zip(models, states):
            if patch_size and task == "segmentation":
                # Patch-trained: whole volume by Gaussian-weighted windows, probabilities averaged (nnU-Net)
                out = sliding_window_inference(
                    x, lambda w, m=model: predict_outputs([m], w, head, task, tta=cfg.tta, amp_dtype=amp_dtype),
                    patch_size, overlap=cfg.sw_overlap, batch_size=cfg.sw_batch_size, compute_device=device,
                    accumulate_device=cfg.get("sw_device") or "cpu",
                )
            else:
                out = predict_outputs([model], x.to(device), head, task, tta=cfg.tta, amp_dtype=amp_dtype)
            if task == "regression":
                out = out * state["target_std"] + state["target_mean"]
            outputs.append(out.cpu())
        output = torch.stack(outputs).mean(0)  # probabilities or values, averaged over the ensemble
        in_training = None if seen is None else subject.subject_id in seen
        row = {id_col: subject.subject_id, "in_training_split": in_training}

        if task == "segmentation":
            probability = invert_geometry(output[0, 0].numpy(), info, "trilinear")  # back on the input's RAS grid
            mask = (probability > cfg.threshold).astype(np.uint8)
            save_like_input(probability.astype(np.float32), grid, out_dir / f"{subject.subject_id}_prob.nii.gz",
                            np.float32)
            save_like_input(mask, grid, out_dir / f"{subject.subject_id}_mask.nii.gz", np.uint8)
            row["predicted_volume_ml"] = float(mask.sum() * np.prod(grid.voxel_size_mm) / 1000.0)
            if subject.mask is not None:
                true_mask, _ = load_mask(subject.mask)
                case = evaluation.segmentation_case_metrics(mask, true_mask, grid.voxel_size_mm)
                case_rows.append({id_col: subject.subject_id, "in_training_split": in_training, **case})
        elif task == "classification":
            probability = float(output.reshape(-1)[0])
            row["probability"] = probability
            row["predicted_class"] = class_names[int(probability > cfg.threshold)]
            if subject.target is not None:
                row["true_class"] = class_names[int(subject.target)]
                row["target"] = subject.target
        else:
            value = float(output.reshape(-1)[0])
            row["prediction"] = value
            correction = states[0].get("bias_correction") if len(states) == 1 else None
            if correction:
                row["prediction_corrected"] = float(evaluation.apply_bias_correction(np.array([value]), correction)[0])
            if subject.target is not None:
                row["target"] = subject.target
                row["brain_age_gap"] = value - subject.target
                if correction:
                    row["brain_age_gap_corrected"] = row["prediction_corrected"] - subject.target

        if cfg.saliency == "gradcam":
            cams = [grad_cam(model, x.to(device), head) for model in models]
            cam = invert_geometry(np.mean(cams, axis=0)[0], info, "trilinear")
            save_like_input(cam.astype(np.float32), grid, out_dir / f"{subject.subject_id}_saliency.nii.gz", np.float32)
        offer_report_case(worst, task, subject, row, image_ras, grid.voxel_size_mm, len(rows),
                          mask=mask if task == "segmentation" else None,
                          true_mask=true_mask if task == "segmentation" and subject.mask is not None else None,
                          dice=case["dice"] if task == "segmentation" and subject.mask is not None else None)
        rows.append(row)

    write_csv(out_dir / "predictions.csv", rows)
    metrics = {}
    n_boot = int(cfg.bootstrap_samples)
    # Metrics over the rows that have a target (or mask); the others are predicted only.
    evaluated = case_rows if task == "segmentation" else [r for r in rows if "target" in r]
    if evaluated and len(evaluated) < len(rows):
        log.info("metrics over the %d of %d subjects with a %s", len(evaluated), len(rows),
                 "mask" if task == "segmentation" else "target")
    if task == "classification" and evaluated:
        probs = np.array([r["probability"] for r in evaluated])
        labels = np.array([r["target"] for r in evaluated])
        metrics = evaluation.classification_report(probs, labels, threshold=cfg.threshold, num_samples=n_boot)
        metrics["positive_class"] = class_names[1]
        write_csv(out_dir / "metrics.csv", evaluated)
    elif task == "regression" and evaluated:
        pred = np.array([r["prediction"] for r in evaluated])
        target = np.array([r["target"] for r in evaluated])
        metrics = evaluation.regression_report(pred, target, num_samples=n_boot)
        if "prediction_corrected" in evaluated[0]:
            corrected = np.array([r["prediction_corrected"] for r in evaluated])
            metrics["bias_corrected"] = evaluation.regression_report(corrected, target, num_samples=n_boot)
        write_csv(out_dir / "metrics.csv", evaluated)
    elif task == "segmentation" and case_rows:
        cases = [{k: v for k, v in r.items() if k not in (id_col, "in_training_split")} for r in case_rows]
        metrics = evaluation.segmentation_report(cases, num_samples=n_boot)
        metrics["threshold"] = cfg.threshold
        write_csv(out_dir / "metrics.csv", case_rows)
    if metrics:
        metrics = {"task": task, "checkpoints": paths, "tta": bool(cfg.tta), **metrics,
                   "num_in_training_split": count_in_training(evaluated)}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    else:
        log.warning("%s", no_metrics_reason(manifest, task, columns, origins))
    report.ReportGuard("report.html")(
        report.write_prediction_report, out_dir, task, metrics, worst.sorted(), int(cfg.get("report_subjects", 16)),
        total_cases=worst.total, scored=bool(evaluated), class_names=class_names,
        note="Each picture shows the input scan on its own grid (reoriented to RAS, in mm proportions)"
             + (" with the written mask (red) and, where the manifest has one, the true mask (green)."
                if task == "segmentation" else "."))
    log.info("wrote %d predictions to %s%s", len(rows), out_dir, " with metrics.json" if metrics else "")
    return metrics


def offer_report_case(worst: report.WorstCases, task: str, subject, row: dict, image_ras: np.ndarray, voxel_size_mm,
                      index: int, mask=None, true_mask=None, dice: float | None = None) -> None:
    """One subject for report.html, ranked as the run report ranks them: 1 - Dice, |p - label|,
    |prediction - target|; subjects without a target come after the scored ones, in manifest order. Slices are
    cut (on the input's RAS grid) only for subjects among the worst so far."""
    values: dict = {"subject_id": subject.subject_id}
    badness = -1e9 - index  # unscored: after every scored subject, in manifest order
    if task == "segmentation":
        values["predicted_volume_ml"] = row.get("predicted_volume_ml")
        if dice is not None:
            values["dice"], badness = float(dice), 1.0 - float(dice)
    elif task == "classification":
        values["probability"] = row["probability"]
        if subject.target is not None:
            values["label"] = float(subject.target)
            badness = abs(row["probability"] - float(subject.target))
    else:
        values["prediction"] = row["prediction"]
        if subject.target is not None:
            values["target"] = float(subject.target)
            badness = abs(row["prediction"] - float(subject.target))
    worst.offer(badness, lambda: {**values, "slices": report.orthogonal_slices(
        image_ras, truth=true_mask, prediction=mask, voxel_size_mm=voxel_size_mm)})


def write_csv(path: Path, rows: list[dict]) -> None:
    """The rows as CSV: the union of their columns in first-seen order; booleans as true / false (what pandas
    and R read as logicals), None as an empty cell."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: str(v).lower() if isinstance(v, bool) else v for k, v in r.items()} for r in rows)


USER_ERRORS = (ConfigError, ManifestError, FileNotFoundError, ValueError)

HELP = f"""brain3d-predict: predict with brain3d-train checkpoints; write the results on each input scan's own grid.

The checkpoint alone defines the model, the preprocessing, the class names and the target scaling; this command
only needs which scans to read and where to write. With targets (or masks) in the manifest it also writes
metrics.json (95% bootstrap intervals) and metrics.csv (one row per subject).

Reads:
{keys_help("predict")}
  data=nifti (default) | bids | msd | synthetic, as in brain3d-train; data.manifest=PATH (CSV or TSV),
  data.on_error=raise|skip; data.*_col: columns (null: the ones the checkpoint was trained with)

Examples:
  brain3d-predict checkpoint=outputs/segmentation/2026-12-01/10-00-00/checkpoints/best.pt data.manifest=new.csv output_dir=preds
  brain3d-predict checkpoint=run/checkpoints/best.pt data.manifest=test.tsv output_dir=preds tta=true
  brain3d-predict checkpoint=[cv/0/checkpoints/best.pt,cv/1/checkpoints/best.pt] data.manifest=test.csv output_dir=ens
  brain3d-predict checkpoint=age/checkpoints/best.pt data.manifest=test.csv output_dir=preds saliency=gradcam
  brain3d-predict checkpoint=run/checkpoints/best.pt data=bids data.root=/data/bids output_dir=preds

Writes: predictions.csv; segmentation <id>_prob.nii.gz and <id>_mask.nii.gz; metrics.json / metrics.csv with targets.
Exit status: 0 done, 2 a mistake in the command, config or data."""  # noqa: E501 (an example is one command a line)

REQUIRED = {"checkpoint": "checkpoint=PATH (a best.pt or last.pt written by brain3d-train; [A,B] for an ensemble)",
            "output_dir": "output_dir=DIR (where predictions, masks and metrics are written)"}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except USER_ERRORS as err:
        report_user_error("brain3d-predict", err)
        sys.exit(2)


def main() -> None:
    """``brain3d-predict``: --help, the command-line check (brain3d.cli), then Hydra."""
    run_command(hydra_main, "brain3d-predict", "predict", HELP, required=REQUIRED)


if __name__ == "__main__":
    main()
