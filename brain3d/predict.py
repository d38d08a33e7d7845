"""``brain3d-predict``: rebuild models from checkpoints, predict every subject of a manifest, write the
results back on each input's own grid, and evaluate them when the manifest has targets.

Read top to bottom: load the checkpoint(s) (they alone define model, preprocessing, class mapping and
target scaling), read the manifest, then per subject: load (RAS) -> preprocess exactly as in training ->
predict (optionally flip-TTA, several checkpoints averaged) -> map back to the input file's grid and
orientation -> write. Last, ``predictions.csv`` and, with targets, ``metrics.json`` and ``metrics.csv``.
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

from brain3d import evaluation
from brain3d.checkpoint import load_checkpoint
from brain3d.data.manifest import ManifestError
from brain3d.data.nifti import load_mask, load_nifti_with_grid, save_on_native_grid
from brain3d.data.preprocess import invert_geometry, preprocess_volume, validate_settings
from brain3d.inference import predict_outputs
from brain3d.models.model import build_model
from brain3d.saliency import grad_cam
from brain3d.sliding_window import sliding_window_inference
from brain3d.errors import ConfigError
from brain3d.hardware import resolve_device, resolve_precision
from brain3d.train import _config_dir, read_manifest

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
        for what, get in (("task", lambda s: s["task"]), ("data.shape", lambda s: list(s["config"]["data"]["shape"] or [])),
                          ("preprocessing", lambda s: s["config"].get("preprocess")),
                          ("class mapping", lambda s: s.get("class_names"))):
            if get(state) != get(first):
                raise ConfigError(f"checkpoint {path} has {what} {get(state)}, but {paths[0]} has {get(first)}: "
                                  "an ensemble needs checkpoints of one task, input shape and class mapping")
    return models, states


def predict(cfg: DictConfig) -> dict:
    """Predict (and evaluate) as ``cfg`` says; return the metrics dict (empty without targets)."""
    paths = [str(p) for p in cfg.checkpoint] if isinstance(cfg.checkpoint, (list, ListConfig)) else [str(cfg.checkpoint)]
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

    manifest = read_manifest(cfg.data, task, require_targets=False, class_names=class_names)
    # The checkpoint's preprocessing, applied exactly as in training (older checkpoints: resize to data.shape).
    train_config = states[0]["config"]
    settings = validate_settings(train_config.get("preprocess") or {"mode": "resize", "shape": list(shape)})
    patch_size = train_config["data"].get("patch_size")

    rows, case_rows = [], []
    for subject in tqdm(manifest.subjects, desc="predict", disable=not cfg.progress, dynamic_ncols=True):
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
        row = {"subject_id": subject.subject_id}

        if task == "segmentation":
            probability = invert_geometry(output[0, 0].numpy(), info, "trilinear")  # back on the input's RAS grid
            mask = (probability > cfg.threshold).astype(np.uint8)
            save_on_native_grid(probability.astype(np.float32), grid, out_dir / f"{subject.subject_id}_prob.nii.gz", np.float32)
            save_on_native_grid(mask, grid, out_dir / f"{subject.subject_id}_mask.nii.gz", np.uint8)
            row["predicted_volume_ml"] = float(mask.sum() * np.prod(grid.voxel_size_mm) / 1000.0)
            if subject.mask is not None:
                true_mask, _ = load_mask(subject.mask)
                case = evaluation.segmentation_case_metrics(mask, true_mask, grid.voxel_size_mm)
                case_rows.append({"subject_id": subject.subject_id, **case})
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
            save_on_native_grid(cam.astype(np.float32), grid, out_dir / f"{subject.subject_id}_saliency.nii.gz", np.float32)
        rows.append(row)

    write_csv(out_dir / "predictions.csv", rows)
    metrics = {}
    n_boot = int(cfg.bootstrap_samples)
    if task == "classification" and manifest.has_targets:
        probs = np.array([r["probability"] for r in rows])
        labels = np.array([r["target"] for r in rows])
        metrics = evaluation.classification_report(probs, labels, threshold=cfg.threshold, num_samples=n_boot)
        metrics["positive_class"] = class_names[1]
        write_csv(out_dir / "metrics.csv", rows)
    elif task == "regression" and manifest.has_targets:
        pred = np.array([r["prediction"] for r in rows])
        target = np.array([r["target"] for r in rows])
        metrics = evaluation.regression_report(pred, target, num_samples=n_boot)
        if "prediction_corrected" in rows[0]:
            corrected = np.array([r["prediction_corrected"] for r in rows])
            metrics["bias_corrected"] = evaluation.regression_report(corrected, target, num_samples=n_boot)
        write_csv(out_dir / "metrics.csv", rows)
    elif task == "segmentation" and case_rows:
        metrics = evaluation.segmentation_report([{k: v for k, v in r.items() if k != "subject_id"} for r in case_rows], num_samples=n_boot)
        metrics["threshold"] = cfg.threshold
        write_csv(out_dir / "metrics.csv", case_rows)
    if metrics:
        metrics = {"task": task, "checkpoints": paths, "tta": bool(cfg.tta), **metrics}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("wrote %d predictions to %s%s", len(rows), out_dir, " with metrics.json" if metrics else "")
    return metrics


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # union of columns, first-seen order
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


USER_ERRORS = (ConfigError, ManifestError, FileNotFoundError, ValueError)


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        print(f"brain3d-predict: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
