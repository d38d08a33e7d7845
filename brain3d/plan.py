"""``brain3d-plan``: look at a dataset once, then choose how to train on it for a memory budget.

It is a Hydra app on the *training* config (``configs/plan.yaml`` composes ``configs/train.yaml`` and adds a
``plan:`` block), so it takes exactly the groups and overrides a training run takes::

    brain3d-plan task=segmentation data=nifti data.manifest=/data/study/manifest.csv plan.memory_gb=16

Three stages, each logged:

1. **Fingerprint** (:func:`fingerprint_dataset`): every header is read (in parallel threads) for the voxel size,
   shape, orientation and dtype of each image (RAS order, as brain3d reorients on load); the voxels of up to
   ``plan.intensity_samples`` subjects are read (in parallel processes) for the intensities inside the head, the
   head's extent, and for segmentation the foreground volume and the lesions (26-connected components). Subjects
   that stand out are listed as anomalies (:func:`find_anomalies`). Written to ``fingerprint.json``.
2. **Plan** (:func:`choose_plan`): the ``preprocess`` option and voxel size, ``data.shape`` or ``data.patch_size``,
   ``data.batch_size`` and ``trainer.precision``, each step of the real model (built from the config) measured
   against the budget by :mod:`brain3d.memory_probe`; every choice with its reason. Written to ``plan.yaml``
   with the exact ``brain3d-train`` command, which is printed.
3. **Report** (``report.html``): the choices and the anomalies as tables, then one thumbnail per subject after
   preprocessing with the plan's settings (three planes), flagged subjects first.

The budget is ``plan.memory_gb`` (GiB) when given, else ``plan.memory_fraction`` of the training device's free
memory (a GPU's free memory, or the available RAM). On CPU it is the whole training process's peak resident
memory: the process as it stands before its first step (Python, torch, the model: measured here), the
preprocessed volumes when they are held in RAM (``data.resident``), and the training step.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from brain3d.cli import check_command_line, config_dir, groups_help, progress_mode, report_user_error, run_command
from brain3d.command_setup import build_loss, check_input_geometry, ignored_manifest, read_manifest
from brain3d.data.manifest import ManifestError, Subject, read_header_info, split_subjects
from brain3d.data.nifti import NiftiReadError, load_mask, load_nifti_with_grid
from brain3d.data.preprocess import foreground_bbox, preprocess_volume, validate_settings
from brain3d.data.resident import available_bytes, size_text
from brain3d.errors import ConfigError
from brain3d.hardware import (
    guard_cpu_bf16_convolutions,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
    worker_count,
)
from brain3d.models.model import build_model
from brain3d.tasks import KINDS

log = logging.getLogger("brain3d.plan")

GIB = 2**30
AUTO = "auto"
HEAD_PERCENTILE = 10.0  # head = voxels above this percentile of the nonzero voxels (drops air, noise, dark skull)
INTENSITY_PERCENTILES = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)
SMALL_LESION_VOXELS = 5  # lesions smaller than this are flagged: often label noise, always hard to learn
OUTLIER_MADS = 3.0  # a value further than 3 scaled MADs from the cohort median (and 10% off it) is an outlier,
OUTLIER_RATIO = 1.5  # and so is one 1.5x above or below the median whatever the spread
# Intensities vary more between healthy scans (the head's median moves between grey and white matter): 5 MADs and
# 25% off, or 2x off (another scanner's scaling is usually more)
INTENSITY_OUTLIER = (5.0, 0.25, 2.0)
MIN_PATCH_EDGE = 32
# plan.batch_size_max=null on CPU: a larger batch is no faster per volume there and takes fewer steps per epoch
# (the default segmentation run: 2.5 vol/s at batch 4 and at 8, but val Dice 0.77 after 10 epochs at 4, 0.47 at 8)
CPU_BATCH_SIZE_MAX = 4
# What a CPU training process holds beside the measured step, the weights and the data: what it imports beyond this
# command (report.html's matplotlib, TensorBoard's writer), validation outputs, augmentation copies, allocator
# slack. Measured: the seed segmentation model at 64^3, batch 8, peaked at 1.43 GiB against 1.20 GiB of baseline,
# data, step and optimizer temporaries (README "Plan").
RUN_OVERHEAD_BYTES = 256 * 2**20
OPTIMIZER_STEP_COPIES = 2  # AdamW's foreach step allocates about two parameter-sized temporaries (not in the probe)
STEP_SLACK = 0.10  # a training run's steps peaked up to ~5% above the probe's measure (allocator reuse): 10% more
LESION_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as brain3d's lesion-wise metrics
# The geometry and batch keys the plan decides: given to brain3d-plan, they are left out of the printed command
# (as are any other keys the plan sets), so nothing the user passed contradicts the plan.
PLANNED_KEYS = ("preprocess", "preprocess.mode", "preprocess.spacing", "preprocess.crop_foreground", "preprocess.shape",
                "data.shape", "data.patch_size", "data.batch_size", "trainer.precision")


# ---- small helpers -------------------------------------------------------------------------------------------

def resolve_workers(value, num_jobs: int) -> int:
    """``plan.workers``: ``auto`` (the usable CPUs) or an integer >= 1; never more than there are jobs."""
    return worker_count("plan.workers", value, num_jobs)


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def describe(values) -> dict:
    """``{"min", "p5", "p50", "p95", "max"}`` of a sample (per column for an (N, 3) array); None when empty."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {key: None for key in ("min", "p5", "p50", "p95", "max")}
    stats = {"min": arr.min(axis=0), "p5": np.percentile(arr, 5, axis=0), "p50": np.median(arr, axis=0),
             "p95": np.percentile(arr, 95, axis=0), "max": arr.max(axis=0)}
    return {key: _rounded(value) for key, value in stats.items()}


