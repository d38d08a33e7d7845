"""``brain3d-train``: the Hydra entry point (``main``) and the plain-Python training run (``train``).

Read top to bottom: resolve device and precision, check and split the data, build model / loss /
optimizer / scheduler from their config groups, resume if asked, then the epoch loop (train, validate,
log, checkpoint), then ``summary.json``. ``train`` returns the monitored validation metric so Hydra
sweepers can optimise it.

``main`` adds what belongs to the command rather than to a run: SIGTERM / SIGUSR1 stop the run after an
optimizer step with a resumable ``last.pt`` and exit 75 (brain3d.preemption); in a sweep, a failed job is
recorded and returns NaN instead of stopping the others (brain3d.sweep).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from brain3d import distributed as dist_utils
from brain3d import engine, memory_probe, report, transfer
from brain3d.checkpoint import (
    config_differences,
    load_checkpoint,
    remove_stale_temp_files,
    resolve_resume_path,
    save_checkpoint,
)
from brain3d.cli import config_dir, groups_help, progress_mode, report_user_error, run_command
from brain3d.data.cache import default_cache_root
from brain3d.data.dataset import VolumeDataset
from brain3d.data.loaders import build_loaders, shutdown_workers
from brain3d.data.manifest import ManifestError, load_manifest, split_subjects
from brain3d.data.preprocess import validate_settings
from brain3d.data.sources import source_manifest
from brain3d.data.synthetic import make_synthetic_dataset, synthetic_cache_dir
from brain3d.errors import ConfigError
from brain3d.evaluation import fit_bias_correction
from brain3d.hardware import (
    configure_backends,
    guard_cpu_bf16_convolutions,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)
from brain3d.models.heads import check_segmentation_shape
from brain3d.models.model import build_model, count_parameters
from brain3d.preemption import EXIT_INTERRUPTED, Preempted, StopRequest, stop_on_signals
from brain3d.sweep import in_multirun, record_job_error
from brain3d.tensorboard_log import log_config, log_epoch, log_hparams, overlay_mid_slices

log = logging.getLogger("brain3d.train")

# Resolvers for configs/hparams_search/optuna.yaml: the Optuna direction from task.monitor_mode, and the loss
# search space from the task's valid losses (task.losses), so a search never tries a loss the task refuses.
OmegaConf.register_new_resolver("brain3d.optuna_direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode],
                                replace=True)
OmegaConf.register_new_resolver("brain3d.loss_choice", lambda losses: f"choice({','.join(losses)})", replace=True)

TASKS = ("classification", "regression", "segmentation")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ignored_manifest(data_cfg: DictConfig) -> str | None:
    """A ``data.manifest`` that the data source would ignore (it used to train on the phantoms and exit 0)."""
    if not data_cfg.get("manifest") or data_cfg.source == "nifti":
        return None
    if data_cfg.source == "synthetic":
        return (f"data.manifest={data_cfg.manifest} is set, but data=synthetic (the default) trains on built-in "
                "phantoms and ignores it; add data=nifti to train on your manifest")
    return (f"data.manifest={data_cfg.manifest} is set, but data={data_cfg.source} builds its manifest from data.root; "
            "use data=nifti to train on your manifest")


def prepare_manifest(data_cfg: DictConfig, task_name: str | None = None, require_targets: bool = True) -> Path:
    """``data.source``: synthetic -> generate (once, cached) the built-in phantoms; nifti -> ``data.manifest``."""
    problem = ignored_manifest(data_cfg)
    if problem:
        raise ConfigError(problem)
    if data_cfg.source == "synthetic":
        root = cache_root(data_cfg) / "synthetic"
        out_dir = synthetic_cache_dir(root, data_cfg.num_subjects, tuple(data_cfg.shape), data_cfg.seed)
        return make_synthetic_dataset(out_dir, data_cfg.num_subjects, tuple(data_cfg.shape), data_cfg.seed)
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
    (``overrides`` replace or add load_manifest arguments, e.g. ``check_data=False``)."""
    kwargs = dict(
        id_col=data_cfg.id_col, image_col=data_cfg.image_col, target_col=data_cfg.target_col,
        mask_col=data_cfg.mask_col, split_col=data_cfg.split_col, group_col=data_cfg.get("group_col"),
        positive_label=data_cfg.get("positive_label"), check_data=data_cfg.check_data,
        on_error=data_cfg.get("on_error", "raise"), mask_values=data_cfg.get("mask_values", "binary"),
        affine_tolerance=data_cfg.get("affine_tolerance", 1e-3),
    )
    manifest_path = prepare_manifest(data_cfg, task_name, overrides.get("require_targets", True))
    return load_manifest(manifest_path, task_name, **{**kwargs, **overrides})


