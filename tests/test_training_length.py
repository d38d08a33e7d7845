"""How long a run trains: trainer.max_time (a wall-clock budget the schedule is planned into),
trainer.early_stopping, trainer.val_every_n_epochs and data.samples_per_volume."""

from __future__ import annotations

import csv
import math
import time
from collections import Counter

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brain3d.budget import TimeBudget, parse_duration, process_age_s
from brain3d.data.dataset import VolumeDataset
from brain3d.data.loaders import training_batch_sampler
from brain3d.data.resident import ResidentVolumes
from brain3d.schedulers import WarmupSchedule

from tests.conftest import read_summary, run_train, tiny_overrides
from tests.test_dataset import RESIZE, make_subject

PYTEST_STARTED = time.monotonic()


@pytest.mark.parametrize("text, seconds", [
    ("10min", 600), ("2h", 7200), ("1h30min", 5400), ("90s", 90), ("1.5h", 5400), ("01:30:00", 5400),
    ("1:00:00:00", 86400), (600, 600), ("45", 45), ("2 h 15 min", 8100), (None, None), ("null", None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10 parsecs", "0s", "-5min", "1:2", "10min3", True])
def test_bad_durations_say_what_is_understood(text):
    with pytest.raises(ValueError, match=r"trainer.max_time=.*(not a duration|positive).*10min"):
        parse_duration(text)


def test_replan_continues_the_schedule_without_a_jump_and_ends_at_the_new_total():
    schedule = WarmupSchedule("cosine", total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    before = schedule(40)
    schedule.replan(40, 60)  # 20 steps left instead of 60
    assert schedule(40) == pytest.approx(before)  # no jump at the re-plan
    assert schedule.progress(40) == pytest.approx(30 / 90)
    assert schedule.progress(50) == pytest.approx(30 / 90 + (60 / 90) * 10 / 20)  # linear to the new end
    assert schedule(60) == pytest.approx(0.01) and schedule(80) == pytest.approx(0.01)
    values = [schedule(t) for t in range(40, 61)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # still decreasing
    # during warm-up only the end moves
    warming = WarmupSchedule("cosine", total_steps=100, warmup_steps=10)
    warming.replan(5, 30)
    assert warming.total_steps == 30 and warming(5) == pytest.approx(6 / 11) and warming(30) == pytest.approx(0.01)


def test_process_age_counts_from_the_process_start():
    since_import = time.monotonic() - PYTEST_STARTED
    first = process_age_s()
    time.sleep(0.2)
    assert first >= since_import - 0.02  # the process started before this module was imported (0.01 s ticks)
    assert process_age_s() - first == pytest.approx(0.2, abs=0.05)


def test_budget_fits_the_epochs_left_after_this_epochs_validation():
    budget = TimeBudget(100.0)
    budget.started -= 20.0  # 20 s used: 80 left
    budget.train_s, budget.val_s = [12.0, 10.0, 10.0], [5.0]
    # a further epoch costs 10 (median of the epochs after the first) + 5 validation; this epoch's
    # validation (5) and the reserve (3) come off first: (80 - 5 - 3) // 15 = 4
    assert budget.estimate(1, val_guess_s=99.0) == (15.0, 5.0)
    assert budget.epochs_after(1, val_guess_s=99.0, reserve_s=3.0) == 4
    # validating every 2nd epoch: 12.5 per epoch, the last a whole validation (2.5 more): (72 - 2.5) // 12.5 = 5
    assert budget.epochs_after(2, val_guess_s=99.0, reserve_s=3.0) == 5
    resumed = TimeBudget.resumed(100.0, budget.state())
    assert resumed.used() == pytest.approx(budget.used(), abs=0.5) and resumed.train_s == budget.train_s


def planned_run(budget: TimeBudget, epoch: int, end_epoch: int, steps_per_epoch: int = 10):
    """The parts of a Run that train.plan_epochs reads: 20 training samples in batches of 4, 5 validation
    volumes, a cosine schedule first planned for ``end_epoch`` epochs and stepped to the end of ``epoch``."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule("cosine", end_epoch * steps_per_epoch, steps_per_epoch))
    for _ in range((epoch + 1) * steps_per_epoch):
        optimizer.step()
        scheduler.step()
    cfg = OmegaConf.create({"trainer": {"max_epochs": None, "max_time": "100s"}})
    return SimpleNamespace(budget=budget, epoch=epoch, end_epoch=end_epoch, steps_per_epoch=steps_per_epoch,
                           val_set=[0] * 5, train_loader=[0] * 5, batch_record={"value": 4}, sliding_window=False,
                           distributed=False, cfg=cfg, scheduler=scheduler)


def test_an_epoch_slower_than_planned_gets_one_closing_epoch_that_completes_the_schedule():
    from brain3d.train import plan_epochs, schedule_completed

    # 4 epochs of 10 s were planned into 100 s; epoch 3 (index 2) took 50 s, so 20 s are left: no further
    # epoch fits, but epoch 3 ran at the learning rate of a run with one more epoch to go
    budget = TimeBudget(100.0, train_s=[10.0, 10.0, 50.0], val_s=[2.0])
    budget.started -= 80.0
    run = planned_run(budget, epoch=2, end_epoch=4)
    assert budget.epochs_after(1, 99.0, 3.0) == 0  # a further epoch now costs 30 + 2 s (the median)
    plan_epochs(run, val_every=1)
    assert run.end_epoch == 4  # one closing epoch: within budget + one epoch
    schedule = run.scheduler.lr_lambdas[0]
    assert schedule.total_steps == 40 and schedule.progress(30) < 1.0
    for _ in range(10):  # the closing epoch
        run.scheduler.optimizer.step()
        run.scheduler.step()
    assert schedule.progress(40) == pytest.approx(1.0) and schedule_completed(run, [{}] * 4)
    # once the budget is spent there is no closing epoch: the run ends, and says its schedule is incomplete
    late = planned_run(TimeBudget(100.0, train_s=[10.0, 10.0, 50.0], val_s=[2.0]), epoch=2, end_epoch=5)
    late.budget.started -= 101.0
    plan_epochs(late, val_every=1)
    assert late.end_epoch == 3 and not schedule_completed(late, [{}] * 3)


def test_max_time_ends_the_run_inside_its_budget_with_the_schedule_completed(tmp_path, cache_dir):
    run_dir, budget = tmp_path / "run", 12.0
    started = time.monotonic()
    run_train([*tiny_overrides(cache_dir), "trainer.max_epochs=null", f"trainer.max_time={budget:g}s",
               "+trainer.debug_step_sleep=0.1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    wall = time.monotonic() - started
    summary = read_summary(run_dir)
    timing = summary["time_budget"]
    epochs = summary["epochs_completed"]
    longest_epoch = max(timing["train_s"]) + max(timing["val_s"])
    assert epochs >= 4  # the budget was used, not one epoch and out
    assert timing["used_s"] <= budget + longest_epoch  # never more than one epoch over
    # the budget counts from the process's start (imports, Hydra): only the exit is outside it
    assert wall <= budget + longest_epoch + 3
    assert timing["schedule_completed"] and summary["planned_epochs"] == epochs
    # the learning-rate schedule was planned to end with the last epoch: its decay is complete
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    saved = state["scheduler"]["lr_lambdas"][0]
    schedule = WarmupSchedule(saved["kind"], saved["total_steps"], saved["warmup_steps"], saved["min_lr_ratio"])
    schedule.__dict__.update(saved)
    steps = state["scheduler"]["last_epoch"]
    assert saved["total_steps"] == steps and schedule.progress(steps) == pytest.approx(1.0)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.01)  # at the cosine's floor
    assert "trainer.max_time=12s:" in (run_dir / "train.log").read_text()


def test_max_epochs_null_without_max_time_and_a_bad_duration_are_one_line(tmp_path, cache_dir):
    from omegaconf import OmegaConf

    from brain3d.errors import ConfigError
    from brain3d.train import check_length_settings

    def settings(**trainer):
        return OmegaConf.create({"trainer": {"max_epochs": 3, "max_time": None, **trainer},
                                 "data": {"samples_per_volume": 1}})

    assert check_length_settings(settings(max_epochs=None, max_time="2h")) == 7200
    for trainer, message in (({"max_epochs": None}, "trainer.max_epochs=null needs trainer.max_time"),
                             ({"val_every_n_epochs": 0}, "trainer.val_every_n_epochs=0 must be a whole number"),
                             ({"early_stopping": 1.5}, "trainer.early_stopping=1.5 must be a whole number")):
        with pytest.raises(ConfigError, match=message):
            check_length_settings(settings(**trainer))
    # and on the command line: one line, exit 2, before anything trains
    proc = run_train([*tiny_overrides(cache_dir), "trainer.max_time=ten", f"hydra.run.dir={tmp_path / 'bad'}"],
                     cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "trainer.max_time='ten' is not a duration" in proc.stderr and "Traceback" not in proc.stderr


def test_early_stopping_stops_after_patience_validations_without_improvement(tmp_path, cache_dir):
    # lr 0 and a frozen backbone (BatchNorm statistics fixed too): the model never changes, so val_auc
    # stays at epoch 1's value and never improves again
    run_dir = tmp_path / "run"
    run_train([*tiny_overrides(cache_dir), "trainer.max_epochs=8", "trainer.early_stopping=2", "optimizer.lr=0",
               "trainer.freeze_backbone=true", "task.monitor=val_loss", "task.monitor_mode=min",
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    summary = read_summary(run_dir)
    assert summary["epochs_completed"] == 3
    assert summary["stopped_early"] == {"epoch": 3, "patience": 2, "monitor": "val_loss", "best_epoch": 1,
                                        "best_value": summary["history"][0]["val_loss"]}
    log_text = (run_dir / "train.log").read_text()
    assert "trainer.early_stopping=2: val_loss has not improved for 2 validations" in log_text


def test_val_every_n_epochs_and_samples_per_volume(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_train([*tiny_overrides(cache_dir), "trainer.max_epochs=5", "trainer.val_every_n_epochs=2",
               "data.samples_per_volume=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    summary = read_summary(run_dir)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    validated = [r["epoch"] for r in rows if r["val_loss"]]
    assert validated == ["2", "4", "5"]  # every 2nd epoch, and always the last
    assert all(r["train_loss"] for r in rows)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 5]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert summary["final_val"]["loss"] == pytest.approx(float(rows[-1]["val_loss"]))
    # three samples of every training volume per epoch, in batches of 2 (a last batch of one is dropped)
    samples = 3 * summary["data"]["num_train"]
    steps_per_epoch = samples // 2 if samples % 2 == 1 else math.ceil(samples / 2)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 5 * steps_per_epoch


def test_samples_per_volume_draws_each_volume_k_times_with_its_own_patches(tmp_path):
    subjects = [make_subject(tmp_path, f"s{i}") for i in range(3)]
    data = VolumeDataset(subjects, "segmentation", RESIZE, patch_size=(8, 8, 8), foreground_fraction=0.0, seed=1)
    sampler = training_batch_sampler(data, batch_size=2, seed=0, samples_per_volume=4)
    sampler.set_epoch(0, shuffle_seed=5)
    drawn = [index for batch in sampler for index, _ in batch]
    assert len(sampler) == 6 and sorted(drawn) == list(range(12))
    assert Counter(i % 3 for i in drawn) == {0: 4, 1: 4, 2: 4}
    # sample s is volume s % 3, and its patch is seeded by s: the 4 samples of a volume are 4 windows
    items = [data[(s, 0)] for s in (1, 4, 7, 10)]
    assert {item["subject_id"] for item in items} == {"s1"}
    assert len({tuple(np.asarray(item["image"]).ravel()[:64]) for item in items}) > 1
    # the memory-resident store gathers the same patches as the dataset
    store = ResidentVolumes(data, torch.device("cpu"), progress=False)
    batch = store.batch([(4, 0), (7, 0)])
    torch.testing.assert_close(batch["image"][0], items[1]["image"])
    torch.testing.assert_close(batch["image"][1], items[2]["image"])


def test_the_budget_times_what_follows_an_epochs_training(tmp_path, cache_dir, monkeypatch):
    """Checkpoints (and report.html) after an epoch are planned for: they count in the epoch's time, in val_s
    after a validation and in train_s after an epoch that does not validate."""
    from hydra import compose, initialize_config_dir

    import brain3d.train as train_module
    from brain3d.cli import config_dir

    save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda *a, **k: time.sleep(1.5) or save(*a, **k))
    run = tmp_path / "run"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *tiny_overrides(cache_dir), "trainer.max_epochs=4", "trainer.max_time=10min",
            "trainer.val_every_n_epochs=2", f"output_dir={run}"])
    train_module.train(cfg)
    timing = read_summary(run)["time_budget"]
    assert len(timing["train_s"]) == 4 and len(timing["val_s"]) == 2
    assert min(timing["val_s"]) >= 1.5  # epochs 2 and 4 validate: their checkpoints are in val_s
    assert timing["train_s"][2] - timing["train_s"][1] >= 1.2  # epoch 3's checkpoint in its train_s, epoch 2's not
