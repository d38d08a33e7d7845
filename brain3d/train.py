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
import functools
import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from brain3d import distributed as dist_utils
from brain3d import engine, memory_probe, report, transfer
from brain3d.batchnorm import recompute_batchnorm_statistics
from brain3d.budget import TimeBudget, parse_duration, process_age_s
from brain3d.checkpoint import (
    config_differences,
    load_checkpoint,
    remove_stale_temp_files,
    resolve_resume_path,
    save_checkpoint,
)
from brain3d.cli import config_dir, groups_help, progress_mode, report_user_error, run_command
from brain3d.command_setup import (  # noqa: F401 (prepare_manifest, cache_root: as brain3d.train offered them)
    build_loss,
    cache_root,
    check_input_geometry,
    ignored_manifest,
    prepare_manifest,
    preprocessed_cache_dir,
    read_manifest,
)
from brain3d.data.channels import image_columns
from brain3d.data.dataset import VolumeDataset
from brain3d.data.loaders import build_loaders, shutdown_workers
from brain3d.data.manifest import ManifestError, split_subjects
from brain3d.data.preprocess import validate_settings
from brain3d.ema import WeightAverage
from brain3d.errors import ConfigError
from brain3d.hardware import (
    configure_backends,
    guard_cpu_bf16_convolutions,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)
from brain3d.inference import tta_flip_axes
from brain3d.models.model import build_model, count_parameters
from brain3d.preemption import EXIT_INTERRUPTED, Preempted, StopRequest, stop_on_signals
from brain3d.sweep import in_multirun, record_job_error
from brain3d.tasks import MULTITASK, SINGLE_TASKS, Task, TaskSet, build_task_set, head_configs
from brain3d.tensorboard_log import log_config, log_epoch, log_hparams, overlay_mid_slices

log = logging.getLogger("brain3d.train")

# Resolvers for configs/hparams_search/optuna.yaml: the Optuna direction from task.monitor_mode, and the loss
# search space from the task's valid losses (task.losses), so a search never tries a loss the task refuses.
OmegaConf.register_new_resolver("brain3d.optuna_direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode],
                                replace=True)
OmegaConf.register_new_resolver("brain3d.loss_choice", lambda losses: f"choice({','.join(losses)})", replace=True)



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    if state.get("weights_only") or "optimizer" not in state:
        raise ConfigError(f"trainer.resume: {path} holds weights only (brain3d-export format=weights): no optimizer "
                          f"state to continue from; start a new run from its weights with trainer.init_from={path}")
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


_FIRST_RUN_IN_PROCESS = True  # trainer.max_time: the first run's budget includes the process's start-up


