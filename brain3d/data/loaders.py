"""The training and validation loaders: memory-resident batches when the data fit, DataLoader workers when not.

``build_loaders`` decides ``data.resident`` (brain3d.data.resident), logs the choice and why, and returns
loaders the training loop uses alike: ``len()``, iteration, and a ``batch_sampler`` whose ``set_epoch(epoch,
shuffle_seed)`` starts each epoch (its shuffle order and, through the indices, its patch seeds) and which can
start part-way (a mid-epoch resume).
"""

from __future__ import annotations

import atexit
import logging
import weakref

import torch
from omegaconf import DictConfig
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from brain3d.data.dataset import VolumeDataset
from brain3d.data.nifti import NiftiReadError
from brain3d.data.resident import (
    ResidentLoader,
    ResidentMemoryError,
    ResidentVolumes,
    estimated_bytes,
    residence_candidates,
    size_text,
)
from brain3d.data.sampling import ResumableBatchSampler
from brain3d.errors import ConfigError
from brain3d.preemption import ignore_stop_signals

log = logging.getLogger("brain3d.data")


def training_batch_sampler(dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                           samples_per_volume: int = 1) -> ResumableBatchSampler:
    """The shuffled batches of an epoch (RandomSampler + BatchSampler), with a shuffle generator of their own:
    the loop calls ``set_epoch(epoch, shuffle_seed)`` every epoch, so the order is reproducible, the same for
    every kind of loader, and a resumed run sees the same batches as an uninterrupted one. Training drops a
    last batch of one volume: BatchNorm cannot normalise a single 1x1x1 bottleneck.

    ``samples_per_volume`` (data.samples_per_volume) = k: an epoch draws every volume k times, as sample
    indices ``0 .. k * len(dataset) - 1`` (sample ``s`` is volume ``s % len(dataset)``, shuffled as one
    permutation); the datasets seed each patch by its sample index, so the k patches of a volume differ."""
    generator = torch.Generator().manual_seed(seed)
    samples = range(len(dataset) * max(int(samples_per_volume), 1))
    return ResumableBatchSampler(RandomSampler(samples, generator=generator), batch_size,
                                 drop_last=len(samples) % batch_size == 1, rank=rank, world_size=world_size)


def samples_per_volume(data_cfg: DictConfig) -> int:
    """data.samples_per_volume (1 when absent): training samples drawn from each volume per epoch."""
    return int(data_cfg.get("samples_per_volume", 1) or 1)


def make_loader(dataset: VolumeDataset, data_cfg: DictConfig, device: torch.device, shuffle: bool, seed: int,
                batch_size: int | None = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over ``dataset`` (the disk cache) with ``data.num_workers`` persistent worker processes.

    The training loader's batch sampler (:func:`training_batch_sampler`) shuffles, and can start an epoch at
    batch k (a mid-epoch resume) without loading the batches before it. Workers persist across epochs (their
    start-up is paid once); the epoch reaches them with every index (``batch_sampler.set_epoch``).
    """
    generator = torch.Generator().manual_seed(seed)
    batch_size = batch_size or data_cfg.batch_size
    workers = int(data_cfg.num_workers)
    common = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals if workers else None,  # only the main process stops
    )
    if not shuffle:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)
    else:
        loader = DataLoader(dataset, batch_sampler=training_batch_sampler(
            dataset, batch_size, seed, rank, world_size, samples_per_volume(data_cfg)), **common)
    if workers:
        # The workers ignore SIGTERM (only the main process handles a stop), so multiprocessing's exit handler
        # could not terminate them and would wait forever: stop them first (atexit runs this before it).
        atexit.register(lambda ref=weakref.ref(loader): shutdown_workers(ref()))
    return loader


def shutdown_workers(loader) -> None:
    """Stop a DataLoader's persistent worker processes now (what its garbage collection would do); a
    later iteration starts new ones. Anything else (None, resident loaders) is left alone."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def build_loaders(train_set: VolumeDataset, val_set: VolumeDataset, data_cfg: DictConfig, device: torch.device,
                  seed: int, val_batch_size: int, rank: int = 0, world_size: int = 1, progress: bool = True):
    """``(train_loader, val_loader, residence)`` for ``data.resident`` (auto | device | host | off).

    Raises:
        ConfigError: an unknown mode, or data that do not fit an explicitly requested residence.
    """
    requested = str(data_cfg.get("resident", "auto"))
    max_fraction = float(data_cfg.get("resident_max_fraction", 0.5))
    try:
        candidates = residence_candidates(requested, device, estimated_bytes([train_set, val_set]), max_fraction)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    except ResidentMemoryError as err:
        raise ConfigError(f"data.resident={requested}: {err}") from err
    threads = int(data_cfg.num_workers)  # reading (on a cold cache: preprocessing) the volumes into memory
    for residence in candidates:
        if residence.mode == "off":
            break
        try:
            train_store = ResidentVolumes(train_set, residence.device, residence.budget, progress, threads)
            val_budget = residence.budget - train_store.nbytes  # one budget for both
            val_store = ResidentVolumes(val_set, residence.device, val_budget, progress, threads)
            break
        except NiftiReadError as err:  # only with data.check_data=false: the start-up check decodes every file
            raise ConfigError(f"reading the volumes into memory: {err} (data.check_data=true finds every such file "
                              f"before training; data.on_error=skip leaves them out)") from err
        except ResidentMemoryError as err:
            if requested != "auto":
                raise ConfigError(f"data.resident={requested}: {err}") from err
            log.info("data: not held in %s: %s", residence.mode, err)
            train_store = val_store = None
            candidates[-1].reason = str(err)
    if residence.mode == "off":
        log.info("data: DataLoader with %d persistent worker process(es) over the %s (%s)", data_cfg.num_workers,
                 "disk cache" if train_set.cache_dir else "files", residence.reason)
        train_loader = make_loader(train_set, data_cfg, device, shuffle=True, seed=seed, rank=rank,
                                   world_size=world_size)
        val_loader = make_loader(val_set, data_cfg, device, shuffle=False, seed=seed, batch_size=val_batch_size)
        return train_loader, val_loader, residence
    on_device = residence.device.type == device.type
    log.info("data: %d + %d volumes (%s) held in %s, batches gathered by index%s (%s)", len(train_store),
             len(val_store), size_text(train_store.nbytes + val_store.nbytes),
             "GPU memory" if residence.device.type == "cuda" else "host RAM",
             "" if on_device else ", copied to the GPU by a prefetch thread", residence.reason)
    to_device = None if on_device else device
    train_batches = training_batch_sampler(train_set, data_cfg.batch_size, seed, rank, world_size,
                                           samples_per_volume(data_cfg))
    train_loader = ResidentLoader(train_store, train_batches, to_device)
    val_batches = BatchSampler(SequentialSampler(range(len(val_set))), val_batch_size, drop_last=False)
    val_loader = ResidentLoader(val_store, val_batches, to_device)
    return train_loader, val_loader, residence