def cache_root(data_cfg: DictConfig) -> Path:
    """``data.cache_dir`` (configs/data: ``$BRAIN3D_CACHE_DIR``, else ``~/.cache/brain3d``); when it is empty or
    absent, the same default (brain3d.data.cache.default_cache_root)."""
    value = data_cfg.get("cache_dir")
    return Path(str(value)).expanduser() if value else default_cache_root()


def preprocessed_cache_dir(data_cfg: DictConfig) -> Path:
    """Where preprocessed volumes are kept (memory-mapped .npy): ``<data.cache_dir>/preprocessed``."""
    return cache_root(data_cfg) / "preprocessed"


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


def build_optimizer(optimizer_cfg: DictConfig, model: torch.nn.Module, device: torch.device):
    """Instantiate ``cfg.optimizer`` for the model's parameters that need gradients (a frozen backbone's do
    not). ``optimizer.backbone_lr_scale`` (not an optimizer argument) other than 1 gives the backbone its own
    param group at ``lr * scale`` (brain3d.transfer.optimizer_param_groups). ``optimizer.fused: null``
    (Adam/AdamW) means fused on CUDA, where one kernel updates every parameter (4% faster steps than foreach
    measured on an H100 for the seed model), and torch's default elsewhere."""
    options = OmegaConf.to_container(optimizer_cfg, resolve=True)
    backbone_lr_scale = options.pop("backbone_lr_scale", 1.0)
    if "fused" in options and options["fused"] is None:
        if device.type == "cuda":
            options["fused"] = True
        else:
            del options["fused"]
    return instantiate(options)(transfer.optimizer_param_groups(model, options.get("lr"), backbone_lr_scale))