@dataclass
class Run:
    """One training run's state, filled phase by phase (:func:`set_up`, :func:`load_data`, :func:`build_model_phase`,
    :func:`build_loaders_phase`, :func:`resume`, :func:`open_logs`) and then changed by the epochs. A checkpoint is
    made from it (:func:`checkpoint_state`) and ``summary.json`` at the end (:func:`finish`)."""

    cfg: DictConfig
    stop: StopRequest
    # set-up
    device: torch.device = None
    rank: int = 0
    world_size: int = 1
    run_dir: Path = None
    precision: str = "fp32"
    amp_dtype: torch.dtype | None = None
    precision_reason: str = ""
    tasks: TaskSet = None  # the heads: their losses, target scaling, class names, metrics
    settings: dict = None  # preprocessing (brain3d.data.preprocess.validate_settings)
    patch_size: tuple | None = None
    config_dict: dict = None
    resume_path: Path | None = None
    resume_state: dict | None = None
    init_state: dict | None = None
    bars: bool = False
    line_every_s: float | None = None
    # data
    manifest: Any = None
    train_subjects: list = field(default_factory=list)
    val_subjects: list = field(default_factory=list)
    train_set: VolumeDataset = None
    val_set: VolumeDataset = None
    sliding_window: dict | None = None
    val_flip_axes: tuple = ()  # trainer.val_flip_axes: the spatial axes whose flips validation averages
    augment: Any = None
    # model, loaders, optimizer
    model: torch.nn.Module = None
    forward_model: torch.nn.Module = None  # the compiled one with trainer.compile (validation runs it)
    train_model: torch.nn.Module = None  # forward_model, wrapped in DistributedDataParallel when distributed
    num_parameters: int = 0
    init_report: dict | None = None
    channels_last: bool = False
    batch_record: dict = None
    train_loader: Any = None
    val_loader: Any = None
    residence: Any = None
    optimizer: torch.optim.Optimizer = None
    scheduler: Any = None
    scaler: torch.amp.GradScaler = None
    ema: WeightAverage | None = None  # trainer.ema: the averaged weights, which validation runs and checkpoints hold
    accumulate: int = 1
    steps_per_epoch: int = 1
    # length: trainer.max_epochs, or what trainer.max_time's budget fits (planned after every epoch)
    budget: TimeBudget | None = None
    end_epoch: int = 0  # the epochs the learning-rate schedule is planned for
    stopped_early: dict | None = None  # trainer.early_stopping: when and why
    # progress
    history: list = field(default_factory=list)
    best: dict = None
    start_epoch: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    resume_position: engine.EpochProgress = field(default_factory=engine.EpochProgress)
    writer: Any = None
    report_note: str = ""
    report_guard: report.ReportGuard = field(default_factory=lambda: report.ReportGuard("report.html"))
    report_pending: Any = None  # the latest validation's report.html, not yet drawn (trainer.report_interval_s)
    report_drawn_at: float = -math.inf  # time.monotonic() when report.html was last drawn

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def validated_model(self) -> torch.nn.Module:
        """The plain module whose weights validation runs and the checkpoints hold as ``model`` (what predict
        loads): trainer.ema's average, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"


def train(cfg: DictConfig, stop: StopRequest | None = None, record_config=None) -> float:
    """Train one model as ``cfg`` says; return the best value of the monitored validation metric.

    ``stop`` (set by SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT in ``main``): when it is requested, the run finishes
    the current optimizer step, saves ``checkpoints/last.pt`` with its position in the epoch and raises
    :class:`~brain3d.preemption.Preempted`. ``record_config`` (``main``: write the run's ``.hydra/`` files) is
    called once the resume check has passed, so nothing in the run folder changes before that.
    """
    run = set_up(cfg, stop or StopRequest())  # device, precision, heads, checks; the resume checkpoint read
    if record_config is not None and run.main_rank:
        record_config()
    load_data(run)  # every manifest row checked once, the split, the datasets
    build_model_phase(run)  # model, trainer.init_from / freeze_backbone, memory layout
    build_loaders_phase(run)  # batch size (auto: probed), loaders, compile / DistributedDataParallel
    build_optimizer_phase(run)  # optimizer, scheduler, grad scaler
    resume(run)  # weights, optimizer, scheduler, RNG, history from trainer.resume
    open_logs(run)  # checkpoints folder, TensorBoard
    run_epochs(run)
    return finish(run)  # summary.json, hparams


def set_up(cfg: DictConfig, stop: StopRequest) -> Run:
    """Device and processes, precision, the heads and their losses, and every check that needs no data; the
    resume checkpoint is read and compared with this config here, before anything is written."""
    run = Run(cfg, stop)
    trainer_cfg, data_cfg = cfg.trainer, cfg.data
    global _FIRST_RUN_IN_PROCESS
    max_time = check_length_settings(cfg)
    if max_time:  # the first run of a process counts from the process's start, later ones (sweeps) from here
        already = process_age_s() if _FIRST_RUN_IN_PROCESS else 0.0
        run.budget = TimeBudget(max_time, started=time.monotonic() - already)
    _FIRST_RUN_IN_PROCESS = False
    run.device = resolve_device(trainer_cfg.device)
    # Distributed (torchrun, WORLD_SIZE > 1): rank 0's run folder is every rank's (Hydra's timestamped folder
    # can differ by a second between ranks); only rank 0 writes files.
    run.rank, run.world_size = dist_utils.init_distributed(run.device)
    run.run_dir = Path(cfg.output_dir)
    if run.distributed:
        if run.device.type == "cuda":
            run.device = torch.device("cuda", torch.cuda.current_device())
        run.run_dir = Path(dist_utils.broadcast_object(str(cfg.output_dir)))
        if trainer_cfg.get("sync_batchnorm", False) and run.device.type != "cuda":
            raise ConfigError("trainer.sync_batchnorm=true needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU "
                              "(gloo)")
        if not run.main_rank:
            _quiet_secondary_rank(Path(cfg.output_dir), run.run_dir)
    if run.main_rank:
        run.run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(trainer_cfg.seed)
    run.precision, run.amp_dtype, run.precision_reason = resolve_precision(trainer_cfg.precision, run.device)
    configure_backends(run.device, trainer_cfg.get("cudnn_benchmark", True))
    run.tasks = build_tasks(cfg)
    run.best = {"name": cfg.task.monitor, "value": None, "epoch": None, "mode": cfg.task.monitor_mode}
    if cfg.task.monitor_mode not in ("min", "max"):
        raise ConfigError(f"task.monitor_mode={cfg.task.monitor_mode!r} is not one of min, max")
    try:
        run.settings = validate_settings(cfg.preprocess)
    except ValueError as err:
        raise ConfigError(f"preprocess: {err}") from err
    run.patch_size = tuple(data_cfg.patch_size) if data_cfg.get("patch_size") else None
    try:
        run.val_flip_axes = tta_flip_axes(trainer_cfg.get("val_flip_axes"), "trainer.val_flip_axes")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_input_geometry(cfg.task.name, run.settings, run.patch_size, run.tasks.kinds)
    run.resume_path = resolve_resume_path(trainer_cfg.resume, run.run_dir)
    set_input_channels(cfg)  # data.image_col's columns -> backbone.in_channels, both kept in the checkpoint's config
    run.config_dict = OmegaConf.to_container(cfg, resolve=True)
    # A resume is checked against the checkpoint's config before anything is written (record_config: the
    # run's .hydra/ files), so a refused resume leaves the run folder as it was.
    if run.resume_path is not None:
        run.resume_state = load_resume_state(run.resume_path, run.config_dict, run.device)
    # trainer.init_from: another run's weights for a fresh start, its backbone checked here (before anything is
    # written); loaded into the model once it is built. A resume wins: its checkpoint holds this run's weights.
    if trainer_cfg.get("init_from") and run.resume_state is None:
        run.init_state = transfer.load_init_checkpoint(trainer_cfg.init_from, run.config_dict["backbone"])
    log.info("run folder %s | device %s | precision %s (%s)", run.run_dir, run.device, run.precision,
             run.precision_reason)
    # trainer.progress: tqdm bars on a terminal, plain lines every progress_interval_s in a log file (auto)
    progress = progress_mode(trainer_cfg.progress)
    run.bars = progress == "bars" and run.main_rank
    if progress == "lines" and run.main_rank:
        run.line_every_s = float(trainer_cfg.get("progress_interval_s") or 60)
    return run


def set_input_channels(cfg: DictConfig) -> None:
    """The model's input channels follow the data: ``data.image_col`` becomes the list of columns read
    (brain3d.data.channels.image_columns: e.g. data=bids data.suffix=[T1w,FLAIR] -> [image, FLAIR]) and
    ``backbone.in_channels`` their number, so the checkpoint's config rebuilds the model and predict reads the
    same columns. The backbone configs say 1; another number that is not the columns' is refused."""
    try:
        columns = image_columns(cfg.data)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    configured = cfg.backbone.get("in_channels", 1)
    if configured not in (1, len(columns)):
        raise ConfigError(f"backbone.in_channels={configured} but data.image_col={columns} gives {len(columns)} "
                          f"channel(s): in_channels follows the image columns; leave it at 1")
    with open_dict(cfg):
        cfg.data.image_col = columns if len(columns) > 1 else columns[0]
        if image_columns(cfg.data) != columns:  # data.channels=2 data.image_col=[image]: plain "image" means both
            cfg.data.image_col = columns
        cfg.backbone.in_channels = len(columns)


def check_length_settings(cfg: DictConfig) -> float | None:
    """trainer.max_epochs / max_time / val_every_n_epochs / early_stopping and data.samples_per_volume, each
    checked with a message naming the key and what it accepts; returns trainer.max_time in seconds (None: no
    budget)."""
    trainer_cfg = cfg.trainer
    try:
        max_time = parse_duration(trainer_cfg.get("max_time"))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    max_epochs = trainer_cfg.get("max_epochs")
    if max_epochs is None and max_time is None:
        raise ConfigError("trainer.max_epochs=null needs trainer.max_time (e.g. trainer.max_time=2h): without a cap "
                          "on the epochs the run needs a time budget to end")
    if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
        raise ConfigError(f"trainer.max_epochs={max_epochs!r} must be a whole number >= 1 (or null with "
                          "trainer.max_time)")
    for key, value in (("trainer.val_every_n_epochs", trainer_cfg.get("val_every_n_epochs", 1)),
                       ("trainer.early_stopping", trainer_cfg.get("early_stopping")),
                       ("data.samples_per_volume", cfg.data.get("samples_per_volume", 1))):
        if value is None and key == "trainer.early_stopping":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            meaning = {"trainer.early_stopping": " (validations without improvement; null: off)"}.get(key, "")
            raise ConfigError(f"{key}={value!r} must be a whole number >= 1{meaning}")
    return max_time


def build_tasks(cfg: DictConfig) -> TaskSet:
    """The run's heads (brain3d.tasks): task=<kind> trains one with the ``loss`` group (checked against
    task.losses); task=multitask each of task.heads with its own loss and weight."""
    single_loss = build_loss(cfg) if cfg.task.name in SINGLE_TASKS else None  # multi-task heads name their own
    return build_task_set(cfg.task, single_loss, cfg.data)


def load_data(run: Run) -> None:
    """Check every manifest row once, up front (all problems reported together), split by subject, fit the
    target scaling on the training subjects, and build the datasets."""
    cfg, data_cfg, tasks = run.cfg, run.cfg.data, run.tasks
    if run.distributed and not run.main_rank:
        dist_utils.barrier()  # rank 0 first: it generates / converts the data once, the others then read it
    heads = [(t.name, t.kind, t.column) for t in tasks] if tasks.multi else None
    num_classes = tasks.mask_classes  # >= 2: label maps 0..K
    run.manifest = manifest = read_manifest(data_cfg, cfg.task.name, heads=heads, num_classes=num_classes)
    if run.distributed and run.main_rank:
        dist_utils.barrier()
    for skipped in manifest.skipped:  # data.on_error=skip
        log.warning("skipped line %s (%s): %s", skipped["line"], skipped["subject_id"] or "no id",
                    "; ".join(skipped["reasons"]))
    stratify = tasks.stratify_task
    run.train_subjects, run.val_subjects = split_subjects(
        manifest.subjects, data_cfg.val_fraction, data_cfg.split_seed, stratify=stratify is not None,
        num_folds=data_cfg.num_folds, fold=data_cfg.fold,
        stratify_by=stratify.name if tasks.multi and stratify else None,
    )
    if run.main_rank:
        with open(run.run_dir / "split.csv", "w") as f:
            f.write("subject_id,split\n")
            f.writelines(f"{s.subject_id},{split}\n"
                         for split, group in (("train", run.train_subjects), ("val", run.val_subjects)) for s in group)
    log.info("%s: %d subjects -> %d train, %d val", manifest.path, len(manifest.subjects), len(run.train_subjects),
             len(run.val_subjects))
    for task in tasks:
        task.class_names = manifest.head_class_names.get(task.name) if tasks.multi else manifest.class_names
        values = tasks.labels(run.train_subjects, task)
        if tasks.multi:
            log.info("head %s (%s, column %r): %d of %d training and %d of %d validation subjects labelled",
                     task.name, task.kind, task.column, len(values), len(run.train_subjects),
                     len(tasks.labels(run.val_subjects, task)), len(run.val_subjects))
            if not values:
                raise ConfigError(f"task.heads.{task.name}: no training subject has a label in column "
                                  f"{task.column!r}; remove the head (task.heads.{task.name}=null) or add labels")
        if values and not task.reads_mask:
            task.fit_scaling(np.array(values, dtype=np.float64))  # regression: mean and std; others nothing
    cache_dir = preprocessed_cache_dir(data_cfg) if data_cfg.get("cache", False) else None
    dataset_heads = [(t.name, t.kind) for t in tasks] if tasks.multi else None
    task_name = next(iter(tasks)).kind if not tasks.multi else MULTITASK
    run.train_set = VolumeDataset(run.train_subjects, task_name, run.settings, cache_dir, run.patch_size,
                                  data_cfg.get("foreground_fraction", 0.33), seed=cfg.trainer.seed, heads=dataset_heads,
                                  num_classes=num_classes)
    # Distributed: each rank validates subjects rank, rank+W, ...; engine.evaluate gathers them (gather=...).
    val_subjects = run.val_subjects[run.rank::run.world_size] if run.distributed else run.val_subjects
    run.val_set = VolumeDataset(val_subjects, task_name, run.settings, cache_dir,
                                heads=dataset_heads, num_classes=num_classes)  # whole volumes, never augmented
    if run.patch_size:
        trainer_cfg = cfg.trainer
        run.sliding_window = {"patch_size": run.patch_size, "overlap": trainer_cfg.sw_overlap,
                              "batch_size": trainer_cfg.sw_batch_size,
                              "accumulate_device": trainer_cfg.get("sw_device")}
    run.augment = instantiate(cfg.augment)


def build_model_phase(run: Run) -> None:
    """The backbone and heads, trainer.init_from's weights, trainer.freeze_backbone, the memory layout."""
    cfg, trainer_cfg = run.cfg, run.cfg.trainer
    model = build_model(cfg.backbone, head_configs(cfg.task)).to(run.device)
    run.num_parameters = count_parameters(model)
    log.info("model: backbone %s + heads %s, %s parameters", cfg.backbone._target_,
             ", ".join(f"{t.name} ({t.kind})" for t in run.tasks), f"{run.num_parameters:,}")
    init_from = trainer_cfg.get("init_from")
    run.init_report = run.resume_state.get("init_from") if run.resume_state is not None else None
    if run.init_state is not None:  # the backbone and the heads whose names and shapes match; the rest stays fresh
        run.init_report = transfer.apply_init_checkpoint(model, run.init_state, init_from)
        run.init_state = None
        log.info("%s", transfer.describe_init(run.init_report))
    elif init_from:
        log.info("trainer.init_from=%s not applied: resuming from %s, which holds this run's weights",
                 init_from, run.resume_path)
    if trainer_cfg.get("freeze_backbone", False):  # only the heads train; the backbone's BatchNorm stays in eval
        frozen = transfer.freeze_backbone(model)
        log.info("trainer.freeze_backbone: %s backbone parameters frozen, BatchNorm statistics fixed; %s trained",
                 f"{frozen:,}", f"{run.num_parameters - frozen:,}")
        if not init_from:
            log.warning("trainer.freeze_backbone=true without trainer.init_from: the backbone stays at its random "
                        "initialisation")
    if run.device.type == "cpu" and run.amp_dtype is torch.bfloat16:
        guard_cpu_bf16_convolutions(model)  # a oneDNN bf16 defect on 2-voxel-thin inputs (brain3d.hardware)
    run.channels_last = resolve_channels_last(trainer_cfg.get("channels_last", True))
    if run.channels_last:  # (N, D, H, W, C) layout: faster convolutions with cuDNN on GPUs and oneDNN on CPUs
        model = model.to(memory_format=torch.channels_last_3d)
    if trainer_cfg.get("grad_checkpointing", False):
        if not hasattr(model.backbone, "grad_checkpointing"):
            raise ConfigError(f"trainer.grad_checkpointing: backbone {cfg.backbone._target_} has no "
                              "grad_checkpointing attribute")
        model.backbone.grad_checkpointing = True
    run.model = model


def build_loaders_phase(run: Run) -> None:
    """data.batch_size (auto: the largest batch whose forward + backward fits, tried on the device with a copy
    of the model; brain3d.memory_probe), the loaders, and the module the loop runs (compiled, DDP)."""
    data_cfg, trainer_cfg, tasks = run.cfg.data, run.cfg.trainer, run.tasks
    # A resumed auto run keeps the batch its checkpoint was trained with, so the steps per epoch stay the
    # same; the config keeps "auto".
    if run.resume_state is not None and run.resume_state.get("batch_size_search"):
        run.batch_record = run.resume_state["batch_size_search"]
        if run.batch_record["mode"] == "auto":
            log.info("data.batch_size=auto: %d, as found when the run began (%s)", run.batch_record["value"],
                     run.resume_path)
    else:
        head = next(iter(tasks))
        input_shape = (run.cfg.backbone.in_channels, *(run.patch_size or run.settings["shape"]))  # (C, D, H, W)
        run.batch_record = memory_probe.resolve_batch_size(
            data_cfg, run.model, head.loss_fn, tasks if tasks.multi else head.kind, input_shape, run.device,
            run.amp_dtype, run.channels_last,
            num_train=max(1, len(run.train_set) // run.world_size), datasets=[run.train_set, run.val_set])
        if run.distributed and run.batch_record["mode"] == "auto":  # every rank trains the smallest batch found
            run.batch_record["value"] = min(dist_utils.all_gather_object(run.batch_record["value"]))
    batch_size = run.batch_record["value"]
    # Patch training validates whole volumes of any size by sliding windows: one volume per batch.
    loader_cfg = OmegaConf.create({**OmegaConf.to_container(data_cfg, resolve=True), "batch_size": batch_size})
    run.train_loader, run.val_loader, run.residence = build_loaders(
        run.train_set, run.val_set, loader_cfg, run.device, trainer_cfg.seed,
        val_batch_size=1 if run.patch_size else batch_size, rank=run.rank, world_size=run.world_size,
        progress=run.bars)
    if run.distributed and len(run.train_loader) == 0:
        raise ConfigError(f"{len(run.train_set)} training volumes in batches of {batch_size} give fewer batches "
                          f"than the {run.world_size} processes; use fewer processes or a smaller data.batch_size")
    # trainer.compile: the loop runs the compiled module; `model` stays the plain one, so checkpoints hold its
    # state_dict (names without compile's "_orig_mod." prefix) and load into an uncompiled model.
    compile_option = trainer_cfg.get("compile", False)
    # true -> torch's default backend (inductor); a string names the backend (e.g. aot_eager)
    compile_kwargs = {} if compile_option is True else {"backend": str(compile_option)}
    run.forward_model = torch.compile(run.model, **compile_kwargs) if compile_option else run.model
    run.train_model = run.forward_model
    if run.distributed:
        if trainer_cfg.get("sync_batchnorm", False):
            if trainer_cfg.get("freeze_backbone", False):  # a frozen BatchNorm uses no batch statistics to sync
                run.model.heads = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model.heads)
            else:
                run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
            run.forward_model = torch.compile(run.model, **compile_kwargs) if compile_option else run.model
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.forward_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def build_optimizer_phase(run: Run) -> None:
    """The optimizer (after the model's final form: SyncBatchNorm replaces modules), its schedule over
    trainer.max_epochs, and fp16's gradient scaler."""
    cfg = run.cfg
    run.optimizer = build_optimizer(cfg.optimizer, run.model, run.device)
    run.accumulate = int(cfg.trainer.accumulate_grad_batches)
    run.steps_per_epoch = math.ceil(len(run.train_loader) / run.accumulate)
    # With trainer.max_time the length is planned once the first epoch is timed (plan_epochs); until then the
    # warm-up runs as planned here, over max_epochs (or, with no cap, a provisional 100 epochs).
    run.end_epoch = int(cfg.trainer.max_epochs) if cfg.trainer.max_epochs is not None else 100
    run.scheduler = instantiate(cfg.scheduler)(run.optimizer, total_steps=run.steps_per_epoch * run.end_epoch,
                                               steps_per_epoch=run.steps_per_epoch)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")
    ema = cfg.trainer.get("ema")
    if ema is not None:
        if isinstance(ema, bool) or not isinstance(ema, (int, float)):
            raise ConfigError(f"trainer.ema={ema!r} must be a decay between 0 and 1 (e.g. 0.99), or null for off")
        try:
            run.ema = WeightAverage(run.model, float(ema))
        except ValueError as err:
            raise ConfigError(str(err)) from err


def resume(run: Run) -> None:
    """trainer.resume: weights, optimizer, scheduler (planned for this max_epochs), scaler, RNG, history, the
    best so far and the position in the epoch, from the checkpoint :func:`set_up` checked."""
    state = run.resume_state
    if state is None:
        return
    # trainer.ema: "model" holds the averaged weights (what was validated), "train_weights" the optimised ones
    load_model_weights(run.model, state.get("train_weights", state["model"]), run.resume_path)
    if run.ema is not None:
        run.ema.load(state["model"], state.get("ema"))
    run.optimizer.load_state_dict(state["optimizer"])
    saved_budget = state.get("time_budget")
    if run.budget is not None and saved_budget is not None:
        # trainer.max_time: the schedule as last planned, and the time used; the loop plans on from there
        run.scheduler.load_state_dict(state["scheduler"])
        run.budget = TimeBudget.resumed(run.budget.seconds, saved_budget)
        run.end_epoch = int(state.get("planned_epochs") or run.end_epoch)
    else:
        restore_scheduler(run.scheduler, run.optimizer, state, run.cfg.trainer.max_epochs)
    if state["scaler"] and run.scaler.is_enabled():  # empty when saved by a run in another precision than fp16
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if run.device.type == "cuda" and state["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.history, run.best, run.start_epoch = state["history"], state["best"], state["epoch"]
    run.resume_position = engine.EpochProgress.from_dict(state.get("epoch_progress"))
    for task in run.tasks:  # regression: the bias correction refitted at the last validation
        saved = (state.get("tasks") or {}).get("heads", {}).get(task.name, {})
        task.bias_correction = saved.get("bias_correction", state.get("bias_correction"))
    if run.distributed and not run.main_rank:  # the saved running loss is rank 0's: count it once, not once per rank
        run.resume_position.loss_sum, run.resume_position.volumes = 0.0, 0
    # Worded as the stop message was ("stopped at epoch 2, after batch 3/6" / "at the end of epoch 2").
    position = run.resume_position.batches_done
    where = (f"epoch {run.start_epoch + 1}, after batch {position}/{len(run.train_loader)}"
             if position else f"the end of epoch {run.start_epoch}")
    log.info("resumed from %s at %s", run.resume_path, where)


def open_logs(run: Run) -> None:
    """The checkpoints folder (cleared of temp files a SIGKILL left) and TensorBoard. Scalars are logged per
    epoch (step = epoch number); a resumed run purges any steps the stopped process logged after its last
    checkpoint (a SIGKILL between logging and saving), so no epoch appears twice."""
    if not run.main_rank:
        run.writer = _NullWriter()  # other ranks compute, rank 0 writes
        return
    remove_stale_temp_files(run.run_dir / "checkpoints")
    run.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"),
                               purge_step=run.start_epoch + 1 if run.resume_path else None)
    if run.resume_path is None:
        log_config(run.writer, run.config_dict)
    if run.distributed:
        run.report_note = (f"distributed over {run.world_size} processes: the subject pictures are rank 0's share of "
                           "the validation subjects (the metrics are over all of them)")


def checkpoint_state(run: Run, epochs_done: int, position: engine.EpochProgress | None) -> dict:
    """Everything a resume needs: ``epochs_done`` whole epochs, plus for a mid-epoch checkpoint the ``position``
    in the next one (batches done and the running sums of its train loss); and what brain3d-predict needs to
    rebuild the heads (``tasks``; single-task runs also keep the older top-level keys)."""
    first = next(iter(run.tasks))
    return {
        "model": run.validated_model.state_dict(), "optimizer": run.optimizer.state_dict(),
        **({"train_weights": run.model.state_dict(), "ema": run.ema.state()} if run.ema is not None else {}),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epochs_done,
        "epoch_progress": position.to_dict() if position is not None else None,
        "history": run.history, "best": run.best,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []},
        "config": run.config_dict, "task": run.cfg.task.name, "num_parameters": run.num_parameters,
        "head_name": None if run.tasks.multi else first.name,
        "class_names": None if run.tasks.multi else first.class_names,
        "target_mean": first.target_mean, "target_std": first.target_std,
        "bias_correction": None if run.tasks.multi else first.bias_correction,
        "tasks": run.tasks.state(),  # per head: kind, column, class names, target scaling, bias correction
        # brain3d-predict warns about (and marks) subjects the model was trained on
        "train_subject_ids": [s.subject_id for s in run.train_subjects],
        "batch_size_search": run.batch_record,  # {"value", "mode", ...}: a resumed data.batch_size=auto keeps it
        "init_from": run.init_report,  # what trainer.init_from loaded when the run began (None: a fresh init)
        "planned_epochs": run.end_epoch,  # the epochs the learning-rate schedule is planned for
        "time_budget": run.budget.state() if run.budget is not None else None,  # trainer.max_time: time used
    }


def stop_now(run: Run, where: str) -> None:
    """After last.pt is saved: leave with Preempted (main exits with stop.exit_code: 75, or 130 for SIGINT)."""
    draw_report(run)
    run.writer.close()
    log.warning("%s received: stopped at %s and saved %s; the same command with trainer.resume=auto continues "
                "(exit code %d)", run.stop.signal_name, where, run.last_path, run.stop.exit_code)
    raise Preempted(f"stopped by {run.stop.signal_name} at {where}")


def after_optimizer_step(run: Run, position: engine.EpochProgress) -> bool:
    """Called by the engine after every optimizer step (no gradients pending, so the state is complete): the
    step log line, a stop request (True ends the epoch there), trainer.checkpoint_every_n_steps."""
    trainer_cfg = run.cfg.trainer
    if run.ema is not None:
        run.ema.update(run.model)
    step = run.epoch * run.steps_per_epoch + math.ceil(position.batches_done / run.accumulate)  # optimizer steps
    log_every_n = trainer_cfg.get("log_every_n_steps")
    if log_every_n and step % log_every_n == 0:
        position.settle()  # read back the losses still on the device (one sync, only on logging steps)
        log.info("step %d: epoch %d, batch %d/%d, train_loss=%.4g", step, run.epoch + 1, position.batches_done,
                 len(run.train_loader), position.loss_sum / max(position.volumes, 1))
    if trainer_cfg.get("debug_step_sleep"):  # testing aid (not documented): slows each step
        time.sleep(float(trainer_cfg.debug_step_sleep))
    if dist_utils.any_rank(run.stop.requested, run.device) if run.distributed else run.stop.requested:
        return True  # the engine ends the epoch here; the loop saves and stops (every rank at the same step)
    every_n = trainer_cfg.get("checkpoint_every_n_steps")
    if every_n and step % every_n == 0 and position.batches_done < len(run.train_loader) and run.main_rank:
        save_checkpoint(checkpoint_state(run, run.epoch, position), run.last_path)  # the epoch's end saves anyway
    return False


def run_epochs(run: Run) -> None:
    """The loop: per epoch train, (every trainer.val_every_n_epochs, and after the last epoch) validate, log,
    checkpoint. trainer.max_time plans the number of epochs after each epoch's training (:func:`plan_epochs`);
    trainer.early_stopping ends the run after that many validations without improvement; trainer.epochs_per_run
    ends this process early (time-limited cluster jobs): the schedule still plans for the whole run, and the
    same command with trainer.resume=auto continues where it stopped."""
    trainer_cfg = run.cfg.trainer
    val_every = int(trainer_cfg.get("val_every_n_epochs") or 1)
    process_end = run.start_epoch + int(trainer_cfg.epochs_per_run) if trainer_cfg.epochs_per_run else None
    epochs = tqdm(desc="epochs", initial=run.start_epoch, total=run.end_epoch, disable=not run.bars,
                  dynamic_ncols=True)
    run.stop.armed = True  # from here a Ctrl-C finishes the step and saves last.pt (a second one exits at once)
    epoch = run.start_epoch
    while epoch < min(run.end_epoch, process_end or run.end_epoch):
        run.epoch = epoch
        started = time.monotonic()
        train_stats = train_epoch(run)
        if run.budget is not None:
            run.budget.train_s.append(time.monotonic() - started)
            plan_epochs(run, val_every)
            epochs.total = run.end_epoch
        last = epoch + 1 >= min(run.end_epoch, process_end or run.end_epoch)
        validated = last or (epoch + 1) % val_every == 0
        started = time.monotonic()
        if validated:
            record, val_outputs = validate_epoch(run, train_stats)
        else:
            record, val_outputs = epoch_record(run, train_stats, {}), {}
        improved = log_and_checkpoint(run, record, val_outputs)
        if run.budget is not None:  # what follows the training (validation, checkpoints, report.html) is planned too
            after = time.monotonic() - started
            if validated:
                run.budget.val_s.append(after)
            else:
                run.budget.train_s[-1] += after
        monitor = run.best["name"]
        epochs.update()
        epochs.set_postfix(train_loss=f"{record['train_loss']:.4f}",
                           **({monitor: f"{record[monitor]:.4f}"} if monitor in record else {}))
        log.info("epoch %d/%d %s%s", epoch + 1, run.end_epoch,
                 " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"), " (best)" if improved else "")
        stop_requested = dist_utils.any_rank(run.stop.requested, run.device) if run.distributed else run.stop.requested
        if stop_requested and not last:  # the signal came during validation: last.pt is saved
            stop_now(run, f"the end of epoch {epoch + 1}")
        if validated and not last and early_stopping_due(run):
            break
        epoch += 1
    epochs.close()
    draw_report(run)  # the last validation's, whatever trainer.report_interval_s skipped


