"""Shared fixtures: a tiny run configuration and a runner for the real ``brain3d-train`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


def tiny_overrides(cache_dir: Path) -> list[str]:
    """A run in seconds on 2 CPU cores: 12 subjects of 32^3, width 0.125, 2 epochs, no worker processes, no
    report.html (drawing it costs ~0.5 s a run; tests/test_report.py turns it on)."""
    return ["debug=fast", f"data.cache_dir={cache_dir}", "trainer.progress=false", "trainer.device=cpu",
            "trainer.report=false"]


def run_train(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``brain3d-train`` as a user would (through ``python -m`` so the test uses this interpreter)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("CI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "brain3d.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"brain3d-train {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One synthetic-data cache for the whole session (the phantoms are generated once)."""
    return tmp_path_factory.mktemp("brain3d_cache")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """One tiny debug=fast run per single task (2 epochs on the synthetic phantoms), trained once for the session
    and shared by the modules that only read its outputs (predict, predict input=, export, report); the
    segmentation and classification runs write report.html (segmentation: 2 of its 3 validation subjects
    pictured). Tests must not write into these folders."""
    root = tmp_path_factory.mktemp("tiny_runs")
    runs = {}
    for task in ("segmentation", "classification", "regression"):
        report = {"segmentation": ["trainer.report=true", "trainer.report_subjects=2"],
                  "classification": ["trainer.report=true"]}.get(task, [])
        run_train([f"task={task}", *tiny_overrides(cache_dir), *report, f"hydra.run.dir={root / task}"], cwd=root)
        runs[task] = root / task
    return runs
