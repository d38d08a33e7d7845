"""``data.batch_size=auto``: the largest batch that fits, found by trying training steps on the device.

Three plain functions, shared by ``brain3d-train`` and ``brain3d-plan``:

* :func:`peak_step_bytes` runs one forward + backward pass of a *copy* of the model (``copy.deepcopy``: the
  real model's weights, gradients and BatchNorm running statistics are untouched) on random inputs and
  targets of the task's shapes, under the same autocast and memory layout as training, and returns the
  memory the step needed; torch's RNG state (CPU and CUDA) is restored afterwards, so a run's determinism
  does not depend on whether it probed.
* :func:`largest_fitting_batch` searches batch sizes (doubling, then bisection between the last batch that
  fitted and the first that did not) with any ``try_batch(batch) -> peak bytes | None``.
* :func:`device_memory_budget` is the memory a step may take: a share of the free GPU memory, or of the
  available host RAM on CPU.

What "the memory a step needed" is, measured after the model copy is made (so the real model's weights,
already on the device, are not counted twice): the optimizer state (``optimizer_state_copies`` zero tensors
per parameter, two for Adam/AdamW's moments), the gradients, the activations kept for backward and the
temporary buffers of the kernels. Not counted: the data held resident on the device (the caller subtracts
it from the budget) and the on-device augmentation's temporaries; the unused share of the free memory
(1 - ``data.batch_size_max_fraction``) is the margin for those, for fragmentation and cuDNN workspaces.

How it is measured:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  before the step. A ``torch.cuda.OutOfMemoryError`` means "does not fit" (``None``); the cache is emptied.
* CPU: there is no allocator counter, and the process's peak resident memory (``ru_maxrss``) only grows.
  On Linux the kernel can reset that peak: writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the
  current resident size. So the step runs in this process, with all of torch's threads: freed heap memory
  is first handed back to the kernel (glibc ``malloc_trim``, so a step that reuses it is still counted),
  the peak is reset, and the need is ``VmHWM`` after the backward pass minus ``VmRSS`` before it. The
  resident size counts every thread's allocations, torch's and others' alike, page by page: an honest
  measure of what the process must be given, within a few MB. Where ``clear_refs`` cannot be written
  (a kernel before 4.0, a restricted ``/proc``), the step runs in a forked child process instead: its
  peak starts at its resident size at the fork, and the child sets ``torch.set_num_threads(1)`` (a forked
  process hangs in its first multi-threaded torch op otherwise, see brain3d.data.cache) -- the same
  measure, slower. A CPU allocation failure (``MemoryError``, torch's "can't allocate memory") means
  "does not fit". Above the free RAM the kernel's OOM killer, not an error, would answer, so
  :func:`largest_fitting_batch` does not run a trial that its earlier trials predict to need more than
  ``safe_limit_bytes`` (the free RAM).

Testing aid: ``+data.batch_size_budget_mb=N`` replaces the measured budget by N MB (a simulated device);
tests/test_batch_size.py uses it to check that a smaller budget gives a smaller batch.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import logging
import os
import pickle
import resource
import sys
import traceback
from collections.abc import Callable, Sequence

import torch

from brain3d.data.resident import available_bytes, estimated_bytes
from brain3d.engine import autocast, to_memory_format
from brain3d.errors import ConfigError
from brain3d.tasks import KINDS, TaskSet, single_task

log = logging.getLogger("brain3d.memory_probe")

TASKS = tuple(KINDS)


def _mb(n: float | None) -> str:
    return "does not fit" if n is None else f"{n / 2**20:.0f} MB"


# ---- CPU resident-memory counters (Linux /proc) ----------------------------------------------------------

def _status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Set this process's peak resident size (VmHWM) to its current one; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _can_reset_peak_rss() -> bool:
    return _status_bytes("VmHWM") is not None and _reset_peak_rss()


_libc = None


def _trim_heap() -> None:
    """Hand freed heap memory back to the kernel (glibc ``malloc_trim(0)``); nothing elsewhere."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss_bytes() -> int:
    """The peak resident size: VmHWM, else ru_maxrss (KiB on Linux, bytes on macOS)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    """After a search: the device's peak-memory counter (``torch.cuda`` peak stats, or on Linux the process's
    peak resident size) restarts from now, so a run's ``summary.json`` peak is its training's, not a trial's."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _trim_heap()
        _reset_peak_rss()


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