def plan_epochs(run: Run, val_every: int) -> None:
    """trainer.max_time, after an epoch's training: the epochs that fit in what is left of the budget
    (brain3d.budget.TimeBudget, from the epochs timed so far), capped by trainer.max_epochs; when that changes
    the plan, the learning-rate schedule is re-planned to end with the new last epoch, continuously from the
    current step (brain3d.schedulers.WarmupSchedule.replan)."""
    budget, done = run.budget, run.epoch + 1
    # Before the first validation is timed: a guess from the training time (a forward pass is about a third of
    # a training step; validation volumes are whole, sliding windows overlap), replaced by the measurement.
    share = len(run.val_set) / max(len(run.train_loader) * run.batch_record["value"], 1)
    val_guess = budget.train_s[-1] * share * (1.0 if run.sliding_window else 0.5)
    reserve = 2.0 + 0.01 * budget.seconds  # the final checkpoint, summary.json, report.html
    more = budget.epochs_after(val_every, val_guess, reserve)
    if run.distributed:
        more = min(dist_utils.all_gather_object(more))  # every rank plans the same length
    cap = run.cfg.trainer.max_epochs
    planned = min(done + more, int(cap)) if cap is not None else done + more
    if planned == done < run.end_epoch and budget.left() > 0:
        # This epoch ran slower than planned and the plan now ends with it, though its learning rate was set for
        # more epochs: one closing epoch (the schedule decays to its end over it) keeps the run inside
        # budget + one epoch with the schedule completed, instead of stopping mid-decay.
        planned = done + 1
    if planned == run.end_epoch and len(budget.train_s) > 1:
        return
    per_epoch, val_s = budget.estimate(val_every, val_guess)
    capped = " (capped by trainer.max_epochs)" if cap is not None and planned == int(cap) and done + more > cap else ""
    # the first plan is logged; later ones (every epoch's timing moves it a little) only at debug level
    log.log(logging.INFO if len(budget.train_s) == 1 else logging.DEBUG,
            "trainer.max_time=%s: %d epochs fit%s (about %.0f s per epoch, validation %.0f s; %.0f s of the "
            "budget left); the learning-rate schedule ends with epoch %d", run.cfg.trainer.max_time, planned,
            capped, per_epoch, val_s, budget.left(), planned)
    run.end_epoch = planned
    for schedule in getattr(run.scheduler, "lr_lambdas", []):
        if hasattr(schedule, "replan"):
            schedule.replan(done * run.steps_per_epoch, planned * run.steps_per_epoch)


