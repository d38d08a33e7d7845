"""Manifest: one row per subject (id, image, targets, mask), checked once at start-up, then split.

Every problem in the manifest is collected and reported together in one :class:`ManifestError`, naming
the file, the row and the column, before any training starts: a bad file found after three hours of
training is the failure this module exists to prevent.
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brain3d.data.nifti import NiftiReadError, load_nifti, read_header_shape

MISSING_VALUES = {"", "n/a", "na", "nan", "none", "null"}  # BIDS writes "n/a"
TASK_TARGET_COLS = {"classification": "sex", "regression": "age"}
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val"}


class ManifestError(ValueError):
    """All problems found in a manifest, one per line."""

    def __init__(self, manifest: Path, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in manifest {manifest}:\n{lines}")


@dataclass
class Subject:
    """One manifest row after checking. ``target`` is a class index (0/1) or a value; None for segmentation."""

    subject_id: str
    image: Path
    row: int  # 1-based data row in the manifest (the header is not counted)
    target: float | None = None
    mask: Path | None = None
    split: str | None = None


@dataclass
class Manifest:
    """Checked subjects plus what was learned about the labels (kept in checkpoints and summary.json)."""

    path: Path
    subjects: list[Subject]
    id_col: str
    target_col: str | None
    class_names: list[str] | None = None  # classification: class index -> original label; [1] is positive
    columns: list[str] = field(default_factory=list)
    has_targets: bool = True  # False when prediction reads a manifest without target / mask column


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV or TSV (by extension; .tsv is tab-separated, as BIDS participants.tsv)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return columns, rows


def _is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in MISSING_VALUES


def _class_mapping(values: list[str], positive_label: str | None) -> tuple[list[str], str | None]:
    """Map the labels of a binary column to class indices: 0/1 numbers stay, two strings are sorted
    (F, M -> F=0, M=1) unless ``positive_label`` names the positive one. Returns (class_names, error)."""
    distinct = sorted(set(values))
    numeric = all(v in {"0", "1", "0.0", "1.0"} for v in distinct)
    if numeric:
        return ["0", "1"], None
    if len(distinct) != 2:
        return [], f"a binary target needs exactly two distinct labels (0/1 or two strings), found {distinct}"
    if positive_label is not None:
        if str(positive_label) not in distinct:
            return [], f"data.positive_label={positive_label!r} is not one of the labels {distinct}"
        negative = [v for v in distinct if v != str(positive_label)][0]
        return [negative, str(positive_label)], None
    return distinct, None


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path)


def _check_image_readable(path: Path) -> str | None:
    """Decode the whole file (a truncated .gz only fails when its data is read); return the error or None."""
    try:
        load_nifti(path)
    except (NiftiReadError, ValueError) as err:
        return str(err)
    return None


def load_manifest(
    path: str | Path,
    task: str,
    id_col: str | None = None,
    image_col: str = "image",
    target_col: str | None = None,
    mask_col: str = "mask",
    split_col: str = "split",
    positive_label: str | None = None,
    check_data: bool = True,
    num_threads: int = 8,
    require_targets: bool = True,
    class_names: list[str] | None = None,
) -> Manifest:
    """Read and check a manifest for ``task``; raise one :class:`ManifestError` listing every problem.

    Args:
        path: CSV or TSV, one row per subject. Relative file paths resolve against its folder.
        task: "classification", "regression" or "segmentation".
        id_col: subject id column; None -> ``subject_id``, else ``participant_id`` (BIDS).
        image_col: image path column. Default "image".
        target_col: target column; None -> "sex" (classification) or "age" (regression). Unused for segmentation.
        mask_col: mask path column for segmentation. Default "mask".
        split_col: optional column with train/val per row; ignored when absent. Default "split".
        positive_label: for two string labels, which one is the positive class (default: the second sorted).
        check_data: decode every image and mask once (catches truncated .gz); headers are always read.
        num_threads: threads for the decode check (zlib releases the GIL).
        require_targets: False for prediction: a missing target (or mask) column is allowed and then
            ``Subject.target`` / ``Subject.mask`` stay None; a column that is present is still checked.
        class_names: a known label mapping (a checkpoint's) to use instead of deriving one from the rows.

    Raises:
        ManifestError: every problem found, each naming the row and column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(path, [f"manifest file not found: {path}"])
    columns, rows = read_rows(path)
    base = path.parent
    problems: list[str] = []

    if id_col is None:
        id_col = "subject_id" if "subject_id" in columns or "participant_id" not in columns else "participant_id"
    if task in TASK_TARGET_COLS and target_col is None:
        target_col = TASK_TARGET_COLS[task]
    needed = {"data.id_col": id_col, "data.image_col": image_col}
    if task in TASK_TARGET_COLS:
        needed["data.target_col"] = target_col
    if task == "segmentation":
        needed["data.mask_col"] = mask_col
    for key, col in needed.items():
        if col not in columns and (require_targets or key in ("data.id_col", "data.image_col")):
            problems.append(f"column {col!r} ({key}) not found; the manifest has columns {columns}")
    has_targets = (target_col in columns) if task in TASK_TARGET_COLS else (mask_col in columns)
    if problems:
        raise ManifestError(path, problems)
    if not rows:
        raise ManifestError(path, ["the manifest has a header but no rows"])

    if task == "classification" and class_names is not None:
        class_names = [str(c) for c in class_names]
    elif task == "classification" and has_targets:
        present = [r[target_col] for r in rows if not _is_missing(r.get(target_col))]
        if present:
            class_names, err = _class_mapping(present, positive_label)
            if err:
                problems.append(f"column {target_col!r}: {err}")

    subjects: list[Subject] = []
    seen_ids: dict[str, int] = {}
    for i, r in enumerate(rows, start=1):
        where = f"row {i}"
        sid = r.get(id_col, "")
        if _is_missing(sid):
            problems.append(f"{where}, column {id_col!r}: empty subject id")
            sid = f"<row {i}>"
        elif sid in seen_ids:
            problems.append(f"{where}, column {id_col!r}: subject id {sid!r} already used in row {seen_ids[sid]}")
        seen_ids.setdefault(sid, i)
        where = f"row {i} ({sid})"

        image = None
        if _is_missing(r.get(image_col)):
            problems.append(f"{where}, column {image_col!r}: empty image path")
        else:
            image = _resolve(base, r[image_col])
            if not image.is_file():
                problems.append(f"{where}, column {image_col!r}: image file not found: {image}")
                image = None

        target = None
        if task in TASK_TARGET_COLS and has_targets:
            raw = r.get(target_col)
            if _is_missing(raw):
                problems.append(f"{where}, column {target_col!r}: empty target")
            elif task == "classification":
                if class_names and class_names != ["0", "1"]:
                    target = float(class_names.index(raw)) if raw in class_names else None
                elif raw in {"0", "1", "0.0", "1.0"}:
                    target = float(raw)
                if target is None and class_names:
                    problems.append(f"{where}, column {target_col!r}: label {raw!r} is not one of {class_names}")
            else:
                try:
                    target = float(raw)
                except ValueError:
                    target = None
                if target is None or not math.isfinite(target):
                    problems.append(f"{where}, column {target_col!r}: {raw!r} is not a finite number")
                    target = None

        mask = None
        if task == "segmentation" and has_targets:
            if _is_missing(r.get(mask_col)):
                problems.append(f"{where}, column {mask_col!r}: empty mask path")
            else:
                mask = _resolve(base, r[mask_col])
                if not mask.is_file():
                    problems.append(f"{where}, column {mask_col!r}: mask file not found: {mask}")
                    mask = None

        split = None
        if split_col in columns and not _is_missing(r.get(split_col)):
            split = SPLIT_NAMES.get(r[split_col].lower())
            if split is None:
                problems.append(f"{where}, column {split_col!r}: {r[split_col]!r} is not one of train, val")

        # Headers: cheap, catch "not NIfTI" and shape mismatches without decoding.
        image_shape = _header_shape(image, where, image_col, problems)
        mask_shape = _header_shape(mask, where, mask_col, problems)
        if image_shape and mask_shape and image_shape != mask_shape:
            problems.append(
                f"{where}, column {mask_col!r}: mask shape {mask_shape} differs from image shape {image_shape} "
                f"({mask} vs {image})"
            )
            mask = None
        if image_shape is None:
            image = None
        subjects.append(Subject(sid, image, i, target, mask, split))

    if check_data:
        # Decode every readable file once, in parallel: a truncated .nii.gz has a valid header.
        jobs = [(s, col, p) for s in subjects for col, p in ((image_col, s.image), (mask_col, s.mask)) if p is not None]
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            errors = list(pool.map(lambda job: _check_image_readable(job[2]), jobs))
        for (s, col, _), err in zip(jobs, errors):
            if err:
                problems.append(f"row {s.row} ({s.subject_id}), column {col!r}: {err}")

    if problems:
        raise ManifestError(path, problems)
    return Manifest(path, subjects, id_col, target_col if task in TASK_TARGET_COLS and has_targets else None, class_names,
                    columns, has_targets)


def _header_shape(path: Path | None, where: str, col: str, problems: list[str]) -> tuple[int, ...] | None:
    if path is None:
        return None
    try:
        return tuple(read_header_shape(path))
    except (NiftiReadError, ValueError) as err:
        problems.append(f"{where}, column {col!r}: {err}")
        return None


def split_subjects(
    subjects: list[Subject], val_fraction: float, seed: int, stratify: bool,
    num_folds: int | None = None, fold: int = 0,
) -> tuple[list[Subject], list[Subject]]:
    """Split by subject into (train, val).

    Rows with a split column value keep it. The others are shuffled with ``seed`` (per class when
    ``stratify``, as for classification, so both sets keep the class balance), then either:

    - ``num_folds`` None: ``round(n * val_fraction)`` of them (at least one, never all) go to validation;
    - ``num_folds`` K: they are dealt round-robin into K folds and fold ``fold`` is the validation set, so
      the K runs ``fold=0..K-1`` validate every subject exactly once.

    Raises:
        ValueError: val_fraction outside (0, 1), a bad fold, or a split that leaves train or val empty.
    """
    if num_folds is None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if num_folds is not None and (num_folds < 2 or not 0 <= fold < num_folds):
        raise ValueError(f"data.num_folds must be >= 2 and data.fold in 0..num_folds-1, got num_folds={num_folds}, fold={fold}")
    fixed = [s for s in subjects if s.split is not None]
    free = [s for s in subjects if s.split is None]
    train = [s for s in fixed if s.split == "train"]
    val = [s for s in fixed if s.split == "val"]
    rng = np.random.default_rng(seed)
    groups: dict[object, list[Subject]] = {}
    for s in free:
        groups.setdefault(s.target if stratify else None, []).append(s)
    dealt = 0  # continue the round-robin across classes so fold sizes stay within one of each other
    for key in sorted(groups, key=str):
        members = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        if num_folds is not None:
            for j, s in enumerate(members):
                (val if (dealt + j) % num_folds == fold else train).append(s)
            dealt += len(members)
            continue
        n_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    if not train or not val:
        raise ValueError(
            f"the split leaves {len(train)} training and {len(val)} validation subjects; both need at least one "
            f"(subjects: {len(subjects)}, data.val_fraction={val_fraction}, data.num_folds={num_folds})"
        )
    train.sort(key=lambda s: s.row)
    val.sort(key=lambda s: s.row)
    return train, val
