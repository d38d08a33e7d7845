"""Preemption: SIGTERM / SIGUSR1 stop a run after an optimizer step with a mid-epoch last.pt and exit code
75; ``trainer.resume=auto`` continues it to the same weights; SIGKILL never leaves an unloadable last.pt."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset, RandomSampler

from brain3d import engine
from brain3d.checkpoint import load_checkpoint
from brain3d.data.sampling import ResumableBatchSampler, iter_from
from brain3d.losses import MSELoss
from brain3d.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, stop_on_signals
from brain3d.schedulers import warmup_schedule
from brain3d.tasks import single_task

from tests.conftest import read_summary, run_train, tiny_overrides
from tests.test_engine import TinyRegressor


class CountingDataset(Dataset):
    """Regression items whose reads are counted, to show that skipped batches are never loaded."""

    def __init__(self, n=10):
        g = torch.Generator().manual_seed(0)
        self.images, self.targets = torch.rand(n, 1, 4, 4, 4, generator=g), torch.rand(n, 1, generator=g)
        self.reads = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.reads.append(index)
        return {"image": self.images[index], "target": self.targets[index], "subject_id": f"sub-{index}"}


def resumable_loader(dataset, seed=3, num_workers=0):
    generator = torch.Generator().manual_seed(seed)
    sampler = ResumableBatchSampler(RandomSampler(dataset, generator=generator), batch_size=2, drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, generator=generator, num_workers=num_workers)


def test_batch_sampler_skips_done_batches_without_loading_them():
    dataset = CountingDataset(10)
    loader = resumable_loader(dataset)
    full = [batch["subject_id"] for batch in loader]
    loader.generator.manual_seed(3)  # as train.py re-seeds each epoch
    dataset.reads.clear()
    rest = [batch["subject_id"] for batch in iter_from(loader, 2)]
    assert rest == full[2:]
    assert len(dataset.reads) == 6 and len(loader) == 5  # only the remaining items were read
    loader.generator.manual_seed(3)
    assert [batch["subject_id"] for batch in loader] == full  # the skip applies to one iteration only


def test_skip_holds_with_worker_processes():
    # A DataLoader with workers calls iter() on its batch sampler twice while building its iterator.
    loader = resumable_loader(CountingDataset(10), num_workers=2)
    full = [batch["subject_id"] for batch in loader]
    loader.generator.manual_seed(3)
    assert [batch["subject_id"] for batch in iter_from(loader, 3)] == full[3:]


def _epoch(model, optimizer, scheduler, loader, **kwargs):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader.generator.manual_seed(3)
    return engine.train_one_epoch(model, loader, MSELoss(), optimizer, scheduler, scaler, single_task("regression"),
                                  torch.device("cpu"), None, epoch=1, accumulate_grad_batches=2, progress=False,
                                  **kwargs)


def _setup(state=None):
    torch.manual_seed(0)
    model = TinyRegressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = warmup_schedule(optimizer, total_steps=3, steps_per_epoch=3, kind="cosine", warmup_epochs=0)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return model, optimizer, scheduler


def test_engine_stops_after_an_optimizer_step_and_resumes_to_the_same_weights():
    # 10 items, batches of 2, accumulation 2 -> optimizer steps after batches 2, 4 and 5
    model, optimizer, scheduler = _setup()
    straight = _epoch(model, optimizer, scheduler, resumable_loader(CountingDataset()))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler = _setup()
    seen = []
    first = _epoch(model, optimizer, scheduler, resumable_loader(CountingDataset()),
                   after_optimizer_step=lambda position: (seen.append(position.batches_done)
                                                          or position.batches_done == 2))
    assert first["stopped"] and first["position"].batches_done == 2 and seen == [2]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    position = engine.EpochProgress.from_dict(first["position"].to_dict())  # as through a checkpoint

    model, optimizer, scheduler = _setup(state)
    dataset = CountingDataset()
    second = _epoch(model, optimizer, scheduler, resumable_loader(dataset), progress_state=position)
    assert not second["stopped"] and second["position"].batches_done == 5
    assert len(dataset.reads) == 6  # batches 3-5 only
    assert second["loss"] == straight["loss"]  # the epoch's loss includes the batches of the first process
    for name, value in expected.items():
        torch.testing.assert_close(model.state_dict()[name], value)


def test_stop_signals_set_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the Python-level handler runs at the next bytecode boundary
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first name
        assert stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def start_train(args, cwd, new_session=False):
    """``brain3d-train`` in the background; ``new_session``: in a process group of its own (as a terminal's
    foreground job, which Ctrl-C signals as a whole)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("CI", None)
    return subprocess.Popen([sys.executable, "-m", "brain3d.train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=new_session)


def wait_for_line(proc, marker, timeout=120):
    """Read the process's output until a line contains ``marker``; return everything read."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError(f"process ended before {marker!r}:\n{''.join(lines)}")


def test_sigterm_mid_epoch_then_resume_auto_gives_the_same_weights(tmp_path, cache_dir):
    # 9 training subjects in batches of 2 (the single last one dropped): 4 optimizer steps per epoch
    common = ["task=classification", *tiny_overrides(cache_dir), "trainer.max_epochs=3", "trainer.log_every_n_steps=1"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    run_train([*common, f"hydra.run.dir={straight}"], cwd=tmp_path)

    # A real SIGTERM, sent while the process sleeps after optimizer step 6 (epoch 2, batch 2 of 4): the hidden
    # per-step sleep only makes the moment reliable; the stop itself is the signal handler's.
    proc = start_train([*common, "+trainer.debug_step_sleep=1.0", f"hydra.run.dir={parted}"], cwd=tmp_path)
    wait_for_line(proc, "step 6:")
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED == 75, output
    assert "SIGTERM received: stopped at epoch 2, after batch 2/4" in output
    state = load_checkpoint(parted / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["epoch_progress"]["batches_done"] == 2 and len(state["history"]) == 1
    assert not (parted / "summary.json").exists()

    proc = run_train([*common, "trainer.resume=auto", f"hydra.run.dir={parted}"], cwd=tmp_path)
    assert "resumed from" in proc.stdout and "at epoch 2, after batch 2/4" in proc.stdout  # as the stop said
    w1 = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    w2 = load_checkpoint(parted / "checkpoints" / "last.pt")["model"]
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name])
    drop = {"train_volumes_per_second", "train_data_wait_fraction"}  # timings differ between runs
    h1 = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(straight)["history"]]
    h2 = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(parted)["history"]]
    assert h1 == h2
    # TensorBoard: one value per epoch, steps 1..3, across the two processes
    events = EventAccumulator(str(parted / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [1, 2, 3]


@pytest.mark.slow  # three processes killed at random moments (~20 s); the atomic write is tested by default
def test_sigkill_at_random_moments_never_leaves_an_unloadable_last_pt(tmp_path, cache_dir):
    # A checkpoint after every optimizer step, so kills land during checkpoint writes too.
    run_dir = tmp_path / "run"
    # 50 epochs of 4 steps, slowed to >= 0.05 s a step (hidden knob) so each process is still training when killed
    args = ["task=classification", *tiny_overrides(cache_dir), "trainer.max_epochs=50", "trainer.log_every_n_steps=1",
            "trainer.checkpoint_every_n_steps=1", "+trainer.debug_step_sleep=0.05", "trainer.resume=auto",
            f"hydra.run.dir={run_dir}"]
    rng = random.Random(0)
    steps_done = []
    for _ in range(3):
        proc = start_train(args, cwd=tmp_path)
        wait_for_line(proc, ", batch ")  # a "step N: epoch E, batch B/4" line: training is under way
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        last = run_dir / "checkpoints" / "last.pt"
        if last.exists():
            state = load_checkpoint(last)  # raises on a truncated or partial file
            steps_done.append(state["epoch"] * 4 + (state["epoch_progress"] or {}).get("batches_done", 0))
    assert steps_done and steps_done == sorted(steps_done)  # each process continued from the last one
    assert not (run_dir / "summary.json").exists()  # every process was killed while training


def test_sigusr2_stops_like_sigusr1():
    """The submitit launcher sends SIGUSR2 before a job's time runs out."""
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGUSR2" and stop.exit_code == EXIT_PREEMPTED


def _children(pid: int) -> set[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return {int(p) for p in open(path).read().split()} if os.path.exists(path) else set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_ctrl_c_saves_the_epoch_in_progress_and_leaves_no_worker_behind(tmp_path, cache_dir):
    """Ctrl-C signals the whole foreground process group: the DataLoader workers ignore it, the main process
    finishes the step, saves last.pt mid-epoch 1, says how to resume and exits 130; its workers go with it."""
    run_dir = tmp_path / "run"
    args = ["task=classification", *tiny_overrides(cache_dir), "data.resident=off", "data.num_workers=2",
            "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "+trainer.debug_step_sleep=1.0",
            f"hydra.run.dir={run_dir}"]
    proc = start_train(args, cwd=tmp_path, new_session=True)
    wait_for_line(proc, "step 1:")
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers  # the DataLoader worker processes
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_INTERRUPTED == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "SIGINT received: stopped at epoch 1, after batch" in output and "trainer.resume=auto" in output
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["epoch_progress"]["batches_done"] >= 1
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


@pytest.mark.slow  # two signal rounds on a slowed run (~13 s)
def test_sigint_to_the_main_process_only_stops_and_a_second_one_exits_at_once(tmp_path, cache_dir):
    """``kill -INT PID`` (the main process only, as some schedulers send it): the same clean stop; a second
    SIGINT while the step finishes exits at once, without a traceback."""
    args = ["task=classification", *tiny_overrides(cache_dir), "data.resident=off", "data.num_workers=2",
            "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "+trainer.debug_step_sleep=2.0"]
    proc = start_train([*args, f"hydra.run.dir={tmp_path / 'once'}"], cwd=tmp_path)
    wait_for_line(proc, "step 1:")
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in output, output
    assert (tmp_path / "once" / "checkpoints" / "last.pt").is_file()

    proc = start_train([*args, f"hydra.run.dir={tmp_path / 'twice'}"], cwd=tmp_path)
    wait_for_line(proc, "step 1:")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in output, output
    assert time.monotonic() - started < 10 and "interrupted" in output