def schedule_completed(run: Run, history: list[dict]) -> bool:
    """summary.json's time_budget.schedule_completed: every planned epoch ran and the learning-rate decay
    reached its end at the last step (not only the epoch count: a plan cut short mid-decay is not complete)."""
    steps = run.scheduler.last_epoch if run.scheduler is not None else 0
    decays = [s for s in getattr(run.scheduler, "lr_lambdas", []) if hasattr(s, "progress")]
    return len(history) >= run.end_epoch and all(s.progress(steps) >= 1.0 - 1e-9 for s in decays)


def early_stopping_due(run: Run) -> bool:
    """trainer.early_stopping=N: True (and ``run.stopped_early`` set) once the monitored metric has not improved
    for N validations in a row. Counted from the history, so a resumed run counts on."""
    patience = run.cfg.trainer.get("early_stopping")
    if not patience:
        return False
    monitor, best_epoch = run.best["name"], run.best["epoch"] or 0
    since = sum(1 for record in run.history if monitor in record and record["epoch"] > best_epoch)
    if since < int(patience):
        return False
    run.stopped_early = {"epoch": run.epoch + 1, "patience": int(patience), "monitor": monitor,
                         "best_epoch": run.best["epoch"], "best_value": run.best["value"]}
    log.info("trainer.early_stopping=%d: %s has not improved for %d validations (best %s at epoch %s); "
             "stopping after epoch %d", int(patience), monitor, since, run.best["value"], run.best["epoch"],
             run.epoch + 1)
    return True


