"""Manifest: one row per subject (id, image, targets, mask), checked once at start-up, then split.

Every problem in the manifest is collected and reported together in one :class:`ManifestError`, naming
the file, the line (as an editor numbers them: the header is line 1) and the column, before any training starts:
a bad file found after three hours of training is the failure this module exists to prevent.

Checks, per row: cells beyond the header's columns, id (empty, duplicate), image / mask paths (empty, missing;
every column of a ``data.image_col`` list: several co-registered channels, brain3d.data.channels),
target (empty, not a label, not a finite number), split value; from the headers (read in parallel): not NIfTI,
not 3-D (a 4-D file says how many volumes it holds), mask shape and mask affine vs the image's; with
``check_data``, from the decoded data (in parallel): truncated files, NaN / Inf image voxels, mask values other
than 0/1 (a multi-class segmentation's label maps: other than the integers 0..K). Across rows: a group (or
subject id) with rows in both train and val of the split column.
A further channel on another grid than the first channel's is not a problem: it is resampled onto it, and a
grid that differs by more than ``affine_tolerance`` gets one logged warning per subject naming both files.

``on_error="skip"`` drops the rows that have problems (listed in :attr:`Manifest.skipped`) instead of raising;
problems of the manifest as a whole (missing columns, no rows, a bad label set) always raise.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from brain3d.data.channels import checked_image_columns
from brain3d.data.nifti import _READ_ERRORS, NiftiReadError, _read_error, load_nifti
from brain3d.tasks import KINDS

log = logging.getLogger("brain3d.data")

MISSING_VALUES = {"", "n/a", "na", "nan", "none", "null"}  # BIDS writes "n/a"
# The default target column of the single tasks that read one (brain3d.tasks: each kind's default_column).
TASK_TARGET_COLS = {kind: cls.default_column for kind, cls in KINDS.items() if not cls.reads_mask}
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val"}
ON_ERROR = ("raise", "skip")
MASK_VALUES = ("binary", "labels")


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
    group: str | None = None  # rows of one group (e.g. sessions of one participant) never straddle train and val;
    #                           None: the subject is its own group (keyed by subject_id)
    line: int | None = None  # the file's line the row starts on (header: line 1), as messages name it
    # task=multitask: {head: class index / value, or the mask path (its segmentation head); None: no label}
    labels: dict = field(default_factory=dict)
    # every channel's file in data.image_col order (images[0] is image); empty: one channel, image
    images: list = field(default_factory=list)

    @property
    def image_paths(self) -> list[Path]:
        """The channels' files, in channel order: ``images``, else ``[image]``."""
        return list(self.images) if self.images else [self.image]


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
    # on_error="skip": the rows left out, as {"row": int (data row), "line": int (the file's line), "subject_id": str
    # ("" when empty), "problems": [str, ...] (as ManifestError lists them: "line 3 (sub-02), column 'image': ..."),
    # "reasons": [str, ...] (the same without the "line 3 (sub-02), " prefix)}.
    skipped: list[dict] = field(default_factory=list)
    # task=multitask: {classification head: its class names}; the heads' columns as read ({head: column})
    head_class_names: dict = field(default_factory=dict)
    head_columns: dict = field(default_factory=dict)


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV or TSV (by extension; .tsv is tab-separated, as BIDS participants.tsv)."""
    columns, rows, _, _ = read_table(path)
    return columns, rows


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]], list[int], list[list[str]]]:
    """:func:`read_rows` plus, per row, the file's line it starts on and its non-empty cells beyond the header's.

    Lines are counted as an editor numbers them: the header is line 1 (when it is the first line), blank lines
    (skipped, as ``csv.DictReader`` skips them) count, and a quoted cell spanning lines moves the next rows down.
    Cells are stripped; a short row gets "" for its missing cells; surplus cells are not put in the row's dict.
    """
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    columns: list[str] | None = None
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    extra: list[list[str]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        read = 0  # lines consumed so far
        for cells in reader:
            start, read = read + 1, reader.line_num
            if not cells:  # a blank line
                continue
            cells = [c.strip() for c in cells]
            if columns is None:
                columns = cells
                continue
            rows.append({col: (cells[k] if k < len(cells) else "") for k, col in enumerate(columns)})
            lines.append(start)
            extra.append([c for c in cells[len(columns):] if c])
    return columns or [], rows, lines, extra


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


@dataclass(frozen=True)
class _LabelSpec:
    """One label column the rows are read for: a single task's target (or mask), or one task=multitask head."""

    name: str  # the head's name; a single task's: "target" (-> Subject.target) or "mask" (-> Subject.mask)
    kind: str  # "classification", "regression" or "segmentation"
    column: str
    required: bool  # an empty cell is a problem: a single task's label when require_targets; never a head's
    key: str  # the setting naming the column, as messages say it: "data.target_col", "task.heads.age.column"
    head: bool = False  # task=multitask: the label goes to Subject.labels[name]


