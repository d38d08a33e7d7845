"""``brain3d-predict``: rebuild models from checkpoints, predict every subject of a manifest (or every NIfTI file
``input=`` names), write the results back on each input's own grid, and evaluate them when the manifest has targets.

Read top to bottom: load the checkpoint(s) (they alone define model, preprocessing, class mapping and
target scaling), read the manifest, then per subject: load (RAS) -> preprocess exactly as in training ->
predict (optionally flip-TTA, several checkpoints averaged) -> map back to the input file's grid and
orientation -> write. Last, ``predictions.csv`` and, with targets, ``metrics.json`` and ``metrics.csv`` (else
one warning saying why not). Manifest columns default to those the checkpoint was trained with; subjects of
its training split are flagged ``in_training_split``. ``input=FILE|FOLDER`` (brain3d.data.inputs) needs no
manifest: its files are checked as a manifest's are, and predicted without targets. ``output_layout=bids``
(brain3d.output_layout) writes BIDS-derivatives names.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import tempfile
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from brain3d import report
from brain3d.checkpoint import load_checkpoint
from brain3d.cli import config_dir, keys_help, progress_mode, report_user_error, run_command
from brain3d.command_setup import read_manifest
from brain3d.data.channels import load_channels
from brain3d.data.inputs import (
    LISTING_COLUMNS,
    Scan,
    find_scans,
    input_folder,
    input_problems,
    skipped_message,
    write_listing,
)
from brain3d.data.manifest import Manifest, ManifestError
from brain3d.data.nifti import NativeGrid, save_on_native_grid
from brain3d.data.preprocess import invert_geometry, preprocess_volume, validate_settings
from brain3d.errors import ConfigError
from brain3d.hardware import resolve_device, resolve_precision
from brain3d.inference import predict_heads, predict_outputs, tta_flip_axes
from brain3d.models.model import build_model
from brain3d.output_layout import OutputLayout, check_layout, segmentation_desc
from brain3d.saliency import grad_cam
from brain3d.sliding_window import sliding_window_inference
from brain3d.tasks import (
    MULTITASK,
    PredictionContext,
    TaskSet,
    checked_min_lesion_voxels,
    head_configs,
    task_set_from_checkpoint,
)

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
        model = build_model(config["backbone"], head_configs(config["task"]))
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
            columns[key], origins[key] = column_names(data_cfg[key]), f"data.{key}"
        elif train_data.get(key) is not None:
            columns[key], origins[key] = column_names(train_data[key]), f"the checkpoint's {what} column"
        else:
            columns[key], origins[key] = COLUMN_FALLBACKS[key], f"the default {what} column"
    return columns, origins


def column_names(value):
    """A column setting as load_manifest takes it: a name, or (data.image_col of several channels) a list."""
    return [str(v) for v in value] if isinstance(value, (list, tuple, ListConfig)) else str(value)


def check_channels(columns: dict, origins: dict, state: dict) -> None:
    """The image columns must be as many as the checkpoint's input channels (backbone.in_channels)."""
    image_cols = columns["image_col"]
    count = len(image_cols) if isinstance(image_cols, list) else 1
    in_channels = int(state["config"]["backbone"].get("in_channels", 1))
    if count != in_channels:
        raise ConfigError(f"data.image_col={image_cols} ({origins['image_col']}) names {count} column(s), but the "
                          f"checkpoint's model reads {in_channels} channel(s) "
                          f"(trained with data.image_col={(state['config'].get('data') or {}).get('image_col')})")