def train_epoch(run: Run) -> dict:
    """One epoch of training (engine.train_one_epoch); a stop signal saves last.pt with the position in the
    epoch and leaves. Distributed: the loss over every rank's volumes."""
    trainer_cfg, epoch = run.cfg.trainer, run.epoch
    # The epoch's shuffle order, and its patch seeds: they travel with the indices, to persistent workers too.
    run.train_loader.batch_sampler.set_epoch(epoch, shuffle_seed=trainer_cfg.seed * 100_003 + epoch)
    stats = engine.train_one_epoch(
        run.train_model, run.train_loader, None, run.optimizer, run.scheduler, run.scaler, run.tasks, run.device,
        run.amp_dtype, epoch + 1, accumulate_grad_batches=run.accumulate,
        gradient_clip_norm=trainer_cfg.gradient_clip_norm, progress=run.bars, log_every_s=run.line_every_s,
        augment=run.augment, augment_seed=trainer_cfg.seed + 1_000 * run.rank,  # rank 0 (one process): the seed
        progress_state=run.resume_position if epoch == run.start_epoch else None,
        after_optimizer_step=functools.partial(after_optimizer_step, run), channels_last=run.channels_last,
    )
    if stats["stopped"]:  # a stop signal: save the position in this epoch and leave
        position = stats["position"]
        if run.main_rank:
            save_checkpoint(checkpoint_state(run, epoch, position), run.last_path)
        stop_now(run, f"epoch {epoch + 1}, after batch {position.batches_done}/{len(run.train_loader)}")
    if run.distributed:
        # The epoch's loss over every rank's volumes; validation and checkpoints use rank 0's BatchNorm statistics.
        loss_sum, volumes, volumes_per_second = dist_utils.all_reduce_sum(
            [stats["position"].loss_sum, stats["position"].volumes, stats["volumes_per_second"]], run.device)
        stats["loss"], stats["volumes_per_second"] = loss_sum / max(volumes, 1), volumes_per_second
        heads = list(stats["position"].head_sums)  # multi-task: each head's sums over every rank (same order)
        sums = dist_utils.all_reduce_sum([v for name in heads for v in stats["position"].head_sums[name]],
                                         run.device) if heads else []
        stats["head_losses"] = {name: sums[2 * k] / sums[2 * k + 1] if sums[2 * k + 1] else float("nan")
                                for k, name in enumerate(heads)}
        dist_utils.broadcast_buffers(run.model)
    return stats


