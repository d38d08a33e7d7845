"""The loop: ``train_one_epoch`` and ``evaluate``, with mixed precision, accumulation and clipping.

Both return a dict of plain floats; ``brain3d.train`` logs them. Losses and metrics are computed in
float32 even under autocast (the loss modules cast their inputs), and heads return logits: sigmoid is
applied here only where probabilities are needed (metrics, previews).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from brain3d import report
from brain3d.data.sampling import iter_from
from brain3d.inference import flip_combinations
from brain3d.sliding_window import sliding_window_inference
from brain3d.tasks import Task, TaskSet

log = logging.getLogger("brain3d.engine")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message names the epoch, step and the batch's subjects."""


@dataclass
class EpochProgress:
    """How far an epoch has got: batches done and the running sums behind its train loss and throughput.

    A mid-epoch checkpoint stores it (:meth:`to_dict`), so a resumed epoch starts at the next batch and
    reports the same train loss as an uninterrupted one.

    The losses of the latest steps stay on the device (:meth:`add_loss`) until :meth:`settle` reads them
    back in one host synchronisation, checks them and adds them to ``loss_sum``: a ``.item()`` every step
    would make the host wait for the device each step, and the GPU then idles while the host prepares
    the next one. Read ``loss_sum`` only after ``settle()`` (``to_dict()`` settles).
    """

    batches_done: int = 0
    loss_sum: float = 0.0  # sum over volumes of the per-batch mean loss (settled steps)
    volumes: int = 0
    data_wait: float = 0.0  # seconds spent waiting for the loader
    seconds: float = 0.0  # seconds of training before this process (a resumed epoch)
    # multi-task: {head: [sum over its labelled samples of its loss, labelled samples]} (settled steps)
    head_sums: dict = field(default_factory=dict)
    # not stored: (step, subject ids, volumes, loss tensor) of the steps not yet read back, and where we are
    pending: list = field(default_factory=list, repr=False, compare=False)
    epoch: int = field(default=0, repr=False, compare=False)
    num_batches: int = field(default=0, repr=False, compare=False)
    last_loss: float = field(default=float("nan"), repr=False, compare=False)

    def add_loss(self, step: int, subject_ids, loss: torch.Tensor, volumes: int,
                 head_terms: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Record step ``step``'s (0-based) mean loss over ``volumes`` volumes, left on the device; a multi-task
        step also each head's ``(loss, labelled samples)``."""
        values = [loss.detach().float().reshape(())]
        for name, (head_loss, count) in (head_terms or {}).items():
            count = torch.as_tensor(count, dtype=torch.float32, device=loss.device)
            values += [head_loss.detach().float() * count, count]
        self.pending.append((step, list(subject_ids), volumes, list(head_terms or ()), torch.stack(values)))

    def settle(self) -> None:
        """Read the pending losses back (one synchronisation), add them to ``loss_sum`` in step order.

        Raises:
            NonFiniteLossError: at the first NaN/Inf loss, naming its epoch, step and subjects.
        """
        if not self.pending:
            return
        flat = torch.cat([values for *_, values in self.pending]).tolist()  # the only sync
        offset = 0
        for step, subject_ids, volumes, heads, values in self.pending:
            row, offset = flat[offset:offset + len(values)], offset + len(values)
            value = row[0]  # the step's loss, then (multi-task) each head's (loss x labelled, labelled)
            if not math.isfinite(value):
                self.pending.clear()
                raise NonFiniteLossError(
                    f"non-finite loss ({value}) at epoch {self.epoch}, step {step + 1}/{self.num_batches}; "
                    f"subjects in the batch: {subject_ids}. Check these images, or lower the "
                    f"learning rate / use trainer.precision=fp32."
                )
            self.loss_sum += value * volumes
            self.last_loss = value
            for k, name in enumerate(heads):
                total = self.head_sums.setdefault(name, [0.0, 0.0])
                total[0] += row[1 + 2 * k]
                total[1] += row[2 + 2 * k]
        self.pending.clear()

    def to_dict(self) -> dict:
        self.settle()
        values = {name: getattr(self, name) for name in ("batches_done", "loss_sum", "volumes", "data_wait", "seconds")}
        return {**values, "head_sums": {name: list(sums) for name, sums in self.head_sums.items()}}

    @classmethod
    def from_dict(cls, values: dict | None) -> "EpochProgress":
        return cls(**values) if values else cls()


def to_memory_format(image: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``trainer.channels_last``: inputs in the same (N, D, H, W, C) memory layout as the model's weights."""
    return image.contiguous(memory_format=torch.channels_last_3d) if channels_last else image


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast context for ``amp_dtype`` (bf16/fp16), or a no-op for fp32 (None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    task: TaskSet | Task,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int,
    accumulate_grad_batches: int = 1,
    gradient_clip_norm: float | None = None,
    progress: bool = True,
    augment: torch.nn.Module | None = None,
    augment_seed: int = 0,
    progress_state: EpochProgress | None = None,
    after_optimizer_step: Callable[[EpochProgress], bool] | None = None,
    channels_last: bool = False,
    sync_every: int | None = None,
    log_every_s: float | None = None,
) -> dict:
    """One pass over ``loader``; returns ``{"loss", "lr", "volumes_per_second", "data_wait_fraction"}`` (the
    share of the epoch spent waiting for the loader) and ``"stopped"`` / ``"position"`` (an :class:`EpochProgress`).

    ``task``: the run's heads (a :class:`~brain3d.tasks.TaskSet`, or one Task trained with ``loss_fn``).
    Gradients of ``accumulate_grad_batches`` micro-batches are summed before each optimizer step (the loss is
    divided so the sum is a mean); the scheduler steps once per optimizer step. ``augment`` (a
    :class:`brain3d.augment.BatchAugment`) runs on the device on the whole batch, with a generator seeded from
    ``(augment_seed, epoch, step)`` so a resumed run sees the same augmentations.

    Resuming and stopping mid-epoch: ``progress_state`` (from a checkpoint) starts the epoch at batch
    ``progress_state.batches_done`` (a ResumableBatchSampler skips the done batches without loading them);
    ``after_optimizer_step(progress)`` is called after every optimizer step (no gradients pending, so the state
    is checkpointable) and returning True ends the epoch there with ``"stopped": True``. The step losses stay
    on the device and are read back (:meth:`EpochProgress.settle`) every ``sync_every`` steps (None: every step
    on CPU, where it costs nothing, every 50 on CUDA). ``log_every_s``: a plain progress line every that many
    seconds (``trainer.progress=lines``) instead of a tqdm bar.

    Raises:
        NonFiniteLossError: a NaN/Inf loss, naming the epoch, step and subject ids of the batch.
    """
    tasks = as_task_set(task, loss_fn)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    state = EpochProgress(**(progress_state.to_dict() if progress_state else {}))
    first_step = state.batches_done
    num_batches = len(loader)  # the whole epoch, also when resuming part-way
    state.epoch, state.num_batches = epoch, num_batches
    sync_every = sync_every or (1 if device.type == "cpu" else 50)  # CPU ops are synchronous: a read-back is free
    start = time.perf_counter() - state.seconds  # throughput counts the time of the earlier process too
    batches = iter_from(loader, first_step)  # skips the done batches without loading them where it can
    stopped = False
    loop_start = last_line = time.perf_counter()  # this process's part of the epoch (for the time left)
    bar = tqdm(range(first_step, num_batches), desc=f"epoch {epoch} train", leave=False, disable=not progress,
               dynamic_ncols=True, initial=first_step, total=num_batches)
    for step in bar:
        wait_start = time.perf_counter()
        batch = next(batches)  # the time spent here is time the model waits for data
        state.data_wait += time.perf_counter() - wait_start
        steps_optimizer = (step + 1) % accumulate_grad_batches == 0 or step + 1 == num_batches
        generator = torch.Generator().manual_seed(augment_seed * 1_000_003 + epoch * 100_003 + step)
        loss, image, head_terms = _forward_backward(model, batch, tasks, device, amp_dtype, augment, generator,
                                                    scaler, accumulate_grad_batches, steps_optimizer, channels_last)
        state.add_loss(step, batch["subject_id"], loss, image.shape[0], head_terms)  # on the device until settled
        state.volumes += image.shape[0]
        state.batches_done = step + 1
        if (step + 1 - first_step) % sync_every == 0:
            state.settle()  # raises NonFiniteLossError naming the first bad step and its subjects
            bar.set_postfix(loss=f"{state.last_loss:.4f}", refresh=False,
                            vol_s=f"{state.volumes / max(time.perf_counter() - start, 1e-9):.2f}")
        if log_every_s and time.perf_counter() - last_line >= log_every_s:
            last_line = time.perf_counter()
            seconds_per_batch = (last_line - loop_start) / (step + 1 - first_step)
            log_progress_line(state, epoch, last_line - start, seconds_per_batch * (num_batches - step - 1))
        if steps_optimizer:
            _optimizer_step(model, optimizer, scheduler, scaler, gradient_clip_norm)
            state.seconds = time.perf_counter() - start
            if after_optimizer_step is not None and after_optimizer_step(state) and step + 1 < num_batches:
                stopped = True
                break
    bar.close()
    return _epoch_stats(state, optimizer, device, start, stopped)


def _epoch_stats(state: EpochProgress, optimizer: torch.optim.Optimizer, device: torch.device, start: float,
                 stopped: bool) -> dict:
    """The epoch's figures once every pending loss is read back (and CUDA's queue has drained)."""
    state.settle()
    if device.type == "cuda":
        torch.cuda.synchronize()
    state.seconds = time.perf_counter() - start
    return {
        "loss": state.loss_sum / max(state.volumes, 1),
        # multi-task: each head's mean loss over its labelled training samples (NaN: none this epoch)
        "head_losses": {name: total / count if count else float("nan")
                        for name, (total, count) in state.head_sums.items()},
        "lr": optimizer.param_groups[0]["lr"],
        "volumes_per_second": state.volumes / max(state.seconds, 1e-9),
        "data_wait_fraction": state.data_wait / max(state.seconds, 1e-9),
        "stopped": stopped,
        "position": state,
    }


def _forward_backward(model: torch.nn.Module, batch: dict, tasks: TaskSet, device: torch.device, amp_dtype,
                      augment: torch.nn.Module | None, generator: torch.Generator, scaler: torch.amp.GradScaler,
                      accumulate_grad_batches: int, steps_optimizer: bool,
                      channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """One micro-batch: to the device, augmented (a mask moves with the image; scalar targets do not), forward
    under autocast, the heads' losses (float32), backward of loss / accumulate_grad_batches. Returns (the
    loss, left on the device; the image batch; multi-task: {head: (its loss, its labelled samples)})."""
    image = batch["image"].to(device, non_blocking=True)  # (B, 1, D, H, W); a no-op for device-resident data
    targets, labelled = tasks.targets(to_device(batch, device))  # {head: (B, 1) or (B, 1, D, H, W)}
    if augment is not None:
        mask_task = tasks.mask_task
        image, mask = augment(image, targets[mask_task.name] if mask_task else None, generator=generator,
                              num_classes=tasks.mask_classes)  # >= 2: a label map
        if mask_task is not None:
            targets[mask_task.name] = mask
    # DistributedDataParallel: gradients are all-reduced only on the micro-batch before an optimizer step.
    sync = model.no_sync() if hasattr(model, "no_sync") and not steps_optimizer else contextlib.nullcontext()
    with sync:
        with autocast(device, amp_dtype):
            logits = model(to_memory_format(image, channels_last))  # {head: logits}
        loss, per_head = tasks.loss(logits, targets, labelled)  # float32: the losses cast their inputs
        scaler.scale(loss / accumulate_grad_batches).backward()
    # multi-task: each head's loss with its labelled samples in the batch, for its own train loss
    head_terms = {name: (value, labelled[name].sum()) for name, value in per_head.items()} if tasks.multi else None
    return loss, image, head_terms


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, gradient_clip_norm: float | None) -> None:
    """Clip (the true gradients, not the fp16-scaled ones), step, update the scaler, zero, step the schedule."""
    if gradient_clip_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), gradient_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def log_progress_line(state: EpochProgress, epoch: int, elapsed_s: float, left_s: float) -> None:
    """``epoch 3: batch 120/400, train_loss=0.4512, 2.1 vol/s, about 2m13s left in the epoch``."""
    state.settle()  # one read-back of the pending losses (every log_every_s seconds, so it costs nothing)
    left = int(left_s)
    log.info("epoch %d: batch %d/%d, train_loss=%.4g, %.2f vol/s, about %dm%02ds left in the epoch", epoch,
             state.batches_done, state.num_batches, state.loss_sum / max(state.volumes, 1),
             state.volumes / max(elapsed_s, 1e-9), left // 60, left % 60)


def as_task_set(task: TaskSet | Task, loss_fn: torch.nn.Module | None) -> TaskSet:
    """The engine's heads: a :class:`~brain3d.tasks.TaskSet`, or one :class:`~brain3d.tasks.Task` (a single
    head, trained with ``loss_fn`` unless it has its own)."""
    if isinstance(task, TaskSet):
        for head in task:
            head.loss_fn = head.loss_fn or loss_fn
        return task
    task.loss_fn = task.loss_fn or loss_fn
    return TaskSet([task], multi=False)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's ``target`` (a tensor, or ``{head: tensor}`` with ``labelled``) on ``device``."""
    moved = dict(batch)
    for key in ("target", "labelled"):
        value = batch.get(key)
        if isinstance(value, dict):
            moved[key] = {name: v.to(device, non_blocking=True) for name, v in value.items()}
        elif value is not None:
            moved[key] = value.to(device, non_blocking=True)
    return moved


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    loss_fn: torch.nn.Module | None,
    task: TaskSet | Task,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int = 0,
    progress: bool = True,
    sliding_window: dict | None = None,
    channels_last: bool = False,
    gather: Callable[[dict], list[dict]] | None = None,
    collect_cases: bool = False,
    max_cases: int | None = None,
    flip_axes: Sequence[int] = (),
) -> tuple[dict[str, float], dict]:
    """Validation loss and every head's metrics over ``loader``.

    Returns:
        (metrics, outputs): metrics holds "loss" and each head's metrics under ``TaskSet.record_key`` without
        the ``val_`` prefix (one head: "auc", "mae", "dice"...; multi-task: "sex_auc", "age_mae"...):
        classification auc, accuracy, balanced_accuracy; regression mae, rmse, pearson_r in target units;
        segmentation mean per-subject dice and iou at threshold 0.5; each over the subjects labelled for
        that head. outputs holds, per head name, ``{"predictions", "targets"}`` (N,) arrays (logits for
        classification, values for regression) or, for segmentation, ``{"preview"}``: the first subject's
        "image", "target" and "probability" (D, H, W) arrays for the TensorBoard overlay; and the same
        entries of the first head at the top level (the single-task layout).

    ``sliding_window`` (segmentation after patch training): ``{"patch_size", "overlap", "batch_size",
    "accumulate_device"}``; each whole volume (batch of one) is predicted by Gaussian-weighted sliding
    windows. Here the windows' logits are averaged, so the validation loss is computed on logits as in
    training (brain3d-predict averages probabilities instead).

    ``gather`` (distributed validation; None in a single process): each rank's ``loader`` holds its shard of
    the validation subjects, subjects ``r, r+W, r+2W, ...`` on rank ``r`` of ``W``; ``gather(part)`` returns
    every rank's ``part`` in rank order (e.g. brain3d.distributed.all_gather_object). The per-subject outputs
    are put back in the original subject order and the metrics computed on the whole, as one process would.

    ``collect_cases`` (report.html): also return ``outputs["cases"]``, the ``max_cases`` worst subjects (None:
    all) of the first head (the segmentation head in a multi-task run), worst first (brain3d.tasks: each
    kind's ``collect`` says what a case holds: small 2-D slices, never volumes, so memory stays bounded);
    ``outputs["cases_task"]``, that head's kind; ``outputs["cases_total"]``, the subjects seen. Distributed:
    each rank collects its own subjects only (the caller on rank 0 shows rank 0's share).

    ``flip_axes`` (trainer.val_flip_axes): spatial axes (0: left-right on the RAS grid) whose flips are
    averaged: each volume (or window) is also run mirrored along every combination of them and the logits,
    voxel-wise ones flipped back, are averaged before the loss and the metrics (brain3d-predict averages the
    same flips' probabilities; :func:`brain3d.inference.predict_heads`).
    """
    tasks = as_task_set(task, loss_fn)
    model.eval()
    total_loss, total_volumes = 0.0, 0
    collected = {head.name: head.new_outputs() for head in tasks}
    shown = tasks.mask_task or next(iter(tasks))  # the head whose worst subjects report.html pictures
    worst = report.WorstCases(max_cases) if collect_cases else None
    flips = flip_combinations(flip_axes)
    for batch in tqdm(loader, desc=f"epoch {epoch} val", leave=False, disable=not progress, dynamic_ncols=True):
        image = batch["image"].to(device, non_blocking=True)
        targets, labelled = tasks.targets(to_device(batch, device))
        if sliding_window is not None:  # one segmentation head (patch training is refused for other tasks)
            name = shown.name
            logits = {name: sliding_window_inference(
                image, lambda window: _forward(model, window, device, amp_dtype, channels_last, flips)[name],
                sliding_window["patch_size"], overlap=sliding_window["overlap"],
                batch_size=sliding_window["batch_size"],
                accumulate_device=sliding_window.get("accumulate_device") or device,
            )}
        else:
            logits = _forward(model, image, device, amp_dtype, channels_last, flips)
        total_loss += tasks.loss(logits, targets, labelled)[0].item() * image.shape[0]
        total_volumes += image.shape[0]
        for head in tasks:
            head.collect(collected[head.name], logits[head.name], targets[head.name], labelled[head.name], batch,
                         image, worst if head is shown else None)
    parts = {head.name: head.parts(collected[head.name]) for head in tasks}
    if gather is not None:
        total_loss, total_volumes, parts = _gather_parts(gather, total_loss, total_volumes, parts)
    results = {"loss": total_loss / max(total_volumes, 1)}
    outputs: dict = {}
    for head in tasks:
        for metric, value in head.metrics(parts[head.name]).items():
            results[tasks.record_key(head.name, metric)[len("val_"):]] = value
        outputs[head.name] = {"preview": collected[head.name]["preview"]} if head.reads_mask else parts[head.name]
    outputs.update(outputs[next(iter(tasks)).name])  # single task: outputs["predictions"] / ["preview"]
    if worst is not None:
        outputs.update({"cases": worst.sorted(), "cases_total": worst.total, "cases_task": shown.kind})
    return results, outputs


def _forward(model: torch.nn.Module, image: torch.Tensor, device: torch.device, amp_dtype,
             channels_last: bool = False, flips: Sequence[tuple[int, ...]] = ((),)) -> dict[str, torch.Tensor]:
    """The model's logits for ``image``, averaged over ``flips`` (dims of the (B, C, D, H, W) batch; ``()`` is
    the volume as it is): voxel-wise (5-D) logits are flipped back first. One flip returns the logits as the
    model gives them (dtype included); several give their float32 mean."""
    if len(flips) == 1 and not flips[0]:
        with autocast(device, amp_dtype):
            return model(to_memory_format(image, channels_last))
    total: dict[str, torch.Tensor] = {}
    for dims in flips:
        with autocast(device, amp_dtype):
            outputs = model(to_memory_format(torch.flip(image, dims) if dims else image, channels_last))
        for name, out in outputs.items():
            out = out.float()
            if dims and out.dim() == 5:
                out = torch.flip(out, dims)
            total[name] = out if name not in total else total[name] + out
    return {name: value / len(flips) for name, value in total.items()}


def _gather_parts(gather: Callable[[dict], list[dict]], total_loss: float, total_volumes: int,
                  parts: dict[str, dict]) -> tuple[float, int, dict[str, dict]]:
    """Distributed validation: every rank's loss sums and per-subject arrays, put back in subject order."""
    gathered = gather({"loss": total_loss, "volumes": total_volumes, "parts": parts})
    merged = {name: {key: _interleave([p["parts"][name][key] for p in gathered]) for key in arrays}
              for name, arrays in parts.items()}
    return sum(p["loss"] for p in gathered), sum(p["volumes"] for p in gathered), merged


def _interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Undo a round-robin shard: rank r of W held items r, r+W, ...; returns them in the original order."""
    total = sum(len(p) for p in parts)
    out = np.empty((total, *parts[0].shape[1:]), dtype=np.result_type(*parts))  # per-subject rows of any width
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out