def build_loss(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate ``cfg.loss`` after checking that it fits the task (``task.losses`` lists those that do)."""
    name = cfg.loss.name
    if name not in cfg.task.losses:
        raise ConfigError(
            f"loss={name} does not fit task={cfg.task.name}; "
            f"valid losses for {cfg.task.name}: {', '.join(cfg.task.losses)}"
        )
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    loss_cfg.pop("name")
    return instantiate(loss_cfg)


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


def write_history_csv(history: list[dict], path: Path) -> None:
    """``metrics.csv``: one row per epoch (the columns of summary.json's history), rewritten whole after each
    epoch through a temp file and a rename, so a reader never sees half a table and a resumed run's table
    holds every epoch once."""
    columns = list(dict.fromkeys(key for record in history for key in record))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def load_resume_state(path: Path, config_dict: dict, device: torch.device) -> dict:
    """The checkpoint ``trainer.resume`` points to, after checking that it was written by this same run.

    Raises:
        ConfigError: the file cannot be read, or its config differs from this one in a key that defines the
            run (model, task, loss, data and split, preprocessing, optimizer...; checkpoint.RESUME_FREE_KEYS
            lists the keys a resume may change), naming each such key with both values.
    """
    try:
        state = load_checkpoint(path, map_location=device)
    except ValueError as err:
        raise ConfigError(f"trainer.resume: {err}") from err
    differences = config_differences(state["config"], config_dict)
    if differences:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:8])
        more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
        raise ConfigError(
            f"trainer.resume: {path} was trained with another configuration: {listed}{more}. A resume continues "
            "the same run: set these back, or start a new run in another folder without trainer.resume")
    return state


def load_model_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    """``model.load_state_dict`` with one line instead of torch's list of every mismatching tensor."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"trainer.resume: the weights in {path} do not fit this model "
                          f"({len(lines) - 1} problems, first: {lines[1] if len(lines) > 1 else lines[0]})") from err


def restore_scheduler(scheduler, optimizer: torch.optim.Optimizer, state: dict, max_epochs: int) -> None:
    """Restore the scheduler's position (steps taken) but keep the schedule just built for this run's
    ``trainer.max_epochs``: a finished run continued with more epochs follows the schedule planned for the
    new length (with the saved one, ``poly`` would hold the learning rate at 0 for the whole extension), and
    the optimizer's learning rate is set to that schedule's value at the current step."""
    saved = dict(state["scheduler"])
    if "lr_lambdas" in saved:  # LambdaLR: the schedule's own settings (total_steps); the fresh ones stay
        saved["lr_lambdas"] = [None] * len(saved["lr_lambdas"])
    scheduler.load_state_dict(saved)
    saved_epochs = state["config"]["trainer"]["max_epochs"]
    if saved_epochs != max_epochs and hasattr(scheduler, "lr_lambdas"):
        old_lr = optimizer.param_groups[0]["lr"]
        for group, base_lr, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        log.warning("trainer.max_epochs %s -> %s: the learning-rate schedule is planned anew for %s epochs; "
                    "the learning rate continues at %.3g (it was %.3g)", saved_epochs, max_epochs, max_epochs,
                    optimizer.param_groups[0]["lr"], old_lr)


def train(cfg: DictConfig, stop: StopRequest | None = None, record_config=None) -> float:
    """Train one model as ``cfg`` says; return the best value of the monitored validation metric.

    ``stop`` (set by SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT in ``main``): when it is requested, the run finishes
    the current optimizer step, saves ``checkpoints/last.pt`` with its position in the epoch and raises
    :class:`~brain3d.preemption.Preempted`. ``record_config`` (``main``: write the run's ``.hydra/`` files) is
    called once the resume check has passed, so nothing in the run folder changes before that.
    """
    stop = stop or StopRequest()
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not one of {TASKS}")
    trainer_cfg, data_cfg = cfg.trainer, cfg.data
    device = resolve_device(trainer_cfg.device)
    # Distributed (torchrun, WORLD_SIZE > 1): rank 0's run folder is every rank's (Hydra's timestamped folder
    # can differ by a second between ranks); only rank 0 writes files.
    rank, world_size = dist_utils.init_distributed(device)
    distributed = world_size > 1
    main_rank = rank == 0
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        run_dir = Path(dist_utils.broadcast_object(str(cfg.output_dir)))
        if trainer_cfg.get("sync_batchnorm", False) and device.type != "cuda":
            raise ConfigError("trainer.sync_batchnorm=true needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU "
                              "(gloo)")
        if not main_rank:
            _quiet_secondary_rank(Path(cfg.output_dir), run_dir)
    else:
        run_dir = Path(cfg.output_dir)
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(trainer_cfg.seed)
    precision, amp_dtype, precision_reason = resolve_precision(trainer_cfg.precision, device)
    configure_backends(device, trainer_cfg.get("cudnn_benchmark", True))
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
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    # A resume is checked against the checkpoint's config before anything is written (record_config: the
    # run's .hydra/ files), so a refused resume leaves the run folder as it was.
    resume_state = load_resume_state(resume_path, config_dict, device) if resume_path is not None else None
    # trainer.init_from: another run's weights for a fresh start, its backbone checked here (before anything is
    # written); loaded into the model once it is built. A resume wins: its checkpoint holds this run's weights.
    init_from, init_state = trainer_cfg.get("init_from"), None
    if init_from and resume_state is None:
        init_state = transfer.load_init_checkpoint(init_from, config_dict["backbone"])
    if record_config is not None and main_rank:
        record_config()
    log.info("run folder %s | device %s | precision %s (%s)", run_dir, device, precision, precision_reason)
    # trainer.progress: tqdm bars on a terminal, plain lines every progress_interval_s in a log file (auto)
    progress = progress_mode(trainer_cfg.progress)
    bars = progress == "bars" and main_rank
    line_every_s = float(trainer_cfg.get("progress_interval_s") or 60) if progress == "lines" and main_rank else None

    # ---- data: check every row once, up front, then split by subject --------------------------------
    if distributed and not main_rank:
        dist_utils.barrier()  # rank 0 first: it generates / converts the data once, the others then read it
    manifest = read_manifest(data_cfg, cfg.task.name)
    if distributed and main_rank:
        dist_utils.barrier()
    manifest_path = manifest.path
    for skipped in manifest.skipped:  # data.on_error=skip
        log.warning("skipped line %s (%s): %s", skipped["line"], skipped["subject_id"] or "no id",
                    "; ".join(skipped["reasons"]))
    train_subjects, val_subjects = split_subjects(
        manifest.subjects, data_cfg.val_fraction, data_cfg.split_seed, stratify=cfg.task.name == "classification",
        num_folds=data_cfg.num_folds, fold=data_cfg.fold,
    )
    if main_rank:
        with open(run_dir / "split.csv", "w") as f:
            f.write("subject_id,split\n")
            f.writelines(f"{s.subject_id},{split}\n"
                         for split, group in (("train", train_subjects), ("val", val_subjects)) for s in group)
    log.info("%s: %d subjects -> %d train, %d val", manifest_path, len(manifest.subjects), len(train_subjects),
             len(val_subjects))

    task = engine.TaskSpec(cfg.task.name)
    if task.name == "regression":
        values = np.array([s.target for s in train_subjects], dtype=np.float64)
        task.target_mean, task.target_std = float(values.mean()), float(max(values.std(), 1e-6))
    cache_dir = preprocessed_cache_dir(data_cfg) if data_cfg.get("cache", False) else None
    train_set = VolumeDataset(train_subjects, task.name, settings, cache_dir, patch_size,
                              data_cfg.get("foreground_fraction", 0.33), seed=trainer_cfg.seed)
    # Distributed: each rank validates subjects rank, rank+W, ...; engine.evaluate gathers them (gather=...).
    val_set = VolumeDataset(val_subjects[rank::world_size] if distributed else val_subjects, task.name, settings,
                            cache_dir)  # whole volumes, never augmented
    sliding_window = None
    if patch_size:
        sliding_window = {"patch_size": patch_size, "overlap": trainer_cfg.sw_overlap,
                          "batch_size": trainer_cfg.sw_batch_size, "accumulate_device": trainer_cfg.get("sw_device")}
    augment = instantiate(cfg.augment)

    # ---- model, optimizer, scheduler, scaler ---------------------------------------------------------
    model = build_model(cfg.backbone, cfg.task.head, head_name=task.name).to(device)
    num_parameters = count_parameters(model)
    log.info("model: backbone %s + head %s, %s parameters", cfg.backbone._target_, cfg.task.head._target_,
             f"{num_parameters:,}")
    init_report = resume_state.get("init_from") if resume_state is not None else None
    if init_state is not None:  # the backbone and the heads whose names and shapes match; the rest stays fresh
        init_report = transfer.apply_init_checkpoint(model, init_state, init_from)
        del init_state
        log.info("%s", transfer.describe_init(init_report))
    elif init_from:
        log.info("trainer.init_from=%s not applied: resuming from %s, which holds this run's weights",
                 init_from, resume_path)
    if trainer_cfg.get("freeze_backbone", False):  # only the heads train; the backbone's BatchNorm stays in eval
        frozen = transfer.freeze_backbone(model)
        log.info("trainer.freeze_backbone: %s backbone parameters frozen, BatchNorm statistics fixed; %s trained",
                 f"{frozen:,}", f"{num_parameters - frozen:,}")
        if not init_from:
            log.warning("trainer.freeze_backbone=true without trainer.init_from: the backbone stays at its random "
                        "initialisation")
    if device.type == "cpu" and amp_dtype is torch.bfloat16:
        guard_cpu_bf16_convolutions(model)  # a oneDNN bf16 defect on 2-voxel-thin inputs (brain3d.hardware)
    channels_last = resolve_channels_last(trainer_cfg.get("channels_last", True))
    if channels_last:  # (N, D, H, W, C) layout: faster convolutions with cuDNN on GPUs and oneDNN on CPUs
        model = model.to(memory_format=torch.channels_last_3d)
    if trainer_cfg.get("grad_checkpointing", False):
        if not hasattr(model.backbone, "grad_checkpointing"):
            raise ConfigError(f"trainer.grad_checkpointing: backbone {cfg.backbone._target_} has no "
                              "grad_checkpointing attribute")
        model.backbone.grad_checkpointing = True
    # data.batch_size (auto: the largest batch whose forward + backward fits, tried on the device with a copy of
    # the model; brain3d.memory_probe), then the loaders, which need it. A resumed auto run keeps the batch its
    # checkpoint was trained with, so the steps per epoch stay the same; the config keeps "auto".
    if resume_state is not None and resume_state.get("batch_size_search"):
        batch_record = resume_state["batch_size_search"]
        if batch_record["mode"] == "auto":
            log.info("data.batch_size=auto: %d, as found when the run began (%s)", batch_record["value"], resume_path)
    else:
        input_shape = (1, *(patch_size or settings["shape"]))  # one input (C, D, H, W)
        batch_record = memory_probe.resolve_batch_size(
            data_cfg, model, loss_fn, task.name, input_shape, device, amp_dtype, channels_last,
            num_train=max(1, len(train_set) // world_size), datasets=[train_set, val_set])
        if distributed and batch_record["mode"] == "auto":  # every rank trains the same batch: the smallest found
            batch_record["value"] = min(dist_utils.all_gather_object(batch_record["value"]))
    batch_size = batch_record["value"]
    # Patch training validates whole volumes of any size by sliding windows: one volume per batch.
    loader_cfg = OmegaConf.create({**OmegaConf.to_container(data_cfg, resolve=True), "batch_size": batch_size})
    train_loader, val_loader, residence = build_loaders(
        train_set, val_set, loader_cfg, device, trainer_cfg.seed, val_batch_size=1 if patch_size else batch_size,
        rank=rank, world_size=world_size, progress=bars)
    if distributed and len(train_loader) == 0:
        raise ConfigError(f"{len(train_set)} training volumes in batches of {batch_size} give fewer batches "
                          f"than the {world_size} processes; use fewer processes or a smaller data.batch_size")
    # trainer.compile: the loop runs the compiled module; `model` stays the plain one, so checkpoints hold its
    # state_dict (names without compile's "_orig_mod." prefix) and load into an uncompiled model.
    forward_model = model
    compile_option = trainer_cfg.get("compile", False)
    # true -> torch's default backend (inductor); a string names the backend (e.g. aot_eager)
    compile_kwargs = {} if compile_option is True else {"backend": str(compile_option)}
    if compile_option:
        forward_model = torch.compile(model, **compile_kwargs)
    train_model = forward_model  # what train_one_epoch runs: DistributedDataParallel around it when distributed
    if distributed:
        if trainer_cfg.get("sync_batchnorm", False):
            if trainer_cfg.get("freeze_backbone", False):  # a frozen BatchNorm uses no batch statistics to sync
                model.heads = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.heads)
            else:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            forward_model = torch.compile(model, **compile_kwargs) if compile_option else model
        train_model = torch.nn.parallel.DistributedDataParallel(
            forward_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg.optimizer, model, device)
    accumulate = int(trainer_cfg.accumulate_grad_batches)
    steps_per_epoch = math.ceil(len(train_loader) / accumulate)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=steps_per_epoch * trainer_cfg.max_epochs,
                                           steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    history: list[dict[str, float]] = []
    best = {"name": monitor, "value": None, "epoch": None, "mode": monitor_mode}
    start_epoch = 0
    resume_position = engine.EpochProgress()  # batches of start_epoch already trained (a mid-epoch checkpoint)
    bias_correction = None  # regression: refitted on each epoch's validation predictions
    if resume_state is not None:
        state = resume_state
        load_model_weights(model, state["model"], resume_path)
        optimizer.load_state_dict(state["optimizer"])
        restore_scheduler(scheduler, optimizer, state, trainer_cfg.max_epochs)
        if state["scaler"] and scaler.is_enabled():  # empty when saved by a run in another precision than fp16
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        resume_position = engine.EpochProgress.from_dict(state.get("epoch_progress"))
        bias_correction = state.get("bias_correction")
        if distributed and not main_rank:  # the saved running loss is rank 0's: count it once, not once per rank
            resume_position.loss_sum, resume_position.volumes = 0.0, 0
        # Worded as the stop message was ("stopped at epoch 2, after batch 3/6" / "at the end of epoch 2").
        where = (f"epoch {start_epoch + 1}, after batch {resume_position.batches_done}/{len(train_loader)}"
                 if resume_position.batches_done else f"the end of epoch {start_epoch}")
        log.info("resumed from %s at %s", resume_path, where)
    checkpoint_dir = run_dir / "checkpoints"
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    if main_rank:
        remove_stale_temp_files(checkpoint_dir)  # left by a process killed (SIGKILL) while writing a checkpoint
    # Scalars are logged per epoch (step = epoch number). A resumed run purges any steps the stopped process
    # logged after its last checkpoint (a SIGKILL between logging and saving), so no epoch appears twice.
    if main_rank:
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                               purge_step=start_epoch + 1 if resume_path else None)
    else:
        writer = _NullWriter()  # other ranks compute, rank 0 writes
    if resume_path is None:
        log_config(writer, config_dict)

    def checkpoint_state(epochs_done: int, position: engine.EpochProgress | None) -> dict:
        """Everything a resume needs: ``epochs_done`` whole epochs, plus for a mid-epoch checkpoint the
        ``position`` in the next one (batches done and the running sums of its train loss). Read at call
        time, so it holds the current model, optimizer, RNG, history and best."""
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epochs_done,
            "epoch_progress": position.to_dict() if position is not None else None,
            "history": history, "best": best,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            "config": config_dict, "task": task.name, "head_name": task.name, "num_parameters": num_parameters,
            "class_names": manifest.class_names, "target_mean": task.target_mean, "target_std": task.target_std,
            "bias_correction": bias_correction,
            # brain3d-predict warns about (and marks) subjects the model was trained on
            "train_subject_ids": [s.subject_id for s in train_subjects],
            "batch_size_search": batch_record,  # {"value", "mode", ...}: a resumed data.batch_size=auto keeps it
            "init_from": init_report,  # what trainer.init_from loaded when the run began (None: a fresh init)
        }

    def stop_now(where: str) -> None:
        """After last.pt is saved: leave with Preempted (main exits with stop.exit_code: 75, or 130 for SIGINT)."""
        writer.close()
        log.warning("%s received: stopped at %s and saved %s; the same command with trainer.resume=auto continues "
                    "(exit code %d)", stop.signal_name, where, last_path, stop.exit_code)
        raise Preempted(f"stopped by {stop.signal_name} at {where}")

    # Called by the engine after every optimizer step (no gradients pending, so the state is complete).
    every_n = trainer_cfg.get("checkpoint_every_n_steps")
    log_every_n = trainer_cfg.get("log_every_n_steps")
    step_sleep = float(trainer_cfg.get("debug_step_sleep") or 0)  # testing aid (not documented): slows each step

    def after_optimizer_step(position: engine.EpochProgress) -> bool:
        step = epoch * steps_per_epoch + math.ceil(position.batches_done / accumulate)  # optimizer steps so far
        if log_every_n and step % log_every_n == 0:
            position.settle()  # read back the losses still on the device (one sync, only on logging steps)
            log.info("step %d: epoch %d, batch %d/%d, train_loss=%.4g", step, epoch + 1, position.batches_done,
                     len(train_loader), position.loss_sum / max(position.volumes, 1))
        if step_sleep:
            time.sleep(step_sleep)
        if dist_utils.any_rank(stop.requested, device) if distributed else stop.requested:
            return True  # the engine ends the epoch here; the loop saves and stops (every rank at the same step)
        if every_n and step % every_n == 0 and position.batches_done < len(train_loader) and main_rank:
            save_checkpoint(checkpoint_state(epoch, position), last_path)  # the epoch's end saves anyway
        return False

    # trainer.report: report.html (curves, metrics, the trainer.report_subjects worst validation subjects)
    # after every validation; drawing never stops training (ReportGuard logs one warning) and is timed (debug).
    report_enabled = bool(trainer_cfg.get("report", True))
    report_subjects = int(trainer_cfg.get("report_subjects", 16))
    write_report = report.ReportGuard("report.html")
    report_note = (f"distributed over {world_size} processes: the subject pictures are rank 0's share of the "
                   "validation subjects (the metrics are over all of them)") if distributed else ""

    # ---- the loop -------------------------------------------------------------------------------------
    # trainer.epochs_per_run ends this process early (time-limited cluster jobs); the schedule still plans
    # for max_epochs, and the same command with trainer.resume=auto continues where it stopped.
    end_epoch = trainer_cfg.max_epochs
    if trainer_cfg.epochs_per_run:
        end_epoch = min(end_epoch, start_epoch + int(trainer_cfg.epochs_per_run))
    epochs = tqdm(range(start_epoch, end_epoch), desc="epochs", initial=start_epoch,
                  total=trainer_cfg.max_epochs, disable=not bars, dynamic_ncols=True)
    stop.armed = True  # from here a Ctrl-C finishes the step and saves last.pt (a second one exits at once)
    for epoch in epochs:
        # The epoch's shuffle order, and its patch seeds: they travel with the indices, to persistent workers too.
        train_loader.batch_sampler.set_epoch(epoch, shuffle_seed=trainer_cfg.seed * 100_003 + epoch)
        train_stats = engine.train_one_epoch(
            train_model, train_loader, loss_fn, optimizer, scheduler, scaler, task, device, amp_dtype, epoch + 1,
            accumulate_grad_batches=accumulate, gradient_clip_norm=trainer_cfg.gradient_clip_norm,
            progress=bars, log_every_s=line_every_s, augment=augment,
            augment_seed=trainer_cfg.seed + 1_000 * rank,  # rank 0 (and a single process): the seed itself
            progress_state=resume_position if epoch == start_epoch else None,
            after_optimizer_step=after_optimizer_step, channels_last=channels_last,
        )
        if train_stats["stopped"]:  # a stop signal: save the position in this epoch and leave
            position = train_stats["position"]
            if main_rank:
                save_checkpoint(checkpoint_state(epoch, position), last_path)
            stop_now(f"epoch {epoch + 1}, after batch {position.batches_done}/{len(train_loader)}")
        if distributed:
            # The epoch's loss over every rank's volumes; validation and checkpoints use rank 0's BatchNorm statistics.
            loss_sum, volumes, volumes_per_second = dist_utils.all_reduce_sum(
                [train_stats["position"].loss_sum, train_stats["position"].volumes, train_stats["volumes_per_second"]],
                device)
            train_stats["loss"], train_stats["volumes_per_second"] = loss_sum / max(volumes, 1), volumes_per_second
            dist_utils.broadcast_buffers(model)
        val_stats, val_outputs = engine.evaluate(forward_model, val_loader, loss_fn, task, device, amp_dtype, epoch + 1,
                                                 bars, sliding_window=sliding_window,
                                                 channels_last=channels_last,
                                                 gather=dist_utils.all_gather_object if distributed else None,
                                                 collect_cases=report_enabled and main_rank, max_cases=report_subjects)
        record = {"epoch": epoch + 1, "train_loss": train_stats["loss"],
                  **{f"val_{k}": v for k, v in val_stats.items()},
                  "lr": train_stats["lr"], "train_volumes_per_second": train_stats["volumes_per_second"],
                  "train_data_wait_fraction": train_stats["data_wait_fraction"]}
        history.append(record)
        log_epoch(writer, record, epoch + 1)
        if main_rank:
            write_history_csv(history, run_dir / "metrics.csv")  # the table so far: a killed run leaves it
        preview = val_outputs.get("preview")
        if preview is not None and trainer_cfg.log_images:
            panel = overlay_mid_slices(preview["image"], preview["target"], preview["probability"])
            writer.add_image("val/mid_slices", panel, epoch + 1, dataformats="HWC")
        writer.flush()
        if monitor not in record:
            recorded = sorted(k for k in record if k.startswith("val_"))
            raise ConfigError(f"task.monitor={monitor!r} is not a recorded metric; choose one of {recorded}")
        improved = is_better(record[monitor], best["value"], monitor_mode)
        if improved:
            best = {"name": monitor, "value": float(record[monitor]), "epoch": epoch + 1, "mode": monitor_mode}
        if task.name == "regression":
            bias_correction = fit_bias_correction_or_none(val_outputs)
        if main_rank:
            state = checkpoint_state(epoch + 1, None)
            save_checkpoint(state, last_path)
            if improved:
                save_checkpoint(state, best_path)
        if main_rank and report_enabled:  # report.html, refreshed each validation; a failure is one warning
            write_report(report.write_run_report, run_dir, history, best, task.name, val_outputs.get("cases", []),
                         report_subjects, total_cases=val_outputs.get("cases_total"),
                         class_names=manifest.class_names, note=report_note)
        summary_line = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
        log.info("epoch %d/%d %s%s", epoch + 1, trainer_cfg.max_epochs, summary_line, " (best)" if improved else "")
        epochs.set_postfix(train_loss=f"{record['train_loss']:.4f}", **{monitor: f"{record[monitor]:.4f}"})
        stop_requested = dist_utils.any_rank(stop.requested, device) if distributed else stop.requested
        if stop_requested and epoch + 1 < end_epoch:  # the signal came during validation: last.pt is saved
            stop_now(f"the end of epoch {epoch + 1}")

    # ---- summary --------------------------------------------------------------------------------------
    final = history[-1] if history else {}
    summary: dict[str, Any] = {
        "task": task.name,
        "num_parameters": num_parameters,
        "epochs_completed": len(history),
        "best_metric": best,
        "final_train": {"loss": final.get("train_loss")},
        "final_val": {k[4:]: v for k, v in final.items() if k.startswith("val_")},
        "train_volumes_per_second": (float(np.mean([h["train_volumes_per_second"] for h in history]))
                                     if history else None),
        # share of training time spent waiting for the data loader (mean over epochs; older checkpoints lack it)
        "data_wait_fraction": (float(np.mean([h.get("train_data_wait_fraction", np.nan) for h in history]))
                               if history else None),
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "device": str(device),
        "precision": precision,
        "precision_reason": precision_reason,
        "channels_last": channels_last,
        # where the training data lived: device | host (memory-resident, batches gathered by index) | off (workers)
        "data_resident": {"mode": residence.mode, "reason": residence.reason},
        # data.batch_size: fixed, or auto (the largest batch that fitted the memory budget, and the trials)
        "batch_size": {k: batch_record.get(k) for k in ("value", "mode", "peak_memory_mb", "budget_mb", "budget_reason",
                                                        "trials")},
        "checkpoints": {"last": str(last_path.resolve()),
                        "best": str(best_path.resolve()) if best_path.exists() else None},
        "data": {"manifest": str(manifest_path), "num_train": len(train_subjects), "num_val": len(val_subjects),
                 "num_skipped": len(manifest.skipped), "skipped": manifest.skipped,
                 "num_folds": data_cfg.num_folds, "fold": data_cfg.fold if data_cfg.num_folds else None},
        "history": history,
    }
    if init_report is not None:  # trainer.init_from: path, loaded parts, skipped ones with the reason, fresh ones
        summary["init_from"] = init_report
    if manifest.class_names is not None:
        summary["class_names"] = manifest.class_names
        summary["positive_class"] = manifest.class_names[1]
    if task.name == "regression":
        # The bar to beat: always predicting the training mean.
        val_targets = np.array([s.target for s in val_subjects])
        summary["target_mean"], summary["target_std"] = task.target_mean, task.target_std
        summary["baseline_val_mae"] = float(np.abs(val_targets - task.target_mean).mean())
    if distributed:
        summary["distributed"] = {"world_size": world_size, "backend": "nccl" if device.type == "cuda" else "gloo"}
    if main_rank:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    hparam_values = {"task": task.name, "backbone": cfg.backbone._target_.rsplit(".", 1)[-1], "loss": cfg.loss.name,
                     "width": cfg.backbone.get("width"), "lr": cfg.optimizer.lr, "batch_size": batch_size,
                     "max_epochs": trainer_cfg.max_epochs}
    if main_rank:
        log_hparams(writer, hparam_values,
                    {"best_" + monitor: best["value"], **{k: v for k, v in final.items() if k.startswith("val_")}})
    writer.close()
    shutdown_workers(train_loader)  # persistent workers (data.resident=off): not left behind by an in-process run
    shutdown_workers(val_loader)
    log.info("done: best %s=%s at epoch %s; summary %s", monitor, best["value"], best["epoch"],
             run_dir / "summary.json")
    # Distributed: every rank waits here until rank 0 has written its outputs, so no rank tears the process
    # group down while another still uses it (gloo aborts the process otherwise).
    dist_utils.barrier()
    return float(best["value"]) if best["value"] is not None else float("nan")


