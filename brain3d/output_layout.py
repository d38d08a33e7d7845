"""Where brain3d-predict writes each subject's images: ``output_layout=flat`` (the default) or ``bids``.

``flat``: next to predictions.csv, named by the subject id as the heads name them (brain3d.tasks):
``<id>_prob.nii.gz`` and ``<id>_mask.nii.gz`` (``<id>_<head>_prob.nii.gz`` ... in a multi-task run), and
``<id>_saliency.nii.gz``.

``bids``: BIDS-derivatives names made from each input's own file name (``sub-02_ses-1_T1w.nii`` ->
entities sub-02, ses-1; every entity of the source is kept except ``space`` and ``desc``, which the outputs set),
under ``output_dir/sub-<label>/[ses-<label>/]anat/``::

    sub-02_ses-1_space-orig_desc-lesion_mask.nii.gz      the binary mask (uint8)
    sub-02_ses-1_space-orig_desc-lesion_probseg.nii.gz   the probabilities (float32)
    sub-02_ses-1_space-orig_desc-gradcam_saliency.nii.gz saliency=gradcam

(a multi-class segmentation's label map is ``..._desc-labels_dseg.nii.gz``, BIDS's suffix for a discrete
segmentation, next to its 4-D ``_probseg``), plus ``output_dir/dataset_description.json`` (DatasetType
"derivative", GeneratedBy brain3d, SourceDatasets when the input lies in a folder with a dataset_description.json).

``space-orig``: the outputs are on each input's own grid (same shape and affine). ``desc-<name>``: the
segmentation head's name in a multi-task checkpoint; in a single-task one the checkpoint's mask column when it is
not the default "mask" (e.g. ``data.mask_col=tumour`` -> ``desc-tumour``), else ``lesion`` (``labels`` for a
multi-class one; :func:`segmentation_desc`). BIDS labels are alphanumeric, so other characters are dropped.
predictions.csv gets ``participant_id`` and ``session`` columns (``n/a`` without a session).

The heads keep naming their files flat; the writer they are handed (:meth:`OutputLayout.saver`) puts each file at
its BIDS name, so brain3d.tasks knows nothing of layouts.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path
from typing import Callable

from brain3d.data.inputs import bids_name, nifti_id
from brain3d.errors import ConfigError

LAYOUTS = ("flat", "bids")
BIDS_VERSION = "1.9.0"
DEFAULT_DESC = "lesion"  # a single-task segmentation checkpoint trained on the default mask column
LABEL_MAP_DESC = "labels"  # the same, multi-class (a label map)
SUFFIXES = {"prob": "probseg"}  # the heads' flat file kinds whose BIDS suffix differs (mask, saliency: the same)
DESCS = {"saliency": "gradcam"}  # the flat kinds whose desc is not the segmentation's
DROPPED_ENTITIES = ("space", "desc")  # set by the outputs themselves

Writer = Callable[..., object]  # (ras_array, grid, path, dtype), as brain3d.predict.save_like_input


def _label(text: str) -> str:
    """``text`` as a BIDS label: its letters and digits only."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def segmentation_desc(mask_column: str | None, label_map: bool = False) -> str:
    """The ``desc-`` of a single-task segmentation's outputs: the checkpoint's mask column when it says more
    than the default "mask" (as a BIDS label), else :data:`DEFAULT_DESC` (:data:`LABEL_MAP_DESC` for a
    multi-class segmentation, ``label_map``)."""
    label = _label(mask_column or "")
    return label if label and label.lower() != "mask" else (LABEL_MAP_DESC if label_map else DEFAULT_DESC)


def check_layout(value) -> str:
    """``output_layout`` as given, when it is one of :data:`LAYOUTS`."""
    if str(value) not in LAYOUTS:
        raise ConfigError(f"output_layout={value!r} is not one of {', '.join(LAYOUTS)}")
    return str(value)


