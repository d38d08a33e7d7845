#!/usr/bin/env python
"""Data-loading throughput: decoding .nii.gz + preprocessing every time (cold) vs the preprocessed cache (warm).

Writes a temporary dataset of ``--subjects`` volumes per shape (int16 with scl_slope / scl_inter, .nii.gz,
1 mm voxels, random smooth content plus ``--noise`` Gaussian noise inside an ellipsoidal "head" with an
exactly-zero background), then, for each shape and each ``--workers`` value, reads every subject through a
torch DataLoader (batch size 1; ``--cold-passes`` / ``--warm-passes`` epochs, the mean per epoch is reported):

* cold: ``load_nifti`` + ``preprocess_volume`` per item (gzip decode, scaling, reorientation, resampling,
  crop/pad, normalisation), what a loader without a cache does every epoch;
* warm: ``cached_volume`` (memory-mapped .npy) + ``np.array`` (the copy a Dataset makes before augmenting),
  after the cache was filled once (the fill time is reported too). The cache files are then in the OS page
  cache, as they are from the second epoch on; on a network filesystem a first warm read is slower.

Each (shape, phase, workers) runs in a fresh forked process so its peak RSS (``resource.getrusage``) is its
own: "main" is that process, "worker" the largest DataLoader worker (RUSAGE_CHILDREN); both include the
torch import (see "baseline" in the header) and, for warm reads, the mapped cache pages the process touched.

The default run (16 subjects of 128^3 and of 182x218x182, workers 0 1 2; 1 cold and 3 warm epochs per
measurement) takes about 15 s on 2 CPU cores. Shrink it with e.g. ``--subjects 4 --shapes 128 --workers 0 2
--warm-passes 1``. The synthetic files (about 1 and 3 MB of .nii.gz) compress better than real T1 scans
(typically 5-15 MB for 182x218x182), so real cold decoding is slower than measured here; raise ``--noise``
to approach it.

Example:
    python scripts/benchmark_data.py
    python scripts/benchmark_data.py --mode resize --out-shape 96 96 96 --subjects 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from brain3d.data.cache import cached_volume
from brain3d.data.nifti import load_nifti
from brain3d.data.preprocess import preprocess_volume, validate_settings


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"shape must be N or DxHxW with sides >= 8, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def smooth_volume(shape: tuple[int, int, int], rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    """Random smooth content (a few low-frequency separable waves) inside an ellipsoid, zero outside.

    numpy only: the parent process must not start torch's OpenMP pool before forking (a forked child
    that then uses torch's threads hangs).
    """
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    vol = np.full(shape, 1.0, dtype=np.float32)
    for _ in range(4):
        f = [np.cos(rng.uniform(1, 6) * a + rng.uniform(0, 2 * np.pi)).astype(np.float32) for a in axes]
        vol += np.float32(rng.uniform(0.1, 0.4)) * f[0][:, None, None] * f[1][None, :, None] * f[2][None, None, :]
    r2 = sum(((a / np.float32(rad)) ** 2)[tuple(slice(None) if i == k else None for i in range(3))]
             for k, (a, rad) in enumerate(zip(axes, rng.uniform(0.75, 0.9, 3))))
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise)  # scanner-like noise: sets the gzip ratio
    vol[r2 >= 1.0] = 0.0
    return vol


def write_dataset(root: Path, shape: tuple[int, int, int], n: int, seed: int, noise: float) -> list[Path]:
    """``n`` int16 .nii.gz files with scl_slope 0.5 / scl_inter 0 (raw 0..4000 -> 0..2000), 1 mm voxels."""
    paths = []
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-(s - 1) / 2 for s in shape]
    for i in range(n):
        vol = smooth_volume(shape, np.random.default_rng([seed, i]), noise)
        raw = np.round(vol * 2000).astype(np.int16)
        img = nib.Nifti1Image(raw, affine)
        img.header.set_data_dtype(np.int16)
        img.header.set_slope_inter(0.5, 0.0)
        path = root / f"{shape[0]}x{shape[1]}x{shape[2]}" / f"sub-{i:03d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        paths.append(path)
    return paths


class ColdDataset(Dataset):
    def __init__(self, paths, settings):
        self.paths, self.settings = paths, settings

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        data, affine = load_nifti(self.paths[i])
        voxel = np.sqrt((affine[:3, :3] ** 2).sum(0))
        image, _, _ = preprocess_volume(data, voxel, self.settings)
        return torch.from_numpy(image)[None]


class WarmDataset(Dataset):
    def __init__(self, paths, settings, cache_dir):
        self.paths, self.settings, self.cache_dir = paths, settings, cache_dir

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image, _, _ = cached_volume(self.paths[i], None, self.settings, self.cache_dir)
        return torch.from_numpy(np.array(image))[None]  # copy out of the memmap, as a Dataset would


def _measure(phase, paths, settings, cache_dir, workers, passes, queue) -> None:
    """Child process body: ``passes`` epochs over the dataset (a new DataLoader each, as in training);
    report (seconds per pass, main RSS MB, worker RSS MB)."""
    try:
        dataset = ColdDataset(paths, settings) if phase == "cold" else WarmDataset(paths, settings, cache_dir)
        if phase == "fill":
            start = time.perf_counter()
            for p in paths:
                cached_volume(p, None, settings, cache_dir)
            queue.put((time.perf_counter() - start, 0.0, 0.0))
            return
        start = time.perf_counter()
        total = 0.0
        for _ in range(passes):
            loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers)
            for batch in loader:
                total += float(batch[0, 0, 0, 0, 0])  # touch the batch
            del loader
        seconds = (time.perf_counter() - start) / passes
        main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0.0
        queue.put((seconds, main_mb, worker_mb))
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        queue.put(repr(err))
        raise


def run_isolated(phase, paths, settings, cache_dir, workers, passes=1) -> tuple[float, float, float]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(phase, paths, settings, cache_dir, workers, passes, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    if isinstance(result, str):
        raise RuntimeError(f"{phase} with {workers} workers failed: {result}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=16, help="volumes per shape (default 16)")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(128, 128, 128), (182, 218, 182)],
                        help="input shapes, N or DxHxW (default 128x128x128 182x218x182)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="DataLoader num_workers values (default 0 1 2)")
    parser.add_argument("--mode", choices=["spacing", "resize"], default="spacing",
                        help="preprocess.mode (default spacing)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5],
                        help="mode spacing: mm (default 1.5 1.5 1.5)")
    parser.add_argument("--out-shape", type=int, nargs=3, default=[128, 128, 128],
                        help="preprocess.shape: crop/pad target (spacing) or resize target (resize); "
                             "default 128 128 128")
    parser.add_argument("--normalization", choices=["zscore", "percentile"], default="zscore")
    parser.add_argument("--noise", type=float, default=0.03,
                        help="noise sd relative to the mean intensity; sets the .nii.gz size (default 0.03)")
    parser.add_argument("--cold-passes", type=int, default=1, help="epochs timed per cold measurement (default 1)")
    parser.add_argument("--warm-passes", type=int, default=3, help="epochs timed per warm measurement (default 3)")
    parser.add_argument("--keep", type=Path, default=None, help="write the data and cache here and keep them")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.mode == "spacing":
        settings = {"mode": "spacing", "spacing": args.spacing, "crop_foreground": True, "foreground_margin": 4,
                    "shape": args.out_shape, "normalization": args.normalization}
    else:
        settings = {"mode": "resize", "shape": args.out_shape, "normalization": args.normalization}
    settings = validate_settings(settings)
    root = args.keep or Path(tempfile.mkdtemp(prefix="brain3d_bench_data_"))
    root.mkdir(parents=True, exist_ok=True)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"settings: {settings}")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"baseline RSS after imports {baseline:.0f} MB, data in {root}")
    rows = []
    try:
        for shape in args.shapes:
            start = time.perf_counter()
            paths = write_dataset(root / "data", shape, args.subjects, args.seed, args.noise)
            written = time.perf_counter() - start
            gz_mb = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
            cache_dir = root / "cache"
            fill_s, _, _ = run_isolated("fill", paths, settings, cache_dir, 0)
            shape_txt = "x".join(map(str, shape))
            npy = [p for p in (cache_dir).rglob("*.image.npy")]
            print(f"{shape_txt}: wrote {len(paths)} files in {written:.1f} s ({gz_mb:.1f} MB .nii.gz each); "
                  f"cache fill {fill_s:.1f} s ({len(paths) / fill_s:.1f} vol/s, 1 process), "
                  f"{sum(p.stat().st_size for p in npy) / max(len(npy), 1) / 2**20:.1f} MB .npy each")
            for workers in args.workers:
                cold = run_isolated("cold", paths, settings, cache_dir, workers, args.cold_passes)
                warm = run_isolated("warm", paths, settings, cache_dir, workers, args.warm_passes)
                rows.append((shape_txt, workers, len(paths) / cold[0], len(paths) / warm[0],
                             cold[1], cold[2], warm[1], warm[2]))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    header = ("input shape", "workers", "cold vol/s", "warm vol/s", "speed-up", "cold RSS main/worker MB",
              "warm RSS main/worker MB")
    lines = [header]
    for shape_txt, workers, cold, warm, cm, cw, wm, ww in rows:
        lines.append((shape_txt, str(workers), f"{cold:.2f}", f"{warm:.1f}", f"{warm / cold:.0f}x",
                      f"{cm:.0f} / {cw:.0f}" if workers else f"{cm:.0f} / -",
                      f"{wm:.0f} / {ww:.0f}" if workers else f"{wm:.0f} / -"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    print()
    for i, row in enumerate(lines):
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
