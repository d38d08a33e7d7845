"""Dataset layouts -> a regular manifest CSV, so everything downstream reads one kind of input.

- :func:`bids_manifest`: a BIDS folder (``participants.tsv`` + ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]``),
  one row per image (per subject and session), grouped by participant so that the sessions of one
  participant never straddle train and val. participants.tsv is optional when the task needs no target.
  Several suffixes (``data.suffix=[T1w,FLAIR]``) give one column per further suffix, read as input channels.
- :func:`msd_manifest`: a Medical Segmentation Decathlon folder (``dataset.json`` with a "training" list of
  image / label pairs, as nnU-Net v1 and MONAI's ``load_decathlon_datalist`` read it).
- :func:`source_manifest`: the one call ``train.prepare_manifest`` needs for ``data.source`` bids / msd: writes
  ``<data.cache_dir>/manifests/<hash of root and settings>.csv`` (rewritten on every call, so it follows the
  dataset as it changes) and returns its path.

Manifests are written atomically (temp file in the same folder, then ``os.replace``) with ABSOLUTE file paths,
so they can live anywhere (the manifest reader resolves relative paths against the manifest's folder).
Every problem of the layout itself raises ``ValueError`` naming the path; problems of single files (unreadable,
not 3-D, NaN voxels...) are left to :func:`brain3d.data.manifest.load_manifest`, which reports them by row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from brain3d.data.cache import default_cache_root
from brain3d.data.manifest import TASK_TARGET_COLS, _is_missing, read_rows

__all__ = ["bids_manifest", "msd_manifest", "source_manifest", "SOURCES", "MANIFEST_VERSION"]

SOURCES = ("bids", "msd")
MANIFEST_VERSION = 1  # part of the cache name: bump when the written manifest changes for the same inputs
LOADER_THRESHOLD = 0.5  # brain3d.data.nifti.load_mask: foreground = value > 0.5
BIDS_COLUMNS = ("subject_id", "participant_id", "session", "image", "mask")
# Entities that name a different acquisition (not a derivative of it): a mask name that adds one of these to an
# image's entity prefix belongs to another image (e.g. sub-01_ses-1 vs sub-01_ses-1_run-2).
RAW_ENTITIES = {"sub", "ses", "task", "acq", "ce", "trc", "stain", "rec", "dir", "run", "mod", "echo", "flip",
                "inv", "mt", "part", "chunk", "sample"}
_LIST_AT_MOST = 50


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_AT_MOST])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _LIST_AT_MOST else "")


def _write_csv_atomic(out_path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def _write_json_atomic(out_path: Path, payload: Mapping[str, Any]) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def _abs(path: Path) -> Path:
    """Absolute and normalised (``./imagesTr/..`` -> ``imagesTr/..``) without resolving symlinks."""
    return Path(os.path.abspath(path))


# ---------------------------------------------------------------------------------------------------------------
# BIDS
# ---------------------------------------------------------------------------------------------------------------


def _split_name(name: str, suffix: str, extension: Sequence[str]) -> tuple[str, str] | None:
    """``sub-01_ses-1_T1w.nii.gz`` -> (``sub-01_ses-1``, ``.nii.gz``) for suffix T1w; None if it does not match."""
    for ext in extension:
        tail = f"_{suffix}{ext}"
        if name.endswith(tail) and len(name) > len(tail):
            return name[: -len(tail)], ext
    return None


def _find_images(participant_dir: Path, pid: str, suffix: str,
                 extension: Sequence[str]) -> list[tuple[str, str | None, Path]]:
    """(entity prefix, session or None, path) of every ``[ses-*/]anat/<pid>_*_<suffix><ext>``; for one prefix
    stored with several extensions, the first in ``extension`` wins."""
    folders: list[tuple[str | None, Path]] = [(None, participant_dir / "anat")]
    if participant_dir.is_dir():
        folders += [(d.name, d / "anat") for d in sorted(participant_dir.iterdir())
                    if d.is_dir() and d.name.startswith("ses-")]
    found: dict[str, tuple[int, str | None, Path]] = {}
    for session, folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            parsed = _split_name(entry.name, suffix, extension)
            if parsed is None or not entry.is_file() or not entry.name.startswith(f"{pid}_"):
                continue
            prefix, ext = parsed
            rank = list(extension).index(ext)
            if prefix not in found or rank < found[prefix][0]:
                found[prefix] = (rank, session, entry)
    return [(prefix, session, path) for prefix, (_, session, path) in sorted(found.items())]


def _mask_index(folder: Path, mask_suffix: str, extension: Sequence[str],
                recursive: bool) -> dict[str, list[tuple[str, Path]]]:
    """Mask files under ``folder`` by participant: {pid: [(name without _<mask_suffix><ext>, path), ...]}."""
    best: dict[tuple[Path, str], tuple[int, Path]] = {}  # one file per folder and name: the preferred extension
    if not folder.is_dir():
        return {}
    entries = folder.rglob(f"*_{mask_suffix}.nii*") if recursive else folder.iterdir()
    for entry in entries:
        parsed = _split_name(entry.name, mask_suffix, extension)
        if parsed is None or not entry.name.startswith("sub-") or not entry.is_file():
            continue
        rank = list(extension).index(parsed[1])
        key = (entry.parent, parsed[0])
        if key not in best or rank < best[key][0]:
            best[key] = (rank, entry)
    index: dict[str, list[tuple[str, Path]]] = {}
    for (_, name), (_, entry) in sorted(best.items()):
        index.setdefault(name.split("_", 1)[0], []).append((name, entry))
    return index


def _match_mask(prefix: str, candidates: list[tuple[str, Path]]) -> list[Path]:
    """Masks of the image with entity prefix ``prefix``: ``<prefix>_<mask_suffix>`` exactly, else
    ``<prefix>_<derivative entities>_<mask_suffix>`` (space-, desc-, label-, ...: no entity of another acquisition)."""
    exact = sorted(p for name, p in candidates if name == prefix)
    if exact:
        return exact
    matches = []
    for name, path in candidates:
        if not name.startswith(f"{prefix}_"):
            continue
        extra = name[len(prefix) + 1:].split("_")
        if all("-" in e and e.split("-", 1)[0] not in RAW_ENTITIES for e in extra):
            matches.append(path)
    return sorted(matches)


def _read_participants(tsv: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """participants.tsv -> ({"sub-<label>": its row}, target columns), checked: the rows are the subjects of the
    manifest and the other columns its targets, so a missing id column, no rows, a duplicate id or a column named
    like one the manifest writes would give a wrong manifest rather than a visible error later."""
    columns, rows = read_rows(tsv)
    if "participant_id" not in columns:
        raise ValueError(f"{tsv}: no participant_id column; its columns are {columns}")
    if not rows:
        raise ValueError(f"{tsv} lists no participants")
    reserved = [c for c in columns if c in BIDS_COLUMNS and c != "participant_id"]
    if reserved:
        raise ValueError(f"{tsv}: column(s) {reserved} clash with the manifest's own columns {list(BIDS_COLUMNS)}; "
                         f"rename them")
    participants: dict[str, dict[str, str]] = {}
    for i, r in enumerate(rows, start=1):
        pid = r.get("participant_id", "")
        if _is_missing(pid):
            raise ValueError(f"{tsv}: line {i + 1} has an empty participant_id")
        pid = pid if pid.startswith("sub-") else f"sub-{pid}"
        if pid in participants:
            raise ValueError(f"{tsv}: participant {pid!r} is listed twice (line {i + 1})")
        participants[pid] = r
    return participants, [c for c in columns if c != "participant_id" and c]


def _participants_from_folders(root: Path) -> dict[str, dict[str, str]]:
    """The participants of a dataset without participants.tsv: its ``sub-*`` folders, in name order, with no
    targets (BIDS only RECOMMENDS participants.tsv, and segmentation or prediction need no subject-level value)."""
    pids = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("sub-"))
    if not pids:
        raise ValueError(f"{root}: no participants.tsv and no sub-* folder: not a BIDS dataset")
    return {pid: {"participant_id": pid} for pid in pids}


def _no_participants_message(tsv: Path, target_col: str | None) -> str:
    """Why a missing participants.tsv stops this run: the targets live there (naming the column when known)."""
    needed = f"the target column {target_col!r} (data.target_col)" if target_col else "the targets (sex, age, ...)"
    return (f"{tsv} not found: this task needs {needed}, which a BIDS dataset lists per participant in "
            f"participants.tsv (participant_id + one column per target); segmentation and prediction run without it")


def _load_participants(root: Path, tsv: Path, required: bool,
                       target_col: str | None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The participants and target columns of the dataset: participants.tsv when it exists (every ``sub-*``
    folder must be listed: an unlisted one is usually a typo or a forgotten row, and would silently drop out),
    else the ``sub-*`` folders when ``required`` is False, else the error naming participants.tsv."""
    if tsv.is_file():
        participants, target_cols = _read_participants(tsv)
        unlisted = sorted(d.name for d in root.iterdir()
                          if d.is_dir() and d.name.startswith("sub-") and d.name not in participants)
        if unlisted:
            raise ValueError(f"{root}: {len(unlisted)} subject folder(s) not listed in {tsv}: {_listing(unlisted)}")
        return participants, target_cols
    if required:
        raise ValueError(_no_participants_message(tsv, target_col))
    return _participants_from_folders(root), []


