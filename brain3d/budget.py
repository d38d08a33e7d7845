"""trainer.max_time: a wall-clock budget for a training run, and the epochs that fit in it.

A cluster job has a time limit; a researcher has an afternoon. With ``trainer.max_time=2h`` the run measures
how long its epochs take (training steps and validation separately) and, after every epoch's training,
plans how many more fit in what is left of the budget. The learning-rate schedule is re-planned to end with
the last epoch that fits (:meth:`brain3d.schedulers.WarmupSchedule.replan`, continuous at the step where it
is re-planned), so the run ends with its schedule completed, validated and saved, inside the budget; an
epoch slower than the ones measured before it can overrun it by at most that epoch.

The budget counts from the start of the process for the first run in it (the interpreter's start-up, the
imports, reading and preprocessing the data count: a job's limit does too; :func:`process_age_s`), from the
start of ``brain3d.train.train`` for later runs of an in-process sweep, and across resumes: a checkpoint
stores the time used so far.

Runtime dependencies: none (standard library).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field

__all__ = ["TimeBudget", "parse_duration", "process_age_s"]

_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60,
          "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400,
          "days": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")


def parse_duration(value) -> float | None:
    """Seconds in ``value``: a number (seconds), ``"90s"``, ``"10min"``, ``"2h"``, ``"1h30min"``, ``"1.5h"``,
    ``"1d"``, or a clock ``"HH:MM:SS"`` / ``"DD:HH:MM:SS"`` (SLURM's and Lightning's form). None / ``"null"``
    -> None (no budget).

    Raises:
        ValueError: anything else, or a duration that is not positive, with the forms that are understood.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    forms = "e.g. 600 (seconds), 90s, 10min, 2h, 1h30min or 01:30:00"
    if isinstance(value, bool):
        raise ValueError(f"trainer.max_time={value!r} is not a duration ({forms})")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (3, 4) or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"trainer.max_time={value!r} is not a duration ({forms})")
            weights = (86400, 3600, 60, 1)[-len(parts):]
            seconds = float(sum(int(p) * w for p, w in zip(parts, weights)))
        else:
            try:
                seconds = float(text)
            except ValueError:
                matches = list(_PART.finditer(text))
                if not matches or "".join(m.group(0) for m in matches).replace(" ", "") != text.replace(" ", "") \
                        or any(m.group(2) not in _UNITS for m in matches):
                    raise ValueError(f"trainer.max_time={value!r} is not a duration ({forms})") from None
                seconds = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in matches)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"trainer.max_time={value!r}: the budget must be a positive duration ({forms})")
    return seconds


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc/self/stat's start time against /proc/uptime); 0.0
    where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) onwards
        start_ticks = int(fields[19])  # field 22: start time in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


@dataclass
class TimeBudget:
    """The run's budget and the epoch times measured so far.

    Attributes:
        seconds: the whole budget.
        used_before_s: time used by earlier processes of this run (a resume), from the checkpoint.
        train_s / val_s: seconds of each epoch's training steps, and of each validation.
        started: ``time.monotonic()`` when this process's share of the budget began.
    """

    seconds: float
    used_before_s: float = 0.0
    train_s: list[float] = field(default_factory=list)
    val_s: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def used(self) -> float:
        """Seconds of the budget used so far (this process and the ones before it)."""
        return self.used_before_s + time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.used()

    @staticmethod
    def _typical(times: list[float]) -> float:
        # The first epoch pays one-off costs (oneDNN / cuDNN kernel selection, page cache), so once there are
        # later ones it is left out; the median keeps one slow epoch on a shared machine from moving the plan.
        return statistics.median(times[1:] if len(times) > 1 else times)

    def estimate(self, val_every: int, val_guess_s: float) -> tuple[float, float]:
        """``(seconds per further epoch, seconds of one validation)``: a typical epoch's training plus its share
        of validation (one in ``val_every`` epochs validates). Before any validation was timed, ``val_guess_s``
        stands in for one."""
        val = self._typical(self.val_s) if self.val_s else val_guess_s
        return self._typical(self.train_s) + val / max(val_every, 1), val

    def epochs_after(self, val_every: int, val_guess_s: float, reserve_s: float) -> int:
        """How many more epochs fit after the current one, whose training just ended: what is left, less this
        epoch's validation (the last epoch always validates) and ``reserve_s`` (saving, the summary), divided by
        the cost of a further epoch, which must also leave room for its own final validation."""
        per_epoch, val = self.estimate(val_every, val_guess_s)
        room = self.left() - val - reserve_s
        if room <= 0:
            return 0
        # k more epochs cost k * per_epoch, the last of them a whole validation rather than its share
        return max(0, int((room - (val - val / max(val_every, 1))) // per_epoch))

    def state(self) -> dict:
        """What a checkpoint keeps: the time used until now and the measured epochs."""
        return {"seconds": self.seconds, "used_s": self.used(), "train_s": list(self.train_s),
                "val_s": list(self.val_s)}

    @classmethod
    def resumed(cls, seconds: float, saved: dict | None) -> TimeBudget:
        """This run's budget, continuing the time used and the measurements of the checkpoint's ``saved``."""
        if not saved:
            return cls(seconds)
        return cls(seconds, used_before_s=float(saved.get("used_s", 0.0)), train_s=list(saved.get("train_s", [])),
                   val_s=list(saved.get("val_s", [])))
