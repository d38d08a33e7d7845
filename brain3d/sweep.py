"""Sweeps (``brain3d-train -m``): a failed job is recorded, not fatal, and ``sweep_summary.csv`` lists every job.

- In a multirun, ``main`` catches a job's error, writes it to ``error.txt`` in the job folder and returns NaN, so
  Hydra goes on with the other jobs (and a sweeper such as Optuna sees a failed trial, not a crash).
- :class:`SweepSummary`, a Hydra callback registered in ``configs/train.yaml`` (``hydra.callbacks``), writes
  ``job_status.json`` in each job folder when the job ends (in the job's own process, so it also works with
  launchers that run jobs elsewhere, e.g. SLURM), and at the end of the sweep gathers them with each job's
  ``summary.json`` into ``<sweep dir>/sweep_summary.csv``: one row per job.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("brain3d.sweep")

ERROR_FILE, STATUS_FILE, SUMMARY_FILE = "error.txt", "job_status.json", "sweep_summary.csv"


def in_multirun() -> bool:
    """True inside a job of ``brain3d-train -m`` (Hydra's MULTIRUN mode)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_job_error(job_dir: str | Path, err: BaseException) -> Path:
    """Write ``err`` (its message first, then the traceback) to ``<job_dir>/error.txt``."""
    path = Path(job_dir) / ERROR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path.write_text(f"{type(err).__name__}: {err}\n\n{trace}")
    return path


SWEPT_KEYS_ENV = "BRAIN3D_SWEPT_KEYS"  # set by SweepSummary.on_multirun_start, read by swept_dirname


def swept_keys(task_overrides, sweeper_params=None) -> list[str]:
    """The keys a sweep varies: command-line overrides with several values (``a,b``, ``range(..)``, ``glob(..)``)
    and the sweeper's own ``params`` (e.g. Optuna's search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for override in OverridesParser.create().parse_overrides([str(o) for o in task_overrides]):
        if override.is_sweep_override():
            keys.append(override.key_or_group)
    return keys + [str(k) for k in (sweeper_params or {}) if str(k) not in keys]


def swept_dirname(job_overrides) -> str:
    """A job folder's name from the swept keys only (``loss=dice,backbone.width=0.5``), not from every override:
    paths and lists in a name make folders no one can read. Used by configs/train.yaml's hydra.sweep.subdir."""
    keys = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]
    parts = []
    for override in job_overrides:
        key, _, value = str(override).partition("=")
        if key.lstrip("+~") in keys:
            parts.append(f"{key.lstrip('+~')}={value}".replace("/", "_"))
    return ",".join(parts)


def _first_line(path: Path) -> str:
    return path.read_text().splitlines()[0] if path.is_file() else ""


class SweepSummary(Callback):
    """``job_status.json`` per job (on_job_end) and ``sweep_summary.csv`` per sweep (on_multirun_end); at the
    start, the swept keys for the job folders' names (:func:`swept_dirname`), passed through the environment
    so launchers that run jobs in other processes (submitit, SLURM) see them too."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params") if "sweeper" in config.hydra else None
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config.hydra.overrides.task, params))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and not (job_dir / ERROR_FILE).is_file():
            record_job_error(job_dir, job_return._return_value)  # an error main() did not catch
        value = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        failed = (job_dir / ERROR_FILE).is_file() or job_return.status != JobStatus.COMPLETED
        status = {
            "job": int(config.hydra.job.num),
            "overrides": " ".join(job_return.overrides or []),
            "status": "failed" if failed else "ok",
            "error": _first_line(job_dir / ERROR_FILE) if failed else "",
            "return_value": float(value) if isinstance(value, (int, float)) else None,
        }
        (job_dir / STATUS_FILE).write_text(json.dumps(status, indent=2))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_rows(sweep_dir)
        if not rows:
            return
        path = write_sweep_summary(rows, sweep_dir / SUMMARY_FILE)
        failed = [r for r in rows if r["status"] != "ok"]
        log.info("sweep summary: %d jobs, %d failed -> %s", len(rows), len(failed), path)
        for row in failed:
            log.warning("job %s (%s) failed: %s", row["job"], row["overrides"], row["error"])


def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per job folder under ``sweep_dir``: its status, then final val metrics and best metric."""
    rows = []
    for status_path in sweep_dir.rglob(STATUS_FILE):
        row = json.loads(status_path.read_text())
        summary_path = status_path.parent / "summary.json"
        if summary_path.is_file() and row["status"] == "ok":
            summary = json.loads(summary_path.read_text())
            row["epochs"] = summary.get("epochs_completed")
            row.update({f"val_{k}": v for k, v in summary.get("final_val", {}).items()})
            best = summary.get("best_metric") or {}
            row["best_metric"], row["best_value"], row["best_epoch"] = (best.get("name"), best.get("value"),
                                                                        best.get("epoch"))
        row["folder"] = str(status_path.parent.relative_to(sweep_dir))
        rows.append(row)
    return sorted(rows, key=lambda r: r["job"])


def write_sweep_summary(rows: list[dict], path: Path) -> Path:
    head = ["job", "overrides", "status", "error", "folder", "epochs", "best_metric", "best_value", "best_epoch"]
    metrics = sorted({k for r in rows for k in r if k.startswith("val_")})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=head + metrics, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


OmegaConf.register_new_resolver("brain3d.swept_dirname", swept_dirname, replace=True)