def validate_epoch(run: Run, train_stats: dict) -> tuple[dict, dict]:
    """Validation (engine.evaluate, gathered over ranks) and the epoch's record: the history row that goes to
    metrics.csv, TensorBoard and summary.json."""
    report_enabled = bool(run.cfg.trainer.get("report", True)) and run.main_rank
    precise_bn = int(run.cfg.trainer.get("precise_bn_batches") or 0)
    if precise_bn:  # BatchNorm statistics re-estimated with the validated weights (brain3d.batchnorm)
        recompute_batchnorm_statistics(run.validated_model, run.train_loader, precise_bn, run.device, run.amp_dtype,
                                       run.channels_last)
        if run.distributed:
            dist_utils.broadcast_buffers(run.validated_model)  # every rank validates and saves rank 0's statistics
    evaluated = run.ema.module if run.ema is not None else run.forward_model  # the compiled one without EMA
    val_stats, val_outputs = engine.evaluate(
        evaluated, run.val_loader, None, run.tasks, run.device, run.amp_dtype, run.epoch + 1, run.bars,
        sliding_window=run.sliding_window, channels_last=run.channels_last,
        gather=dist_utils.all_gather_object if run.distributed else None,
        collect_cases=report_enabled, max_cases=int(run.cfg.trainer.get("report_subjects", 16)),
        flip_axes=run.val_flip_axes)
    return epoch_record(run, train_stats, val_stats), val_outputs


