"""Atomic, code-free checkpoints; warm-up schedules."""

from __future__ import annotations

import math

import pytest
import torch

from brain3d.checkpoint import load_checkpoint, resolve_resume_path, save_checkpoint
from brain3d.schedulers import WarmupSchedule, warmup_schedule


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"a": 1}}, path)
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {"a": 2}}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["config"] == {"a": 2}


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "config": {"v": 1}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint({"model": {}, "config": {"v": 2}, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["config"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_refuses_files_that_would_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Payload()}, path)
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(path)
    truncated = tmp_path / "cut.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}, "config": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(truncated)


def test_resume_resolution(tmp_path):
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("auto", tmp_path) is None  # nothing yet: a fresh start
    save_checkpoint({"model": {}, "config": {}}, tmp_path / "checkpoints" / "last.pt")
    assert resolve_resume_path("auto", tmp_path) == tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume_path(str(tmp_path / "x.pt"), tmp_path)


def test_warmup_then_cosine_values():
    s = WarmupSchedule("cosine", total_steps=12, warmup_steps=2, min_lr_ratio=0.0)
    assert [s(0), s(1)] == pytest.approx([1 / 3, 2 / 3])
    assert s(2) == pytest.approx(1.0)
    assert s(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(12) == pytest.approx(0.0)
    poly = WarmupSchedule("poly", total_steps=10, warmup_steps=0, power=0.9)
    assert poly(5) == pytest.approx(0.5**0.9)
    assert WarmupSchedule("constant", total_steps=10)(9) == 1.0
    with pytest.raises(ValueError, match="not one of"):
        WarmupSchedule("step", total_steps=10)


def test_scheduler_state_round_trips_with_weights_only(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_schedule(opt, total_steps=20, steps_per_epoch=5, kind="cosine", warmup_epochs=1)
    for _ in range(7):
        opt.step()
        sched.step()
    save_checkpoint({"model": {}, "config": {}, "scheduler": sched.state_dict()}, tmp_path / "s.pt")
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = warmup_schedule(opt2, total_steps=20, steps_per_epoch=5, kind="cosine", warmup_epochs=1)
    sched2.load_state_dict(load_checkpoint(tmp_path / "s.pt")["scheduler"])
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
