"""End to end: the real ``brain3d-train`` command on tiny synthetic data, checking every output."""

from __future__ import annotations

import csv

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brain3d.checkpoint import load_checkpoint
from brain3d.models.model import build_model

from tests.conftest import read_summary, run_train, tiny_overrides

TASK_METRICS = {
    "classification": ["auc", "accuracy", "balanced_accuracy"],
    "regression": ["mae", "rmse", "pearson_r"],
    "segmentation": ["dice", "iou"],
}


def load_events(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("task", ["classification", "regression", "segmentation"])
def test_tiny_run_writes_every_output(task, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_train([f"task={task}", *tiny_overrides(cache_dir), f"hydra.run.dir={run_dir}"], cwd=tmp_path)

    # Hydra's resolved config and the log
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").task.name == task
    log_text = (run_dir / "train.log").read_text()
    assert "epoch 2/2" in log_text

    # summary.json
    summary = read_summary(run_dir)
    assert summary["task"] == task
    assert summary["epochs_completed"] == 2
    assert summary["num_parameters"] > 0
    assert set(summary["best_metric"]) >= {"name", "value", "epoch"}
    assert summary["best_metric"]["name"] == f"val_{TASK_METRICS[task][0]}"
    assert summary["final_train"]["loss"] > 0
    for metric in ["loss", *TASK_METRICS[task]]:
        assert metric in summary["final_val"], metric
    assert summary["train_volumes_per_second"] > 0
    assert 0.0 <= summary["data_wait_fraction"] < 1.0
    assert summary["peak_memory_mb"] > 0
    assert len(summary["history"]) == 2
    if task == "regression":
        assert summary["baseline_val_mae"] > 0
    if task == "classification":
        assert summary["class_names"] == ["0", "1"] and summary["positive_class"] == "1"

    # checkpoints: plain values only, loadable with weights_only=True, model rebuilt from the file alone
    for name in ("last", "best"):
        path = run_dir / "checkpoints" / f"{name}.pt"
        assert summary["checkpoints"][name] == str(path.resolve())
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "history"} <= set(state)
        assert isinstance(state["config"], dict)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 2
    config = state["config"]
    model = build_model(config["backbone"], config["task"]["head"], head_name=task)
    model.load_state_dict(state["model"])
    model.eval()
    out = model(torch.zeros(1, 1, 32, 32, 32))[task]
    assert out.shape == ((1, 1, 32, 32, 32) if task == "segmentation" else (1, 1))

    # TensorBoard, read back with tensorboard's own reader
    events = load_events(run_dir)
    scalars = set(events.Tags()["scalars"])
    expected = ({"train/loss", "val/loss", "optim/lr", "train/volumes_per_second", "train/data_wait_fraction"}
                | {f"val/{m}" for m in TASK_METRICS[task]})
    assert expected <= scalars, expected - scalars
    assert [e.step for e in events.Scalars("val/loss")] == [1, 2]
    history_losses = [h["val_loss"] for h in summary["history"]]
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx(history_losses, rel=1e-5)
    assert "config/text_summary" in events.Tags()["tensors"]
    if task == "segmentation":
        images = events.Images("val/mid_slices")
        assert len(images) == 2 and images[0].width == 3 * images[0].height and images[0].height >= 192


def test_hparams_written_into_the_run_itself(tmp_path, cache_dir):
    """hparams land in the same run (one row per job in TensorBoard's HPARAMS tab)."""
    run_dir = tmp_path / "run"
    run_train(["task=segmentation", *tiny_overrides(cache_dir), "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"],
              cwd=tmp_path)
    events = load_events(run_dir)
    tags = set(events.Tags()["scalars"])
    assert "hparams/best_val_dice" in tags and "hparams/val_loss" in tags
    assert not [p for p in (run_dir / "tensorboard").iterdir() if p.is_dir()], "add_hparams must not create a sub-run"


def test_resume_continues_identical_history(tmp_path, cache_dir):
    common = ["task=classification", *tiny_overrides(cache_dir), "data.num_subjects=12"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    run_train([*common, "trainer.max_epochs=3", f"hydra.run.dir={straight}"], cwd=tmp_path)
    run_train([*common, "trainer.max_epochs=3", "trainer.epochs_per_run=2", f"hydra.run.dir={parted}"], cwd=tmp_path)
    assert read_summary(parted)["epochs_completed"] == 2
    proc = run_train([*common, "trainer.max_epochs=3", "trainer.resume=auto", f"hydra.run.dir={parted}"], cwd=tmp_path)
    assert "resumed from" in proc.stdout + (parted / "train.log").read_text()

    drop = {"train_volumes_per_second", "train_data_wait_fraction"}  # timings differ between runs
    h1 = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(straight)["history"]]
    h2 = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(parted)["history"]]
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (key, a, b)
    w1 = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
