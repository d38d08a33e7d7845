"""Memory-resident training data (``data.resident``): every preprocessed volume held as a tensor, on the
training device or in host memory, and batches gathered by index, without DataLoader worker processes.

Why: with the cache warm, the worker path spends its time passing each volume between processes
(~140 vol/s at 128^3 on 2 cores, brain3d's data benchmark) and copying it to the GPU every step, while a
3-D network of brain3d's size trains at 100-200 vol/s on a GPU; on a 2-core CPU, workers compete with the
model for the same cores. Held in memory, a batch is one gather (``torch.stack`` of views, or of patch
crops) on the device itself: MONAI's fast recipe (CacheDataset + ToDeviced + ThreadDataLoader), without
its per-sample Python transforms.

Modes (``data.resident``):

* ``device``: tensors on the training device (GPU memory on CUDA; on CPU the same as ``host``).
* ``host``: tensors in host RAM; on CUDA each batch is gathered, pinned and copied by a background
  thread on its own CUDA stream (:class:`Prefetcher`) while the GPU computes the previous step.
* ``off``: the DataLoader over the disk cache, with persistent worker processes.
* ``auto`` (default): ``device`` when the data take at most ``data.resident_max_fraction`` of the
  device's free memory, else (CUDA) ``host`` when they fit that share of the available RAM, else ``off``.

The batches are exactly those of the DataLoader path (same order from the same batch sampler, same
patches from the same ``(seed, epoch, index)`` generator, same values and dtypes: tests/test_resident.py).
An explicit ``device`` or ``host`` that does not fit is refused before training with the size needed and
the memory free (:class:`ResidentMemoryError`); ``auto`` falls back instead. The check happens while
loading, before the first step, so a run never runs out of memory mid-epoch because of its data.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from brain3d.data.dataset import VolumeDataset, channels_first, head_targets, load_preprocessed
from brain3d.data.patches import mask_foreground_voxels, training_patch_start

log = logging.getLogger("brain3d.data")

RESIDENT_MODES = ("auto", "device", "host", "off")


class ResidentMemoryError(MemoryError):
    """The data do not fit the memory allowed for them; the message gives both sizes."""


def available_bytes(where: torch.device) -> int:
    """Free memory: on CUDA the device's free memory (``cudaMemGetInfo``), else the host's available RAM
    (``MemAvailable`` of /proc/meminfo; free physical pages where there is none)."""
    if where.type == "cuda":
        return int(torch.cuda.mem_get_info(where)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def estimated_bytes(datasets: Sequence[VolumeDataset]) -> int | None:
    """Bytes the datasets take when resident: float32 images (one per channel) plus uint8 masks, when every
    volume has the fixed preprocessed shape (``preprocess.shape``); None when the shapes are only known after
    loading."""
    total = 0
    for dataset in datasets:
        shape = dataset.settings.get("shape")
        if shape is None:
            return None
        voxels = int(np.prod([int(s) for s in shape]))
        channels = len(dataset.subjects[0].image_paths) if dataset.subjects else 1
        total += len(dataset) * voxels * (4 * channels + (1 if dataset.with_mask else 0))
    return total


def size_text(n: float) -> str:
    """A size for a log line: MB below a GiB, else GiB."""
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


@dataclass
class Residence:
    """Where the data live: ``mode`` (device | host | off), the ``device`` that holds them, ``budget``
    (bytes they may take) and ``reason`` (logged)."""

    mode: str
    device: torch.device | None
    budget: int | None
    reason: str


def residence_candidates(requested: str, device: torch.device, needed: int | None,
                         max_fraction: float) -> list[Residence]:
    """The residences to try for ``data.resident``, in order (see the module docstring): for ``auto``,
    device memory, then (CUDA) host RAM, each only where ``needed`` (when known) fits its budget, and
    always ``off`` last; an explicit mode alone.

    Raises:
        ValueError: an unknown mode or a fraction outside (0, 1].
        ResidentMemoryError: ``device`` or ``host`` was asked for and ``needed`` (known in advance) exceeds
            the allowed share of the free memory.
    """
    if requested not in RESIDENT_MODES:
        raise ValueError(f"data.resident={requested!r} is not one of {', '.join(RESIDENT_MODES)}")
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"data.resident_max_fraction must be in (0, 1], got {max_fraction}")
    off = Residence("off", None, None, "data.resident=off" if requested == "off" else "")
    if requested == "off":
        return [off]
    modes = [requested] if requested != "auto" else (["device", "host"] if device.type == "cuda" else ["device"])
    size = size_text(needed) if needed is not None else "size known after loading"
    candidates, refused = [], []
    for mode in modes:
        where = device if mode == "device" else torch.device("cpu")
        free = available_bytes(where)
        budget = int(free * max_fraction)
        label = "GPU memory" if where.type == "cuda" else "host RAM"
        if needed is None or needed <= budget:
            reason = f"{size}, within {max_fraction:g} of the {size_text(free)} of free {label}"
            candidates.append(Residence(mode, where, budget, reason))
            continue
        if requested != "auto":
            raise ResidentMemoryError(
                f"the training and validation volumes need {size_text(needed)}, more than data.resident_max_fraction="
                f"{max_fraction:g} of the {size_text(free)} of free {label} ({size_text(budget)}); use "
                f"data.resident=auto (falls back), host or off, a smaller data.shape, or raise the fraction")
        refused.append(f"{size} exceed {max_fraction:g} of the {size_text(free)} of free {label}")
    off.reason = off.reason or "; ".join(refused)
    return candidates + ([off] if requested == "auto" else [])


class ResidentVolumes:
    """Every item of a :class:`~brain3d.data.dataset.VolumeDataset`, preprocessed once, as tensors on ``device``.

    Per subject: the image (C, D, H, W) float32 (C channels, 1 for one image column), the mask (1, D, H, W)
    uint8 (segmentation) or the target (1,) float32, and for patch training the foreground voxel coordinates
    (N, 3) int32 on the host (to draw patch starts as the dataset does).

    Args:
        dataset: the dataset whose items to hold (its settings, cache folder, patch size, seed and epoch).
        device: where the tensors live.
        budget: bytes they may take (None: no limit); exceeded while loading -> ResidentMemoryError.
        progress: a tqdm bar while loading.
        num_threads: threads reading (and, on a cold cache, preprocessing) the volumes; 0 reads in this thread.
    """

    def __init__(self, dataset: VolumeDataset, device: torch.device, budget: int | None = None,
                 progress: bool = True, num_threads: int = 0):
        self.dataset = dataset
        self.device = device
        self.images: list[torch.Tensor] = []
        self.targets: list = []  # masks (uint8) for segmentation, else (1,) float32; multi-task {head: either}
        self.labelled: list[dict] = []  # multi-task: {head: (1,) 1.0 / 0.0} per subject
        self.foreground: list[np.ndarray | None] = []
        self.nbytes = 0
        with_mask = dataset.with_mask

        def read(index: int):
            subject = dataset.subjects[index]
            return load_preprocessed(subject, dataset.settings, with_mask and subject.mask is not None,
                                     dataset.cache_dir, dataset.num_classes)

        indices = range(len(dataset))
        if num_threads > 0:
            from concurrent.futures import ThreadPoolExecutor
            pool = ThreadPoolExecutor(max_workers=num_threads)
            items: Iterator = pool.map(read, indices)
        else:
            pool, items = None, map(read, indices)
        try:
            for index, (image, mask, _) in enumerate(tqdm(items, total=len(dataset), desc="data to memory",
                                                          leave=False, disable=not progress, dynamic_ncols=True)):
                image_t = channels_first(torch.from_numpy(np.array(image, dtype=np.float32)))  # a copy of the map
                if dataset.heads:  # multi-task: {head: target}, masks kept as uint8, and the labelled flags
                    targets, labelled = head_targets(dataset.heads, dataset.subjects[index], mask, image.shape[-3:])
                    target_t = {name: t.to(torch.uint8) if t.dim() > 1 else t for name, t in targets.items()}
                    self.labelled.append({name: flag.to(device) for name, flag in labelled.items()})
                elif with_mask:
                    target_t = torch.from_numpy(np.array(mask, dtype=np.uint8))[None]
                else:
                    target_t = torch.tensor([dataset.subjects[index].target], dtype=torch.float32)
                self.nbytes += image_t.nbytes + sum(t.nbytes for t in _values(target_t))
                if budget is not None and self.nbytes > budget:
                    expected = self.nbytes / (index + 1) * len(dataset)
                    raise ResidentMemoryError(
                        f"{len(dataset)} volumes need about {size_text(expected)} in memory, more than the "
                        f"{size_text(budget)} allowed (data.resident_max_fraction of the free memory)")
                self.images.append(image_t.to(device))
                self.targets.append(_to(target_t, device))
                coords = None
                if dataset.patch_size is not None and mask is not None:
                    coords = mask_foreground_voxels(mask).astype(np.int32)  # as the dataset finds them
                self.foreground.append(coords)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Sequence) -> dict:
        """The batch of ``indices`` (ints, or (index, epoch) pairs) as the DataLoader would collate it:
        ``{"image": (B, C, D, H, W) float32, "target": (B, 1) or (B, 1, D, H, W) float32, "subject_id": [str]}``,
        on this store's device."""
        dataset = self.dataset
        images, targets, subject_ids, volumes = [], [], [], []
        for item in indices:
            sample, epoch = item if isinstance(item, tuple) else (item, dataset.epoch)
            index = sample % len(self.images)  # data.samples_per_volume: sample s is volume s % N
            volumes.append(index)
            subject_ids.append(dataset.subjects[index].subject_id)
            image, target = self.images[index], self.targets[index]
            if dataset.patch_size is not None:
                rng = np.random.default_rng([dataset.seed, epoch, sample])  # the dataset's generator
                spatial = tuple(image.shape[1:])
                has_mask = any(t.dim() > 1 for t in _values(target))
                start = training_patch_start(spatial, dataset.patch_size, rng, dataset.foreground_fraction,
                                             has_mask=has_mask, foreground_coords=self.foreground[index])
                image = crop(image, start, dataset.patch_size)
                target = _map(target, lambda t: crop(t, start, dataset.patch_size) if t.dim() > 1 else t)
            images.append(image)
            targets.append(target)
        batch = {"image": torch.stack(images), "subject_id": subject_ids}
        if dataset.heads:
            batch["target"] = {name: torch.stack([t[name] for t in targets]).float() for name, _ in dataset.heads}
            batch["labelled"] = {name: torch.stack([self.labelled[v][name] for v in volumes])
                                 for name, _ in dataset.heads}
        else:
            batch["target"] = torch.stack(targets).float()
        return batch


