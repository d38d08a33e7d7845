"""trainer.ema: the averaged weights against a hand computation, and a run that validates, saves and resumes them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brain3d.ema import WeightAverage

from tests.conftest import read_summary, run_train, tiny_overrides


def test_average_follows_the_hand_computation_with_its_warm_up():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    average = WeightAverage(model, decay=0.5)
    expected = 1.0
    for n, value in enumerate([3.0, -1.0, 5.0, 2.0], start=1):
        with torch.no_grad():
            model[0].weight.fill_(value)
            model[1].running_mean.fill_(value)
        model[1].num_batches_tracked.fill_(10 * n)
        average.update(model)
        d = min(0.5, (1 + n) / (10 + n))  # the warm-up: 2/11, 3/12, 4/13, 5/14 (all below 0.5)
        expected = d * expected + (1 - d) * value
        assert average.module[0].weight.item() == pytest.approx(expected)
    # the float buffer (running mean, initially 0) is averaged the same way
    mean = 0.0
    for n, value in enumerate([3.0, -1.0, 5.0, 2.0], start=1):
        d = min(0.5, (1 + n) / (10 + n))
        mean = d * mean + (1 - d) * value
    assert average.module[1].running_mean.item() == pytest.approx(mean)
    assert average.module[1].num_batches_tracked.item() == 40  # integer buffers are copied
    assert not any(p.requires_grad for p in average.module.parameters())
    slow = WeightAverage(model, decay=0.9)
    slow.updates = 1000
    assert slow.current_decay() == 0.9  # the warm-up is over: the configured decay


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="trainer.ema=1.5 must be a decay between 0 and 1"):
        WeightAverage(nn.Linear(1, 1), 1.5)


def test_a_run_validates_and_saves_the_average_and_resumes_it_exactly(tmp_path, cache_dir):
    common = ["task=regression", *tiny_overrides(cache_dir), "trainer.ema=0.9", "trainer.max_epochs=3"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    run_train([*common, f"hydra.run.dir={straight}"], cwd=tmp_path)
    run_train([*common, "trainer.epochs_per_run=2", f"hydra.run.dir={parted}"], cwd=tmp_path)
    run_train([*common, "trainer.resume=auto", f"hydra.run.dir={parted}"], cwd=tmp_path)
    state = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    assert state["ema"]["decay"] == 0.9 and state["ema"]["updates"] == state["scheduler"]["last_epoch"]
    # "model" (what validation ran and predict loads) is the average, not the last step's weights
    differs = [name for name in state["model"] if state["model"][name].is_floating_point()
               and not torch.equal(state["model"][name], state["train_weights"][name])]
    assert differs
    drop = {"train_volumes_per_second", "train_data_wait_fraction"}
    h1 = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(straight)["history"]]
    h2 = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(parted)["history"]]
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, a, b)
    resumed = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "train_weights"):
        for name, value in state[part].items():
            torch.testing.assert_close(value, resumed[part][name], rtol=1e-5, atol=1e-6)


def test_a_bad_ema_value_is_one_line(tmp_path, cache_dir):
    # one run: the value is checked before anything trains (1.5, out of range, is WeightAverage's unit test above)
    for value, shown in (("abc", "trainer.ema='abc'"),):
        proc = run_train([*tiny_overrides(cache_dir), f"trainer.ema={value}", f"hydra.run.dir={tmp_path / value}"],
                         cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"{shown} must be a decay between 0 and 1" in proc.stderr and "Traceback" not in proc.stderr
