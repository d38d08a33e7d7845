"""Learning-rate schedules with linear warm-up, stepped once per optimizer step.

The schedule is a small callable class (not a lambda) so ``LambdaLR.state_dict()`` stores its plain
attributes and a checkpoint restores it exactly under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math

import torch

SCHEDULE_KINDS = ("cosine", "poly", "constant")


class WarmupSchedule:
    """LR multiplier for step ``t``: linear warm-up from ~0 to 1, then cosine / poly decay or constant.

    Args:
        kind: "cosine" (down to ``min_lr_ratio``), "poly" ((1 - progress) ** power, as nnU-Net) or "constant".
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of linear warm-up; 0 disables it. Warm-up first so the LR never spikes on
            freshly initialised BatchNorm statistics.
        min_lr_ratio: floor of the cosine, as a fraction of the base LR. Default 0.01.
        power: exponent of the poly schedule. Default 0.9.

    Raises:
        ValueError: unknown kind or non-positive total_steps.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.01,
                 power: float = 0.9):
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"scheduler kind {kind!r} is not one of {SCHEDULE_KINDS}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(max(warmup_steps, 0), total_steps))
        self.min_lr_ratio = float(min_lr_ratio)
        self.power = float(power)
        # Set by replan(): from anchor_step on, the decay's progress runs linearly from anchor_progress to 1 at
        # total_steps (before it, as first planned). anchor_step = -1: never re-planned.
        self.anchor_step = -1
        self.anchor_progress = 0.0

    def progress(self, step: int) -> float:
        """Where ``step`` is in the decay: 0 at its start (after warm-up), 1 at ``total_steps`` and after."""
        if self.anchor_step >= 0 and step >= self.anchor_step:
            remaining = max(1, self.total_steps - self.anchor_step)
            return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / remaining)
        first_total = self.first_total_steps if self.anchor_step >= 0 else self.total_steps
        return min(1.0, max(0.0, (step - self.warmup_steps) / max(1, first_total - self.warmup_steps)))

    def replan(self, step: int, total_steps: int) -> None:
        """Make the schedule end at ``total_steps`` instead (trainer.max_time: the epochs that fit), from
        ``step`` on, with no jump: the decay continues from where it is at ``step`` and reaches its end at
        ``total_steps`` (a re-plan during warm-up only moves the end; the warm-up stays as it was)."""
        total_steps = max(int(total_steps), int(step), 1)
        if step <= self.warmup_steps:
            self.total_steps = max(total_steps, self.warmup_steps)
            return
        progress = self.progress(step)
        if self.anchor_step < 0:
            self.first_total_steps = self.total_steps
        self.anchor_step, self.anchor_progress, self.total_steps = int(step), progress, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = self.progress(step)
        if self.kind == "cosine":
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** self.power


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    kind: str = "cosine",
    warmup_epochs: float = 1.0,
    min_lr_ratio: float = 0.01,
    power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Build the per-step scheduler that ``configs/scheduler/*.yaml`` name (``_partial_``: the loop passes
    ``optimizer``, ``total_steps`` and ``steps_per_epoch``)."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    schedule = WarmupSchedule(kind, total_steps, warmup_steps, min_lr_ratio, power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