def has_validation(record: dict) -> bool:
    """Whether an epoch's history row comes from an epoch that validated (trainer.val_every_n_epochs)."""
    return any(key.startswith("val_") for key in record)


def epoch_record(run: Run, train_stats: dict, val_stats: dict) -> dict:
    """The epoch's history row (metrics.csv, TensorBoard, summary.json); an epoch that did not validate
    (trainer.val_every_n_epochs) has no val_ entries."""
    return {"epoch": run.epoch + 1, "train_loss": train_stats["loss"],
            **{f"train_{name}_loss": value for name, value in train_stats["head_losses"].items()},
            **{f"val_{k}": v for k, v in val_stats.items()},
            "lr": train_stats["lr"], "train_volumes_per_second": train_stats["volumes_per_second"],
            "train_data_wait_fraction": train_stats["data_wait_fraction"]}


def log_and_checkpoint(run: Run, record: dict, val_outputs: dict) -> bool:
    """The epoch's record to the history, metrics.csv and TensorBoard; best / last checkpoints; report.html.
    Returns whether the monitored metric improved."""
    trainer_cfg, epoch, monitor = run.cfg.trainer, run.epoch, run.best["name"]
    run.history.append(record)
    log_epoch(run.writer, record, epoch + 1, heads=run.tasks.names if run.tasks.multi else ())
    if run.main_rank:
        write_history_csv(run.history, run.run_dir / "metrics.csv")  # the table so far: a killed run leaves it
    mask_task = run.tasks.mask_task
    preview = val_outputs.get(mask_task.name, {}).get("preview") if mask_task else None
    if preview is not None and trainer_cfg.log_images:
        panel = overlay_mid_slices(preview["image"], preview["target"], preview["probability"])
        run.writer.add_image("val/mid_slices", panel, epoch + 1, dataformats="HWC")
    run.writer.flush()
    validated = has_validation(record)
    if validated and monitor not in record:
        recorded = sorted(k for k in record if k.startswith("val_"))
        raise ConfigError(f"task.monitor={monitor!r} is not a recorded metric; choose one of {recorded}")
    improved = validated and is_better(record[monitor], run.best["value"], run.best["mode"])
    if improved:
        run.best = {**run.best, "value": float(record[monitor]), "epoch": epoch + 1}
    for task in run.tasks if validated else ():  # regression: the brain-age bias correction, refitted on it
        task.after_validation(val_outputs[task.name])
    if run.main_rank:
        state = checkpoint_state(run, epoch + 1, None)
        save_checkpoint(state, run.last_path)
        if improved:
            save_checkpoint(state, run.best_path)
    # report.html after a validation, at most every trainer.report_interval_s (and at the end: draw_report)
    if run.main_rank and validated and trainer_cfg.get("report", True):
        shown = run.tasks.mask_task or next(iter(run.tasks))
        run.report_pending = functools.partial(
            report.write_run_report, run.run_dir, list(run.history), dict(run.best), shown.kind,
            val_outputs.get("cases", []), int(trainer_cfg.get("report_subjects", 16)),
            total_cases=val_outputs.get("cases_total"), class_names=shown.class_names, note=run.report_note)
        interval = float(trainer_cfg.get("report_interval_s") or 0)
        if time.monotonic() - run.report_drawn_at >= interval:
            draw_report(run)
    return improved


def draw_report(run: Run) -> None:
    """report.html of the latest validation, if it is not drawn yet (a failure is one warning)."""
    if run.report_pending is not None:
        run.report_drawn_at = time.monotonic()
        run.report_guard(run.report_pending)
        run.report_pending = None