def no_metrics_reason(manifest: Manifest, tasks: TaskSet, columns: dict, origins: dict) -> str:
    """Why no metrics.json is written, as one log line: a silently missing file looks like a bug, and the
    usual cause (a column named otherwise than in training) is fixed by one override."""
    if tasks.multi:
        missing = [f"{t.name}: {t.column!r}" for t in tasks if t.column not in manifest.columns]
        return (f"no metrics.json: no subject has a label for any head ({'; '.join(missing) or 'every cell empty'}"
                f" missing from the manifest); predictions only")
    task = next(iter(tasks))
    key = "mask_col" if task.reads_mask else "target_col"
    name = columns[key] or task.default_column
    origin = origins[key] if columns[key] else f"the default target column of {task.kind}"
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
    (X, Y, Z, 1) outputs, so tools that check an overlay's shape against its image accept them. An array with its
    own 4th axis (a multi-class head's (X, Y, Z, K+1) probabilities) is written as it is."""
    extra = tuple(grid.header.get_data_shape()[3:]) if hasattr(grid.header, "get_data_shape") else ()
    extra = extra if ras_array.ndim == 3 else ()
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
    layout = check_layout(cfg.get("output_layout", "flat"))
    scans = input_scans(cfg, out_dir)  # input=FILE|FOLDER: its files (None: the data group's manifest)
    models, states = load_models(paths, device)
    tasks = task_set_from_checkpoint(states[0])
    if len(states) > 1:  # each member's bias correction was fitted on its own validation split: none for the mean
        for task in tasks:
            task.bias_correction = None
    if cfg.get("min_lesion_voxels") is not None:  # the command line's; null: each checkpoint's own
        for task in tasks:
            if task.reads_mask:
                task.min_lesion_voxels = checked_min_lesion_voxels(cfg.min_lesion_voxels, task.kind,
                                                                   task.num_classes, "min_lesion_voxels")
    if cfg.saliency and (tasks.multi or tasks.mask_task is not None):
        raise ConfigError("saliency=gradcam is for single-task classification and regression checkpoints")
    flip_axes = prediction_flip_axes(cfg.get("tta"), states[0])
    with open_dict(cfg):
        cfg.tta = list(flip_axes)  # what ensemble_outputs and metrics.json read
    log.info("%d checkpoint(s), task %s (heads %s), input shape %s, device %s, precision %s, tta flips of axes %s",
             len(models), states[0]["task"], ", ".join(tasks.names), states[0]["config"]["data"]["shape"], device,
             precision, list(flip_axes) or "none")
    if scans is None:
        manifest, columns, origins = read_prediction_manifest(cfg, states[0], tasks)
    else:
        manifest = read_input_manifest(cfg, states[0], tasks, scans)
    outputs = output_layout(layout, out_dir, manifest, states[0], tasks)
    seen = training_subject_ids(states, paths)
    warn_training_subjects([s.subject_id for s in manifest.subjects], seen)
    # The checkpoint's preprocessing, applied exactly as in training (older checkpoints: resize to data.shape),
    # and each member's own heads (its target scaling), both read once.
    train_config = states[0]["config"]
    settings = validate_settings(train_config.get("preprocess") or {"mode": "resize",
                                                                    "shape": list(train_config["data"]["shape"])})
    members = [(model, task_set_from_checkpoint(state)) for model, state in zip(models, states)]
    patch_size = train_config["data"].get("patch_size")
    rows, evaluated = [], {task.name: [] for task in tasks}  # evaluated: per head, the rows with a label
    worst = report.WorstCases(int(cfg.get("report_subjects", 16)))  # report.html: the worst subjects' slices
    for index, subject in enumerate(tqdm(manifest.subjects, desc="predict", dynamic_ncols=True,
                                         disable=progress_mode(cfg.progress) != "bars")):
        in_training = None if seen is None else subject.subject_id in seen
        row, evaluations, picture = predict_subject(cfg, subject, members, tasks, settings, patch_size, out_dir,
                                                    device, amp_dtype, save=outputs.saver(subject.subject_id))
        row = {manifest.id_col: subject.subject_id, **input_columns(subject, manifest.id_col, scans, outputs),
               "in_training_split": in_training, **row}
        for name, result in evaluations.items():
            if result is not None:
                evaluated[name].append((row, result))
        offer_report_case(worst, tasks, subject, row, evaluations, picture, index)
        rows.append(row)
    write_csv(out_dir / "predictions.csv", rows)
    metrics = write_metrics(cfg, out_dir, paths, tasks, manifest.id_col, rows, evaluated)
    if not metrics and scans is None:  # input= said so once at the start
        log.warning("%s", no_metrics_reason(manifest, tasks, columns, origins))
    outputs.finish(paths, input_folder(str(cfg.input)) if scans is not None else data_folder(cfg, manifest))
    shown = tasks.mask_task or next(iter(tasks))
    report.ReportGuard("report.html")(
        report.write_prediction_report, out_dir, shown.kind, metrics, worst.sorted(),
        int(cfg.get("report_subjects", 16)), total_cases=worst.total, scored=bool(evaluated[shown.name]),
        class_names=shown.class_names,
        note="Each picture shows the input scan on its own grid (reoriented to RAS, in mm proportions)"
             + (" with the written mask (red) and, where the manifest has one, the true mask (green)."
                if shown.reads_mask else "."))
    log.info("wrote %d predictions to %s%s", len(rows), out_dir, " with metrics.json" if metrics else "")
    return metrics


def read_prediction_manifest(cfg: DictConfig, state: dict, tasks: TaskSet,
                             listing: Path | None = None) -> tuple[Manifest, dict, dict]:
    """The manifest, read with the checkpoint's columns and class names (targets optional: a row without one
    is predicted, not evaluated); also the columns and where each came from (for messages). ``listing``:
    input='s files as a manifest (:func:`read_input_manifest`), read instead, with its own id and image columns."""
    columns, origins = manifest_columns(cfg.data, state["config"].get("data") or {})
    check_channels(columns, origins, state)
    data_cfg = cfg.data
    if listing is not None:
        data_cfg = OmegaConf.merge(cfg.data, {"manifest": str(listing)})
        columns.update(id_col=LISTING_COLUMNS[0], image_col=LISTING_COLUMNS[1])
    num_classes = tasks.mask_classes
    if tasks.multi:
        heads = [(t.name, t.kind, t.column) for t in tasks]
        class_names = {t.name: t.class_names for t in tasks if t.class_names is not None}
        manifest = read_manifest(data_cfg, MULTITASK, require_targets=False, class_names=class_names or None,
                                 heads=heads, num_classes=num_classes, **columns)
    else:
        manifest = read_manifest(data_cfg, state["task"], require_targets=False,
                                 class_names=next(iter(tasks)).class_names, num_classes=num_classes, **columns)
    if listing is None:
        log_skipped(manifest)
    return manifest, columns, origins


def output_layout(layout: str, out_dir: Path, manifest: Manifest, state: dict, tasks: TaskSet) -> OutputLayout:
    """Where each subject's images go (brain3d.output_layout), every name checked before any is predicted; the
    desc of a single-task segmentation's BIDS names from the checkpoint's mask column, and a multi-class one's
    label map a BIDS dseg."""
    label_map = tasks.mask_classes > 1
    desc = segmentation_desc((state["config"].get("data") or {}).get("mask_col"), label_map)
    return OutputLayout(layout, out_dir, {s.subject_id: s.image for s in manifest.subjects}, save_like_input, desc,
                        label_map)


def input_scans(cfg: DictConfig, out_dir: Path) -> list[Scan] | None:
    """``input=``: the files it names (brain3d.data.inputs.find_scans), logged once with "predictions only";
    None without it. One line (ConfigError) for input= given with data.manifest or another data source, or a
    folder that is output_dir itself (a second run would read the predictions as scans)."""
    if cfg.get("input") in (None, ""):
        return None
    given = str(cfg.input)
    if cfg.data.get("manifest"):
        raise ConfigError(f"input={given} and data.manifest={cfg.data.manifest} both say what to predict; give one "
                          f"(input= needs no manifest)")
    if cfg.data.source != "nifti":
        raise ConfigError(f"input={given} predicts the files it names, but data={cfg.data.source} reads subjects of "
                          f"its own; drop data={cfg.data.source} or input=")
    scans = find_scans(given)
    if Path(given).expanduser().is_dir() and input_folder(given) == input_folder(str(out_dir)):
        raise ConfigError(f"output_dir={out_dir} is the input folder {given}: a second run would read the "
                          f"predictions as scans; write them to another folder")
    log.info("input=%s: %d NIfTI file(s); no targets with input=, so predictions only (no metrics.json)", given,
             len(scans))
    return scans


def read_input_manifest(cfg: DictConfig, state: dict, tasks: TaskSet, scans: list[Scan]) -> Manifest:
    """input=: its files as a manifest without targets, checked as a manifest is (every header; with
    data.check_data every file decoded once; data.on_error=skip leaves a bad file out with a warning), every
    problem reported together and named by its file."""
    given = str(cfg.input)
    in_channels = int(state["config"]["backbone"].get("in_channels", 1))
    if in_channels > 1:
        trained_with = (state["config"].get("data") or {}).get("image_col")
        raise ConfigError(f"input={given} gives one file per scan, but the checkpoint's model reads {in_channels} "
                          f"channels (trained with data.image_col={trained_with}); list each subject's files in a "
                          f"manifest (data.manifest=PATH)")
    with tempfile.TemporaryDirectory(prefix="brain3d-input-") as tmp:
        listing = write_listing(scans, Path(tmp) / "inputs.csv")
        try:
            manifest, _, _ = read_prediction_manifest(cfg, state, tasks, listing)
        except ManifestError as err:
            raise input_problems(given, scans, err.problems) from None
    for skipped in manifest.skipped:
        log.warning("%s", skipped_message(scans, skipped))
    return manifest


def input_columns(subject, id_col: str, scans: list[Scan] | None, outputs: OutputLayout) -> dict:
    """predictions.csv columns after the id: the layout's (bids: participant_id, session; never the id column
    itself) and, with input=, the scan's ``image`` path."""
    columns = {k: v for k, v in outputs.columns(subject.subject_id).items() if k != id_col}
    return {**columns, "image": str(subject.image)} if scans is not None else columns


def data_folder(cfg: DictConfig, manifest: Manifest) -> Path:
    """Where a manifest's scans come from, for dataset_description.json's SourceDatasets: ``data.root`` (bids,
    msd), else the first scan's folder."""
    root = cfg.data.get("root")
    return Path(str(root)).expanduser() if root else Path(manifest.subjects[0].image).parent


def predict_subject(cfg: DictConfig, subject, members: list, tasks: TaskSet, settings: dict, patch_size,
                    out_dir: Path, device, amp_dtype, save=save_like_input) -> tuple[dict, dict, dict]:
    """One subject: load (RAS), preprocess with the checkpoint's ``settings``, predict every head (ensemble
    mean over ``members``, (model, its TaskSet) pairs; optional flip TTA; sliding windows after patch
    training), write its outputs on the input's grid with ``save`` (``save_like_input``, or the output layout's
    writer: brain3d.output_layout). Returns (predictions.csv columns, {head: evaluation row or None}, what
    report.html needs to draw it)."""
    # every channel (data.image_col's columns) on the first one's grid, which the outputs are written on
    image_ras, _, grid = load_channels(subject.image_paths)
    image, _, info = preprocess_volume(image_ras, grid.voxel_size_mm, settings)
    x = torch.from_numpy(image if image.ndim == 4 else image[None])[None]  # (1, C, D, H, W); stays on the CPU
    image_ras = image_ras[0] if image_ras.ndim == 4 else image_ras  # report.html draws the first channel
    outputs = ensemble_outputs(cfg, x, members, tasks, patch_size, device, amp_dtype)
    where = PredictionContext(subject.subject_id, grid, info, out_dir, cfg.threshold, save)
    row, evaluations = {}, {}
    for task in tasks:
        columns, evaluations[task.name] = task.predict_subject(outputs[task.name], tasks.label_of(subject, task),
                                                               where)
        row.update(columns)
    if cfg.saliency == "gradcam":
        head = next(iter(tasks)).name
        cams = [grad_cam(model, x.to(device), head) for model, _ in members]
        cam = invert_geometry(np.mean(cams, axis=0)[0], info, "trilinear")
        save(cam.astype(np.float32), grid, out_dir / f"{subject.subject_id}_saliency.nii.gz", np.float32)
    return row, evaluations, {"image_ras": image_ras, "voxel_size_mm": grid.voxel_size_mm, "mask": where.mask,
                              "true_mask": where.true_mask}


def prediction_flip_axes(tta, state: dict) -> tuple[int, ...]:
    """The spatial axes whose flips predictions average: ``tta=null`` (the default) the checkpoint's
    trainer.val_flip_axes, so predict gives what validation measured (none for checkpoints without it);
    ``tta=true`` all 8 flips of the three axes; ``tta=false`` none; ``tta=[0]`` left-right flips only."""
    if tta is None:
        return tta_flip_axes(state["config"].get("trainer", {}).get("val_flip_axes"), "the checkpoint's "
                             "trainer.val_flip_axes")
    try:
        return tta_flip_axes(tta, "tta")
    except ValueError as err:
        raise ConfigError(str(err)) from err


def ensemble_outputs(cfg: DictConfig, x: torch.Tensor, members: list, tasks: TaskSet, patch_size, device,
                     amp_dtype) -> dict[str, torch.Tensor]:
    """Every head's output averaged over the checkpoints: probabilities (classification, segmentation) or
    values in target units (regression: each checkpoint maps its own outputs back with its own scaling)."""
    kinds = {task.name: task.kind for task in tasks}
    per_model = []
    for model, own in members:
        if patch_size and tasks.mask_task is not None and not tasks.multi:
            # Patch-trained: the whole volume by Gaussian-weighted windows, probabilities averaged (nnU-Net)
            name = tasks.mask_task.name
            out = {name: sliding_window_inference(
                x, lambda w, m=model: predict_outputs([m], w, name, "segmentation", tta=cfg.tta, amp_dtype=amp_dtype),
                patch_size, overlap=cfg.sw_overlap, batch_size=cfg.sw_batch_size, compute_device=device,
                accumulate_device=cfg.get("sw_device") or "cpu")}
        else:
            out = predict_heads([model], x.to(device), kinds, tta=cfg.tta, amp_dtype=amp_dtype)
        # decode: regression values back to target units (probabilities pass unchanged)
        per_model.append({name: own[name].decode(value).cpu() for name, value in out.items()})
    return {name: torch.stack([o[name] for o in per_model]).mean(0) for name in kinds}


def write_metrics(cfg: DictConfig, out_dir: Path, paths: list[str], tasks: TaskSet, id_col: str, rows: list[dict],
                  evaluated: dict[str, list]) -> dict:
    """metrics.json (bootstrap intervals) and metrics.csv (one row per evaluated subject) over the rows with a
    target (or mask); {} when none has one. A multi-task checkpoint: metrics.json holds each head under
    ``heads`` and metrics.csv every subject with any label (a segmentation head's case metrics prefixed)."""
    n_boot = int(cfg.bootstrap_samples)
    per_head, csv_rows = {}, {}
    for task in tasks:
        pairs = evaluated[task.name]
        if not pairs:
            continue
        if len(pairs) < len(rows):
            log.info("metrics of %s over the %d of %d subjects with a %s", task.name, len(pairs), len(rows),
                     "mask" if task.reads_mask else "target")
        per_head[task.name] = task.prediction_metrics([result for _, result in pairs], n_boot, cfg.threshold)
        for row, result in pairs:
            entry = csv_rows.setdefault(row[id_col], dict(row) if not task.reads_mask or tasks.multi else
                                        {id_col: row[id_col], "in_training_split": row["in_training_split"]})
            if task.reads_mask:
                entry.update({task.out_key(k): v for k, v in result.items()})
    if not per_head:
        return {}
    evaluated_rows = [r for r in rows if r[id_col] in csv_rows]
    write_csv(out_dir / "metrics.csv", [csv_rows[r[id_col]] for r in evaluated_rows])
    head_metrics = {"heads": per_head} if tasks.multi else next(iter(per_head.values()))
    metrics = {"task": MULTITASK if tasks.multi else next(iter(tasks)).kind, "checkpoints": paths,
               "tta": bool(cfg.tta), "tta_flip_axes": list(cfg.tta), **head_metrics,
               "num_in_training_split": count_in_training(evaluated_rows)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def offer_report_case(worst: report.WorstCases, tasks: TaskSet, subject, row: dict, evaluations: dict,
                      picture: dict, index: int) -> None:
    """One subject for report.html, ranked as the run report ranks them (by the segmentation head in a
    multi-task run): 1 - Dice, |p - label|, |prediction - target|; subjects without a target come after the
    scored ones, in manifest order. Slices are cut (on the input's RAS grid) only for subjects among the
    worst so far."""
    shown = tasks.mask_task or next(iter(tasks))
    badness, values = shown.report_case(row, evaluations[shown.name])
    if badness is None:
        badness = -1e9 - index  # unscored: after every scored subject, in manifest order
    worst.offer(badness, lambda: {"subject_id": subject.subject_id, **values, "slices": report.orthogonal_slices(
        picture["image_ras"], truth=picture["true_mask"], prediction=picture["mask"],
        voxel_size_mm=picture["voxel_size_mm"])})


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
  input=FILE|FOLDER instead of a manifest: a .nii / .nii.gz, or every one in a folder (and in sub-*/[ses-*/]anat/
  of a BIDS dataset); ids are the file names without .nii / .nii.gz; predictions only (no targets)

Examples:
  brain3d-predict checkpoint=outputs/segmentation/2026-12-01/10-00-00/checkpoints/best.pt data.manifest=new.csv output_dir=preds
  brain3d-predict checkpoint=run/checkpoints/best.pt data.manifest=test.tsv output_dir=preds tta=true
  brain3d-predict checkpoint=[cv/0/checkpoints/best.pt,cv/1/checkpoints/best.pt] data.manifest=test.csv output_dir=ens
  brain3d-predict checkpoint=age/checkpoints/best.pt data.manifest=test.csv output_dir=preds saliency=gradcam
  brain3d-predict checkpoint=run/checkpoints/best.pt data=bids data.root=/data/bids output_dir=preds
  brain3d-predict checkpoint=run/checkpoints/best.pt input=scan.nii.gz output_dir=preds
  brain3d-predict checkpoint=run/checkpoints/best.pt input=/data/bids output_dir=/data/bids/derivatives/brain3d output_layout=bids

Writes: predictions.csv; segmentation <id>_prob.nii.gz and <id>_mask.nii.gz; metrics.json / metrics.csv with targets.
A multi-task checkpoint writes every head: sex_probability, age_prediction... and <id>_lesion_prob.nii.gz.
output_layout=bids: sub-X/[ses-Y/]anat/sub-X[_ses-Y]_space-orig_desc-lesion_mask.nii.gz (and _probseg), and
dataset_description.json; predictions.csv gets participant_id and session.
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