def _rounded(value, digits: int = 4):
    if isinstance(value, np.ndarray):
        return [_rounded(v, digits) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        value = round(float(value), digits)
        return int(value) if value.is_integer() else value  # shapes and counts read as integers
    if isinstance(value, np.integer):
        return int(value)
    return value


def outliers(values: Sequence[float], mads: float = OUTLIER_MADS, min_fraction: float = 0.1,
             ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """Which values stand out from their cohort: further than ``mads`` scaled MADs (1.4826 x the median absolute
    deviation, the sd of a normal sample) from the median and more than ``min_fraction`` of it away, or ``ratio``
    times above or below the median (or further). With fewer than 3 values nothing is an outlier."""
    x = np.asarray(values, dtype=np.float64)
    flagged = np.zeros(x.shape, dtype=bool)
    finite = np.isfinite(x)
    if finite.sum() < 3:
        return flagged
    median = float(np.median(x[finite]))
    mad = 1.4826 * float(np.median(np.abs(x[finite] - median)))
    off = np.abs(x - median)
    flagged |= finite & (off > mads * mad) & (off > min_fraction * abs(median))
    if median > 0:
        flagged |= finite & ((x >= ratio * median) | (x <= median / ratio))
    return flagged


def round_to_multiple(values: Sequence[float], multiple: int, up: bool = False) -> list[int]:
    """Each value to a multiple of ``multiple`` (the nearest, or the next one up), at least ``multiple``."""
    out = []
    for v in values:
        n = math.ceil(v / multiple) if up else round(v / multiple)
        out.append(int(max(1, n) * multiple))
    return out


def format_value(value) -> str:
    """A config value as a Hydra command-line value: lists as ``[a,b,c]``, None as null, booleans as true/false."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def override_key(override: str) -> str:
    """``+data.x=1`` -> ``data.x``; ``~data.x`` -> ``data.x``."""
    return override.lstrip("+~").split("=", 1)[0]


# ---- stage 1: the fingerprint ----------------------------------------------------------------------------------

def read_header_row(subject: Subject) -> dict:
    """What the image's header says, in RAS order (shape, voxel size) plus its stored orientation and dtype."""
    info = read_header_info(subject.image)
    img = nib.load(str(subject.image))
    spacing = np.sqrt((info.ras_affine[:3, :3] ** 2).sum(axis=0))
    codes = nib.aff2axcodes(info.affine)
    return {
        "subject_id": subject.subject_id,
        "image": str(subject.image),
        "mask": str(subject.mask) if subject.mask is not None else None,
        "line": subject.line,
        "target": subject.target,
        "shape": [int(n) for n in info.shape],
        "spacing_mm": [round(float(v), 5) for v in spacing],
        "orientation": "".join(c if c is not None else "?" for c in codes),
        "dtype": str(img.get_data_dtype()),
        "ndim": len(img.shape),
    }


def sample_subject(image: str, mask: str | None) -> dict:
    """Read one subject's voxels (RAS, as training reads them): non-finite voxels, intensity percentiles inside the
    head, the extent of the nonzero voxels (what ``preprocess.crop_foreground`` keeps) in mm, and with a mask its
    foreground volume and lesions. Runs in a worker process."""
    data, _, grid = load_nifti_with_grid(image)
    spacing = np.asarray(grid.voxel_size_mm, dtype=np.float64)
    finite = np.isfinite(data)
    non_finite = int(data.size - finite.sum())
    clean = np.where(finite, data, 0.0).astype(np.float32, copy=False)
    nonzero = clean[clean != 0]
    row: dict[str, Any] = {"non_finite_voxels": non_finite, "nonzero_voxels": int(nonzero.size)}
    if nonzero.size:
        threshold = float(np.percentile(nonzero, HEAD_PERCENTILE))
        head = nonzero[nonzero > threshold]
        head = head if head.size else nonzero
        values = np.percentile(head.astype(np.float64), INTENSITY_PERCENTILES)
        row["head_threshold"] = round(threshold, 6)
        row["head_voxels"] = int(head.size)
        row["intensity"] = {f"p{p:g}": round(float(v), 6) for p, v in zip(INTENSITY_PERCENTILES, values)}
    else:
        row["head_threshold"], row["head_voxels"], row["intensity"] = None, 0, None
    start, stop = foreground_bbox(clean)
    row["foreground_extent_mm"] = [round(float((b - a) * v), 3) for a, b, v in zip(start, stop, spacing)]
    if mask is not None:
        from scipy import ndimage

        labels_mask, _ = load_mask(mask)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        labels, count = ndimage.label(labels_mask, structure=LESION_STRUCTURE)
        sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0, dtype=np.int64)
        row["foreground_voxels"] = int(labels_mask.sum())
        row["foreground_ml"] = round(float(labels_mask.sum()) * voxel_ml, 4)
        row["lesion_count"] = int(count)
        row["lesion_sizes_voxels"] = [int(s) for s in sorted(sizes.tolist(), reverse=True)]
        row["lesion_sizes_ml"] = [round(s * voxel_ml, 4) for s in row["lesion_sizes_voxels"]]
    return row


def _init_worker() -> None:
    torch.set_num_threads(1)  # parallelism comes from the processes


def _mp_context():
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")  # fast, as torch's DataLoader
    return multiprocessing.get_context()


def _parallel(fn: Callable, jobs: list[tuple], workers: int, desc: str, bars: bool, processes: bool) -> list:
    """``fn(*job)`` for every job, in order, with a progress bar (``bars``), in ``workers`` processes (else threads);
    a file that cannot be read comes back as its error message (a string)."""
    if not jobs:
        return []
    results: list = [None] * len(jobs)
    if workers <= 1:
        for i, job in enumerate(tqdm(jobs, desc=desc, disable=not bars, dynamic_ncols=True)):
            results[i] = _safe_call(fn, job)
        return results
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_init_worker)
            if processes else ThreadPoolExecutor(max_workers=workers))
    with pool:
        futures = [pool.submit(_safe_call, fn, job) for job in jobs]
        for i, future in enumerate(tqdm(futures, desc=desc, disable=not bars, dynamic_ncols=True)):
            results[i] = future.result()
    return results


def _safe_call(fn: Callable, job: tuple):
    try:
        return fn(*job)
    except (NiftiReadError, ValueError, OSError) as err:
        return f"{type(err).__name__}: {err}"


def sample_indices(num_subjects: int, num_samples: int) -> list[int]:
    """``num_samples`` subjects spread evenly over the manifest (all of them when there are fewer)."""
    if num_samples >= num_subjects:
        return list(range(num_subjects))
    if num_samples <= 0:
        return []
    return sorted({round(float(i)) for i in np.linspace(0, num_subjects - 1, num_samples)})


# The kinds of anomaly, most serious first: the report shows subjects in this order of their worst flag.
ANOMALY_KINDS = ("unreadable", "4d_file", "grid_mismatch", "manifest", "non_finite", "orientation", "spacing", "shape",
                 "intensity", "empty_mask", "small_lesions", "4d_singleton")


def _anomaly(subject_id: str, kind: str, message: str, stops_training: bool = False) -> dict:
    return {"subject_id": subject_id, "kind": kind, "message": message, "stops_training": stops_training}


def _skipped_kind(reasons: list[str]) -> str:
    text = " ".join(reasons).lower()
    if "4-d" in text or "volumes (shape" in text:
        return "4d_file"
    if "mask" in text and ("affine" in text or "grid" in text or "shape" in text):
        return "grid_mismatch"
    if "not found" in text or "nifti" in text or "truncated" in text:
        return "unreadable"
    return "manifest"


def find_anomalies(rows: list[dict], skipped: list[dict], task: str) -> list[dict]:
    """What stands out, one entry per subject and kind (``subject_id``, ``kind``, ``message``,
    ``stops_training``): rows the start-up check refuses (4-D files, image/mask grid mismatches, unreadable files),
    an orientation other than the majority's, voxel-size and shape outliers per axis (:func:`outliers`),
    intensity outliers (the median or 99th percentile inside the head), non-finite voxels, a singleton 4th
    dimension, and for segmentation empty masks and lesions under ``SMALL_LESION_VOXELS`` voxels."""
    found = [_anomaly(s["subject_id"] or f"line {s['line']}", _skipped_kind(s["reasons"]), "; ".join(s["reasons"]),
                      stops_training=True) for s in skipped]
    if not rows:
        return found
    ids = [r["subject_id"] for r in rows]
    orientations = [r["orientation"] for r in rows]
    majority = max(set(orientations), key=orientations.count)
    for sid, code in zip(ids, orientations):
        if code != majority:
            found.append(_anomaly(sid, "orientation", f"{code} header where {orientations.count(majority)} of "
                                  f"{len(rows)} are {majority}: brain3d reorients to RAS on load, so a header that "
                                  f"does not match the data shows a flipped brain in the thumbnail"))
    for key, unit, what in (("spacing_mm", " mm", "voxel size"), ("shape", "", "shape")):
        values = np.asarray([r[key] for r in rows], dtype=np.float64)
        for axis, name in enumerate("xyz"):
            median = float(np.median(values[:, axis]))
            for i in np.flatnonzero(outliers(values[:, axis])):
                found.append(_anomaly(ids[i], key.split("_")[0], f"{what} {values[i, axis]:g}{unit} along {name} "
                                      f"(RAS) where the median is {median:g}{unit}"))
    sampled = [(i, r) for i, r in enumerate(rows) if r.get("intensity")]
    for key, what in (("p50", "median"), ("p99", "99th percentile")):
        values = [r["intensity"][key] for _, r in sampled]
        median = float(np.median(values)) if values else 0.0
        for j in np.flatnonzero(outliers(values, *INTENSITY_OUTLIER)):
            i, r = sampled[j]
            found.append(_anomaly(ids[i], "intensity", f"{what} intensity inside the head {values[j]:.4g} where the "
                                  f"cohort's median is {median:.4g} (another scanner, scaling or contrast?)"))
    for r in rows:
        sid = r["subject_id"]
        if r.get("non_finite_voxels"):
            found.append(_anomaly(sid, "non_finite", f"{r['non_finite_voxels']} NaN/Inf voxel(s)", stops_training=True))
        if r["ndim"] > 3:
            found.append(_anomaly(sid, "4d_singleton", f"a {r['ndim']}-D file holding one volume (read as 3-D)"))
        if "lesion_count" in r:  # a mask was read (segmentation)
            if r["lesion_count"] == 0:
                found.append(_anomaly(sid, "empty_mask", "the mask is empty (no foreground voxel)"))
            small = [s for s in r["lesion_sizes_voxels"] if s < SMALL_LESION_VOXELS]
            if small:
                found.append(_anomaly(sid, "small_lesions", f"{len(small)} lesion(s) of fewer than "
                                      f"{SMALL_LESION_VOXELS} voxels ({', '.join(map(str, small[:5]))} voxels)"))
    order = {sid: k for k, sid in enumerate(ids)}
    return sorted(found, key=lambda a: (ANOMALY_KINDS.index(a["kind"]), order.get(a["subject_id"], -1)))