def finish(run: Run) -> float:
    """summary.json, TensorBoard's hparams, the loaders' workers shut down; returns the best monitored value."""
    summary = run_summary(run)
    if run.main_rank:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    cfg, monitor = run.cfg, run.best["name"]
    losses = cfg.loss.name if not run.tasks.multi else "+".join(
        str(OmegaConf.select(cfg, f"task.heads.{t.name}.loss") or t.losses[0]) for t in run.tasks)
    hparam_values = {"task": cfg.task.name, "backbone": cfg.backbone._target_.rsplit(".", 1)[-1], "loss": losses,
                     "width": cfg.backbone.get("width"), "lr": cfg.optimizer.lr,
                     "batch_size": run.batch_record["value"], "max_epochs": run.end_epoch}
    if run.main_rank:
        last = run.history[-1] if run.history else {}
        log_hparams(run.writer, hparam_values,
                    {"best_" + monitor: run.best["value"], **{k: v for k, v in last.items() if k.startswith("val_")}})
    run.writer.close()
    shutdown_workers(run.train_loader)  # persistent workers (data.resident=off): not left behind in-process
    shutdown_workers(run.val_loader)
    if run.budget is not None:
        log.info("trainer.max_time=%s: %d epochs in %.0f s of the %.0f s budget", cfg.trainer.max_time,
                 len(run.history), run.budget.used(), run.budget.seconds)
    log.info("done: best %s=%s at epoch %s; summary %s", monitor, run.best["value"], run.best["epoch"],
             run.run_dir / "summary.json")
    # Distributed: every rank waits here until rank 0 has written its outputs, so no rank tears the process
    # group down while another still uses it (gloo aborts the process otherwise).
    dist_utils.barrier()
    return float(run.best["value"]) if run.best["value"] is not None else float("nan")


def run_summary(run: Run) -> dict[str, Any]:
    """summary.json: the run's outcome (best and final metrics, per head in a multi-task run), speed, memory,
    device and precision, the data and the whole history."""
    history, data_cfg, tasks = run.history, run.cfg.data, run.tasks
    # the last validated epoch (the last epoch always validates; trainer.val_every_n_epochs skips others)
    validated = [h for h in history if has_validation(h)]
    final = validated[-1] if validated else (history[-1] if history else {})
    summary: dict[str, Any] = {
        "task": run.cfg.task.name,
        "num_parameters": run.num_parameters,
        "epochs_completed": len(history),
        "planned_epochs": run.end_epoch,  # what the learning-rate schedule was planned for (trainer.max_time)
        "stopped_early": run.stopped_early,  # trainer.early_stopping: {epoch, patience, monitor, best_epoch, ...}
        "best_metric": run.best,
        "final_train": {"loss": final.get("train_loss")},
        "final_val": {k[4:]: v for k, v in final.items() if k.startswith("val_")},
        "train_volumes_per_second": (float(np.mean([h["train_volumes_per_second"] for h in history]))
                                     if history else None),
        # share of training time spent waiting for the data loader (mean over epochs; older checkpoints lack it)
        "data_wait_fraction": (float(np.mean([h.get("train_data_wait_fraction", np.nan) for h in history]))
                               if history else None),
        "peak_memory_mb": peak_memory_mb(run.device),
        "peak_memory_kind": "cuda_max_allocated" if run.device.type == "cuda" else "process_max_rss",
        "device": str(run.device),
        "precision": run.precision,
        "precision_reason": run.precision_reason,
        "channels_last": run.channels_last,
        # where the training data lived: device | host (memory-resident, batches gathered by index) | off (workers)
        "data_resident": {"mode": run.residence.mode, "reason": run.residence.reason},
        # data.batch_size: fixed, or auto (the largest batch that fitted the memory budget, and the trials)
        "batch_size": {k: run.batch_record.get(k) for k in ("value", "mode", "peak_memory_mb", "budget_mb",
                                                            "budget_reason", "trials")},
        "checkpoints": {"last": str(run.last_path.resolve()),
                        "best": str(run.best_path.resolve()) if run.best_path.exists() else None},
        "data": {"manifest": str(run.manifest.path), "num_train": len(run.train_subjects),
                 "num_val": len(run.val_subjects), "num_skipped": len(run.manifest.skipped),
                 "skipped": run.manifest.skipped, "num_folds": data_cfg.num_folds,
                 "fold": data_cfg.fold if data_cfg.num_folds else None},
        "history": history,
    }
    if run.budget is not None:  # trainer.max_time: the budget, the time used and the measured epochs
        summary["time_budget"] = {**run.budget.state(), "max_time": str(run.cfg.trainer.max_time),
                                  "schedule_completed": schedule_completed(run, history)}
    if run.init_report is not None:  # trainer.init_from: path, loaded parts, skipped ones with the reason, fresh ones
        summary["init_from"] = run.init_report
    if tasks.multi:
        summary["heads"] = {task.name: head_summary(run, task, final) for task in tasks}
        return summary
    task = next(iter(tasks))  # class names, or the regression baseline (target_mean, baseline_val_mae...)
    summary.update(task.summary_entries(tasks.labels(run.val_subjects, task)))
    if run.distributed:
        summary["distributed"] = {"world_size": run.world_size,
                                  "backend": "nccl" if run.device.type == "cuda" else "gloo"}
    return summary


def head_summary(run: Run, task: Task, final: dict) -> dict:
    """A multi-task head's entry in summary.json: kind, column, labelled subjects, final validation metrics
    (and the best value of its default metric over the epochs), class names or the regression baseline."""
    prefix = f"val_{task.name}_"
    metric, mode = task.metric
    values = [h[prefix + metric] for h in run.history if h.get(prefix + metric) is not None
              and math.isfinite(h[prefix + metric])]
    val_labels = run.tasks.labels(run.val_subjects, task)
    entry = {"kind": task.kind, "column": task.column, "weight": task.weight,
             "num_train_labelled": len(run.tasks.labels(run.train_subjects, task)),
             "num_val_labelled": len(val_labels),
             "final_val": {k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)},
             f"best_{metric}": (max(values) if mode == "max" else min(values)) if values else None}
    entry.update(task.summary_entries(val_labels))
    return entry


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


HELP = f"""brain3d-train: train a 3D CNN on brain MRI volumes (classification, regression, segmentation, or
several heads on one backbone: task=multitask).

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
  brain3d-train task=multitask data=nifti data.manifest=cohort.csv task.monitor=val_lesion_dice task.monitor_mode=max
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
