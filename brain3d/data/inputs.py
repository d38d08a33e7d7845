"""``brain3d-predict input=PATH``: the NIfTI files a path names, as the rows prediction reads, no manifest needed.

- A file (``.nii`` or ``.nii.gz``): that one scan.
- A folder: every ``*.nii`` / ``*.nii.gz`` directly in it, sorted by name; when the folder is a BIDS dataset (it
  holds ``sub-*`` folders) or one participant of one (it is named ``sub-*``), also every NIfTI in
  ``sub-*/anat/`` and ``sub-*/ses-*/anat/`` (a BIDS root's ``derivatives/`` and other folders are not read).

A scan's id is its file name without ``.nii`` / ``.nii.gz`` (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``): the
names of its outputs and its row in predictions.csv. Two files with one id (``a.nii`` and ``a.nii.gz``) are an
error naming both, as are a missing path, a file that is not NIfTI and a folder without one: each one line
(:class:`~brain3d.errors.ConfigError`, exit 2). Whether each file reads as one 3-D volume is checked later, once
for all files, by the manifest reader, as for a manifest (:func:`write_listing` writes the rows it reads;
:class:`InputError` lists every problem together, each named by its file).

BIDS names (:func:`bids_name`): ``sub-<label>[_<key>-<label>...]_<suffix>`` with alphanumeric labels, e.g.
``sub-02_ses-1_acq-mprage_run-2_T1w`` -> entities ``{sub: 02, ses: 1, acq: mprage, run: 2}``, suffix ``T1w``.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from brain3d.errors import ConfigError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")  # longest first: "a.nii.gz" is "a", not "a.nii"
LISTING_COLUMNS = ("subject_id", "image")  # the columns of the rows :func:`write_listing` writes
_BIDS_NAME = re.compile(r"sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*_[A-Za-z0-9]+")


class InputError(ValueError):
    """Every problem with the files ``input=`` names, one per line (the manifest reader's, by file)."""


@dataclass(frozen=True)
class BidsName:
    """A BIDS file name's parts: the entities in the order written (``{"sub": "01", "ses": "1"}``) and the suffix."""

    entities: dict = field(default_factory=dict)
    suffix: str = ""


@dataclass(frozen=True)
class Scan:
    """One input file: its id (the file name without the extension) and its absolute path."""

    subject_id: str
    path: Path


def nifti_id(name: str) -> str | None:
    """``scan.nii.gz`` -> ``scan`` (extensions matched case-insensitively); None when the name is not NIfTI."""
    for ext in NIFTI_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def bids_name(name: str) -> BidsName | None:
    """The entities and suffix of a BIDS file name (with or without its .nii / .nii.gz); None if it is not one."""
    stem = nifti_id(name) or name
    if not _BIDS_NAME.fullmatch(stem):
        return None
    *pairs, suffix = stem.split("_")
    return BidsName(dict(pair.split("-", 1) for pair in pairs), suffix)


def _niftis_in(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted by name (hidden files, e.g. macOS ``._x.nii``, left out)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and nifti_id(p.name) is not None)


def _participant_folders(folder: Path) -> list[Path]:
    """The ``sub-*`` folders a BIDS read covers: ``folder`` itself when it is one, else its ``sub-*`` children."""
    if folder.name.startswith("sub-"):
        return [folder]
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name.startswith("sub-"))


def folder_files(folder: Path) -> list[Path]:
    """Every NIfTI file ``input=folder`` means: those directly in it, then ``sub-*/[ses-*/]anat/*`` (sorted)."""
    files = _niftis_in(folder)
    for participant in _participant_folders(folder):
        sessions = sorted(d for d in participant.iterdir() if d.is_dir() and d.name.startswith("ses-"))
        for anat in [participant / "anat", *(s / "anat" for s in sessions)]:
            files += _niftis_in(anat)
    return files


def find_scans(given: str) -> list[Scan]:
    """The scans ``input=given`` names (module docstring), with unique ids.

    Raises:
        ConfigError: the path does not exist; a file that is not .nii / .nii.gz; a folder without a NIfTI file;
            two files with the same id (both named).
    """
    path = Path(os.path.abspath(Path(given).expanduser()))
    if not path.exists():
        raise ConfigError(f"input={given}: no such file or folder")
    if path.is_file():
        if nifti_id(path.name) is None:
            raise ConfigError(f"input={given} is not a NIfTI file (.nii or .nii.gz)")
        files = [path]
    else:
        files = folder_files(path)
        if not files:
            raise ConfigError(f"input={given}: no .nii or .nii.gz file in the folder (nor in sub-*/[ses-*/]anat/ "
                              f"of a BIDS dataset)")
    scans: list[Scan] = []
    first: dict[str, Path] = {}
    for file in files:
        subject_id = nifti_id(file.name)
        if subject_id in first:
            raise ConfigError(f"input={given}: {first[subject_id]} and {file} have the same id {subject_id!r} (the "
                              f"file name without .nii / .nii.gz), so their outputs would overwrite each other; "
                              f"move or rename one")
        first[subject_id] = file
        scans.append(Scan(subject_id, file))
    return scans


def input_folder(given: str) -> Path:
    """The folder ``input=given`` reads from (a file's own folder), absolute."""
    path = Path(os.path.abspath(Path(given).expanduser()))
    return path if path.is_dir() else path.parent


def write_listing(scans: list[Scan], path: Path) -> Path:
    """The scans as a manifest (``subject_id``, ``image``: absolute paths), for the manifest reader's checks."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(LISTING_COLUMNS)
        writer.writerows((s.subject_id, str(s.path)) for s in scans)
    return path


_IMAGE_COLUMN = f"column {LISTING_COLUMNS[1]!r}: "  # how the manifest reader prefixes a problem of the image


def _named_by_file(reason: str, file: Path) -> str:
    """A reason the manifest reader gave for one file, without its column prefix, and with the file's path in
    front when the reason does not name it."""
    reason = reason[len(_IMAGE_COLUMN):] if reason.startswith(_IMAGE_COLUMN) else reason
    return reason if str(file) in reason else f"{file}: {reason}"


def input_problems(given: str, scans: list[Scan], problems: list[str]) -> InputError:
    """The manifest reader's problems with the listing of ``scans`` (:func:`write_listing`; "line 3 (b), column
    'image': <reason>"), each named by its file instead of the listing's line, as one error: "2 problem(s) in
    input=DIR:", then one line per problem."""
    files = {f"line {line} ({s.subject_id}), ": s.path for line, s in enumerate(scans, start=2)}
    named = []
    for problem in problems:
        prefix = next((p for p in files if problem.startswith(p)), None)
        named.append(problem if prefix is None else _named_by_file(problem[len(prefix):], files[prefix]))
    lines = "\n".join(f"  - {p}" for p in named)
    return InputError(f"{len(problems)} problem(s) in input={given}:\n{lines}")


def skipped_message(scans: list[Scan], skipped: dict) -> str:
    """The warning for a file ``data.on_error=skip`` left out (an entry of
    :attr:`brain3d.data.manifest.Manifest.skipped`): "skipped (data.on_error=skip): <reasons, naming the file>"."""
    file = scans[skipped["line"] - 2].path
    return f"skipped (data.on_error=skip): {'; '.join(_named_by_file(r, file) for r in skipped['reasons'])}"