def read_subject_rows(manifest, task: str, plan_cfg: DictConfig, bars: bool) -> tuple[list[dict], list[dict]]:
    """Every readable subject's header row, with the voxel statistics of up to ``plan.intensity_samples`` of
    them; and the rows left out (refused by the start-up check, or unreadable here) with their reasons."""
    subjects = manifest.subjects
    header_workers = resolve_workers(plan_cfg.workers, len(subjects)) * 2  # I/O: threads, a few per CPU
    log.info("%s: %d subjects (%d rows refused by the start-up check); reading the headers", manifest.path,
             len(subjects), len(manifest.skipped))
    headers = _parallel(read_header_row, [(s,) for s in subjects], header_workers, "headers", bars, processes=False)
    rows, skipped = [], list(manifest.skipped)
    for s, h in zip(subjects, headers):
        if isinstance(h, str):
            skipped.append({"line": s.line, "subject_id": s.subject_id, "reasons": [h], "problems": [h]})
        else:
            rows.append(h)
    picked = sample_indices(len(rows), int(plan_cfg.intensity_samples))
    workers = resolve_workers(plan_cfg.workers, len(picked))
    log.info("reading the voxels of %d of %d subjects (%d worker processes)", len(picked), len(rows), workers)
    with_mask = KINDS[task].reads_mask
    samples = _parallel(sample_subject, [(rows[i]["image"], rows[i]["mask"] if with_mask else None) for i in picked],
                        workers, "voxels", bars, processes=True)
    for i, sample in zip(picked, samples):
        if isinstance(sample, str):
            rows[i]["sample_error"] = sample
            skipped.append({"line": rows[i]["line"], "subject_id": rows[i]["subject_id"], "reasons": [sample]})
        else:
            rows[i].update(sample)
            rows[i]["sampled"] = True
    return rows, skipped


def planned_split(manifest, rows: list[dict], cfg: DictConfig) -> dict:
    """Train / val counts as the training run will split the readable subjects (refused rows left out)."""
    readable = {r["subject_id"] for r in rows}
    try:
        train, val = split_subjects([s for s in manifest.subjects if s.subject_id in readable], cfg.data.val_fraction,
                                    cfg.data.split_seed, stratify=KINDS[cfg.task.name].stratify,
                                    num_folds=cfg.data.get("num_folds"), fold=cfg.data.get("fold", 0))
        return {"train": len(train), "val": len(val)}
    except ValueError as err:
        return {"train": len(rows), "val": 0, "problem": str(err)}


def task_statistics(task: str, rows: list[dict], sampled: list[dict], manifest) -> dict:
    """The fingerprint's task part: lesions (segmentation), class balance (classification) or the target
    distribution (regression)."""
    statistics = TASK_STATISTICS.get(task)  # a kind without its own statistics: the fingerprint has none
    return {task: statistics(rows, sampled, manifest)} if statistics else {}


def _lesion_statistics(rows: list[dict], sampled: list[dict], manifest) -> dict:
    masks = [r for r in sampled if "lesion_count" in r]
    sizes = [s for r in masks for s in r["lesion_sizes_ml"]]
    return {
        "foreground_ml": describe([r["foreground_ml"] for r in masks]),
        "lesion_count": describe([r["lesion_count"] for r in masks]),
        "lesion_size_ml": describe(sizes),
        "lesion_size_voxels": describe([s for r in masks for s in r["lesion_sizes_voxels"]]),
        "lesions_total": len(sizes),
        "empty_masks": sum(r["lesion_count"] == 0 for r in masks),
        "connectivity": "26-connected components (scipy.ndimage.label)",
    }


def _class_balance(rows: list[dict], sampled: list[dict], manifest) -> dict:
    names = manifest.class_names or ["0", "1"]
    counts = {name: sum(1 for r in rows if r["target"] is not None and int(r["target"]) == k)
              for k, name in enumerate(names)}
    return {"class_balance": counts, "positive_class": names[-1],
            "positive_fraction": round(counts[names[-1]] / max(1, sum(counts.values())), 4)}


def _target_distribution(rows: list[dict], sampled: list[dict], manifest) -> dict:
    targets = [r["target"] for r in rows if r["target"] is not None]
    return {"target": {**describe(targets),
                       "mean": _rounded(float(np.mean(targets))) if targets else None,
                       "sd": _rounded(float(np.std(targets))) if targets else None},
            "target_col": manifest.target_col}


TASK_STATISTICS = {"segmentation": _lesion_statistics, "classification": _class_balance,
                   "regression": _target_distribution}