def _values(target) -> list[torch.Tensor]:
    """The tensors of a target: itself, or a multi-task ``{head: tensor}``'s values."""
    return list(target.values()) if isinstance(target, dict) else [target]


def _map(target, fn):
    return {name: fn(t) for name, t in target.items()} if isinstance(target, dict) else fn(target)


def _to(target, device: torch.device):
    return _map(target, lambda t: t.to(device))


def crop(volume: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``volume[:, start:start + size]`` over the last three axes, zero-padded after the end where the
    volume is smaller (as brain3d.data.patches.extract_patch)."""
    region = volume[(Ellipsis, *(slice(s, s + p) for s, p in zip(start, size)))]
    if tuple(region.shape[-3:]) == tuple(size):
        return region
    out = volume.new_zeros(volume.shape[:-3] + tuple(size))
    out[(Ellipsis, *(slice(0, n) for n in region.shape[-3:]))] = region
    return out


class ResidentLoader:
    """Iterates batches of a :class:`ResidentVolumes` in the order of ``batch_sampler`` (the training
    loader's ResumableBatchSampler, or sequential batches for validation).

    Has what the loop uses of a DataLoader: ``len()`` and ``batch_sampler`` (``set_epoch``; a mid-epoch
    resume, brain3d.data.sampling.iter_from). Indices may come as (index, epoch) pairs (a sampler with an
    epoch set); plain indices take the dataset's epoch. ``to_device``: on CUDA with host-resident data, the
    device each batch is copied to by a background thread (:class:`Prefetcher`).
    """

    def __init__(self, store: ResidentVolumes, batch_sampler, to_device: torch.device | None = None):
        self.store = store
        self.batch_sampler = batch_sampler
        self.to_device = to_device

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict]:
        index_batches = iter(self.batch_sampler)  # now, not at the first next(): iter_from sets its start around iter()
        batches = (self.store.batch(indices) for indices in index_batches)
        if self.to_device is not None and self.to_device.type == "cuda":
            return iter(Prefetcher(batches, self.to_device))
        return batches


class Prefetcher:
    """Runs ``batches`` in a background thread, at most ``depth`` batches ahead of the consumer.

    On CUDA each batch is pinned and copied to ``device`` on a CUDA stream of its own, so the copy overlaps
    the GPU's work on the previous step; the consumer's stream waits for that copy (an event, no host
    synchronisation) and the tensors are marked as used by it (``record_stream``). On other devices the
    thread just prepares batches ahead (tensors moved with ``.to(device)``). Exceptions of the thread are
    raised in the consumer; closing the iterator (or dropping it) stops the thread.
    """

    def __init__(self, batches: Iterator[dict], device: torch.device, depth: int = 2):
        self.batches, self.device, self.depth = batches, device, depth

    def __iter__(self) -> Iterator[dict]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def move(batch: dict):
            if not cuda:
                return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, None
            with torch.cuda.stream(stream):
                moved = {k: v.pin_memory().to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
                event = torch.cuda.Event()
                event.record(stream)
            return moved, event

        def put(item) -> bool:  # False once the consumer has gone
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self.batches:
                    if not put(move(batch)):
                        return
                put((done, None))
            except BaseException as err:  # handed to the consumer
                put((err, None))

        thread = threading.Thread(target=produce, name="brain3d-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item, event = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for value in item.values():
                        if isinstance(value, torch.Tensor):
                            value.record_stream(current)  # its memory is not reused while this stream reads it
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