class _NullWriter:
    """Stands in for the SummaryWriter on ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _quiet_secondary_rank(own_dir: Path, run_dir: Path) -> None:
    """A rank other than 0 writes nothing: its Hydra log file handler is closed, and when its Hydra folder is
    not rank 0's (a timestamp a second apart) the folder, holding only Hydra's files, is removed."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING)  # rank 0 logs the run; the others only their warnings and errors
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    if own_dir.resolve() != run_dir.resolve() and own_dir.is_dir():
        if {p.name for p in own_dir.iterdir()} <= {".hydra", "train.log"}:
            import shutil
            shutil.rmtree(own_dir, ignore_errors=True)


# InstantiationException: a config value refused by the class it builds (e.g. backbone.norm=batc); Hydra's
# message names the _target_, the key and the class's own ValueError.
USER_ERRORS = (ConfigError, ManifestError, FileNotFoundError, engine.NonFiniteLossError, InstantiationException)


def record_hydra_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write the run's ``.hydra/`` files (config.yaml, hydra.yaml, overrides.yaml) as Hydra would; train.yaml
    sets ``hydra.output_subdir: null`` so that Hydra itself does not, and train() calls this only after a
    resume was checked, so a refused resume leaves the run's recorded config as it was."""
    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")


HELP = f"""brain3d-train: train a 3D CNN on brain MRI volumes (classification, regression or segmentation).

Every setting comes from the config groups below (configs/ in the package); pick an option with
group=option and change any value with group.key=value. `-m` runs every combination of comma-separated values.
Without data=..., it trains on built-in synthetic phantoms, so it runs with no data at all.

Config groups:
{groups_help("train")}

Examples:
  brain3d-train                                              # sex from synthetic T1 phantoms, CPU or GPU
  brain3d-train task=regression data=nifti data.manifest=study.csv data.target_col=age
  brain3d-train task=segmentation data=bids data.root=/data/bids data.mask_suffix=mask data.mask_root=derivatives/lesions
  brain3d-train task=segmentation data.patch_size=[48,48,48] trainer.max_epochs=40 trainer.resume=auto
  brain3d-train -m task=regression data.num_folds=5 data.fold=0,1,2,3,4 hydra.sweep.dir=runs/cv

Show the composed config: brain3d-train --cfg job [overrides]; Hydra's own options: brain3d-train --hydra-help.
Writes to outputs/<task>/<date>/<time>/ (hydra.run.dir=DIR): checkpoints/, tensorboard/, metrics.csv, summary.json.
Exit status: 0 done, 2 a mistake in the command, config or data, 75 stopped by a signal (resume with
trainer.resume=auto), 130 interrupted (Ctrl-C)."""  # noqa: E501 (the examples stay one line each)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    stop = None
    try:
        with stop_on_signals() as stop:  # SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT: checkpoint, then exit 75 (130)
            return train(cfg, stop, record_config=lambda: record_hydra_config(cfg, Path(cfg.output_dir)))
    except Preempted:
        sys.exit(stop.exit_code)  # train() logged where it stopped and what to run next
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one while stopping
        print("brain3d-train: interrupted; checkpoints/last.pt (if any) holds the last saved state", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except USER_ERRORS as err:
        # A user's mistake: one clear message and exit status 2, not a traceback.
        report_user_error("brain3d-train", err)
        if in_multirun():
            return failed_job(cfg, err)
        sys.exit(2)
    except Exception as err:
        if not in_multirun():
            raise
        log.exception("job failed")
        return failed_job(cfg, err)
    finally:
        dist_utils.cleanup()  # distributed runs: leave the process group (nothing in a single process)


def failed_job(cfg: DictConfig, err: Exception) -> float:
    """In a sweep, one failed job must not stop the others: its error goes to error.txt in its folder (and to
    sweep_summary.csv through brain3d.sweep.SweepSummary) and it returns NaN, which sweepers such as Optuna
    record as a failed trial."""
    record_job_error(cfg.output_dir, err)
    return float("nan")


def main() -> None:
    """``brain3d-train``: --help, the command-line check (brain3d.cli), then Hydra."""
    run_command(hydra_main, "brain3d-train", "train", HELP, validate=lambda cfg: ignored_manifest(cfg.data))


if __name__ == "__main__":
    main()