def _label_specs(task: str, target_col: str | None, mask_col: str, heads: Sequence[tuple[str, str, str]] | None,
                 require_targets: bool) -> list[_LabelSpec]:
    """What the rows are read for: task=classification / regression the target column (None: "sex" / "age"),
    segmentation the mask column; then each of ``heads`` (task=multitask). None at all: task=multitask
    without heads (e.g. brain3d-preprocess reads only ids and images)."""
    specs = []
    if task in KINDS:  # a single task: its mask column, or its target column (None: the kind's, sex / age)
        if KINDS[task].reads_mask:
            specs.append(_LabelSpec("mask", task, mask_col, require_targets, "data.mask_col"))
        else:
            column = KINDS[task].default_column if target_col is None else target_col
            specs.append(_LabelSpec("target", task, column, require_targets, "data.target_col"))
    return specs + [_LabelSpec(name, kind, col, False, f"task.heads.{name}.column", head=True)
                    for name, kind, col in heads or ()]


def _single_target(specs: list[_LabelSpec]) -> _LabelSpec | None:
    """A single task's target column (classification / regression); None for segmentation and multitask."""
    return next((s for s in specs if not s.head and not KINDS[s.kind].reads_mask), None)


def _has_targets(specs: list[_LabelSpec], columns: list[str], mask_col: str) -> bool:
    """Whether the manifest has the label columns (prediction may read one without): task=multitask every
    head's, a single task its one; with none to read, whether it has the mask column."""
    read = [s for s in specs if s.head] or specs
    return all(s.column in columns for s in read) if read else mask_col in columns


def _spec_class_names(spec: _LabelSpec, rows: list[dict], columns: list[str], class_names: list[str] | dict | None,
                      positive_label: str | None, problems: list[str]) -> list[str] | None:
    """A classification label's class names: the known ones (``class_names``: a single task's list, or
    task=multitask's {head: list}), else derived from the column's labels (:func:`_class_mapping`; a bad label
    set is a problem of the manifest); None for the other kinds, and when no row has a label."""
    if not KINDS[spec.kind].class_mapped:
        return None
    if spec.head and isinstance(class_names, dict):
        return [str(c) for c in class_names[spec.name]]
    if not spec.head and class_names is not None:
        return [str(c) for c in class_names]
    present = [r[spec.column] for r in rows if spec.column in columns and not _is_missing(r.get(spec.column))]
    if not present:
        return None
    names, err = _class_mapping(present, positive_label)
    if err:
        problems.append(f"column {spec.column!r}{f' (task.heads.{spec.name})' if spec.head else ''}: {err}")
    return names


def _read_value(spec: _LabelSpec, row: dict, class_names: list[str] | None, base: Path,
                problems: list[str]) -> float | Path | None:
    """A label cell (not missing) as the mask path (segmentation: an existing file), else as its kind reads it
    (brain3d.tasks: the class index for classification, the number for regression); else a problem and None."""
    raw, col = row[spec.column], spec.column
    if KINDS[spec.kind].reads_mask:
        return _existing_file(row, col, "mask", base, problems)
    return KINDS[spec.kind].parse_label(raw, col, class_names, problems)


def _read_labels(row: dict, specs: list[_LabelSpec], spec_classes: list[list[str] | None], base: Path,
                 problems: list[str]) -> tuple[float | None, Path | None, dict]:
    """One row's labels as ``(Subject.target, Subject.mask, Subject.labels)``: a single task's target or mask;
    task=multitask each head's label (``{head: value or mask path}``) and its segmentation head's mask path.
    An empty cell is no label (a head does not learn from the row; prediction does not evaluate it); it is a
    problem only where the label is required."""
    target, mask, labels = None, None, {}
    for spec, names in zip(specs, spec_classes):
        if _is_missing(row.get(spec.column)):
            if spec.required:
                problems.append(f"column {spec.column!r}: empty "
                                f"{'mask path' if KINDS[spec.kind].reads_mask else 'target'}")
            if spec.head:
                labels[spec.name] = None
            continue
        value = _read_value(spec, row, names, base, problems)
        if spec.head:
            labels[spec.name] = value
        if KINDS[spec.kind].reads_mask:
            mask = value
        elif not spec.head:
            target = value
    return target, mask, labels


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path)


