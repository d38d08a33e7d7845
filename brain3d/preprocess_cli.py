"""``brain3d-preprocess``: fill the preprocessed-volume cache for a whole manifest, ahead of training.

It is a Hydra app on the *training* config (``configs/preprocess_data.yaml`` composes ``configs/train.yaml``
and adds ``preprocess_workers``), so it takes exactly the groups and overrides a training run takes and fills
exactly the entries that run will read::

    brain3d-preprocess task=segmentation data=nifti data.manifest=/data/study/manifest.csv preprocess=spacing
    brain3d-preprocess data=nifti data.manifest=... preprocess_workers=8   # default auto: the usable CPUs

Settings come from ``cfg.preprocess`` (see :mod:`brain3d.data.preprocess`), the cache folder is
``<data.cache_dir>/preprocessed`` (``~/.cache/brain3d/preprocessed`` when the data group has no
``cache_dir``). Which files are cached is the task's: images always, masks for segmentation. Every
subject's entry is keyed by its files' identities and the settings (:mod:`brain3d.data.cache`), so a
second run is all hits and several runs at once are safe.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import hydra
from omegaconf import DictConfig
from tqdm.auto import tqdm

from brain3d.cli import config_dir, groups_help, progress_mode, report_user_error, run_command
from brain3d.command_setup import preprocessed_cache_dir, read_manifest
from brain3d.data.cache import ensure_cached
from brain3d.data.manifest import ManifestError
from brain3d.data.nifti import NiftiReadError
from brain3d.data.preprocess import validate_settings
from brain3d.errors import ConfigError
from brain3d.hardware import worker_count
from brain3d.tasks import head_specs

log = logging.getLogger("brain3d.preprocess")
AUTO_WORKERS = "auto"


def resolve_workers(cfg: DictConfig, num_jobs: int) -> int:
    """Worker processes for ``num_jobs`` subjects: ``cfg.preprocess_workers`` (``auto`` or an integer >= 1), at
    most one per subject (an idle process costs a fork and its imports) and at least one.

    ``cfg.num_workers`` (the undeclared ``+num_workers=N`` of earlier versions) still wins when given, with a
    warning, so existing scripts keep their worker count instead of silently falling back to ``auto``.

    Raises:
        ConfigError: a value that is neither ``auto`` nor a positive integer.
    """
    key, value = "preprocess_workers", cfg.get("preprocess_workers", AUTO_WORKERS)
    if cfg.get("num_workers") is not None:
        key, value = "num_workers", cfg.num_workers
        log.warning("+num_workers=%s is deprecated: use preprocess_workers=%s", value, value)
    return worker_count(key, value, num_jobs)


def _init_worker() -> None:
    # One volume per process at a time: parallelism comes from the processes, not torch's threads.
    import torch

    torch.set_num_threads(1)


def _fill_one(image: str | list[str], mask: str | None, settings: dict, cache_dir: str, num_classes: int = 1) -> bool:
    """Worker: make sure one subject is cached (``num_classes`` >= 2: its mask as a label map); True on a hit."""
    return ensure_cached(image, mask, settings, cache_dir, num_classes)[1]


def _mp_context():
    # fork on Linux (fast, like torch's DataLoader); elsewhere the platform default (spawn).
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def fill_cache(cfg: DictConfig) -> dict:
    """Preprocess every subject of the run's manifest into the cache.

    Args:
        cfg: the composed ``preprocess_data`` config (a training config with a ``preprocess`` node;
            ``cfg.preprocess_workers``: worker processes, see :func:`resolve_workers`; ``cfg.trainer.progress``:
            the tqdm bar).

    Returns:
        ``{"subjects": n, "hits": h, "misses": m, "seconds": s}``.

    Raises:
        ConfigError: no ``preprocess`` node, invalid preprocessing settings or an invalid worker count.
        ManifestError: the manifest cannot be read (files are not decoded here: ``check_data=False``).
    """
    start = time.perf_counter()
    if cfg.get("preprocess") is None:
        raise ConfigError("the config has no preprocess group: add e.g. preprocess=resize")
    try:
        settings = validate_settings(cfg.preprocess)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    cache_dir = preprocessed_cache_dir(cfg.data)
    # a multi-class segmentation's label maps are cached under their own keys, as the training run reads them
    num_classes = max([spec["num_classes"] for spec in head_specs(cfg.task).values()
                       if spec["kind"] == "segmentation"] or [1])
    manifest = read_manifest(cfg.data, cfg.task.name, check_data=False, require_targets=False, num_classes=num_classes)
    manifest_path = manifest.path
    # every channel's file (one channel: the path itself, the key training uses for it)
    jobs = [([str(p) for p in s.image_paths] if len(s.image_paths) > 1 else str(s.image),
             str(s.mask) if s.mask is not None else None) for s in manifest.subjects]
    workers = resolve_workers(cfg, len(jobs))
    progress = progress_mode(cfg.get("trainer", {}).get("progress", "auto")) == "bars"
    log.info("%s: %d subjects -> %s (%d worker processes)", manifest_path, len(jobs), cache_dir, workers)
    hits = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_init_worker) as pool:
        futures = {pool.submit(_fill_one, image, mask, settings, str(cache_dir), num_classes): image
                   for image, mask in jobs}
        bar = tqdm(as_completed(futures), total=len(futures), desc="preprocess", disable=not progress,
                   dynamic_ncols=True)
        for future in bar:
            hits += bool(future.result())
            bar.set_postfix(hits=hits)
    stats = {"subjects": len(jobs), "hits": hits, "misses": len(jobs) - hits, "seconds": time.perf_counter() - start}
    log.info("cache %s: %d subjects, %d hits, %d misses in %.1f s", cache_dir, *stats.values())
    return stats


HELP = f"""brain3d-preprocess: fill the preprocessed-volume cache before training, in parallel.

Reads every scan of the manifest once, preprocesses it exactly as brain3d-train would with the same config
(data, preprocess, task) and stores it under <data.cache_dir>/preprocessed, so that training starts at once and
its DataLoader workers never decode NIfTI files. Pass the same groups and values you will train with.

Config groups it reads:
{groups_help("preprocess_data", ("data", "preprocess", "task"))}
  preprocess_workers: auto (the CPUs this process may use) | N worker processes

Examples:
  brain3d-preprocess data=nifti data.manifest=study.csv
  brain3d-preprocess data=nifti data.manifest=study.csv preprocess=spacing preprocess_workers=16
  brain3d-preprocess task=segmentation data=bids data.root=/data/bids data.mask_suffix=mask
  BRAIN3D_CACHE_DIR=/scratch/$USER/cache brain3d-preprocess data=nifti data.manifest=study.csv

Prints {{"subjects", "hits", "misses", "seconds"}} as JSON. Exit status: 0 done, 2 a mistake in the command,
config or data."""


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="preprocess_data")
def hydra_main(cfg: DictConfig) -> dict:
    try:
        stats = fill_cache(cfg)
    except (ConfigError, ManifestError, FileNotFoundError, NiftiReadError, ValueError) as err:
        report_user_error("brain3d-preprocess", err)
        sys.exit(2)
    print(json.dumps(stats))
    return stats


def main() -> None:
    """``brain3d-preprocess``: --help, the command-line check (brain3d.cli), then Hydra."""
    run_command(hydra_main, "brain3d-preprocess", "preprocess_data", HELP)


if __name__ == "__main__":
    main()
