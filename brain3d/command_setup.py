"""Set-up the commands share (brain3d-train, -predict, -preprocess, -plan): which manifest a data source
means and reading it with the ``data`` group's settings, where the cache lives, the loss of a single-task
run, and the input shapes a task can train on. No command imports another command's module: what two of
them need lives here (or in brain3d.cli: the command line; brain3d.hardware: device and precision).
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from brain3d.data.cache import default_cache_root
from brain3d.data.channels import image_columns
from brain3d.data.manifest import load_manifest
from brain3d.data.sources import source_manifest
from brain3d.data.synthetic import make_synthetic_dataset, synthetic_cache_dir
from brain3d.errors import ConfigError
from brain3d.models.heads import check_segmentation_shape
from brain3d.tasks import single_task_losses


def ignored_manifest(data_cfg: DictConfig) -> str | None:
    """A ``data.manifest`` that the data source would ignore (it used to train on the phantoms and exit 0)."""
    if not data_cfg.get("manifest") or data_cfg.source == "nifti":
        return None
    if data_cfg.source == "synthetic":
        return (f"data.manifest={data_cfg.manifest} is set, but data=synthetic (the default) trains on built-in "
                "phantoms and ignores it; add data=nifti to train on your manifest")
    return (f"data.manifest={data_cfg.manifest} is set, but data={data_cfg.source} builds its manifest from data.root; "
            "use data=nifti to train on your manifest")


def prepare_manifest(data_cfg: DictConfig, task_name: str | None = None, require_targets: bool = True,
                     num_classes: int = 1) -> Path:
    """``data.source``: synthetic -> generate (once, cached) the built-in phantoms (``num_classes`` 3 or 4: with
    tissue label maps for a multi-class segmentation); nifti -> ``data.manifest``."""
    problem = ignored_manifest(data_cfg)
    if problem:
        raise ConfigError(problem)
    if data_cfg.source == "synthetic":
        root = cache_root(data_cfg) / "synthetic"
        channels = data_cfg.get("channels", 1)  # 2: T1-like and FLAIR-like scans (columns image, flair)
        out_dir = synthetic_cache_dir(root, data_cfg.num_subjects, tuple(data_cfg.shape), data_cfg.seed, channels,
                                      num_classes)
        try:
            return make_synthetic_dataset(out_dir, data_cfg.num_subjects, tuple(data_cfg.shape), data_cfg.seed,
                                          channels=channels, num_classes=num_classes)
        except ValueError as err:
            raise ConfigError(f"data=synthetic: {err}") from err
    if data_cfg.source == "nifti":
        if not data_cfg.get("manifest"):
            raise ConfigError("data=nifti needs data.manifest=PATH (a CSV or TSV, one row per subject)")
        return Path(str(data_cfg.manifest)).expanduser()
    if data_cfg.source in ("bids", "msd"):
        try:
            # a regular manifest written from the folder's layout (BIDS: participants.tsv only where targets are needed)
            return source_manifest(data_cfg, task=task_name, require_targets=require_targets)
        except ValueError as err:
            raise ConfigError(f"data={data_cfg.source}: {err}") from err
    raise ConfigError(f"data.source={data_cfg.source!r} is not one of synthetic, nifti, bids, msd")


def read_manifest(data_cfg: DictConfig, task_name: str, **overrides):
    """Check the data source's manifest with the ``data`` group's column and check settings
    (``overrides`` replace or add load_manifest arguments, e.g. ``check_data=False``, or ``heads`` for
    task=multitask; ``num_classes`` K >= 2 for a multi-class segmentation: its label maps are checked for labels
    0..K, and data=synthetic writes tissue label maps)."""
    kwargs = dict(
        id_col=data_cfg.id_col, image_col=image_columns(data_cfg), target_col=data_cfg.target_col,
        mask_col=data_cfg.mask_col, split_col=data_cfg.split_col, group_col=data_cfg.get("group_col"),
        positive_label=data_cfg.get("positive_label"), check_data=data_cfg.check_data,
        on_error=data_cfg.get("on_error", "raise"), mask_values=data_cfg.get("mask_values", "binary"),
        affine_tolerance=data_cfg.get("affine_tolerance", 1e-3),
    )
    manifest_path = prepare_manifest(data_cfg, task_name, overrides.get("require_targets", True),
                                     overrides.get("num_classes", 1))
    return load_manifest(manifest_path, task_name, **{**kwargs, **overrides})


def cache_root(data_cfg: DictConfig) -> Path:
    """``data.cache_dir`` (configs/data: ``$BRAIN3D_CACHE_DIR``, else ``~/.cache/brain3d``); when it is empty or
    absent, the same default (brain3d.data.cache.default_cache_root)."""
    value = data_cfg.get("cache_dir")
    return Path(str(value)).expanduser() if value else default_cache_root()


def preprocessed_cache_dir(data_cfg: DictConfig) -> Path:
    """Where preprocessed volumes are kept (memory-mapped .npy): ``<data.cache_dir>/preprocessed``."""
    return cache_root(data_cfg) / "preprocessed"


def check_input_geometry(task_name: str, settings: dict, patch_size, kinds: set[str] | None = None) -> None:
    """Shapes that cannot work are refused before any data is read.

    A segmentation head (task=segmentation, or a multi-task run whose ``kinds`` include segmentation) needs
    every trained input divisible by 16 (patches, or whole volumes of preprocess.shape); whole-volume training
    needs a fixed ``shape`` so volumes batch together; patches are for task=segmentation only.
    """
    kinds = kinds or {task_name}
    if patch_size is not None:
        if kinds != {"segmentation"}:
            raise ConfigError(f"data.patch_size is for segmentation; task={task_name} trains on whole volumes")
        try:
            check_segmentation_shape(tuple(patch_size))
        except ValueError as err:
            raise ConfigError(f"data.patch_size: {err}") from err
        return
    if settings.get("shape") is None:
        raise ConfigError("preprocess.shape (data.shape) is null: whole-volume training needs a fixed shape; "
                          "set data.shape=[D,H,W], or data.patch_size for segmentation")
    if "segmentation" in kinds:
        try:
            check_segmentation_shape(tuple(settings["shape"]))
        except ValueError as err:
            raise ConfigError(f"data.shape: {err}") from err


def build_loss(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate ``cfg.loss`` after checking that it fits the task (``task.losses`` lists those that do; a
    multi-class segmentation, task.num_classes >= 2, takes its kind's own: brain3d.tasks.single_task_losses)."""
    name = cfg.loss.name
    losses, what = single_task_losses(cfg.task)
    if name not in losses:
        raise ConfigError(f"loss={name} does not fit task={what}; valid losses for {what}: {', '.join(losses)}")
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    loss_cfg.pop("name")
    return instantiate(loss_cfg)