# ---- one probe step ----------------------------------------------------------------------------------

def random_batch(task_name: str, input_shape: Sequence[int], batch_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``image`` (B, C, D, H, W) float32 and a target of the task's shape: segmentation (B, 1, D, H, W)
    binary, classification (B, 1) 0/1, regression (B, 1) standard-normal floats (all float32, as the loaders
    give them; brain3d.tasks: ``random_target`` of each kind)."""
    if task_name not in KINDS:
        raise ValueError(f"task_name={task_name!r} is not one of {TASKS}")
    image = torch.randn((batch_size, *input_shape), device=device)
    return image, KINDS[task_name].random_target(batch_size, input_shape[1:], device)


def _step(probe: torch.nn.Module, loss_fn: torch.nn.Module, task_name: str | TaskSet, input_shape, batch_size: int,
          device: torch.device, amp_dtype, channels_last: bool, optimizer_state_copies: int) -> None:
    """Optimizer state + forward + backward of ``probe`` (a copy), as engine.train_one_epoch runs them; a
    :class:`~brain3d.tasks.TaskSet` (multi-task) gives every head a random target and sums the heads' losses."""
    state = [torch.zeros_like(p) for p in probe.parameters() if p.requires_grad for _ in range(optimizer_state_copies)]
    tasks = task_name if isinstance(task_name, TaskSet) else TaskSet([single_task(task_name, loss_fn)], multi=False)
    image = torch.randn((batch_size, *input_shape), device=device)
    targets = {t.name: type(t).random_target(batch_size, input_shape[1:], device) for t in tasks}
    with autocast(device, amp_dtype):
        logits = probe(to_memory_format(image, channels_last))
    loss, _ = tasks.loss(logits, targets, {name: None for name in targets})  # float32: the losses cast their inputs
    loss.backward()
    del state, image, targets, logits, loss


def _forked_step_bytes(run_step: Callable[[], None]) -> int | None:
    """``run_step`` in a forked child; its peak resident growth over its size at the fork (None: no memory)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers
        os.close(read_end)
        try:
            torch.set_num_threads(1)  # a forked process hangs in its first multi-threaded torch op otherwise
            before = _peak_rss_bytes()
            run_step()
            result = ("peak", _peak_rss_bytes() - before)
        except BaseException as err:  # noqa: BLE001 -- everything goes back to the parent
            result = ("oom", None) if _is_out_of_memory(err) else ("error", traceback.format_exc())
        try:
            os.write(write_end, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not chunks:  # killed (the kernel's OOM killer sends SIGKILL) before it could answer
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9:
            return None
        raise RuntimeError(f"the memory probe's child process ended without an answer (wait status {status})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise RuntimeError(f"the memory probe's step failed in its child process:\n{value}")
    return value


def peak_step_bytes(model: torch.nn.Module, loss_fn: torch.nn.Module, task_name: str, input_shape: Sequence[int],
                    batch_size: int, device: torch.device | str, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, optimizer_state_copies: int = 2) -> int | None:
    """Bytes one training step of ``batch_size`` inputs needs on ``device``; None when it does not fit.

    A copy of ``model`` (already on ``device``) is put in train mode and runs forward and backward on random
    inputs of ``(batch_size, *input_shape)`` with targets of the task's shape (:func:`random_batch`), under
    ``torch.autocast(amp_dtype)`` and, with ``channels_last``, in the (N, D, H, W, C) layout, as
    brain3d.engine trains. No optimizer steps; its state is stood in for by ``optimizer_state_copies`` zero
    tensors per parameter. The module docstring says what is measured and how, on CUDA and on CPU.

    Args:
        model: the model to copy; it is not changed (weights, gradients, BatchNorm statistics, mode).
        loss_fn: the run's loss (logits, target) -> scalar.
        task_name: classification | regression | segmentation (the key of the model's output dict), or a
            multi-task run's :class:`~brain3d.tasks.TaskSet` (every head gets a target; their losses summed).
        input_shape: one input, (C, D, H, W): (1, *data.patch_size) or (1, *preprocess.shape).
        batch_size: >= 1.
        device: where to measure (where ``model`` lives).
        amp_dtype: the autocast dtype, None for fp32. Defaults to None.
        channels_last: the trainer.channels_last layout. Defaults to False.
        optimizer_state_copies: tensors of each parameter's size the optimizer keeps (AdamW 2, SGD with
            momentum 1). Defaults to 2.

    Returns:
        The peak bytes of the step above what was allocated before it, or None when it ran out of memory.

    Raises:
        ValueError: ``batch_size`` < 1, ``input_shape`` not (C, D, H, W), or an unknown ``task_name``.

    Example::

        need = peak_step_bytes(model, loss_fn, "segmentation", (1, 96, 96, 96), 2, torch.device("cuda"))
    """
    device = torch.device(device)
    input_shape = _checked_probe_shape(task_name, input_shape, batch_size)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    probe = None
    try:
        probe = copy.deepcopy(model)
        probe.train()

        def run_step() -> None:  # reads ``probe`` when called: setting it to None below frees the copy
            _step(probe, loss_fn, task_name, input_shape, batch_size, device, amp_dtype, channels_last,
                  optimizer_state_copies)

        if device.type == "cuda":
            return _cuda_step_bytes(run_step, device)
        return _cpu_step_bytes(run_step)
    finally:
        probe = None  # the copy's memory is freed before the next trial
        _restore_after_probe(device, cpu_rng, cuda_rng)


def _checked_probe_shape(task_name: str, input_shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    """:func:`peak_step_bytes`'s argument checks; returns ``input_shape`` as a tuple of ints (C, D, H, W)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (C, D, H, W), got {tuple(input_shape)}")
    if not isinstance(task_name, TaskSet) and task_name not in KINDS:
        raise ValueError(f"task_name={task_name!r} is not one of {TASKS}")
    return tuple(int(s) for s in input_shape)


def _cuda_step_bytes(run_step: Callable[[], None], device: torch.device) -> int | None:
    """CUDA: the step's peak allocation above what was allocated before it; None on out of memory."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run_step()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        return None
    return int(torch.cuda.max_memory_allocated(device) - before)


def _cpu_step_bytes(run_step: Callable[[], None]) -> int | None:
    """CPU: peak resident growth over the step (VmHWM after it - VmRSS before); None on out of memory.

    Runs in this process after resetting the peak, or in a forked child where the peak cannot be reset.
    """
    if not _can_reset_peak_rss():
        return _forked_step_bytes(run_step)
    _trim_heap()  # freed heap pages back to the kernel: a step reusing them raises the resident size too
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    try:
        run_step()
    except (MemoryError, RuntimeError) as err:
        if _is_out_of_memory(err):
            return None
        raise
    return int(_status_bytes("VmHWM") - before)


def _restore_after_probe(device: torch.device, cpu_rng: torch.Tensor, cuda_rng: torch.Tensor | None) -> None:
    """Put torch's RNG states back and hand the probe's freed memory back (CUDA cache, or the heap on CPU)."""
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
        torch.cuda.empty_cache()
    else:
        _trim_heap()


# ---- the search --------------------------------------------------------------------------------------

def _predicted_bytes(trials: list[tuple[int, int | None]], batch: int) -> int | None:
    """The need of ``batch`` extrapolated from the measured trials: linear through the two largest smaller
    batches, proportional from one; None without any."""
    measured = sorted((b, peak) for b, peak in trials if peak is not None and b < batch)
    if not measured:
        return None
    if len(measured) == 1:
        b, peak = measured[0]
        return int(peak * batch / b)
    (b1, p1), (b2, p2) = measured[-2:]
    slope = max((p2 - p1) / (b2 - b1), 0.0)
    return int(p2 + slope * (batch - b2))


def largest_fitting_batch(try_batch: Callable[[int], int | None], budget_bytes: int, start: int = 1,
                          maximum: int = 64,
                          safe_limit_bytes: int | None = None) -> tuple[int, list[tuple[int, int | None]]]:
    """The largest batch size in [start, maximum] whose measured need is at most ``budget_bytes``.

    Batch sizes are tried doubling from ``start`` (start, 2 start, 4 start, ..., ``maximum``) until one does
    not fit, then by bisection between the last that fitted and the first that did not: about
    2 log2(maximum / start) trials. A step's memory grows with the batch, so the answer is the largest that
    fits (not necessarily a power of two).

    Args:
        try_batch: batch size -> the bytes a step needs, or None when it does not fit (out of memory), e.g.
            ``lambda b: peak_step_bytes(model, loss_fn, task, shape, b, device)``.
        budget_bytes: the most a step may need (:func:`device_memory_budget`).
        start: the smallest batch. Defaults to 1.
        maximum: the largest batch tried. Defaults to 64.
        safe_limit_bytes: a batch whose need, extrapolated from the trials so far, exceeds this is not
            run and counts as not fitting (CPU: beyond the free RAM the OOM killer would end the process
            instead of an error). Defaults to None (every trial runs).

    Returns:
        ``(batch, trials)``: the batch, and every ``(batch size, bytes or None)`` tried, in order.

    Raises:
        ValueError: ``start`` < 1 or ``maximum`` < ``start``.
        ConfigError: even ``start`` does not fit; names the budget and the need.

    Example::

        >>> largest_fitting_batch(lambda b: (100 + 30 * b) * 2**20, 400 * 2**20)[0]
        10
    """
    if start < 1 or maximum < start:
        raise ValueError(f"need 1 <= start <= maximum, got start={start}, maximum={maximum}")
    trials: list[tuple[int, int | None]] = []

    def fits(batch: int) -> bool:
        predicted = _predicted_bytes(trials, batch)
        skip = safe_limit_bytes is not None and predicted is not None and predicted > safe_limit_bytes
        peak = None if skip else try_batch(batch)
        trials.append((batch, None if peak is None else int(peak)))
        return peak is not None and peak <= budget_bytes

    if not fits(start):
        need = trials[0][1]
        need_text = f"needs {_mb(need)}" if need is not None else "ran out of memory"
        raise ConfigError(
            f"data.batch_size=auto: even a batch of {start} {need_text}, more than the {_mb(budget_bytes)} budget; "
            "use a smaller data.shape (or data.patch_size for segmentation), trainer.grad_checkpointing=true, "
            "a larger data.batch_size_max_fraction, or a fixed data.batch_size")
    good, bad = start, None
    while good < maximum:
        batch = min(good * 2, maximum)
        if not fits(batch):
            bad = batch
            break
        good = batch
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, trials


def device_memory_budget(device: torch.device | str, fraction: float, reserved_bytes: int = 0) -> tuple[int, str]:
    """``(bytes, reason)``: ``fraction`` of the free memory of ``device`` -- on CUDA ``torch.cuda.mem_get_info``'s
    free bytes, on CPU the available RAM (``MemAvailable``, brain3d.data.resident.available_bytes) -- after
    ``reserved_bytes`` (data that will be held there) are set aside.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    device = torch.device(device)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.batch_size_max_fraction must be in (0, 1], got {fraction}")
    free = available_bytes(device)
    budget = int(max(free - reserved_bytes, 0) * fraction)
    label = "free GPU memory" if device.type == "cuda" else "available RAM"
    reason = f"{fraction:g} of the {_mb(free)} of {label}"
    if reserved_bytes:
        reason += f" less {_mb(reserved_bytes)} for the resident data"
    return budget, reason


# ---- brain3d-train's data.batch_size --------------------------------------------------------------------

def resident_reserve(data_cfg, device: torch.device, datasets: Sequence) -> int:
    """Bytes the training data will take on ``device`` when ``data.resident`` will hold them there (decided
    as brain3d.data.resident.residence_candidates does, before the loaders are built); 0 otherwise."""
    requested = str(data_cfg.get("resident", "auto"))
    on_device = ("auto", "device") if device.type == "cuda" else ("auto", "device", "host")
    needed = estimated_bytes(datasets)
    if requested not in on_device or not needed:
        return 0
    fraction = float(data_cfg.get("resident_max_fraction", 0.5))
    return needed if needed <= available_bytes(device) * fraction else 0


def resolve_batch_size(data_cfg, model: torch.nn.Module, loss_fn: torch.nn.Module, task_name: str,
                       input_shape: Sequence[int], device: torch.device, amp_dtype, channels_last: bool,
                       num_train: int, datasets: Sequence = ()) -> dict:
    """``data.batch_size``: a number as given (``mode: fixed``), or for ``auto`` the largest batch that fits
    ``data.batch_size_max_fraction`` (default 0.8) of the device's free memory, at most ``data.batch_size_max``
    (default 32) and ``num_train`` (the training volumes of this process). Logs the choice and returns the
    record summary.json keeps: ``{"value", "mode", "peak_memory_mb", "budget_mb", "budget_reason", "trials"}``.

    Raises:
        ConfigError: a value that is neither a positive integer nor ``auto``; a batch of 1 does not fit.
    """
    value = data_cfg.batch_size
    if str(value) != "auto":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.batch_size={value!r} is not a positive integer or auto")
        return {"value": int(value), "mode": "fixed", "peak_memory_mb": None, "budget_mb": None,
                "budget_reason": None, "trials": []}
    maximum = data_cfg.get("batch_size_max", 32)
    if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1:
        raise ConfigError(f"data.batch_size_max={maximum!r} is not a positive integer")
    maximum = max(1, min(maximum, num_train))
    fraction = float(data_cfg.get("batch_size_max_fraction", 0.8))
    # A warm-up step first: the process's first step makes one-time allocations that stay (thread pools, oneDNN /
    # cuDNN / cuBLAS workspaces); the budget is what is free after them, and the trials then measure steps alone.
    step_bytes = functools.partial(peak_step_bytes, model, loss_fn, task_name, input_shape, device=device,
                                   amp_dtype=amp_dtype, channels_last=channels_last)
    step_bytes(batch_size=1)
    reserved = resident_reserve(data_cfg, device, datasets)
    try:
        budget, reason = device_memory_budget(device, fraction, reserved)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    simulated = data_cfg.get("batch_size_budget_mb")
    if simulated is not None:  # testing aid: a simulated device
        budget, reason = int(float(simulated) * 2**20), f"data.batch_size_budget_mb={simulated} (simulated)"
    # CPU: a trial predicted to need more than the free RAM is not run (the OOM killer would answer it)
    safe_limit = None if device.type == "cuda" else max(available_bytes(device) - reserved, 0)
    batch, trials = largest_fitting_batch(lambda b: step_bytes(batch_size=b), budget, start=1, maximum=maximum,
                                          safe_limit_bytes=safe_limit)
    reset_peak_memory(device)
    peak = dict(trials)[batch]
    tried = ", ".join(f"{b}: {_mb(p)}" for b, p in trials)
    log.info("data.batch_size=auto: %d (peak %s of a %s budget, %s; at most %d; tried %s)", batch, _mb(peak),
             _mb(budget), reason, maximum, tried)
    return {"value": batch, "mode": "auto", "peak_memory_mb": round(peak / 2**20, 1),
            "budget_mb": round(budget / 2**20, 1), "budget_reason": reason,
            "trials": [[b, None if p is None else round(p / 2**20, 1)] for b, p in trials]}
