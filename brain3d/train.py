"""``brain3d-train``: the Hydra entry point (``main``) and the plain-Python training run (``train``).

Read top to bottom: resolve device and precision, check and split the data, build model / loss /
optimizer / scheduler from their config groups, resume if asked, then the epoch loop (train, validate,
log, checkpoint), then ``summary.json``. ``train`` returns the monitored validation metric so Hydra
sweepers can optimise it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from brain3d import engine
from brain3d.evaluation import fit_bias_correction
from brain3d.checkpoint import load_checkpoint, resolve_resume_path, save_checkpoint
from brain3d.data.manifest import ManifestError, load_manifest, split_subjects
from brain3d.data.preprocess import validate_settings
from brain3d.data.sources import source_manifest
from brain3d.data.dataset import VolumeDataset
from brain3d.data.synthetic import make_synthetic_dataset, synthetic_cache_dir
from brain3d.models.heads import check_segmentation_shape
from brain3d.models.model import build_model, count_parameters
from brain3d.tensorboard_log import log_config, log_epoch, log_hparams, overlay_mid_slices

log = logging.getLogger("brain3d.train")

TASKS = ("classification", "regression", "segmentation")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: auto (cuda when available, else cpu), cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """``trainer.precision``: auto -> bf16 on a GPU that supports it, else fp16 (with a GradScaler); fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"trainer.precision={name!r} is not one of auto, {', '.join(PRECISIONS)}")
    return name, PRECISIONS[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_manifest(data_cfg: DictConfig) -> Path:
    """``data.source``: synthetic -> generate (once, cached) the built-in phantoms; nifti -> ``data.manifest``."""
    if data_cfg.source == "synthetic":
        root = Path(str(data_cfg.cache_dir)).expanduser() / "synthetic"
        out_dir = synthetic_cache_dir(root, data_cfg.num_subjects, tuple(data_cfg.shape), data_cfg.seed)
        return make_synthetic_dataset(out_dir, data_cfg.num_subjects, tuple(data_cfg.shape), data_cfg.seed)
    if data_cfg.source == "nifti":
        if not data_cfg.get("manifest"):
            raise ConfigError("data=nifti needs data.manifest=PATH (a CSV or TSV, one row per subject)")
        return Path(str(data_cfg.manifest)).expanduser()
    if data_cfg.source in ("bids", "msd"):
        try:
            return source_manifest(data_cfg)  # a regular manifest written from the folder's layout
        except ValueError as err:
            raise ConfigError(f"data={data_cfg.source}: {err}") from err
    raise ConfigError(f"data.source={data_cfg.source!r} is not one of synthetic, nifti, bids, msd")


def read_manifest(data_cfg: DictConfig, task_name: str, **overrides):
    """Check the data source's manifest with the ``data`` group's column and check settings
    (``overrides`` replace or add load_manifest arguments, e.g. ``check_data=False``)."""
    kwargs = dict(
        id_col=data_cfg.id_col, image_col=data_cfg.image_col, target_col=data_cfg.target_col,
        mask_col=data_cfg.mask_col, split_col=data_cfg.split_col, group_col=data_cfg.get("group_col"),
        positive_label=data_cfg.get("positive_label"), check_data=data_cfg.check_data,
        on_error=data_cfg.get("on_error", "raise"), mask_values=data_cfg.get("mask_values", "binary"),
        affine_tolerance=data_cfg.get("affine_tolerance", 1e-3),
    )
    return load_manifest(prepare_manifest(data_cfg), task_name, **{**kwargs, **overrides})


def preprocessed_cache_dir(data_cfg: DictConfig) -> Path:
    """Where preprocessed volumes are kept (memory-mapped .npy): ``<data.cache_dir>/preprocessed``."""
    return Path(str(data_cfg.get("cache_dir") or "~/.cache/brain3d")).expanduser() / "preprocessed"


def check_input_geometry(task_name: str, settings: dict, patch_size) -> None:
    """Shapes that cannot work are refused before any data is read.

    Segmentation needs every trained input divisible by 16 (patches, or whole volumes of preprocess.shape);
    whole-volume training needs a fixed ``shape`` so volumes batch together.
    """
    if patch_size is not None:
        if task_name != "segmentation":
            raise ConfigError(f"data.patch_size is for segmentation; task={task_name} trains on whole volumes")
        try:
            check_segmentation_shape(tuple(patch_size))
        except ValueError as err:
            raise ConfigError(f"data.patch_size: {err}") from err
        return
    if settings.get("shape") is None:
        raise ConfigError("preprocess.shape (data.shape) is null: whole-volume training needs a fixed shape; "
                          "set data.shape=[D,H,W], or data.patch_size for segmentation")
    if task_name == "segmentation":
        try:
            check_segmentation_shape(tuple(settings["shape"]))
        except ValueError as err:
            raise ConfigError(f"data.shape: {err}") from err


def build_loss(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate ``cfg.loss`` after checking that it fits the task (``task.losses`` lists those that do)."""
    name = cfg.loss.name
    if name not in cfg.task.losses:
        raise ConfigError(
            f"loss={name} does not fit task={cfg.task.name}; valid losses for {cfg.task.name}: {', '.join(cfg.task.losses)}"
        )
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    loss_cfg.pop("name")
    return instantiate(loss_cfg)


def make_loader(dataset: VolumeDataset, data_cfg: DictConfig, device: torch.device, shuffle: bool, seed: int,
                batch_size: int | None = None) -> DataLoader:
    # The shuffle generator is re-seeded every epoch from (seed, epoch), so the order is reproducible and a
    # resumed run sees the same batches as an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size or data_cfg.batch_size,
        shuffle=shuffle,
        num_workers=data_cfg.num_workers,
        pin_memory=device.type == "cuda",
        # Training drops a last batch of one volume: BatchNorm cannot normalise a single 1x1x1 bottleneck.
        drop_last=shuffle and len(dataset) % (batch_size or data_cfg.batch_size) == 1,
        generator=generator,
        persistent_workers=False,  # workers are re-created each epoch and see dataset.set_epoch()
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; on CPU the process's peak resident memory (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def is_better(value: float, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def fit_bias_correction_or_none(val_outputs: dict) -> dict | None:
    """The linear brain-age bias correction (as for SFCN) fitted on this epoch's validation predictions;
    stored in the checkpoint so brain3d-predict can report corrected ages. None when it cannot be fitted."""
    try:
        return fit_bias_correction(val_outputs["predictions"], val_outputs["targets"])
    except ValueError:
        return None


def train(cfg: DictConfig) -> float:
    """Train one model as ``cfg`` says; return the best value of the monitored validation metric."""
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not one of {TASKS}")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer_cfg, data_cfg = cfg.trainer, cfg.data
    seed_everything(trainer_cfg.seed)
    device = resolve_device(trainer_cfg.device)
    precision, amp_dtype = resolve_precision(trainer_cfg.precision, device)
    loss_fn = build_loss(cfg)
    monitor, monitor_mode = cfg.task.monitor, cfg.task.monitor_mode
    if monitor_mode not in ("min", "max"):
        raise ConfigError(f"task.monitor_mode={monitor_mode!r} is not one of min, max")
    try:
        settings = validate_settings(cfg.preprocess)
    except ValueError as err:
        raise ConfigError(f"preprocess: {err}") from err
    patch_size = tuple(data_cfg.patch_size) if data_cfg.get("patch_size") else None
    check_input_geometry(cfg.task.name, settings, patch_size)
    resume_path = resolve_resume_path(trainer_cfg.resume, run_dir)
    log.info("run folder %s | device %s | precision %s", run_dir, device, precision)

    # ---- data: check every row once, up front, then split by subject --------------------------------
    manifest = read_manifest(data_cfg, cfg.task.name)
    manifest_path = manifest.path
    for skipped in manifest.skipped:  # data.on_error=skip
        log.warning("skipped row %s (%s): %s", skipped["row"], skipped["subject_id"], "; ".join(skipped["problems"]))
    train_subjects, val_subjects = split_subjects(
        manifest.subjects, data_cfg.val_fraction, data_cfg.split_seed, stratify=cfg.task.name == "classification",
        num_folds=data_cfg.num_folds, fold=data_cfg.fold,
    )
    with open(run_dir / "split.csv", "w") as f:
        f.write("subject_id,split\n")
        f.writelines(f"{s.subject_id},{split}\n" for split, group in (("train", train_subjects), ("val", val_subjects)) for s in group)
    log.info("%s: %d subjects -> %d train, %d val", manifest_path, len(manifest.subjects), len(train_subjects), len(val_subjects))

    task = engine.TaskSpec(cfg.task.name)
    if task.name == "regression":
        values = np.array([s.target for s in train_subjects], dtype=np.float64)
        task.target_mean, task.target_std = float(values.mean()), float(max(values.std(), 1e-6))
    cache_dir = preprocessed_cache_dir(data_cfg) if data_cfg.get("cache", False) else None
    train_set = VolumeDataset(train_subjects, task.name, settings, cache_dir, patch_size,
                              data_cfg.get("foreground_fraction", 0.33), seed=trainer_cfg.seed)
    val_set = VolumeDataset(val_subjects, task.name, settings, cache_dir)  # whole volumes, never augmented
    train_loader = make_loader(train_set, data_cfg, device, shuffle=True, seed=trainer_cfg.seed)
    # Patch training validates whole volumes of any size by sliding windows: one volume per batch.
    val_loader = make_loader(val_set, data_cfg, device, shuffle=False, seed=trainer_cfg.seed,
                             batch_size=1 if patch_size else None)
    sliding_window = None
    if patch_size:
        sliding_window = {"patch_size": patch_size, "overlap": trainer_cfg.sw_overlap,
                          "batch_size": trainer_cfg.sw_batch_size, "accumulate_device": trainer_cfg.get("sw_device")}
    augment = instantiate(cfg.augment)

    # ---- model, optimizer, scheduler, scaler ---------------------------------------------------------
    model = build_model(cfg.backbone, cfg.task.head, head_name=task.name).to(device)
    num_parameters = count_parameters(model)
    log.info("model: backbone %s + head %s, %s parameters", cfg.backbone._target_, cfg.task.head._target_, f"{num_parameters:,}")
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    accumulate = int(trainer_cfg.accumulate_grad_batches)
    steps_per_epoch = math.ceil(len(train_loader) / accumulate)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps_per_epoch * trainer_cfg.max_epochs, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    history: list[dict[str, float]] = []
    best = {"name": monitor, "value": None, "epoch": None, "mode": monitor_mode}
    start_epoch = 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        log.info("resumed from %s at epoch %d", resume_path, start_epoch)

    config_dict = OmegaConf.to_container(cfg, resolve=True)
    checkpoint_dir = run_dir / "checkpoints"
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    if start_epoch == 0:
        log_config(writer, config_dict)

    # ---- the loop -------------------------------------------------------------------------------------
    # trainer.epochs_per_run ends this process early (time-limited cluster jobs); the schedule still plans
    # for max_epochs, and the same command with trainer.resume=auto continues where it stopped.
    end_epoch = trainer_cfg.max_epochs
    if trainer_cfg.epochs_per_run:
        end_epoch = min(end_epoch, start_epoch + int(trainer_cfg.epochs_per_run))
    epochs = tqdm(range(start_epoch, end_epoch), desc="epochs", initial=start_epoch,
                  total=trainer_cfg.max_epochs, disable=not trainer_cfg.progress, dynamic_ncols=True)
    for epoch in epochs:
        train_set.set_epoch(epoch)
        train_loader.generator.manual_seed(trainer_cfg.seed * 100_003 + epoch)
        train_stats = engine.train_one_epoch(
            model, train_loader, loss_fn, optimizer, scheduler, scaler, task, device, amp_dtype, epoch + 1,
            accumulate_grad_batches=accumulate, gradient_clip_norm=trainer_cfg.gradient_clip_norm,
            progress=trainer_cfg.progress, augment=augment, augment_seed=trainer_cfg.seed,
        )
        val_stats, val_outputs = engine.evaluate(model, val_loader, loss_fn, task, device, amp_dtype, epoch + 1,
                                                 trainer_cfg.progress, sliding_window=sliding_window)
        record = {"epoch": epoch + 1, "train_loss": train_stats["loss"],
                  **{f"val_{k}": v for k, v in val_stats.items()},
                  "lr": train_stats["lr"], "train_volumes_per_second": train_stats["volumes_per_second"],
                  "train_data_wait_fraction": train_stats["data_wait_fraction"]}
        history.append(record)
        log_epoch(writer, record, epoch + 1)
        preview = val_outputs.get("preview")
        if preview is not None and trainer_cfg.log_images:
            panel = overlay_mid_slices(preview["image"], preview["target"], preview["probability"])
            writer.add_image("val/mid_slices", panel, epoch + 1, dataformats="HWC")
        writer.flush()
        if monitor not in record:
            raise ConfigError(f"task.monitor={monitor!r} is not a recorded metric; choose one of {sorted(k for k in record if k.startswith('val_'))}")
        improved = is_better(record[monitor], best["value"], monitor_mode)
        if improved:
            best = {"name": monitor, "value": float(record[monitor]), "epoch": epoch + 1, "mode": monitor_mode}
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history, "best": best,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            "config": config_dict, "task": task.name, "head_name": task.name, "num_parameters": num_parameters,
            "class_names": manifest.class_names, "target_mean": task.target_mean, "target_std": task.target_std,
            "bias_correction": fit_bias_correction_or_none(val_outputs) if task.name == "regression" else None,
        }
        save_checkpoint(state, last_path)
        if improved:
            save_checkpoint(state, best_path)
        summary_line = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
        log.info("epoch %d/%d %s%s", epoch + 1, trainer_cfg.max_epochs, summary_line, " (best)" if improved else "")
        epochs.set_postfix(train_loss=f"{record['train_loss']:.4f}", **{monitor: f"{record[monitor]:.4f}"})

    # ---- summary --------------------------------------------------------------------------------------
    final = history[-1] if history else {}
    summary: dict[str, Any] = {
        "task": task.name,
        "num_parameters": num_parameters,
        "epochs_completed": len(history),
        "best_metric": best,
        "final_train": {"loss": final.get("train_loss")},
        "final_val": {k[4:]: v for k, v in final.items() if k.startswith("val_")},
        "train_volumes_per_second": float(np.mean([h["train_volumes_per_second"] for h in history])) if history else None,
        # share of training time spent waiting for the data loader (mean over epochs; older checkpoints lack it)
        "data_wait_fraction": float(np.mean([h.get("train_data_wait_fraction", np.nan) for h in history])) if history else None,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "device": str(device),
        "precision": precision,
        "checkpoints": {"last": str(last_path.resolve()), "best": str(best_path.resolve()) if best_path.exists() else None},
        "data": {"manifest": str(manifest_path), "num_train": len(train_subjects), "num_val": len(val_subjects),
                 "num_skipped": len(manifest.skipped), "skipped": manifest.skipped,
                 "num_folds": data_cfg.num_folds, "fold": data_cfg.fold if data_cfg.num_folds else None},
        "history": history,
    }
    if manifest.class_names is not None:
        summary["class_names"] = manifest.class_names
        summary["positive_class"] = manifest.class_names[1]
    if task.name == "regression":
        # The bar to beat: always predicting the training mean.
        val_targets = np.array([s.target for s in val_subjects])
        summary["target_mean"], summary["target_std"] = task.target_mean, task.target_std
        summary["baseline_val_mae"] = float(np.abs(val_targets - task.target_mean).mean())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    hparam_values = {"task": task.name, "backbone": cfg.backbone._target_.rsplit(".", 1)[-1], "loss": cfg.loss.name,
                     "width": cfg.backbone.get("width"), "lr": cfg.optimizer.lr, "batch_size": data_cfg.batch_size,
                     "max_epochs": trainer_cfg.max_epochs}
    log_hparams(writer, hparam_values, {"best_" + monitor: best["value"], **{k: v for k, v in final.items() if k.startswith("val_")}})
    writer.close()
    log.info("done: best %s=%s at epoch %s; summary %s", monitor, best["value"], best["epoch"], run_dir / "summary.json")
    return float(best["value"]) if best["value"] is not None else float("nan")


def _config_dir() -> str:
    """configs/ ships inside the installed package as brain3d/configs; in a source checkout it is ../configs."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"brain3d configs not found next to {here}")


# InstantiationException: a config value refused by the class it builds (e.g. backbone.norm=batc); Hydra's
# message names the _target_, the key and the class's own ValueError.
USER_ERRORS = (ConfigError, ManifestError, FileNotFoundError, engine.NonFiniteLossError, InstantiationException)


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except USER_ERRORS as err:
        # A user's mistake: one clear message and a non-zero exit, not a traceback.
        log.error("%s", err)
        print(f"brain3d-train: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
