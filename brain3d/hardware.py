"""Device, precision and speed defaults: what ``trainer.device``, ``trainer.precision``,
``trainer.channels_last`` and ``trainer.cudnn_benchmark`` mean on the machine at hand.

``precision=auto`` is bf16 wherever the hardware computes in bf16 natively: a CUDA GPU that supports it
(else fp16 with a GradScaler), and a CPU with bf16 instructions (x86 ``avx512_bf16`` or ``amx_bf16``,
Arm ``bf16``/FEAT_BF16). On such a CPU the seed networks train about 1.8x faster under bf16 autocast than
in fp32 (scripts/benchmark_train.py, README "Performance"); on a CPU without them bf16 is emulated and
slower, so auto stays fp32. Every choice comes back with the reason, which the run logs.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch

from brain3d.errors import ConfigError

log = logging.getLogger("brain3d.hardware")

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# CPU feature flags (Linux /proc/cpuinfo names) that mean bf16 arithmetic in hardware.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: auto (cuda when available, else cpu), cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
    return torch.device(name)


@functools.lru_cache(maxsize=4)
def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The CPU's native-bf16 feature flags (e.g. ``("avx512_bf16",)``); empty when it has none or the
    platform does not say. Linux: the ``flags``/``Features`` lines of /proc/cpuinfo; macOS: sysctl."""
    if cpuinfo.is_file():
        try:
            text = cpuinfo.read_text(errors="replace")
        except OSError:
            return ()
        flags: set[str] = set()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
        return tuple(f for f in CPU_BF16_FLAGS if f in flags)
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ()
        return ("FEAT_BF16",) if out == "1" else ()
    return ()


def resolve_precision(name: str, device: torch.device) -> tuple[str, torch.dtype | None, str]:
    """``trainer.precision`` -> ``(name, autocast dtype or None for fp32, reason)``.

    auto: bf16 on a CUDA GPU that supports it, else fp16 (trained with a GradScaler); on CPU bf16 when the
    CPU has native bf16 instructions (:func:`cpu_bf16_flags`), else fp32.
    """
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                name, reason = "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
            else:
                name, reason = "fp16", f"auto: {torch.cuda.get_device_name(device)} has no bf16; fp16 with loss scaling"
        else:
            flags = cpu_bf16_flags()
            if flags:
                name, reason = "bf16", f"auto: this CPU has native bf16 instructions ({', '.join(flags)})"
            else:
                name, reason = "fp32", ("auto: this CPU has no native bf16 instructions (avx512_bf16, amx_bf16 or "
                                        "Arm bf16), where bf16 would be emulated and slower")
    else:
        reason = "set by trainer.precision"
    if name not in PRECISIONS:
        raise ConfigError(f"trainer.precision={name!r} is not one of auto, {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type == "cpu":
        log.warning("trainer.precision=fp16 on a CPU: CPUs have no fast fp16 convolutions, so this runs slower than "
                    "fp32; use trainer.precision=auto (bf16 where the CPU has bf16 instructions, else fp32)")
    return name, PRECISIONS[name], reason


def resolve_channels_last(value) -> bool:
    """``trainer.channels_last`` (default true): model and inputs in the ``channels_last_3d`` (N, D, H, W, C)
    memory format. Faster on both kinds of device measured: cuDNN's 3-D convolutions on tensor-core GPUs
    (117 -> 163 vol/s for the seed segmentation model at 128^3 on an H100), and oneDNN's on a 2-core AVX512-BF16
    CPU (seed segmentation model at 64^3: 1.25x at width 1, 1.3x (bf16) to 2x (fp32) at width 0.25;
    README "Performance")."""
    if isinstance(value, bool):
        return value
    raise ConfigError(f"trainer.channels_last={value!r} is not one of true, false")


def configure_backends(device: torch.device, cudnn_benchmark: bool) -> None:
    """cuDNN autotuning (``trainer.cudnn_benchmark``): with fixed input shapes, as brain3d trains, the
    first steps time the convolution algorithms and the rest use the fastest. Nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)


# ---- a oneDNN bf16 defect, worked around ------------------------------------------------------------------
# On CPU (torch 2.13, oneDNN, AVX512-BF16), the weight gradient of a bf16 3x3x3 convolution is wrong, and
# differs from run to run, when the input is 2 voxels deep: relative errors of 1 to 1e25 against fp32 for
# inputs of (2, 2, 2), (2, 4, 4) and (2, 2, 3) voxels, while (4, 4, 2), (1, 2, 2), (3, 3, 3) and larger are
# right to bf16 rounding (3e-3). A 32^3 volume or patch reaches 2^3 at the seed model's bottleneck, so an
# unguarded run trains on garbage there (NaN losses, runs that do not repeat). Such convolutions are tiny:
# they run in fp32 instead (tests/test_hardware.py checks the gradients against fp32).
SMALL_CONV_VOXELS = 2


def _conv3d_fp32_when_thin(self: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and min(x.shape[2:]) <= SMALL_CONV_VOXELS:
        with torch.autocast("cpu", enabled=False):
            return torch.nn.Conv3d.forward(self, x.float()).to(torch.get_autocast_dtype("cpu"))
    return torch.nn.Conv3d.forward(self, x)


def guard_cpu_bf16_convolutions(model: torch.nn.Module) -> int:
    """Make every 3-D convolution of ``model`` with a kernel larger than 1 run in fp32 under CPU autocast
    when its input is at most 2 voxels thick in some axis (see above); elsewhere nothing changes. Returns the
    number of convolutions guarded. Parameters and state_dict are untouched."""
    guarded = 0
    for module in model.modules():
        if type(module) is torch.nn.Conv3d and max(module.kernel_size) > 1:
            module.forward = _conv3d_fp32_when_thin.__get__(module)
            guarded += 1
    return guarded


def usable_cpus() -> int:
    """The CPUs this process may run on: the affinity mask where the platform has one (a container or a batch
    job's CPU set is often smaller than the machine, which ``os.cpu_count()`` reports), else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def worker_count(key: str, value, num_jobs: int) -> int:
    """A ``<key>: auto | N`` worker setting (brain3d-preprocess, brain3d-plan): ``auto`` (or null) = the usable
    CPUs, else an integer >= 1; never more than there are jobs, never fewer than 1.

    Raises:
        ConfigError: any other value, naming ``key``.
    """
    if value is None or value == "auto":
        workers = usable_cpus()
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        workers = value
    else:
        raise ConfigError(f"{key}={value!r}: expected auto (one process per usable CPU) or an integer >= 1")
    return max(1, min(workers, num_jobs))
