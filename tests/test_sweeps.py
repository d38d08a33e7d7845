"""Sweeps: a failing job is recorded and the others finish; sweep_summary.csv lists every job; Optuna search."""

from __future__ import annotations

import csv
import json

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIG_DIR, read_summary, run_train, tiny_overrides


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "task=classification", *tiny_overrides(cache_dir), "trainer.max_epochs=1",
                      "trainer.precision=fp32,fp8,fp32", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0
    jobs = {int(p.name.split("_", 1)[0]): p for p in sweep.iterdir() if p.is_dir()}
    assert sorted(jobs) == [0, 1, 2]
    assert "trainer.precision='fp8'" in (jobs[1] / "error.txt").read_text().splitlines()[0]
    assert not (jobs[1] / "summary.json").exists()
    for num in (0, 2):
        assert read_summary(jobs[num])["epochs_completed"] == 1 and not (jobs[num] / "error.txt").exists()
        assert json.loads((jobs[num] / "job_status.json").read_text())["status"] == "ok"

    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed"), ("2", "ok")]
    assert "trainer.precision=fp8" in rows[1]["overrides"] and "fp8" in rows[1]["error"]
    for row in (rows[0], rows[2]):
        assert row["best_metric"] == "val_auc" and row["best_value"] != "" and row["val_loss"] != ""
    assert rows[1]["best_value"] == "" and rows[1]["val_loss"] == ""


def test_optuna_search_space_follows_the_task():
    """configs/hparams_search/optuna.yaml: direction from task.monitor_mode, losses from task.losses."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import brain3d.train  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        seg = compose("train", overrides=["hparams_search=optuna", "task=segmentation"], return_hydra_config=True)
        reg = compose("train", overrides=["hparams_search=optuna", "task=regression"], return_hydra_config=True)
    assert seg.hydra.sweeper.direction == "maximize" and reg.hydra.sweeper.direction == "minimize"
    assert seg.hydra.sweeper.params.loss == "choice(dice_bce,dice,bce)"
    assert reg.hydra.sweeper.params.loss == "choice(l1,mse,huber)"
    assert seg.hydra.sweeper.params["optimizer.lr"].startswith("tag(log")


# Skipped where the plugin is not installed (CI installs only .[test]); about 15 s on 2 CPU cores.
def test_optuna_sweep_of_three_tiny_trials_returns_the_best(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    run_train(["-m", "hparams_search=optuna", "task=classification", *tiny_overrides(cache_dir), "trainer.max_epochs=1",
               "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    from omegaconf import OmegaConf

    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(results.best_params) == {"optimizer.lr", "optimizer.weight_decay", "backbone.width", "loss"}
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert results.best_value == pytest.approx(max(float(r["best_value"]) for r in rows))