def fingerprint_dataset(cfg: DictConfig, bars: bool = False) -> dict:
    """Stage 1: the dataset's fingerprint (module docstring), as written to ``fingerprint.json``.

    Keys: ``task``, ``manifest``, ``num_subjects`` (readable rows), ``num_skipped``, ``num_sampled``,
    ``spacing_mm`` and ``shape`` (``{"min", "p5", "p50", "p95", "max"}``, each a RAS [x, y, z] list),
    ``orientations`` and ``dtypes`` (counts), ``intensity`` (per percentile inside the head, its distribution
    over the sampled subjects; ``head``: how the head is defined), per task ``segmentation`` (foreground ml,
    lesion counts and sizes), ``classification`` (class balance) or ``regression`` (target distribution),
    ``anomalies`` and ``subjects`` (one row per subject).

    Raises:
        ManifestError: the manifest as a whole cannot be read (rows with problems are anomalies instead).
        ConfigError: a bad ``plan.workers``.
    """
    task = cfg.task.name
    manifest = read_manifest(cfg.data, task, check_data=False, on_error="skip")
    rows, skipped = read_subject_rows(manifest, task, cfg.plan, bars)
    anomalies = find_anomalies(rows, skipped, task)
    flags: dict[str, list[str]] = {}
    for a in anomalies:
        flags.setdefault(a["subject_id"], []).append(a["kind"])
    for r in rows:
        r["flags"] = flags.get(r["subject_id"], [])
    sampled = [r for r in rows if r.get("intensity")]
    orientations, dtypes = {}, {}
    for r in rows:
        orientations[r["orientation"]] = orientations.get(r["orientation"], 0) + 1
        dtypes[r["dtype"]] = dtypes.get(r["dtype"], 0) + 1
    fp: dict[str, Any] = {
        "task": task,
        "manifest": str(manifest.path),
        "num_subjects": len(rows),
        "num_skipped": len(skipped),
        "num_sampled": len(sampled),
        "split": planned_split(manifest, rows, cfg),
        "axis_order": "RAS (after brain3d's reorientation: x left->right, y posterior->anterior, z inferior->superior)",
        "spacing_mm": describe([r["spacing_mm"] for r in rows]),
        "shape": describe([r["shape"] for r in rows]),
        "orientations": dict(sorted(orientations.items(), key=lambda kv: -kv[1])),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
        "intensity": {
            "head": f"voxels above the {HEAD_PERCENTILE:g}th percentile of the nonzero voxels of each subject",
            "percentiles": {key: describe([r["intensity"][key] for r in sampled])
                            for key in (sampled[0]["intensity"] if sampled else {})},
            "foreground_extent_mm": describe([r["foreground_extent_mm"] for r in sampled]),
        },
    }
    fp.update(task_statistics(task, rows, sampled, manifest))
    fp["anomalies"] = anomalies
    fp["subjects"] = rows
    return fp


# ---- stage 2: the plan ---------------------------------------------------------------------------------------

@dataclass
class Budget:
    """The memory the training run may use: ``total`` bytes, of which ``baseline`` is taken before its first step
    (on CPU: the process with torch and the model's weights, measured here; on a GPU the weights: the free memory
    was measured with a CUDA context open, as the training's will be) and ``margin`` beside every step (what the
    probe does not see: the optimizer step's temporaries, on CPU also ``RUN_OVERHEAD_BYTES``)."""

    total: int
    baseline: int
    reason: str
    device: torch.device
    margin: int = 0


@dataclass
class Plan:
    """The chosen values (``overrides``: config key -> value, in command-line order), the reason for each, and the
    memory arithmetic behind them."""

    overrides: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    def set(self, key: str, value, reason: str | None = None) -> None:
        self.overrides[key] = value
        if reason:
            self.reasons[key] = reason


def _spacing_defaults(cfg: DictConfig) -> dict:
    """The spacing preprocess settings the command will compose: the user's when ``preprocess=spacing`` was chosen,
    else configs/preprocess/spacing.yaml's."""
    if cfg.preprocess.mode == "spacing":
        return OmegaConf.to_container(cfg.preprocess, resolve=False)
    return OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "preprocess" / "spacing.yaml"), resolve=False)


def estimated_shapes(rows: list[dict], spacing: Sequence[float], crop: bool, margin: int) -> np.ndarray:
    """Per subject, the shape after resampling to ``spacing`` and (``crop``) the head crop plus ``margin`` voxels,
    from the sampled extents; subjects not sampled get the sampled median crop (or their whole resampled FOV)."""
    target = np.asarray(spacing, dtype=np.float64)
    full = np.asarray([np.round(np.asarray(r["shape"]) * np.asarray(r["spacing_mm"]) / target) for r in rows])
    if not crop:
        return np.maximum(full, 1)
    cropped = np.full(full.shape, np.nan)
    for i, r in enumerate(rows):
        if r.get("foreground_extent_mm"):
            cropped[i] = np.minimum(np.ceil(np.asarray(r["foreground_extent_mm"]) / target) + 2 * margin, full[i])
    if np.isnan(cropped).all():
        return np.maximum(full, 1)
    fill = np.nanmedian(cropped, axis=0)
    missing = np.isnan(cropped[:, 0])
    cropped[missing] = np.minimum(fill, full[missing])
    return np.maximum(cropped, 1)


def choose_geometry(fp: dict, cfg: DictConfig) -> tuple[dict, dict, np.ndarray]:
    """The ``preprocess`` choice before the memory check: ``(overrides, reasons, per-subject shapes)``.

    Every subject on one voxel size and shape: ``preprocess=resize`` to the shape rounded to a multiple of 16
    (segmentation) or 8; else ``preprocess=spacing`` at the median voxel size (RAS) with the head crop, and the
    95th percentile of the estimated head-cropped shapes rounded up as ``data.shape`` (so at most one head in 20
    loses a few voxels to the centre crop). The per-subject shapes are those the volumes will have on disk
    (the resident data's size)."""
    rows = fp["subjects"]
    multiple = 16 if KINDS[cfg.task.name].reads_mask else 8
    spacings = np.asarray([r["spacing_mm"] for r in rows], dtype=np.float64)
    shapes = np.asarray([r["shape"] for r in rows], dtype=np.int64)
    median_spacing = [round(float(v), 3) for v in np.median(spacings, axis=0)]
    uniform = bool(np.allclose(spacings, spacings[0], rtol=1e-3, atol=1e-4) and (shapes == shapes[0]).all())
    overrides, reasons = {}, {}
    if uniform:
        shape = round_to_multiple(shapes[0], multiple)
        overrides["preprocess"] = "resize"
        reasons["preprocess"] = (f"every subject has the same voxel size ({_mm(spacings[0])}) and shape "
                                 f"({_x(shapes[0])}): preprocess=resize keeps the grid")
        overrides["data.shape"] = shape
        reasons["data.shape"] = (f"the native shape {_x(shapes[0])}" + (f" rounded to a multiple of {multiple}"
                                 if list(shapes[0]) != shape else "") +
                                 (" (the segmentation network halves it 4 times)" if multiple == 16 else ""))
        per_subject = np.tile(np.asarray(shape), (len(rows), 1))
        return overrides, reasons, per_subject
    spacing_cfg = _spacing_defaults(cfg)
    margin = int(spacing_cfg.get("foreground_margin", 4))
    per_subject = estimated_shapes(rows, median_spacing, True, margin)
    shape = round_to_multiple(np.percentile(per_subject, 95, axis=0), multiple, up=True)
    ranges = ", ".join(f"{a} {spacings[:, i].min():g}-{spacings[:, i].max():g} mm" for i, a in enumerate("xyz"))
    overrides["preprocess"] = "spacing"
    reasons["preprocess"] = f"voxel sizes or shapes differ ({ranges}): resample every subject to one voxel size"
    overrides["preprocess.spacing"] = median_spacing
    reasons["preprocess.spacing"] = f"the median voxel size per RAS axis of the {len(rows)} subjects"
    overrides["preprocess.crop_foreground"] = True
    reasons["preprocess.crop_foreground"] = (f"crop to the head (nonzero voxels) plus {margin} voxels: the median "
                                             f"head-cropped shape at that voxel size is "
                                             f"{_x(np.median(per_subject, axis=0))}")
    overrides["data.shape"] = shape
    reasons["data.shape"] = (f"the 95th percentile of the head-cropped shapes "
                             f"({_x(np.percentile(per_subject, 95, axis=0))}) rounded up to a multiple of {multiple}")
    return overrides, reasons, np.minimum(per_subject, np.asarray(shape))


def _x(shape) -> str:
    return "x".join(f"{round(float(n))}" for n in shape)


def _mm(spacing) -> str:
    return "x".join(f"{float(v):g}" for v in spacing) + " mm"


def resident_bytes(per_subject_shapes: np.ndarray, task: str) -> int:
    """Bytes of every preprocessed volume held in memory: float32 images plus uint8 masks (segmentation)."""
    voxels = int(np.prod(np.asarray(per_subject_shapes, dtype=np.float64), axis=1).sum())
    return voxels * (4 + (1 if KINDS[task].reads_mask else 0))


