"""Multi-process DistributedDataParallel training: 2 CPU processes (gloo) under torchrun, one run folder, and
validation metrics equal to a single-process evaluation of the saved model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from brain3d import engine
from brain3d.checkpoint import load_checkpoint
from brain3d.data.dataset import VolumeDataset
from brain3d.data.loaders import make_loader
from brain3d.data.preprocess import validate_settings
from brain3d.data.sampling import ResumableBatchSampler
from brain3d.models.model import build_model
from brain3d.tasks import single_task
from brain3d.train import build_loss, read_manifest

from tests.conftest import read_summary, tiny_overrides


def run_torchrun(args: list[str], cwd, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("CI", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "--module", "brain3d.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def evaluate_single_process(run_dir):
    """last.pt evaluated by one process on the run's validation split (split.csv)."""
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = OmegaConf.create(state["config"])
    task_name = state["task"]
    with open(run_dir / "split.csv") as f:
        val_ids = [row["subject_id"] for row in csv.DictReader(f) if row["split"] == "val"]
    by_id = {s.subject_id: s for s in read_manifest(cfg.data, task_name).subjects}
    val_set = VolumeDataset([by_id[i] for i in val_ids], task_name, validate_settings(cfg.preprocess), None)
    loader = make_loader(val_set, cfg.data, torch.device("cpu"), shuffle=False, seed=cfg.trainer.seed)
    model = build_model(cfg.backbone, cfg.task.head, head_name=task_name)
    model.load_state_dict(state["model"])
    task = single_task(task_name, None, state["target_mean"], state["target_std"])
    metrics, _ = engine.evaluate(model, loader, build_loss(cfg), task, torch.device("cpu"), None, progress=False)
    return metrics, len(val_ids)


# segmentation in the default run (its gather is the most involved); the other two with -m slow (~8 s each)
@pytest.mark.parametrize("task", [pytest.param("classification", marks=pytest.mark.slow),
                                  pytest.param("regression", marks=pytest.mark.slow), "segmentation"])
def test_two_process_ddp_run_matches_single_process_evaluation(task, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    # fp32: the single-process reference below evaluates in fp32 (auto would be bf16 on a CPU with bf16)
    proc = run_torchrun([f"task={task}", *tiny_overrides(cache_dir), "data.num_workers=0", "trainer.precision=fp32",
                         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"

    # one folder, written once, by rank 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    summary = read_summary(run_dir)
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert summary["epochs_completed"] == 2 and len(summary["history"]) == 2
    assert summary["final_train"]["loss"] > 0
    assert (run_dir / "train.log").read_text().count("epoch 2/2") == 1

    # the key check: validation sharded over 2 ranks and gathered == one process over the whole split
    metrics, num_val = evaluate_single_process(run_dir)
    assert summary["data"]["num_val"] == num_val
    assert set(metrics) == set(summary["final_val"])
    for name, value in metrics.items():
        assert summary["final_val"][name] == pytest.approx(value, rel=1e-5, abs=1e-5), (
            name, summary["final_val"], metrics)


def test_batch_sampler_shards_are_disjoint_and_equal_length():
    sampler = list(range(11))
    full = list(ResumableBatchSampler(sampler, 2, drop_last=False))  # 6 batches, the last of one
    shards = [list(ResumableBatchSampler(sampler, 2, drop_last=False, rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in shards] == [1, 1, 1, 1]
    assert shards == [[full[0]], [full[1]], [full[2]], [full[3]]]
    two = [ResumableBatchSampler(sampler, 2, drop_last=False, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in two] == [3, 3]
    assert list(two[0]) == full[0:6:2] and list(two[1]) == full[1:6:2]
    two[1].start = 1  # a mid-epoch resume skips this rank's own first batch
    assert list(two[1]) == full[3:6:2]


def test_evaluate_gather_reassembles_round_robin_shards():
    import numpy as np
    parts = [np.array([0.0, 2.0, 4.0]), np.array([1.0, 3.0])]
    assert engine._interleave(parts).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_sync_batchnorm_is_refused_on_cpu(tmp_path, cache_dir):
    proc = run_torchrun(["task=classification", *tiny_overrides(cache_dir), "trainer.sync_batchnorm=true",
                         f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "trainer.sync_batchnorm=true needs CUDA" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