def _existing_file(row: dict, col: str, kind: str, base: Path, problems: list[str]) -> Path | None:
    """The row's ``col`` path resolved against ``base`` when it names an existing file; else a problem and None."""
    if _is_missing(row.get(col)):
        problems.append(f"column {col!r}: empty {kind} path")
        return None
    path = _resolve(base, row[col])
    if not path.is_file():
        problems.append(f"column {col!r}: {kind} file not found: {path}")
        return None
    return path


@dataclass
class HeaderInfo:
    """What a NIfTI header says, without reading the data block.

    Attributes:
        shape: the spatial shape (X, Y, Z) in RAS axis order (what :func:`~brain3d.data.nifti.load_nifti`
            returns; :func:`~brain3d.data.nifti.read_header_shape` gives the same).
        affine: the file's own 4x4 voxel->world (mm) matrix (``img.affine``: sform, else qform, else pixdim).
        ras_affine: the affine of the RAS-reoriented array (what ``load_nifti`` returns with the data).
        num_volumes: the product of the dimensions after the third (1 for a 3-D file).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ras_affine: np.ndarray
    num_volumes: int


def read_header_info(path: str | os.PathLike) -> HeaderInfo:
    """Read one header (cheap: the data block is not read) and check that the file is a single 3-D volume.

    Raises:
        NiftiReadError: missing or unreadable file, or not an image (same message as ``load_nifti``).
        ValueError: not 3-D; a 4-D (or 5-D) file with more than one volume says how many it holds.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        disk_shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc  # the messages of brain3d.data.nifti ("not a NIfTI file ...")
    num_volumes = int(np.prod(disk_shape[3:], dtype=np.int64)) if len(disk_shape) > 3 else 1
    if len(disk_shape) >= 4 and num_volumes > 1:
        raise ValueError(
            f"{path}: expected a 3-D volume, got a {len(disk_shape)}-D file with {num_volumes} volumes "
            f"(shape {disk_shape}); brain3d reads one volume per file"
        )
    if len(disk_shape) < 3 or num_volumes != 1:
        raise ValueError(
            f"{path}: expected a 3-D volume (a 4th dimension of size 1 is allowed), got shape {disk_shape}"
        )
    shape = disk_shape[:3]
    ornt = nib.orientations.io_orientation(affine)
    if np.isnan(ornt).any():  # degenerate affine: load_nifti keeps the on-disk order
        return HeaderInfo(shape, affine, affine, 1)  # type: ignore[arg-type]
    ras_shape = [0, 0, 0]
    for disk_axis, (ras_axis, _flip) in enumerate(ornt):
        ras_shape[int(ras_axis)] = shape[disk_axis]
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)  # as nib.as_closest_canonical does
    return HeaderInfo(tuple(ras_shape), affine, ras_affine, 1)  # type: ignore[arg-type]


def affine_distance_mm(a: HeaderInfo, b: HeaderInfo) -> float:
    """How far apart (mm) the two grids put the same RAS voxel: the largest distance over the 8 corner voxels.

    The RAS affines are compared (the arrays brain3d trains on), so a mask stored in another axis order or
    direction but on the same grid as its image is at distance 0.
    """
    corners = np.array([[i, j, k, 1.0] for i in (0, a.shape[0] - 1) for j in (0, a.shape[1] - 1)
                        for k in (0, a.shape[2] - 1)]).T
    diff = (a.ras_affine @ corners - b.ras_affine @ corners)[:3]
    return float(np.sqrt((diff ** 2).sum(axis=0)).max())


def _read_headers(paths: list[Path], num_threads: int) -> list[HeaderInfo | str]:
    """:func:`read_header_info` for every path, in parallel; each result is the info or the error message."""
    def one(p: Path) -> HeaderInfo | str:
        try:
            return read_header_info(p)
        except (NiftiReadError, ValueError) as err:
            return str(err)

    if len(paths) < 2 or num_threads <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return list(pool.map(one, paths))


def _read_raw(path: Path) -> np.ndarray:
    """The stored values (scl_slope / scl_inter applied, no thresholding, no reorientation)."""
    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc


def _format_values(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit].tolist())
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _check_image_data(path: Path) -> list[str]:
    """Decode an image as training will (a truncated .gz only fails once its data is read); report non-finite voxels."""
    try:
        data, _ = load_nifti(path)
    except (NiftiReadError, ValueError) as err:
        return [str(err)]
    finite = np.isfinite(data)
    if finite.all():
        return []
    n_nan = int(np.isnan(data).sum())
    n_inf = int(data.size - finite.sum()) - n_nan
    found = " and ".join(f"{n} {name}" for n, name in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    return [f"image has {found} voxel(s) out of {data.size}: {path}"]


def _check_mask_data(path: Path, mask_values: str, num_classes: int = 1) -> list[str]:
    """Decode a mask's stored values; ``binary``: only 0 and 1; ``labels``: non-negative integers (foreground = > 0);
    ``num_classes`` K >= 2 (a multi-class segmentation): the integers 0..K only.

    ``load_mask`` thresholds at > 0.5 without complaint, so this reads the values before that.
    """
    try:
        raw = _read_raw(path)
    except NiftiReadError as err:
        return [str(err)]
    if num_classes > 1:
        raw = np.asarray(raw, dtype=np.float64)  # within 1e-3 of an integer counts, as load_label_map reads it
        bad = ~((np.abs(raw - np.round(raw)) <= 1e-3) & (np.round(raw) >= 0) & (np.round(raw) <= num_classes))
        if not bad.any():
            return []
        values = np.unique(raw[bad])
        return [f"a label map for task.num_classes={num_classes} must hold the integers 0..{num_classes} "
                f"(0 background), found {len(values)} other distinct values {_format_values(values)} in {path}"]
    if raw.dtype == np.bool_:
        return []
    if mask_values == "binary":
        if np.issubdtype(raw.dtype, np.integer):
            ok = raw.size == 0 or (raw.min() >= 0 and raw.max() <= 1)
        else:
            ok = bool(np.all((raw == 0) | (raw == 1)))
        if ok:
            return []
        values = np.unique(raw)
        return [f"a binary segmentation mask must hold only 0 and 1, found {len(values)} distinct values "
                f"{_format_values(values)} in {path} (for a label map whose foreground is every label > 0, "
                f"set data.mask_values=labels)"]
    if np.issubdtype(raw.dtype, np.integer):
        ok = raw.size == 0 or raw.min() >= 0
    else:
        ok = bool(np.all(np.isfinite(raw) & (raw >= 0) & (raw == np.round(raw))))
    if ok:
        return []
    values = np.unique(raw)
    bad = values[~(np.isfinite(values) & (values >= 0) & (values == np.round(values)))]
    return [f"a label mask must hold non-negative integers, found {len(bad)} other distinct values "
            f"{_format_values(bad)} in {path}"]


def load_manifest(
    path: str | Path, task: str, id_col: str | None = None, image_col: str | Sequence[str] = "image",
    target_col: str | None = None,
    mask_col: str = "mask", split_col: str = "split", positive_label: str | None = None, check_data: bool = True,
    num_threads: int = 8, require_targets: bool = True, class_names: list[str] | None = None,
    group_col: str | None = "group", on_error: str = "raise", affine_tolerance: float = 1e-3,
    mask_values: str = "binary", heads: Sequence[tuple[str, str, str]] | None = None, num_classes: int = 1,
) -> Manifest:
    """Read and check a manifest for ``task``; raise one :class:`ManifestError` listing every problem.

    Args:
        path: CSV or TSV, one row per subject. Relative file paths resolve against its folder.
        task: "classification", "regression", "segmentation" or "multitask" (with ``heads``).
        id_col: subject id column; None -> ``subject_id``, else ``participant_id`` (BIDS).
        image_col: image path column (default "image"), or a list of columns: co-registered channels of one
            input, in channel order (each must be present in every row; the mask lies on the first one's grid;
            a further channel on another grid is resampled onto it, brain3d.data.channels). ``Subject.images``
            then holds every channel's file, ``Subject.image`` the first.
        target_col: target column; None -> "sex" (classification) or "age" (regression). Unused for segmentation.
        mask_col: mask path column for segmentation. Default "mask".
        split_col: optional column with train/val per row; ignored when absent. Default "split".
        positive_label: for two string labels, which one is the positive class (default: the second sorted).
        check_data: decode every image and mask once (catches truncated .gz, NaN / Inf image voxels and mask
            values other than 0/1); headers are always read.
        num_threads: threads for the header pass and the decode check (file I/O and zlib release the GIL).
        require_targets: False for prediction: a missing target (or mask) column is allowed and then
            ``Subject.target`` / ``Subject.mask`` stay None; so is an empty cell of that column (the row is
            predicted, not evaluated); a value that is present is still checked.
        class_names: a known label mapping (a checkpoint's) to use instead of deriving one from the rows.
        group_col: optional column naming the unit that must not straddle train and val (e.g. the participant
            of several sessions); used when the column exists; an empty cell makes the row its own group.
            None: no groups.
        on_error: "raise" (default): any problem raises. "skip": rows with problems are left out and listed in
            :attr:`Manifest.skipped`; problems of the manifest as a whole (a missing column, no rows, a bad
            label set) still raise, and so does a manifest in which every row has a problem.
        affine_tolerance: largest distance (mm) the image and mask grids may put the same voxel apart
            (compared on the RAS-reoriented grids, over the volume's corners); further channels farther from the
            first channel's grid are logged (one warning per subject) and resampled.
        mask_values: "binary" (default): segmentation masks must hold only 0 and 1. "labels": masks may be
            integer label maps (e.g. the Medical Segmentation Decathlon's {0, 1, 2, 3}); brain3d's loader
            (``load_mask``: value > 0.5) then trains on every label > 0 as one foreground.
        heads: task="multitask": ``(head name, kind, column)`` per head. Every column must exist (when
            ``require_targets``); an empty cell means the row has no label for that head (it still trains the
            others) and is never a problem; ``Subject.labels`` holds the labels and ``Subject.mask`` the
            segmentation head's mask; ``Manifest.head_class_names`` each classification head's labels.
        num_classes: the segmentation head's labels (task.num_classes). K >= 2: masks are label maps whose
            values must be integers 0..K (with ``check_data``; ``mask_values`` is then not used).

    Raises:
        ManifestError: every problem found, each naming the file's line (the header is line 1), the row's
            subject id and the column: "line 3 (sub-02), column 'image': image file not found: ...".
        ValueError: a bad ``on_error``, ``mask_values`` or ``image_col``.
    """
    image_cols = checked_image_columns(image_col)
    path = _checked_path(path, on_error, mask_values)
    columns, rows, lines, extra_cells = read_table(path)
    if id_col is None:
        id_col = "subject_id" if "subject_id" in columns or "participant_id" not in columns else "participant_id"
    specs = _label_specs(task, target_col, mask_col, heads, require_targets)
    has_targets = _has_targets(specs, columns, mask_col)
    _check_table(path, columns, rows, id_col, image_cols, specs, require_targets)
    layout = _Layout(path.parent, columns, id_col, tuple(image_cols), mask_col, split_col,
                     group_col if group_col is not None and group_col in columns else None)

    # Problems of the manifest as a whole (always raise): grouping by the target, a bad label set.
    target = _single_target(specs)
    problems = _group_is_target(layout.group_col, target)
    spec_classes = [_spec_class_names(s, rows, columns, class_names, positive_label, problems) for s in specs]

    # Per row: pass 1 (no file opened), pass 2 (the headers), across rows (the split), pass 3 (the data).
    subjects, row_problems = _check_rows(rows, lines, extra_cells, layout, specs, spec_classes)
    _check_headers(subjects, row_problems, image_cols, mask_col, affine_tolerance, num_threads)
    if split_col in columns:
        _check_split_sides(subjects, row_problems, split_col, group_col)
    if check_data:
        _check_decoded(subjects, row_problems, image_cols, mask_col, mask_values, num_threads, num_classes)
    subjects, skipped = _keep_or_raise(path, problems, subjects, row_problems, on_error)

    if target is not None and KINDS[target.kind].class_mapped:
        class_names = spec_classes[specs.index(target)]
    return Manifest(path, subjects, id_col, target.column if target is not None and has_targets else None,
                    None if heads else class_names, columns, has_targets, skipped,
                    {s.name: c for s, c in zip(specs, spec_classes) if s.head and c is not None},
                    {name: col for name, _, col in heads or ()})


def _checked_path(path: str | Path, on_error: str, mask_values: str) -> Path:
    """The manifest's path (``~`` expanded), once the options are known and the file exists."""
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r} is not one of {', '.join(ON_ERROR)}")
    if mask_values not in MASK_VALUES:
        raise ValueError(f"data.mask_values={mask_values!r} is not one of {', '.join(MASK_VALUES)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(path, [f"manifest file not found: {path}"])
    return path


def _check_table(path: Path, columns: list[str], rows: list[dict], id_col: str, image_cols: list[str],
                 specs: list[_LabelSpec], require_targets: bool) -> None:
    """Raise when a needed column is missing (id and every image column always, the label columns when
    ``require_targets``), else when the manifest has no rows."""
    needed = [("data.id_col", id_col), *(("data.image_col", col) for col in image_cols),
              *((s.key, s.column) for s in specs)]
    problems = [f"column {col!r} ({key}) not found; the manifest has columns {columns}"
                for key, col in needed
                if col not in columns and (require_targets or key in ("data.id_col", "data.image_col"))]
    if problems:
        raise ManifestError(path, problems)
    if not rows:
        raise ManifestError(path, ["the manifest has a header but no rows"])


@dataclass(frozen=True)
class _Layout:
    """Where a manifest's paths resolve (its folder), its header, and the columns pass 1 reads."""

    base: Path
    columns: list[str]
    id_col: str
    image_cols: tuple[str, ...]  # the channels' columns (data.image_col), in channel order
    mask_col: str
    split_col: str
    group_col: str | None  # None: no groups (data.group_col=null, or the manifest has no such column)


def _group_is_target(group_col: str | None, target: _LabelSpec | None) -> list[str]:
    """The problem of a split group column that is the target column itself (each class would be one group)."""
    if group_col is None or target is None or group_col != target.column:
        return []
    return [f"column {group_col!r} is both the target (data.target_col) and the split group "
            f"(data.group_col): grouping by the target would put each class on one side; "
            f"set data.group_col to a participant id column or null"]


def _check_rows(rows: list[dict], lines: list[int], extra_cells: list[list[str]], layout: _Layout,
                specs: list[_LabelSpec], spec_classes: list[list[str] | None]) -> tuple[list[Subject], list[list[str]]]:
    """Pass 1, per row, no file opened: ids, paths, labels, split values. Returns the subjects and
    ``row_problems``: ``row_problems[i - 1]`` the problems of data row i, without the "line N (id), " prefix
    (added at the end)."""
    subjects: list[Subject] = []
    row_problems: list[list[str]] = []
    seen_ids: dict[str, int] = {}  # subject id -> the line of its first row
    for i, (r, line, extra) in enumerate(zip(rows, lines, extra_cells), start=1):
        mine: list[str] = []
        row_problems.append(mine)
        if extra:
            mine.append(f"{len(extra)} cell(s) beyond the header's {len(layout.columns)} columns: {extra} (a value "
                        f"with the delimiter in it must be quoted)")
        sid = r.get(layout.id_col, "")
        if _is_missing(sid):
            mine.append(f"column {layout.id_col!r}: empty subject id")
            sid = ""  # the row cannot be used: it is reported (or skipped) by its line alone
        elif sid in seen_ids:
            mine.append(f"column {layout.id_col!r}: subject id {sid!r} is already used on line {seen_ids[sid]}")
        else:
            seen_ids[sid] = line
        images = [_existing_file(r, col, "image", layout.base, mine) for col in layout.image_cols]
        target, mask, labels = _read_labels(r, specs, spec_classes, layout.base, mine)
        split = None
        if layout.split_col in layout.columns and not _is_missing(r.get(layout.split_col)):
            split = SPLIT_NAMES.get(r[layout.split_col].lower())
            if split is None:
                mine.append(f"column {layout.split_col!r}: {r[layout.split_col]!r} is not one of train, val")
        group = r.get(layout.group_col) if layout.group_col is not None else None
        group = None if _is_missing(group) else group
        subjects.append(Subject(sid, images[0], i, target, mask, split, group, line, labels,
                                images if len(images) > 1 else []))
    return subjects, row_problems


def _row_files(s: Subject, image_cols: Sequence[str], mask_col: str) -> list[tuple[str, Path | None]]:
    """``(column, path or None)`` of a row's files: every channel's, in channel order, then the mask's."""
    return [*zip(image_cols, s.image_paths), (mask_col, s.mask)]


def _check_headers(subjects: list[Subject], row_problems: list[list[str]], image_cols: Sequence[str], mask_col: str,
                   affine_tolerance: float, num_threads: int) -> None:
    """Pass 2, the headers, in parallel: not NIfTI, not one 3-D volume, mask shape / grid vs the (first
    channel's) image's; further channels on another grid are logged (:func:`_warn_other_grids`). A file that
    fails is dropped from its subject (``image`` / ``images[k]`` / ``mask`` None; the row is reported)."""
    jobs = [(s, k, p) for s in subjects for k, (_, p) in enumerate(_row_files(s, image_cols, mask_col))
            if p is not None]
    infos = dict(zip(((s.row, k) for s, k, _ in jobs), _read_headers([p for _, _, p in jobs], num_threads)))
    for s in subjects:
        mine = row_problems[s.row - 1]
        header: list[HeaderInfo | None] = []
        for k, (col, p) in enumerate(_row_files(s, image_cols, mask_col)):
            info = infos.get((s.row, k)) if p is not None else None
            if isinstance(info, str):
                mine.append(f"column {col!r}: {info}")
                info = None
            header.append(info)
        *channel_infos, mask_info = header
        image_info = channel_infos[0]
        if s.images:  # several channels
            if image_info is not None:
                _warn_other_grids(s, image_cols, channel_infos, affine_tolerance)
            s.images = [p if info is not None else None for p, info in zip(s.images, channel_infos)]
        if image_info and mask_info and not _mask_on_image_grid(s, image_info, mask_info, mask_col,
                                                                affine_tolerance, mine):
            mask_info = None
        if mask_info is None:
            s.mask = None
            if s.labels:  # task=multitask: the segmentation head's label goes with it (the row is reported)
                s.labels = {k: (None if isinstance(v, Path) else v) for k, v in s.labels.items()}
        if image_info is None:
            s.image = None


def _warn_other_grids(s: Subject, image_cols: Sequence[str], infos: Sequence[HeaderInfo | None],
                      affine_tolerance: float) -> None:
    """One warning for a subject whose further channels lie on another grid than the first channel's (beyond
    ``affine_tolerance`` mm, or another shape): naming both files; they are resampled onto the first's grid."""
    first = infos[0]
    differences = []
    for col, path, info in zip(image_cols[1:], s.images[1:], infos[1:]):
        if info is None:
            continue
        if info.shape != first.shape:
            how = (f"{info.shape} voxels of {_voxel_mm(info)} mm vs {first.shape} of {_voxel_mm(first)} mm")
        else:
            distance = affine_distance_mm(first, info)
            if distance <= affine_tolerance:
                continue
            how = f"the same voxel {distance:.4g} mm apart (data.affine_tolerance={affine_tolerance:g} mm)"
        differences.append(f"column {col!r} ({path}) is on another grid than column {image_cols[0]!r} "
                           f"({s.image}): {how}")
    if differences:
        log.warning("line %s%s: %s; resampled onto the grid of column %r", s.line,
                    f" ({s.subject_id})" if s.subject_id else "", "; ".join(differences), image_cols[0])


def _voxel_mm(info: HeaderInfo) -> str:
    """The voxel size of a RAS grid, e.g. "1x1x1.2"."""
    return "x".join(f"{v:.3g}" for v in np.sqrt((info.ras_affine[:3, :3] ** 2).sum(axis=0)))


def _mask_on_image_grid(s: Subject, image_info: HeaderInfo, mask_info: HeaderInfo, mask_col: str,
                        affine_tolerance: float, problems: list[str]) -> bool:
    """Whether the mask has the image's shape and grid (within ``affine_tolerance`` mm); else a problem."""
    if image_info.shape != mask_info.shape:
        problems.append(
            f"column {mask_col!r}: mask shape {mask_info.shape} differs from image shape "
            f"{image_info.shape} ({s.mask} vs {s.image})"
        )
        return False
    distance = affine_distance_mm(image_info, mask_info)
    if not distance <= affine_tolerance:  # NaN affines fail too
        problems.append(
            f"column {mask_col!r}: mask affine differs from image affine: the same voxel is "
            f"{distance:.4g} mm apart (data.affine_tolerance={affine_tolerance:g} mm) "
            f"({s.mask} vs {s.image})"
        )
        return False
    return True


def _check_split_sides(subjects: list[Subject], row_problems: list[list[str]], split_col: str,
                       group_col: str | None) -> None:
    """Across rows: with a split column, all rows of a group (or one subject id) must be on the same side."""
    members: dict[str, list[Subject]] = {}
    for s in subjects:
        if s.split is not None and (s.group is not None or s.subject_id):  # no id: already reported
            members.setdefault(_group_key(s), []).append(s)
    for key, group_rows in members.items():
        sides = {s.split for s in group_rows}
        if len(sides) < 2:
            continue
        by_side = {side: ", ".join(str(s.line) for s in group_rows if s.split == side) for side in ("train", "val")}
        what = f"group {key!r} (column {group_col!r})" if group_rows[0].group is not None else f"subject {key!r}"
        for s in group_rows:
            row_problems[s.row - 1].append(
                f"column {split_col!r}: {what} is in both train (lines {by_side['train']}) and val (lines "
                f"{by_side['val']}); all its rows must be on one side"
            )


def _check_decoded(subjects: list[Subject], row_problems: list[list[str]], image_cols: Sequence[str], mask_col: str,
                   mask_values: str, num_threads: int, num_classes: int = 1) -> None:
    """Pass 3: decode every readable file once, in parallel: a truncated .nii.gz has a valid header."""
    decode_jobs = [(s, col, p, k == len(image_cols)) for s in subjects
                   for k, (col, p) in enumerate(_row_files(s, image_cols, mask_col)) if p is not None]

    def decode(job: tuple[Subject, str, Path, bool]) -> list[str]:
        return _check_mask_data(job[2], mask_values, num_classes) if job[3] else _check_image_data(job[2])

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(pool.map(decode, decode_jobs))
    for (s, col, _, _), errs in zip(decode_jobs, results):
        row_problems[s.row - 1].extend(f"column {col!r}: {e}" for e in errs)


def _keep_or_raise(path: Path, problems: list[str], subjects: list[Subject], row_problems: list[list[str]],
                   on_error: str) -> tuple[list[Subject], list[dict]]:
    """Raise every problem (the manifest's, then each row's, named "line 3 (sub-02), column 'image': ..."),
    or with on_error=skip return the rows without problems and the skipped ones (:attr:`Manifest.skipped`)."""
    located = [[f"line {s.line}{f' ({s.subject_id})' if s.subject_id else ''}, {p}" for p in row_problems[s.row - 1]]
               for s in subjects]
    all_problems = problems + [p for mine in located for p in mine]
    if problems or (all_problems and on_error == "raise"):
        raise ManifestError(path, all_problems)
    skipped = [{"row": s.row, "line": s.line, "subject_id": s.subject_id, "problems": located[s.row - 1],
                "reasons": list(row_problems[s.row - 1])}
               for s in subjects if row_problems[s.row - 1]]
    kept = [s for s in subjects if not row_problems[s.row - 1]]
    if not kept:
        raise ManifestError(path, all_problems + ["every row has a problem: data.on_error=skip leaves no subject"])
    return kept, skipped


def _group_key(s: Subject) -> str:
    """The unit of the split: the row's group, else its subject id."""
    return s.group if s.group not in (None, "") else s.subject_id


def split_subjects(
    subjects: list[Subject], val_fraction: float, seed: int, stratify: bool,
    num_folds: int | None = None, fold: int = 0, stratify_by: str | None = None,
) -> tuple[list[Subject], list[Subject]]:
    """Split by subject GROUP into (train, val): all rows of a group go to the same side.

    A group is ``Subject.group`` (e.g. the participant of several sessions), else the subject itself
    (``subject_id``); without groups every statement below is about single subjects, as before groups existed.

    Groups with a split column value keep it (all their rows follow it). The others are shuffled with
    ``seed`` (per class when ``stratify``, by the target of the group's first row, as for classification, so
    both sets keep the class balance), then either:

    - ``num_folds`` None: ``round(n * val_fraction)`` of the n groups (at least one, never all) go to validation;
    ``stratify_by`` (task=multitask): stratify by that head's label (``Subject.labels``) instead of the target;
    subjects without it form a stratum of their own.

    - ``num_folds`` K: they are dealt round-robin into K folds and fold ``fold`` is the validation set, so
      the K runs ``fold=0..K-1`` validate every group exactly once.

    Raises:
        ValueError: val_fraction outside (0, 1), a bad fold, a group with rows marked both train and val, or a
            split that leaves train or val empty.
    """
    if num_folds is None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if num_folds is not None and (num_folds < 2 or not 0 <= fold < num_folds):
        raise ValueError(
            f"data.num_folds must be >= 2 and data.fold in 0..num_folds-1, got num_folds={num_folds}, fold={fold}"
        )
    units: dict[str, list[Subject]] = {}  # group key -> its rows, in first-appearance order
    for s in subjects:
        units.setdefault(_group_key(s), []).append(s)
    train: list[Subject] = []
    val: list[Subject] = []
    free: list[list[Subject]] = []
    for key, members in units.items():
        sides = {s.split for s in members if s.split is not None}
        if len(sides) > 1:
            rows = ", ".join(f"{s.row}: {s.split}" for s in members if s.split is not None)
            raise ValueError(
                f"group {key!r} has rows marked both train and val (rows {rows}); a group must stay on one side"
            )
        if sides:
            (train if sides.pop() == "train" else val).extend(members)
        else:
            free.append(members)
    rng = np.random.default_rng(seed)
    strata: dict[object, list[list[Subject]]] = {}
    for members in free:
        first = min(members, key=lambda s: s.row)
        key = (first.labels.get(stratify_by) if stratify_by else first.target) if stratify else None
        strata.setdefault(key, []).append(members)
    dealt = 0  # continue the round-robin across classes so fold sizes stay within one of each other
    for key in sorted(strata, key=str):
        shuffled = [strata[key][j] for j in rng.permutation(len(strata[key]))]
        if num_folds is not None:
            for j, members in enumerate(shuffled):
                (val if (dealt + j) % num_folds == fold else train).extend(members)
            dealt += len(shuffled)
            continue
        n_val = int(round(len(shuffled) * val_fraction))
        if len(shuffled) >= 2:
            n_val = min(max(n_val, 1), len(shuffled) - 1)
        val += [s for members in shuffled[:n_val] for s in members]
        train += [s for members in shuffled[n_val:] for s in members]
    if not train or not val:
        grouped = f", groups: {len(units)}" if len(units) != len(subjects) else ""
        raise ValueError(
            f"the split leaves {len(train)} training and {len(val)} validation subjects; both need at least one "
            f"(subjects: {len(subjects)}{grouped}, data.val_fraction={val_fraction}, data.num_folds={num_folds})"
        )
    train.sort(key=lambda s: s.row)
    val.sort(key=lambda s: s.row)
    return train, val