def batch_cap(cfg: DictConfig, device: torch.device, num_train: int) -> tuple[int, str]:
    """The largest batch the plan may choose: ``plan.batch_size_max`` (null: ``CPU_BATCH_SIZE_MAX`` on CPU,
    ``data.batch_size_max`` on a GPU) and a quarter of the training subjects (at least 2), so that
    an epoch has several steps."""
    limit = cfg.plan.get("batch_size_max")
    if limit is None:
        limit, why = ((CPU_BATCH_SIZE_MAX, f"{CPU_BATCH_SIZE_MAX} on CPU (plan.batch_size_max)") if device.type == "cpu"
                      else (int(cfg.data.get("batch_size_max", 32)), "data.batch_size_max"))
    else:
        limit, why = int(limit), f"plan.batch_size_max={limit}"
    quarter = max(2, num_train // 4)
    if quarter < limit:
        return quarter, f"a quarter of the {num_train} training subjects (at least 2)"
    return limit, why


def _fits(need: int | None, room: float) -> bool:
    """Whether a step measured at ``need`` bytes fits ``room`` with ``STEP_SLACK`` to spare."""
    return need is not None and need * (1 + STEP_SLACK) <= room


def _need(need: int | None) -> str:
    return "more than the device has" if need is None else size_text(need)


def choose_plan(cfg: DictConfig, fp: dict, budget: Budget, step_bytes: Callable[[Sequence[int], int], int | None],
                num_train: int, precision: tuple[str, str]) -> Plan:
    """Stage 2: the plan for ``budget`` (module docstring), given ``step_bytes(input_shape, batch)``: the memory one
    training step of the real model needs (:func:`step_probe`; None: does not fit the device).

    Rules: :func:`choose_geometry` gives ``preprocess`` and ``data.shape``. What a step may take is the budget less
    the baseline and the margin (:class:`Budget`), less the preprocessed volumes when they are held in memory: they
    are when they take at most ``data.resident_max_fraction`` of the budget after the baseline, else
    ``data.resident=off``. A step fits with ``STEP_SLACK`` to spare. Segmentation trains on whole volumes when a
    step of 2 fits, else on the largest cube (a multiple of 16, at least 32, smaller than the volume) whose batch-2
    step fits (``data.patch_size``; ``data.shape=null`` with ``preprocess=spacing``, so each head-cropped volume is
    kept whole). Classification and regression train on whole volumes, downsampled (a coarser voxel size and a
    smaller shape) in steps of 1.25x until a step of 1 fits. The batch is the largest that fits
    (:func:`brain3d.memory_probe.largest_fitting_batch`), at most :func:`batch_cap`.

    Raises:
        ConfigError: the baseline alone exceeds the budget, or not even the smallest input fits.
    """
    task = cfg.task.name
    plan, per_subject = _geometry_plan(fp, cfg)
    available = _step_available_bytes(budget)
    max_fraction = float(cfg.data.get("resident_max_fraction", 0.5))
    cap, cap_reason = batch_cap(cfg, budget.device, num_train)
    shape = list(plan.overrides["data.shape"])
    # room(volume_shapes) -> (bytes left for the step, bytes of the preprocessed volumes, held in memory?)
    room = partial(_step_room, task=task, available=available, max_fraction=max_fraction)
    if KINDS[task].reads_mask:  # patches when whole volumes do not fit
        input_shape, (step_budget, data_bytes, held) = _segmentation_input(plan, cfg, shape, per_subject, step_bytes,
                                                                           room, budget.reason)
    else:
        input_shape, (step_budget, data_bytes, held) = _whole_volume_input(plan, cfg, shape, len(per_subject),
                                                                           step_bytes, room, budget.reason)
    step_peak, trials = _choose_batch(plan, task, input_shape, step_bytes, step_budget, cap, cap_reason,
                                      budget.device)
    if not held:
        _set_resident_elsewhere(plan, data_bytes, max_fraction, available, budget.device)
    plan.set("trainer.precision", precision[0], precision[1])
    plan.memory = _memory_summary(budget, data_bytes if held else 0, step_peak, input_shape, trials)
    return plan


def _geometry_plan(fp: dict, cfg: DictConfig) -> tuple[Plan, np.ndarray]:
    """A plan holding :func:`choose_geometry`'s overrides and reasons, and the per-subject shapes (N, 3)."""
    overrides, reasons, per_subject = choose_geometry(fp, cfg)
    plan = Plan()
    for key, value in overrides.items():
        plan.set(key, value, reasons.get(key))
    return plan, per_subject


def _step_available_bytes(budget: Budget) -> int:
    """Bytes the budget leaves for the step and the resident data (total less baseline and margin); raises
    ConfigError when nothing is left."""
    available = budget.total - budget.baseline - budget.margin
    if available <= 0:
        raise ConfigError(f"the memory budget ({size_text(budget.total)}, {budget.reason}) is smaller than what the "
                          f"training process takes before its first step ({size_text(budget.baseline)}) and beside it "
                          f"({size_text(budget.margin)}); raise plan.memory_gb")
    return available


def _step_room(volume_shapes, task: str, available: int, max_fraction: float) -> tuple[int, int, bool]:
    """(bytes left for the step, bytes of the preprocessed volumes, held in memory?) for volumes of
    ``volume_shapes`` (N, 3): they are held when they take at most ``max_fraction`` of ``available``."""
    data = resident_bytes(volume_shapes, task)
    held = data <= max_fraction * available
    return available - (data if held else 0), data, held


def _largest_fitting_cube(shape: Sequence[int], step_bytes: Callable[[Sequence[int], int], int | None],
                          step_budget: float) -> int | None:
    """The largest cube edge (a multiple of 16 from ``MIN_PATCH_EDGE``, at most the smallest axis and smaller than
    the largest) whose batch-2 step fits ``step_budget``; None if none does. A step's memory grows with the edge:
    bisect."""
    edges = [e for e in range(MIN_PATCH_EDGE, min(shape) + 1, 16) if e < max(shape)]
    best, lo, hi = None, 0, len(edges) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fits(step_bytes([edges[mid]] * 3, 2), step_budget):
            best, lo = edges[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _segmentation_input(plan: Plan, cfg: DictConfig, shape: list[int], per_subject: np.ndarray,
                        step_bytes: Callable[[Sequence[int], int], int | None], room: Callable,
                        budget_reason: str) -> tuple[list[int], tuple[int, int, bool]]:
    """Segmentation: whole volumes when a step of 2 fits, else the largest fitting cube as ``data.patch_size``
    (updating ``plan``). Returns (the training input shape, ``room`` of the volumes held)."""
    fit = room(np.tile(shape, (len(per_subject), 1)))
    whole = step_bytes(shape, 2)
    if _fits(whole, fit[0]):
        plan.reasons["data.shape"] += (f"; whole volumes: a step of 2 needs {size_text(whole)} of the "
                                       f"{size_text(fit[0])} left for it")
        if cfg.data.get("patch_size"):
            plan.set("data.patch_size", None, "whole volumes fit the budget")
        return shape, fit
    if plan.overrides["preprocess"] == "spacing":
        fit = room(per_subject)  # each head-cropped volume kept whole
    step_budget = fit[0]
    best = _largest_fitting_cube(shape, step_bytes, step_budget)
    if best is None:
        raise ConfigError(f"whole {_x(shape)} volumes and even {MIN_PATCH_EDGE}^3 patches in batches of 2 need "
                          f"{_need(step_bytes([MIN_PATCH_EDGE] * 3, 2))} per step, more than the "
                          f"{size_text(step_budget)} the budget leaves ({budget_reason}); raise "
                          f"plan.memory_gb or use a smaller model (backbone.width=0.5)")
    input_shape = [best] * 3
    plan.set("data.patch_size", input_shape, f"whole {_x(shape)} volumes in batches of 2 need {_need(whole)} "
             f"per step, more than the {size_text(step_budget)} left: the largest cube (a multiple of 16) "
             f"whose batch-2 step fits; validation runs on whole volumes by sliding windows")
    if plan.overrides["preprocess"] == "spacing":
        plan.set("data.shape", None, "patch training keeps each head-cropped volume whole (their sizes vary)")
    return input_shape, fit


def _whole_volume_input(plan: Plan, cfg: DictConfig, shape: list[int], n: int,
                        step_bytes: Callable[[Sequence[int], int], int | None], room: Callable,
                        budget_reason: str) -> tuple[list[int], tuple[int, int, bool]]:
    """Classification / regression: whole volumes, downsampled in steps of 1.25x (shape and voxel size) until a
    step of 1 fits (updating ``plan``). Returns (the training input shape, ``room`` of the ``n`` volumes held)."""
    fit = room(np.tile(shape, (n, 1)))
    if cfg.data.get("patch_size"):
        plan.set("data.patch_size", None, f"task={cfg.task.name} trains on whole volumes")
    factor, spacing, input_shape = 1.0, plan.overrides.get("preprocess.spacing"), shape
    while not _fits(step_bytes(input_shape, 1), fit[0]):
        factor *= 1.25
        input_shape = round_to_multiple([v / factor for v in shape], 8, up=True)
        if min(input_shape) < 16:
            raise ConfigError(f"a step of one {_x(shape)} volume does not fit the {size_text(fit[0])} the "
                              f"budget leaves ({budget_reason}), even downsampled; raise plan.memory_gb")
        fit = room(np.tile(input_shape, (n, 1)))
    if factor > 1.0:
        plan.set("data.shape", input_shape, f"{_x(shape)} downsampled {factor:.2f}x: a step of one volume at "
                 f"full size needs {_need(step_bytes(shape, 1))}, more than the budget leaves")
        if spacing is not None:
            plan.set("preprocess.spacing", [round(v * factor, 3) for v in spacing],
                     f"the median voxel size {_mm(spacing)} coarsened {factor:.2f}x to fit the budget")
    return input_shape, fit


def _choose_batch(plan: Plan, task: str, input_shape: Sequence[int],
                  step_bytes: Callable[[Sequence[int], int], int | None], step_budget: int, cap: int,
                  cap_reason: str, device: torch.device) -> tuple[int, list]:
    """Set ``data.batch_size``: the largest batch whose step fits ``step_budget`` with ``STEP_SLACK`` to spare, at
    most ``cap``. Returns (that step's peak bytes, the probe's (batch, bytes) trials)."""
    from brain3d.memory_probe import largest_fitting_batch

    safe = available_bytes(device) if device.type == "cpu" else None  # beyond it: the OOM killer
    batch, trials = largest_fitting_batch(lambda b: step_bytes(input_shape, b), int(step_budget / (1 + STEP_SLACK)),
                                          start=min(2 if KINDS[task].reads_mask else 1, cap), maximum=cap,
                                          safe_limit_bytes=safe)
    step_peak = int(step_bytes(input_shape, batch))
    plan.set("data.batch_size", int(batch), f"the largest batch whose step fits the {size_text(step_budget)} left "
             f"({size_text(step_peak)} at {batch}; tried " + ", ".join(f"{b}: {_need(p)}" for b, p in trials) +
             f"), at most {cap}: {cap_reason}")
    return step_peak, trials


def _set_resident_elsewhere(plan: Plan, data_bytes: int, max_fraction: float, available: int,
                            device: torch.device) -> None:
    """The preprocessed volumes do not fit the budget: ``data.resident=host`` on a GPU when host RAM holds them (at
    no cost to the budget), else ``off`` (workers read the disk cache)."""
    where = ("host" if device.type == "cuda"
             and data_bytes <= max_fraction * available_bytes(torch.device("cpu")) else "off")
    plan.set("data.resident", where, f"the preprocessed volumes ({size_text(data_bytes)}) would take more than "
             f"data.resident_max_fraction={max_fraction:g} of the budget: " +
             ("held in host RAM instead" if where == "host" else "workers read them from the disk cache"))


def _memory_summary(budget: Budget, resident: int, step_peak: int, input_shape: Sequence[int],
                    trials: list) -> dict[str, Any]:
    """``Plan.memory``: the budget, its parts and the expected peak (bytes and text), the input shape and trials."""
    expected = budget.baseline + budget.margin + resident + int(step_peak * (1 + STEP_SLACK))
    return {
        "device": str(budget.device), "budget_bytes": int(budget.total), "budget": size_text(budget.total),
        "budget_reason": budget.reason,
        "baseline_bytes": int(budget.baseline), "baseline": size_text(budget.baseline),
        "margin_bytes": int(budget.margin), "margin": size_text(budget.margin),
        "resident_data_bytes": int(resident), "resident_data": size_text(resident),
        "step_bytes": step_peak, "step": size_text(step_peak),
        "expected_peak_bytes": int(expected), "expected_peak": size_text(expected),
        "input_shape": [int(v) for v in input_shape], "batch_trials": [[b, p] for b, p in trials],
    }


def measure_budget(cfg: DictConfig, device: torch.device, process_bytes: int, weight_bytes: int) -> Budget:
    """``plan.memory_gb`` GiB when set, else ``plan.memory_fraction`` of the device's free memory; ``process_bytes``:
    this process's resident memory before any data (CPU), ``weight_bytes``: the model's weights."""
    from brain3d.memory_probe import device_memory_budget

    gb = cfg.plan.get("memory_gb")
    if gb is not None:
        if not isinstance(gb, (int, float)) or isinstance(gb, bool) or gb <= 0:
            raise ConfigError(f"plan.memory_gb={gb!r}: expected a positive number of GiB, or null to measure")
        total, reason = int(float(gb) * GIB), f"plan.memory_gb={gb:g}"
    else:
        total, reason = device_memory_budget(device, float(cfg.plan.get("memory_fraction", 0.8)))
    cpu = device.type == "cpu"
    return Budget(int(total), (process_bytes if cpu else 0) + weight_bytes, reason, device,
                  margin=OPTIMIZER_STEP_COPIES * weight_bytes + (RUN_OVERHEAD_BYTES if cpu else 0))


def step_probe(cfg: DictConfig, device: torch.device, amp_dtype) -> Callable[[Sequence[int], int], int | None]:
    """``step_bytes(input_shape, batch)``: the memory one training step of the model the config builds needs
    beyond the model's weights (:func:`brain3d.memory_probe.peak_step_bytes`: gradients, AdamW's moments,
    activations, kernel buffers), as the training run sets the model up (channels_last, the bf16 guard on CPU,
    grad_checkpointing); None when it does not fit the device at all. ``input_shape``: (D, H, W). Results are
    remembered."""
    from brain3d.memory_probe import peak_step_bytes

    model = build_model(cfg.backbone, cfg.task.head, head_name=cfg.task.name).to(device)
    if device.type == "cpu" and amp_dtype is torch.bfloat16:
        guard_cpu_bf16_convolutions(model)
    channels_last = resolve_channels_last(cfg.trainer.get("channels_last", True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if cfg.trainer.get("grad_checkpointing", False) and hasattr(model.backbone, "grad_checkpointing"):
        model.backbone.grad_checkpointing = True
    loss_fn = build_loss(cfg)
    seen: dict[tuple, int] = {}

    def step_bytes(input_shape: Sequence[int], batch: int) -> int | None:
        key = (tuple(int(n) for n in input_shape), int(batch))
        if key not in seen:
            seen[key] = peak_step_bytes(model, loss_fn, cfg.task.name, (1, *key[0]), key[1], device, amp_dtype,
                                        channels_last)
            log.info("a training step of %d x %s needs %s", key[1], _x(key[0]),
                     "more than the device has" if seen[key] is None else size_text(seen[key]))
        return seen[key]

    return step_bytes


# ---- the command -------------------------------------------------------------------------------------------

def user_overrides(task_overrides: Sequence[str], planned: Sequence[str]) -> list[str]:
    """The command line given to brain3d-plan, minus ``plan.*`` and ``hydra.*``, ``PLANNED_KEYS`` and the other keys
    the plan sets (``planned``)."""
    kept = []
    for override in task_overrides:
        key = override_key(override)
        if key.startswith(("plan.", "hydra.")) or key in ("plan", "hydra") or key in PLANNED_KEYS or key in planned:
            continue
        kept.append(override)
    return kept


def train_command(given: Sequence[str], plan: Plan) -> tuple[str, list[str]]:
    """``(the brain3d-train command line, its arguments)``: the user's overrides, then the plan's."""
    args = [*user_overrides(given, tuple(plan.overrides)),
            *(f"{k}={format_value(v)}" for k, v in plan.overrides.items())]
    return "brain3d-train " + " ".join(shlex.quote(a) for a in args), args


def compose_training_config(args: Sequence[str]) -> DictConfig:
    """The training config the printed command composes (inside the running Hydra app, or an ``initialize``)."""
    from hydra import compose

    return compose(config_name="train", overrides=list(args))


# ---- stage 3: the report -----------------------------------------------------------------------------------

def thumbnail(image: str, mask: str | None, settings: dict, title: str, path: str) -> str:
    """One subject after preprocessing with ``settings`` (three planes; the mask outlined), saved as PNG."""
    from brain3d.report import orthogonal_panel, save_png

    data, _, grid = load_nifti_with_grid(image)
    mask_ras = load_mask(mask)[0] if mask is not None else None
    out, mask_out, _ = preprocess_volume(np.nan_to_num(data), grid.voxel_size_mm, settings, mask_ras)
    save_png(orthogonal_panel(out, truth=mask_out, title=title), path)
    return True


def write_report(out_dir: Path, fp: dict, plan: Plan, command: str, settings: dict, cfg: DictConfig,
                 bars: bool) -> Path:
    """``report.html``: the choices, the anomalies, then up to ``plan.thumbnails`` subjects after preprocessing,
    flagged subjects first (the flags in the caption)."""
    from brain3d.report import FILES_DIR, prune_files, write_html

    files = out_dir / FILES_DIR
    rows = fp["subjects"]
    worst = [min((ANOMALY_KINDS.index(k) for k in r["flags"]), default=len(ANOMALY_KINDS)) for r in rows]
    ordered = sorted(range(len(rows)), key=lambda i: (worst[i], i))[: int(cfg.plan.thumbnails)]
    with_mask = KINDS[cfg.task.name].reads_mask
    jobs = []
    for k, i in enumerate(ordered):
        r = rows[i]
        name = f"{k:03d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in r['subject_id'])}.png"
        title = f"{r['subject_id']}  FLAGGED: {', '.join(r['flags'])}" if r["flags"] else r["subject_id"]
        jobs.append((r["image"], r["mask"] if with_mask else None, settings, title, str(files / name)))
    workers = resolve_workers(cfg.plan.workers, len(jobs))
    done = _parallel(thumbnail, jobs, workers, "thumbnails", bars, processes=True)
    anomalies_by_id: dict[str, list[str]] = {}
    for a in fp["anomalies"]:
        anomalies_by_id.setdefault(a["subject_id"], []).append(f"{a['kind']}: {a['message']}")
    images = []
    for (_, _, _, _, path), i, result in zip(jobs, ordered, done):
        sid = rows[i]["subject_id"]
        if isinstance(result, str):
            log.warning("thumbnail of %s: %s", sid, result)
            continue
        flags = anomalies_by_id.get(sid)
        caption = f"{sid} - FLAGGED: " + "; ".join(flags) if flags else sid
        images.append({"src": f"{FILES_DIR}/{Path(path).name}", "caption": caption})
    choices = [{"setting": k, "value": format_value(v), "reason": plan.reasons.get(k, "")}
               for k, v in plan.overrides.items()]
    memory = plan.memory
    sections = [
        {"heading": "Plan", "text": f"{command}\n\nMemory: budget {memory['budget']} ({memory['budget_reason']}); "
         f"before the first step {memory['baseline']}, resident data {memory['resident_data']}, training step "
         f"{memory['step']}, beside it {memory['margin']}: expected peak {memory['expected_peak']} "
         f"on {memory['device']}.", "table": choices},
        {"heading": "Dataset", "text": f"{fp['num_subjects']} subjects ({fp['num_skipped']} refused), "
         f"{fp['num_sampled']} sampled for intensities; orientations {fp['orientations']}, dtypes {fp['dtypes']}. "
         f"Axes in RAS order.",
         "table": [{"statistic": f"{name} {k}", **{a: v[j] if v else None for j, a in enumerate("xyz")}}
                   for name, key in (("voxel size (mm)", "spacing_mm"), ("shape", "shape"))
                   for k, v in fp[key].items()]},
        {"heading": f"Anomalies ({len(fp['anomalies'])})",
         "text": "none found" if not fp["anomalies"] else "rows marked 'stops training' are refused by "
                 "brain3d-train's start-up check (the plan adds data.on_error=skip for them)",
         "table": [{"subject": a["subject_id"], "kind": a["kind"], "stops training": "yes" if a["stops_training"]
                    else "", "what": a["message"]} for a in fp["anomalies"]]},
        {"heading": f"Subjects after preprocessing ({len(images)} of {len(rows)}, flagged first)",
         "text": "each volume as the model will see it (preprocessed with the plan's settings, RAS), three planes "
                 "through its mask's foreground (else the centre); a flipped brain means a header that does not match "
                 "its data",
         "images": images},
    ]
    path = out_dir / "report.html"
    write_html(path, f"brain3d-plan: {fp['task']} on {fp['manifest']}", sections)
    prune_files(files, [Path(job[-1]) for job in jobs])  # a previous plan's thumbnails
    return path


# ---- the whole command -----------------------------------------------------------------------------------------

def make_plan(cfg: DictConfig, given_overrides: Sequence[str], out_dir: Path) -> dict:
    """Fingerprint, plan, report (module docstring); writes ``fingerprint.json``, ``plan.yaml`` and
    ``report.html`` into ``out_dir`` and returns ``{"command", "args", "plan", "fingerprint", "out_dir"}``.

    ``given_overrides``: the command line given to brain3d-plan (Hydra's ``overrides.task``); its own overrides
    reach the printed command, less ``plan.*`` and the keys the plan sets.

    Raises:
        ConfigError, ManifestError: a mistake in the config or a manifest that cannot be read at all.
    """
    baseline = current_rss_bytes()  # the process with torch, Hydra and brain3d imported, before any data
    problem = ignored_manifest(cfg.data)
    if problem:
        raise ConfigError(problem)
    if cfg.task.name not in KINDS:
        raise ConfigError(f"brain3d-plan plans one head (task={'|'.join(KINDS)}); for task={cfg.task.name}, plan "
                          "task=segmentation (its heaviest head) and give the multi-task run those overrides")
    out_dir.mkdir(parents=True, exist_ok=True)
    bars = progress_mode(cfg.trainer.get("progress", AUTO)) == "bars"
    fp = fingerprint_dataset(cfg, bars)
    if not fp["subjects"]:
        raise ManifestError(Path(fp["manifest"]), ["no subject could be read: see the anomalies above"])
    (out_dir / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    log.info("fingerprint: %s", fingerprint_summary(fp))

    device = resolve_device(cfg.trainer.device)
    precision, amp_dtype, precision_reason = resolve_precision(cfg.trainer.precision, device)
    num_train = fp["split"]["train"]
    budget = measure_budget(cfg, device, baseline, model_bytes(cfg))  # before the probe's model takes GPU memory
    step_bytes = step_probe(cfg, device, amp_dtype)
    log.info("memory budget %s (%s); %s taken before the first step, %s beside each step", size_text(budget.total),
             budget.reason, size_text(budget.baseline), size_text(budget.margin))
    plan = choose_plan(cfg, fp, budget, step_bytes, num_train, (precision, precision_reason))
    refused = sorted({a["subject_id"] for a in fp["anomalies"] if a["stops_training"]})
    if refused:
        plan.set("data.on_error", "skip", f"{len(refused)} subject(s) have problems the start-up check refuses "
                 f"({', '.join(refused[:5])}{', ...' if len(refused) > 5 else ''}; see the anomalies): "
                 f"train without them")
    given = list(given_overrides)
    command, args = train_command(given, plan)
    problem = check_command_line("train", args)
    if problem:
        raise ConfigError(f"the planned command does not compose: {problem}: {command}")
    final = compose_training_config(args)
    try:
        settings = validate_settings(final.preprocess)
    except ValueError as err:
        raise ConfigError(f"preprocess: {err}") from err
    check_input_geometry(final.task.name, settings, final.data.patch_size)
    for key, reason in plan.reasons.items():
        log.info("plan %s=%s: %s", key, format_value(plan.overrides[key]), reason)
    document = {
        "command": command,
        "overrides": args,
        "choices": {k: _plain(v) for k, v in plan.overrides.items()},
        "reasons": dict(plan.reasons),
        "memory": plan.memory,
        "preprocess": settings,
        "fingerprint": str(out_dir / "fingerprint.json"),
        "anomalies": len(fp["anomalies"]),
    }
    header = (f"# brain3d-plan for task={cfg.task.name} on {fp['manifest']}: run `command` to train with this plan.\n"
              f"# reasons: why each value was chosen; memory: the budget and the peak expected against it.\n")
    (out_dir / "plan.yaml").write_text(header + OmegaConf.to_yaml(OmegaConf.create(document)))
    report = write_report(out_dir, fp, plan, command, settings, cfg, bars)
    log.info("wrote %s, %s and %s", out_dir / "fingerprint.json", out_dir / "plan.yaml", report)
    return {"command": command, "args": args, "plan": plan, "fingerprint": fp, "out_dir": out_dir}


def model_bytes(cfg: DictConfig) -> int:
    """The model's float32 weights, which the training process holds before its first step (the step's
    gradients and optimizer moments are in :func:`step_probe`'s measure)."""
    model = build_model(cfg.backbone, cfg.task.head, head_name=cfg.task.name)
    return 4 * sum(p.numel() for p in model.parameters())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def fingerprint_summary(fp: dict) -> str:
    """One line: subjects, voxel size and shape medians (RAS), orientations, dtypes, anomalies."""
    spacing, shape = fp["spacing_mm"], fp["shape"]
    text = (f"{fp['num_subjects']} subjects ({fp['num_sampled']} sampled, {fp['num_skipped']} refused); voxel size "
            f"median {_mm(spacing['p50'])} (min {_mm(spacing['min'])}, max {_mm(spacing['max'])}); shape median "
            f"{_x(shape['p50'])} (min {_x(shape['min'])}, max {_x(shape['max'])}); orientations "
            f"{fp['orientations']}; dtypes {fp['dtypes']}")
    if "segmentation" in fp:
        seg = fp["segmentation"]
        text += (f"; foreground median {seg['foreground_ml']['p50']} ml, {seg['lesions_total']} lesions, "
                 f"{seg['empty_masks']} empty masks")
    if "classification" in fp:
        text += f"; classes {fp['classification']['class_balance']}"
    if "regression" in fp:
        target = fp["regression"]["target"]
        text += f"; target median {target['p50']} (min {target['min']}, max {target['max']})"
    return text + f"; {len(fp['anomalies'])} anomalies"


HELP = f"""brain3d-plan: look at a dataset and choose how to train on it for a memory budget.

Reads every header and the voxels of up to plan.intensity_samples subjects (in parallel), then chooses the
preprocessing (resize, or spacing at the median voxel size with the head crop), data.shape or data.patch_size,
data.batch_size and trainer.precision so that training fits the memory budget: each choice is measured with a
training step of the real model. Pass the groups and values you will train with. Writes into plan.output_dir:
fingerprint.json (voxel sizes, shapes, orientations, dtypes, intensities, lesions or targets, anomalies),
plan.yaml (the choices with their reasons, and the command) and report.html (a thumbnail per subject after
preprocessing, flagged subjects first); prints the brain3d-train command that uses the plan.

Config groups it reads:
{groups_help("plan", ("task", "data", "preprocess", "backbone", "loss"))}
  plan.memory_gb:         null (memory_fraction 0.8 of the GPU's free memory, else of the available RAM) | GiB
                          for the whole training run (on CPU: its peak resident memory)
  plan.batch_size_max:    null (4 on CPU, data.batch_size_max on a GPU) | N
  plan.output_dir:        plans/<task> (fingerprint.json, plan.yaml, report.html, plan.log)
  plan.workers:           auto (the CPUs this process may use) | N processes reading voxels
  plan.intensity_samples: 200 subjects whose voxels are read (every header is)
  plan.thumbnails:        64 subjects shown in report.html, flagged ones first

Examples:
  brain3d-plan task=segmentation                                  # the built-in synthetic phantoms
  brain3d-plan task=segmentation data=nifti data.manifest=lesions.csv plan.memory_gb=8
  brain3d-plan task=regression data=bids data.root=/data/bids data.target_col=age trainer.device=cuda
  brain3d-plan task=classification data=nifti data.manifest=study.csv backbone=resnet plan.output_dir=plans/sex
  brain3d-plan task=segmentation data=msd data.root=/data/Task04_Hippocampus plan.intensity_samples=50

Exit status: 0 done, 2 a mistake in the command, config or data."""


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="plan")
def hydra_main(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        result = make_plan(cfg, list(HydraConfig.get().overrides.task), Path(cfg.output_dir))
    except (ConfigError, ManifestError, FileNotFoundError, NiftiReadError) as err:
        report_user_error("brain3d-plan", err)
        sys.exit(2)
    out_dir = result["out_dir"]
    print(f"fingerprint: {fingerprint_summary(result['fingerprint'])}")
    print(f"plan: {out_dir / 'plan.yaml'}, report: {out_dir / 'report.html'}")
    print(result["command"])
    return result["command"]


def main() -> None:
    """``brain3d-plan``: --help, the command-line check (brain3d.cli), then Hydra."""
    run_command(hydra_main, "brain3d-plan", "plan", HELP, validate=lambda cfg: ignored_manifest(cfg.data))


if __name__ == "__main__":
    main()