def test_multirun_gives_each_job_its_own_folder(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    run_train(["-m", "task=segmentation", "loss=dice,dice_bce", *tiny_overrides(cache_dir), "trainer.max_epochs=1",
               "data.shape=[32,32,32]", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(jobs) == 2
    # folders are named by the swept key only: no cache path, list value or fixed overrides in the name
    assert [job.name for job in jobs] == ["0_loss=dice", "1_loss=dice_bce"]
    losses = set()
    for job in jobs:
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        losses.add(config.loss.name)
        assert (job / "tensorboard").is_dir() and (job / "checkpoints" / "last.pt").is_file()
        assert read_summary(job)["epochs_completed"] == 1
    assert losses == {"dice", "dice_bce"}


def test_fixed_seed_repeats_history_and_resnet_serves_segmentation(tmp_path, cache_dir):
    args = ["task=segmentation", "backbone=resnet", "backbone.depth=10", *tiny_overrides(cache_dir)]
    run_train([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    run_train([*args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
    drop = {"train_volumes_per_second", "train_data_wait_fraction"}  # timings differ between runs
    a = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(tmp_path / "a")["history"]]
    b = [{k: v for k, v in h.items() if k not in drop} for h in read_summary(tmp_path / "b")["history"]]
    assert a == b
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["backbone"]["_target_"].endswith("ResNetBackbone")


def test_data_manifest_without_data_nifti_is_refused(tmp_path, cache_dir):
    """data.manifest on the default data=synthetic used to train on the phantoms and exit 0."""
    proc = run_train(["task=classification", *tiny_overrides(cache_dir), f"data.manifest={tmp_path / 'study.tsv'}",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "add data=nifti" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra made a run folder


@pytest.mark.slow  # a third resume check (~16 s); the other resume tests here run by default
def test_resume_with_more_epochs_follows_the_longer_schedule_and_metrics_csv_keeps_every_epoch(tmp_path, cache_dir):
    """A finished poly run (lr 0 at its end) continued to 4 epochs gets the lr a 4-epoch run has at epoch 3."""
    common = ["task=classification", *tiny_overrides(cache_dir), "scheduler=poly"]
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    run_train([*common, "trainer.max_epochs=4", f"hydra.run.dir={straight}"], cwd=tmp_path)
    run_train([*common, "trainer.max_epochs=2", f"hydra.run.dir={extended}"], cwd=tmp_path)
    assert read_summary(extended)["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    proc = run_train([*common, "trainer.max_epochs=4", "trainer.resume=auto", f"hydra.run.dir={extended}"],
                     cwd=tmp_path)
    assert "planned anew for 4 epochs" in proc.stdout + (extended / "train.log").read_text()
    lr_straight = [h["lr"] for h in read_summary(straight)["history"]]
    lr_extended = [h["lr"] for h in read_summary(extended)["history"]]
    assert lr_extended[2] > 0 and lr_extended[2:] == pytest.approx(lr_straight[2:], rel=1e-9)

    with open(extended / "metrics.csv", newline="") as f:  # one row per epoch, over both processes
        rows = list(csv.DictReader(f))
    history = read_summary(extended)["history"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for row, record in zip(rows, history):
        assert float(row["val_loss"]) == pytest.approx(record["val_loss"])
        assert float(row["lr"]) == pytest.approx(record["lr"])


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
def test_resume_with_another_model_is_refused_before_anything_is_written(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    common = ["task=regression", *tiny_overrides(cache_dir), "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    run_train(common, cwd=tmp_path)
    recorded = (run_dir / ".hydra" / "config.yaml").read_text()
    last = run_dir / "checkpoints" / "last.pt"
    stamp = last.stat().st_mtime_ns
    proc = run_train([*common, "backbone.width=0.25", "optimizer.lr=0.01", "trainer.resume=auto"], cwd=tmp_path,
                     check=False)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, proc.stderr
    assert "backbone.width: 0.125 -> 0.25" in error_lines[0] and "optimizer.lr: 0.001 -> 0.01" in error_lines[0]
    assert "size mismatch" not in proc.stdout + proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == recorded and last.stat().st_mtime_ns == stamp
    # values a resume may change (where and how it runs) pass the check
    run_train([*common, "trainer.max_epochs=2", "data.num_workers=0", "trainer.resume=auto"], cwd=tmp_path)
    assert read_summary(run_dir)["epochs_completed"] == 2


def test_progress_auto_writes_plain_lines_when_output_is_not_a_terminal(tmp_path, cache_dir):
    """A SLURM log (output to a file or pipe) gets periodic plain lines, not a tqdm bar's escape codes."""
    run_dir = tmp_path / "run"
    proc = run_train(["task=classification", *tiny_overrides(cache_dir), "trainer.max_epochs=1",
                      "trainer.progress=auto", "trainer.progress_interval_s=0.001", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    log_text = (run_dir / "train.log").read_text()
    assert "epoch 1: batch 1/" in log_text and "left in the epoch" in log_text
    assert "\r" not in proc.stderr + proc.stdout and "\x1b[" not in proc.stderr + proc.stdout
    assert "it/s]" not in proc.stderr  # no tqdm bar