def _read_sessions(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """``sub-<label>_sessions.tsv`` -> (its value columns, {"ses-<label>": row}); no file or no session_id
    column: nothing (the file is optional in BIDS, and without session_id its rows cannot be matched)."""
    if not path.is_file():
        return [], {}
    columns, rows = read_rows(path)
    if "session_id" not in columns:
        return [], {}
    clash = [c for c in columns if c in BIDS_COLUMNS]
    if clash:
        raise ValueError(f"{path}: column(s) {clash} clash with the manifest's own columns")
    sessions = {r["session_id"] if r["session_id"].startswith("ses-") else f"ses-{r['session_id']}": r
                for r in rows if not _is_missing(r.get("session_id"))}
    return [c for c in columns if c != "session_id" and c], sessions


def _mask_root_index(root: Path, mask_root: str | os.PathLike | None, mask_suffix: str | None,
                     extension: Sequence[str]) -> dict[str, list[tuple[str, Path]]] | None:
    """The masks under ``mask_root`` (relative to ``root`` unless absolute), by participant (:func:`_mask_index`,
    searched recursively); None when the masks sit next to the images (no ``mask_root``) or there are none."""
    if mask_suffix is None or mask_root is None:
        return None
    mask_dir = Path(mask_root).expanduser()
    mask_dir = _abs(mask_dir if mask_dir.is_absolute() else root / mask_dir)
    if not mask_dir.is_dir():
        raise ValueError(f"mask root {mask_dir} is not a folder")
    return _mask_index(mask_dir, mask_suffix, extension, recursive=True)


def _image_row(pid: str, prow: Mapping[str, str], sessions: Mapping[str, Mapping[str, str]], prefix: str,
               session: str | None, image: Path) -> dict[str, str]:
    """The manifest row of one image, without its mask: the participant's columns, overridden by its session's
    (sessions.tsv), then subject_id / participant_id / session / image."""
    row = {c: v for c, v in prow.items() if c != "participant_id"}
    if session in sessions:
        row.update({c: v for c, v in sessions[session].items() if c != "session_id" and c})
    row.update(subject_id=prefix, participant_id=pid, session=session or "n/a", image=str(image))
    return row


def _image_masks(pid: str, prefix: str, image: Path, mask_suffix: str, extension: Sequence[str],
                 masks_by_pid: Mapping[str, list[tuple[str, Path]]] | None) -> list[Path]:
    """The masks matching one image: from the ``mask_root`` index when given, else from the image's folder."""
    candidates = (masks_by_pid if masks_by_pid is not None
                  else _mask_index(image.parent, mask_suffix, extension, recursive=False)).get(pid, [])
    return _match_mask(prefix, candidates)


def _bids_rows(root: Path, participants: Mapping[str, Mapping[str, str]], target_cols: list[str], suffix: str,
               mask_suffix: str | None, extension: Sequence[str],
               masks_by_pid: Mapping[str, list[tuple[str, Path]]] | None
               ) -> tuple[list[dict[str, str]], list[str], list[str], list[str]]:
    """Scan every participant's images: (manifest rows, target columns plus those the sessions.tsv files add,
    participants without an image, "image -> masks" of the images matching several masks)."""
    target_cols = list(target_cols)
    out_rows: list[dict[str, str]] = []
    missing: list[str] = []
    ambiguous: list[str] = []
    for pid, prow in participants.items():
        images = _find_images(root / pid, pid, suffix, extension)
        if not images:
            missing.append(pid)
            continue
        s_cols, sessions = _read_sessions(root / pid / f"{pid}_sessions.tsv")
        target_cols += [c for c in s_cols if c not in target_cols]
        for prefix, session, image in images:
            row = _image_row(pid, prow, sessions, prefix, session, image)
            if mask_suffix is not None:
                found = _image_masks(pid, prefix, image, mask_suffix, extension, masks_by_pid)
                if len(found) > 1:
                    ambiguous.append(f"{image} -> {', '.join(str(p) for p in found)}")
                row["mask"] = str(_abs(found[0])) if len(found) == 1 else ""
            out_rows.append(row)
    return out_rows, target_cols, missing, ambiguous


def _raise_bids_problems(root: Path, tsv: Path, suffix: str, mask_suffix: str | None, extension: Sequence[str],
                         missing: Sequence[str], ambiguous: Sequence[str]) -> None:
    """Raise ValueError listing the participants without an image, else the images matching several masks."""
    if missing:
        listed_in, fix = ((tsv, "remove them from participants.tsv") if tsv.is_file()
                          else (f"{root} (its sub-* folders; no participants.tsv)", "remove those folders"))
        raise ValueError(
            f"{len(missing)} participant(s) of {listed_in} have no image {root}/<participant>/[ses-*/]anat/*_{suffix}"
            f"{{{','.join(extension)}}}: {_listing(missing)} ({fix} or fix data.suffix)"
        )
    if ambiguous:
        raise ValueError(f"{len(ambiguous)} image(s) match several '{mask_suffix}' masks: {_listing(ambiguous)}")


def _find_channel(image: Path, prefix: str, suffix: str, first_suffix: str, extension: Sequence[str]) -> Path | None:
    """The ``suffix`` scan of the image ``<prefix>_<first_suffix><ext>``, in the image's folder:
    ``<prefix>_<suffix><ext>``, else (entities that differ, e.g. ``acq-``) the folder's one ``_<suffix>`` file
    when the folder also holds one ``_<first_suffix>`` image; None when there is no such scan."""
    folder = image.parent
    for ext in extension:
        exact = folder / f"{prefix}_{suffix}{ext}"
        if exact.is_file():
            return exact
    scans = sorted(e for e in folder.iterdir() if e.is_file() and _split_name(e.name, suffix, extension))
    firsts = [e for e in folder.iterdir() if e.is_file() and _split_name(e.name, first_suffix, extension)]
    return scans[0] if len(scans) == 1 and len(firsts) == 1 else None


def _add_channels(rows: list[dict[str, str]], suffixes: Sequence[str], extension: Sequence[str]) -> list[str]:
    """Put each further suffix's scan in its column (named after the suffix) of every row; returns
    ``"<subject_id>: <suffix>"`` for each scan that is missing."""
    missing = []
    for row in rows:
        image = Path(row["image"])
        for suffix in suffixes[1:]:
            found = _find_channel(image, row["subject_id"], suffix, suffixes[0], extension)
            if found is None:
                missing.append(f"{row['subject_id']}: {suffix} (no {image.parent}/{row['subject_id']}_{suffix}"
                               f"{{{','.join(extension)}}})")
            row[suffix] = str(_abs(found)) if found is not None else ""
    return missing


def _checked_suffixes(suffix: str | Sequence[str], mask_suffix: str | None) -> list[str]:
    """``suffix`` as a non-empty list of distinct suffixes (one string: one suffix), none of them the mask's or a
    column the manifest writes."""
    suffixes = [suffix] if isinstance(suffix, str) else [str(s) for s in suffix]
    if not suffixes or len(set(suffixes)) != len(suffixes) or not all(suffixes):
        raise ValueError(f"data.suffix={suffix!r} must be a suffix (e.g. T1w) or a list of distinct ones "
                         f"(e.g. [T1w,FLAIR])")
    if mask_suffix is not None and mask_suffix in suffixes:
        raise ValueError(f"the mask suffix {mask_suffix!r} is an image suffix")
    clash = [s for s in suffixes[1:] if s in BIDS_COLUMNS]
    if clash:
        raise ValueError(f"data.suffix {clash} would name a column the manifest already writes ({list(BIDS_COLUMNS)})")
    return suffixes


def _write_bids_manifest(out_path: Path, rows: Sequence[Mapping[str, str]], target_cols: Sequence[str],
                         with_mask: bool, channel_cols: Sequence[str] = ()) -> Path:
    """Write the rows under the header subject_id, participant_id, session, image[, further channels][, mask],
    targets; a target a row lacks (e.g. a sessions.tsv column of another participant) is written "n/a"."""
    header = (list(BIDS_COLUMNS[:4]) + list(channel_cols) + (["mask"] if with_mask else [])
              + list(target_cols))
    missing_value = {c: "n/a" for c in target_cols}
    cells = ([r.get(c) or missing_value.get(c, "") for c in header] for r in rows)
    return _write_csv_atomic(out_path, header, cells)


def bids_manifest(
    root: str | os.PathLike,
    out_path: str | os.PathLike,
    suffix: str | Sequence[str] = "T1w",
    mask_suffix: str | None = None,
    mask_root: str | os.PathLike | None = None,
    extension: Sequence[str] = (".nii.gz", ".nii"),
    require_participants: bool = True,
    target_col: str | None = None,
) -> Path:
    """Write the manifest of a BIDS dataset: one row per image of ``suffix`` (per subject and session).

    Layout read: ``root/participants.tsv`` (``participant_id`` plus target columns such as sex, age; "n/a" is
    missing and stays "n/a", which the manifest reader reports as an empty target) and
    ``root/sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]``. ``sub-<label>/sub-<label>_sessions.tsv``, when present, adds
    per-session columns (e.g. age at each session) that override the participant's value for that session.
    Without participants.tsv (``require_participants=False``: a task that needs no subject-level target), the
    participants are the ``sub-*`` folders and the manifest has no target columns (sessions.tsv still adds its own).

    Columns written: ``subject_id`` (the file's entity prefix: ``sub-01_ses-1`` with sessions, ``sub-01``
    without, ``sub-01_ses-1_run-2`` when a session holds several runs), ``participant_id`` (the GROUP of the
    row: read it with ``group_col="participant_id"`` so the sessions of one participant stay on one side of
    the split), ``session`` (``ses-1`` or n/a), ``image``, ``mask`` (with ``mask_suffix``), then every other
    column of participants.tsv (and the sessions.tsv files), copied to each of the participant's rows. Paths
    are absolute. Rows follow participants.tsv, then the entity prefix.

    Several suffixes (e.g. ``["T1w", "FLAIR"]``: the channels of one input): the rows are the first suffix's
    images (its file in ``image``) and each further suffix gets a column named after it, after ``image``,
    holding that scan of the same subject and session: ``<prefix>_<suffix><ext>`` in the image's folder, else
    the folder's only ``_<suffix>`` file when it holds only one first-suffix image. Every image needs every
    suffix: the missing ones are one error naming each subject (entity prefix) and suffix.

    Masks (``mask_suffix``, e.g. "mask" or "dseg"): for an image ``<prefix>_<suffix><ext>``, the file
    ``<prefix>_<mask_suffix>.nii[.gz]``, or ``<prefix>_<derivative entities>_<mask_suffix>.nii[.gz]`` (e.g.
    ``sub-01_ses-1_space-orig_label-lesion_mask.nii.gz``), in the image's folder or, with ``mask_root``,
    anywhere under ``mask_root`` (e.g. ``derivatives/lesions``; relative to ``root`` unless absolute). An image
    without a mask gets an empty ``mask`` cell: the manifest reader then reports that row for segmentation (or
    leaves it out with ``on_error="skip"``), and the other tasks do not read masks.

    Args:
        root: the BIDS dataset folder.
        out_path: the manifest to write (CSV; parents created; replaced atomically).
        suffix: the image suffix, e.g. "T1w", "T2w", "FLAIR", or a list of them (one input channel each).
        mask_suffix: the mask suffix; None: no mask column.
        mask_root: where the masks are (a derivatives folder); None: next to the images.
        extension: the file extensions accepted, in order of preference (when one image is stored twice).
        require_participants: a missing participants.tsv is an error (the default: targets are read from it);
            False: the ``sub-*`` folders are the participants.
        target_col: the target column the caller needs, only to name it in the missing-participants.tsv error.

    Returns:
        ``out_path``.

    Raises:
        ValueError: ``root`` is not a folder, or has no participants.tsv while ``require_participants``, or
            (without participants.tsv) no ``sub-*`` folder; participants.tsv has no
            participant_id column, no rows or a duplicate id, or a column named like one the manifest writes;
            a ``sub-*`` folder is not listed in participants.tsv; a listed participant has no image (all listed
            together); an image matches several masks; an image lacks a further suffix's scan (all listed
            together); a bad ``suffix`` list.
    """
    root = _abs(Path(root).expanduser())
    out_path = Path(out_path).expanduser()
    if not root.is_dir():
        raise ValueError(f"BIDS root {root} is not a folder")
    suffixes = _checked_suffixes(suffix, mask_suffix)
    tsv = root / "participants.tsv"
    participants, target_cols = _load_participants(root, tsv, require_participants, target_col)
    masks_by_pid = _mask_root_index(root, mask_root, mask_suffix, extension)
    rows, target_cols, missing, ambiguous = _bids_rows(root, participants, target_cols, suffixes[0], mask_suffix,
                                                       extension, masks_by_pid)
    _raise_bids_problems(root, tsv, suffixes[0], mask_suffix, extension, missing, ambiguous)
    clash = [s for s in suffixes[1:] if s in target_cols]
    if clash:
        raise ValueError(f"data.suffix {clash}: participants.tsv (or a sessions.tsv) has a column of that name, "
                         f"and each further suffix gets a manifest column named after it; rename the column")
    missing_channels = _add_channels(rows, suffixes, extension)
    if missing_channels:
        raise ValueError(f"{len(missing_channels)} scan(s) missing: every {suffixes[0]} image needs a scan of "
                         f"each suffix in data.suffix={suffixes}: {_listing(missing_channels)}")
    return _write_bids_manifest(out_path, rows, target_cols, with_mask=mask_suffix is not None,
                                channel_cols=suffixes[1:])


# ---------------------------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon
# ---------------------------------------------------------------------------------------------------------------


def _case_id(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def msd_manifest(root: str | os.PathLike, out_path: str | os.PathLike, label_threshold: float = 0.5) -> Path:
    """Write the manifest of a Medical Segmentation Decathlon dataset (segmentation).

    Reads ``root/dataset.json``'s "training" list (``[{"image": "./imagesTr/x.nii.gz", "label":
    "./labelsTr/x.nii.gz"}, ...]``) and writes ``subject_id`` (the file name without .nii[.gz]), ``image`` and
    ``mask``, as absolute paths. The "test" list has no labels and is not used.

    MSD labels can be multi-class (e.g. BrainTumour 0-3). brain3d trains binary segmentation: its loader
    (``load_mask``) keeps value > 0.5, so every label > 0 becomes foreground ({0, 1, 2} -> {0, 1}); read such
    manifests with ``load_manifest(..., mask_values="labels")`` (the msd data config sets it), since the
    default ``"binary"`` check reports masks with values other than 0/1. ``dataset.json``'s "labels" (and name,
    modality, tensorImageSize) are recorded in the sidecar ``<out_path without .csv>.json``.
    Multi-modal MSD tasks (BrainTumour, Prostate) store 4-D images; the manifest reader reports those rows
    (brain3d reads one 3-D volume per file).

    Args:
        root: the task folder holding dataset.json, imagesTr/, labelsTr/.
        out_path: the manifest to write (CSV; parents created; replaced atomically, after the sidecar).
        label_threshold: the foreground threshold, recorded in the sidecar. Only 0.5, the loader's fixed
            threshold (foreground = any label > 0 for integer labels), is accepted.

    Returns:
        ``out_path``.

    Raises:
        ValueError: ``root`` is not a folder, dataset.json is missing or not JSON, or its "training" list is
            missing, empty or has an entry without "image"; ``label_threshold`` is not 0.5.
    """
    if label_threshold != LOADER_THRESHOLD:
        raise ValueError(f"label_threshold={label_threshold}: brain3d's mask loader binarises at > {LOADER_THRESHOLD} "
                         f"(every integer label > 0 is foreground); other thresholds are not supported")
    root = _abs(Path(root).expanduser())
    out_path = Path(out_path).expanduser()
    if not root.is_dir():
        raise ValueError(f"MSD root {root} is not a folder")
    spec_path = root / "dataset.json"
    if not spec_path.is_file():
        raise ValueError(f"{spec_path} not found: an MSD dataset describes its cases in dataset.json")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{spec_path}: cannot read it as JSON: {err}") from err
    training = spec.get("training") if isinstance(spec, dict) else None
    if not isinstance(training, list) or not training:
        raise ValueError(f"{spec_path}: no \"training\" list of {{\"image\": ..., \"label\": ...}} pairs "
                         f"(an nnU-Net v2 dataset.json has none; this reads the MSD / nnU-Net v1 format)")
    rows = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f"{spec_path}: training entry {i} has no \"image\" path: {entry!r}")
        label = entry.get("label")
        rows.append([_case_id(entry["image"]), str(_abs(root / entry["image"])),
                     str(_abs(root / label)) if isinstance(label, str) and label else ""])
    sidecar = out_path.with_name((out_path.name[:-4] if out_path.name.endswith(".csv") else out_path.name) + ".json")
    _write_json_atomic(sidecar, {
        "source": "msd",
        "root": str(root),
        "dataset_json": str(spec_path),
        "name": spec.get("name"),
        "modality": spec.get("modality"),
        "tensorImageSize": spec.get("tensorImageSize"),
        "labels": spec.get("labels"),
        "num_training": len(rows),
        "label_threshold": label_threshold,
        "foreground": "every label > 0 (brain3d's load_mask keeps value > 0.5: labels {0, 1, 2, ...} -> {0, 1})",
        "manifest": str(out_path),
    })
    return _write_csv_atomic(out_path, ["subject_id", "image", "mask"], rows)


# ---------------------------------------------------------------------------------------------------------------
# From the data config
# ---------------------------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _needs_participants(data_cfg: Any, task: str | None, require_targets: bool) -> tuple[bool, str | None]:
    """(is participants.tsv required, the target column to name when it is missing). Without a task (callers
    that predate the argument) it is required, as it always was; segmentation reads masks and prediction
    (``require_targets=False``) reads no target, so neither needs it."""
    if task is None:
        return True, None
    if task not in TASK_TARGET_COLS or not require_targets:
        return False, None
    return True, str(_get(data_cfg, "target_col", TASK_TARGET_COLS[task]))


def source_manifest(data_cfg: Any, task: str | None = None, require_targets: bool = True) -> Path:
    """The manifest for ``data.source`` bids or msd, written to ``<data.cache_dir>/manifests/<hash>.csv``.

    The hash covers the source, the absolute root and the settings (bids: suffix, mask_suffix, mask_root; msd:
    label_threshold) and :data:`MANIFEST_VERSION`, so each dataset and setting has its own file. The manifest is
    rewritten on every call (scanning a dataset is cheap next to training; a cached one would miss new or
    removed files); runs that write the same one concurrently each replace it atomically with the same content.
    ``task`` and ``require_targets`` only decide whether a BIDS dataset may lack participants.tsv (they do not
    change what is written for a given dataset, so they are not part of the hash).

    Args:
        data_cfg: the ``data`` config (a DictConfig or a mapping): ``source``, ``root`` (required),
            ``cache_dir`` (empty or absent: :func:`brain3d.data.cache.default_cache_root`), and the source's
            settings.
        task: the task the manifest is for; None: participants.tsv is required (the behaviour before ``task``).
            With a task, a BIDS dataset without participants.tsv is read for segmentation.
        require_targets: False (prediction): no task needs participants.tsv.

    Returns:
        The manifest path.

    Raises:
        ValueError: a source other than bids / msd, no ``data.root``, or what the source raises (for bids, a
            missing participants.tsv names the target column the task needs).
    """
    source = _get(data_cfg, "source")
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: source_manifest handles {', '.join(SOURCES)}")
    root_value = _get(data_cfg, "root")
    if not root_value:
        what = "BIDS dataset" if source == "bids" else "MSD task"
        raise ValueError(f"data={source} needs data.root=PATH (the {what} folder)")
    root = _abs(Path(str(root_value)).expanduser())
    if source == "bids":
        mask_root = _get(data_cfg, "mask_root")
        if mask_root:
            mask_root = Path(str(mask_root)).expanduser()
            mask_root = _abs(mask_root if mask_root.is_absolute() else root / mask_root)
        suffix = _get(data_cfg, "suffix", "T1w")  # one suffix, or a list: one input channel each
        suffix = str(suffix) if isinstance(suffix, str) else [str(s) for s in suffix]
        settings = {"suffix": suffix, "mask_suffix": _get(data_cfg, "mask_suffix"),
                    "mask_root": str(mask_root) if mask_root else None}
    else:
        settings = {"label_threshold": float(_get(data_cfg, "label_threshold", LOADER_THRESHOLD))}
    key = json.dumps({"source": source, "root": str(root), "version": MANIFEST_VERSION, **settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    cache_dir = _get(data_cfg, "cache_dir")
    cache_root = Path(str(cache_dir)).expanduser() if cache_dir else default_cache_root()
    out_path = cache_root / "manifests" / f"{digest}.csv"
    if source == "bids":
        required, target_col = _needs_participants(data_cfg, task, require_targets)
        return bids_manifest(root, out_path, suffix=settings["suffix"], mask_suffix=settings["mask_suffix"],
                             mask_root=settings["mask_root"], require_participants=required, target_col=target_col)
    return msd_manifest(root, out_path, label_threshold=settings["label_threshold"])