class OutputLayout:
    """The output paths and extra predictions.csv columns of every subject, checked before any is predicted.

    Args:
        layout: "flat" or "bids".
        out_dir: output_dir.
        images: ``{subject id: its input image path}``, in prediction order.
        write: the writer of flat paths (``save_like_input``); the BIDS layout calls it with the BIDS path.
        desc: the desc label of a single-task segmentation's files (:func:`segmentation_desc`).
        label_map: the segmentation's mask is a multi-class label map: BIDS suffix ``dseg`` instead of ``mask``.

    Raises:
        ConfigError (bids): an input whose file name is not a BIDS name (the first one, named); two inputs that
            would get the same BIDS names (both named).
    """

    def __init__(self, layout: str, out_dir: Path, images: dict[str, Path], write: Writer, desc: str = DEFAULT_DESC,
                 label_map: bool = False):
        self.layout, self.out_dir, self.write, self.desc = check_layout(layout), out_dir, write, desc
        self.suffixes = {**SUFFIXES, "mask": "dseg"} if label_map else SUFFIXES
        self.names: dict[str, dict] = {}  # bids: subject id -> the entities its outputs keep
        if self.layout == "bids":
            self.names = self._bids_entities(images)

    @staticmethod
    def _bids_entities(images: dict[str, Path]) -> dict[str, dict]:
        entities, owner = {}, {}
        for subject_id, image in images.items():
            parsed = bids_name(Path(image).name)
            if parsed is None:
                raise ConfigError(f"output_layout=bids needs BIDS file names (sub-<label>[_ses-<label>]..._<suffix>"
                                  f".nii[.gz]); {image} is not one (output_layout=flat names outputs by file name)")
            kept = {k: v for k, v in parsed.entities.items() if k not in DROPPED_ENTITIES}
            key = "_".join(f"{k}-{v}" for k, v in kept.items())
            if key in owner:
                raise ConfigError(f"output_layout=bids: {owner[key]} and {image} would both be written as {key}_"
                                  f"space-orig_desc-...: BIDS derivatives drop the suffix (and space-, desc-); "
                                  f"predict one kind of scan at a time (input=FILE, or a folder holding one)")
            owner[key] = image
            entities[subject_id] = kept
        return entities

    def bids_path(self, subject_id: str, flat: Path) -> Path:
        """The BIDS path of the file a head would write at ``flat`` (``<id>_[<head>_]<kind>.nii.gz``)."""
        entities = self.names[subject_id]
        if not flat.name.startswith(f"{subject_id}_"):
            raise ValueError(f"{flat.name}: a head's file name must start with its subject id {subject_id!r}_")
        *head, kind = nifti_id(flat.name)[len(subject_id) + 1:].split("_")
        desc = _label("".join(head)) or DESCS.get(kind, self.desc)
        folder = self.out_dir / f"sub-{entities['sub']}"
        if "ses" in entities:
            folder = folder / f"ses-{entities['ses']}"
        stem = "_".join(f"{k}-{v}" for k, v in entities.items())
        return folder / "anat" / f"{stem}_space-orig_desc-{desc}_{self.suffixes.get(kind, kind)}.nii.gz"

    def saver(self, subject_id: str) -> Writer:
        """The writer for this subject's images: the flat writer itself, or one that moves each to its BIDS path."""
        if self.layout == "flat":
            return self.write

        def write_bids(array, grid, path, dtype):
            return self.write(array, grid, self.bids_path(subject_id, Path(path)), dtype)
        return write_bids

    def columns(self, subject_id: str) -> dict:
        """predictions.csv columns of the layout: bids ``participant_id`` (sub-X) and ``session`` (ses-Y / n/a)."""
        if self.layout == "flat":
            return {}
        entities = self.names[subject_id]
        return {"participant_id": f"sub-{entities['sub']}",
                "session": f"ses-{entities['ses']}" if "ses" in entities else "n/a"}

    def finish(self, checkpoints: list[str], source: Path | None) -> None:
        """bids: ``dataset_description.json`` (:func:`dataset_description`) in output_dir."""
        if self.layout == "bids":
            description = dataset_description(checkpoints, source_dataset(source))
            (self.out_dir / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")


def source_dataset(path: Path | None, levels: int = 4) -> Path | None:
    """The BIDS dataset ``path`` lies in: the nearest folder (``path`` itself, or up to ``levels`` above it)
    holding a dataset_description.json; None when there is none."""
    if path is None:
        return None
    for folder in [path, *path.parents][: levels + 1]:
        if (folder / "dataset_description.json").is_file():
            return folder
    return None


def _version() -> str:
    try:
        return metadata.version("brain3d")
    except metadata.PackageNotFoundError:
        return "unknown"


def dataset_description(checkpoints: list[str], source: Path | None) -> dict:
    """The BIDS-derivatives description of brain3d-predict's outputs: Name, BIDSVersion, DatasetType,
    GeneratedBy (brain3d, its version, the checkpoints) and, for a known ``source`` dataset, SourceDatasets (its
    URL, and its DOI when its own description gives one)."""
    description = {"Name": "brain3d predictions", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "brain3d", "Version": _version(),
                                    "Description": f"brain3d-predict with checkpoint(s) {', '.join(checkpoints)}"}]}
    if source is not None:
        entry = {"URL": source.resolve().as_uri()}
        try:
            own = json.loads((source / "dataset_description.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            own = {}
        if isinstance(own, dict) and own.get("DatasetDOI"):
            entry["DOI"] = str(own["DatasetDOI"])
        if isinstance(own, dict) and own.get("Name"):
            description["Name"] = f"brain3d predictions of {own['Name']}"
        description["SourceDatasets"] = [entry]
    return description
