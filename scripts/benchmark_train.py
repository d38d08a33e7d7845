#!/usr/bin/env python
"""Training throughput of brain3d: the model's compute ceiling, and the whole loop measured against it.

Two modes:

* default: the compute-only train step (forward + float32 loss + backward + clipping + AdamW on random
  volumes already in memory, after warm-up steps) per task, shape and width; a table of volumes/s and
  peak memory, to size data.shape, data.batch_size and trainer.max_epochs for a machine.
* ``--end-to-end``: in one process, on one machine, for one model, shape, batch, precision and memory format:
  (a) the compute-only train step (the ceiling; measured before and after the loops, the higher one counts),
  (b) brain3d's own training loop (``brain3d.train.train``, as ``brain3d-train`` runs it) on real .nii.gz
      files through the disk cache, epochs after the first (warm cache, warm kernels),
  (c) when monai is installed, MONAI's reference loops on the same files, model, loss and optimizer:
      CacheDataset + DataLoader (``--monai-workers`` processes) with RandFlipd, and on CUDA the GPU-cached
      recipe (ToDeviced + RandFlipd on the GPU + ThreadDataLoader(num_workers=0)),
  and prints volumes/s, the ratio of each to (a), data_wait_fraction and peak memory.

Examples:
    python scripts/benchmark_train.py --tasks segmentation classification --shapes 48 64 --batch-size 2
    python scripts/benchmark_train.py --end-to-end                       # CPU: width 0.25, 64^3, batch 2
    python scripts/benchmark_train.py --end-to-end --width 1 --shapes 128 --precision bf16   # a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from brain3d.engine import autocast, to_memory_format
from brain3d.hardware import guard_cpu_bf16_convolutions, resolve_channels_last, resolve_precision
from brain3d.losses import DiceBCELoss
from brain3d.models.model import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]
HEADS = {
    "classification": {"_target_": "brain3d.models.heads.GlobalPoolHead"},
    "regression": {"_target_": "brain3d.models.heads.GlobalPoolHead"},
    "segmentation": {"_target_": "brain3d.models.heads.SegmentationHead"},
}
BACKBONES = {"plain": "brain3d.models.backbones.PlainBackbone", "resnet": "brain3d.models.backbones.ResNetBackbone"}
CLIP_NORM = 5.0  # trainer.gradient_clip_norm's default


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: torch's peak allocation since the last reset; CPU: the process's peak RSS so far (monotonic)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def make_model(task: str, backbone: str, width: float, device: torch.device, channels_last: bool, amp_dtype=None):
    torch.manual_seed(0)
    model = build_model({"_target_": BACKBONES[backbone], "width": width}, HEADS[task], head_name=task).to(device)
    if device.type == "cpu" and amp_dtype is torch.bfloat16:
        guard_cpu_bf16_convolutions(model)  # as brain3d-train does
    return model.to(memory_format=torch.channels_last_3d) if channels_last else model


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # configs/optimizer/adamw.yaml, with brain3d's fused kernel on CUDA
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, **fused)


def train_step(model, optimizer, scaler, loss_fn, image, target, task, device, amp_dtype,
               channels_last) -> torch.Tensor:
    """One optimizer step as brain3d's loop takes it: autocast forward, float32 loss, backward, clipping."""
    with autocast(device, amp_dtype):
        logits = model(to_memory_format(image, channels_last))[task]
    loss = loss_fn(logits, target)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def compute_only(task: str, backbone: str, size: int, width: float, batch_size: int, precision: str,
                 device: torch.device, steps: int, warmup: int, channels_last: bool) -> dict:
    """(a) the ceiling: train steps on volumes already on the device, no data loading, no host sync per step."""
    _, amp_dtype, _ = resolve_precision(precision, device)
    model = make_model(task, backbone, width, device, channels_last, amp_dtype)
    optimizer = make_optimizer(model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 1, size, size, size, generator=generator).to(device)  # (B, 1, D, H, W)
    if task == "segmentation":
        target = (torch.rand(batch_size, 1, size, size, size, generator=generator) > 0.97).float().to(device)
        loss_fn = DiceBCELoss()
    else:
        target = torch.rand(batch_size, 1, generator=generator).round().to(device)
        loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    reset_peak(device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        loss = train_step(model, optimizer, scaler, loss_fn, image, target, task, device, amp_dtype, channels_last)
    loss.item()  # waits for the device
    seconds = time.perf_counter() - start
    return {"task": task, "backbone": backbone, "shape": f"{size}^3", "width": width, "batch": batch_size,
            "precision": precision, "params": count_parameters(model), "vol/s": steps * batch_size / seconds,
            "peak MB": peak_memory_mb(device)}


# ------------------------------------------------------------------------------------------------ end to end


def brain3d_loop(args, work: Path, precision: str, channels_last: bool, resident: str) -> tuple[dict, Path]:
    """(b) ``brain3d.train.train`` on the built-in synthetic subjects (real .nii.gz files through the cache)."""
    from hydra import compose, initialize_config_dir

    from brain3d.train import train

    overrides = [
        f"task={args.task}", f"backbone={args.backbone}", f"backbone.width={args.width}", "data=synthetic",
        f"data.num_subjects={args.subjects}", f"data.shape=[{args.shapes[0]},{args.shapes[0]},{args.shapes[0]}]",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", f"data.cache_dir={work / 'cache'}",
        f"data.resident={resident}", f"trainer.max_epochs={args.epochs}", f"trainer.precision={precision}",
        f"trainer.channels_last={str(channels_last).lower()}", f"trainer.device={args.device}",
        "trainer.progress=false", "trainer.log_images=false",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.output_dir = str(work / "brain3d_run")
    device = torch.device(args.device)
    reset_peak(device)
    train(cfg)
    summary = json.loads((work / "brain3d_run" / "summary.json").read_text())
    epochs = summary["history"][1:] or summary["history"]  # the first epoch warms kernels (and a cold cache)
    row = {"loop": f"brain3d-train (data.resident={resident}: {summary['data_resident']['mode']})",
           "vol/s": statistics.mean(h["train_volumes_per_second"] for h in epochs),
           "data_wait": statistics.mean(h["train_data_wait_fraction"] for h in epochs),
           "peak MB": peak_memory_mb(device), "epochs timed": len(epochs)}
    return row, Path(summary["data"]["manifest"])


def monai_loaders(args, manifest: Path, run_dir: Path) -> list[tuple[str, object]]:
    """(c) MONAI's recipes on the same training files (brain3d's training split): ``[(name, loader)]``, the
    volumes cached once; :func:`monai_loop` trains the same model, loss (brain3d's float32 Dice+BCE) and AdamW."""
    try:
        import monai  # noqa: F401
    except ImportError:
        print("monai is not installed: no MONAI reference (pip install monai)", file=sys.stderr)
        return []
    import csv

    from monai.data import CacheDataset, DataLoader, ThreadDataLoader
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandFlipd,
        Resized,
        ToDeviced,
    )

    device = torch.device(args.device)
    train_ids = {row["subject_id"] for row in csv.DictReader(open(run_dir / "split.csv")) if row["split"] == "train"}
    with open(manifest) as f:
        rows = [r for r in csv.DictReader(f) if r["subject_id"] in train_ids]
    files = [{"image": str(manifest.parent / r["image"]), "label": str(manifest.parent / r["mask"])} for r in rows]
    size = args.shapes[0]
    deterministic = [
        LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Resized(keys=["image", "label"], spatial_size=(size, size, size), mode=("trilinear", "nearest")),
        NormalizeIntensityd(keys="image", nonzero=True), EnsureTyped(keys=["image", "label"], track_meta=False),
    ]
    flips = [RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=axis) for axis in range(3)]
    recipes = [("MONAI CacheDataset + DataLoader", Compose(deterministic + flips), False)]
    if device.type == "cuda":
        to_gpu = [ToDeviced(keys=["image", "label"], device=str(device))]
        gpu_recipe = Compose(deterministic + to_gpu + flips)
        recipes.append(("MONAI GPU-cached (ToDeviced + ThreadDataLoader)", gpu_recipe, True))
    loaders = []
    for name, transform, gpu_cached in recipes:
        dataset = CacheDataset(files, transform=transform, cache_rate=1.0, num_workers=args.workers, progress=False)
        if gpu_cached:
            loader = ThreadDataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True)
        else:
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.monai_workers,
                                drop_last=True, pin_memory=device.type == "cuda",
                                persistent_workers=args.monai_workers > 0)
        loaders.append((name, loader))
    return loaders


def monai_loop(args, name: str, loader, precision: str, channels_last: bool) -> dict:
    """One MONAI row: a fresh model trained ``args.epochs`` epochs from ``loader``; epochs after the first timed."""
    device = torch.device(args.device)
    _, amp_dtype, _ = resolve_precision(precision, device)
    model = make_model(args.task, args.backbone, args.width, device, channels_last, amp_dtype)
    optimizer = make_optimizer(model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = DiceBCELoss()
    model.train()
    reset_peak(device)
    speeds, waits = [], []
    for epoch in range(args.epochs):
        start, wait, volumes, epoch_loss = time.perf_counter(), 0.0, 0, 0.0
        t = time.perf_counter()
        for batch in loader:
            wait += time.perf_counter() - t
            image = batch["image"].to(device, non_blocking=True).float()
            label = batch["label"].to(device, non_blocking=True).float()
            loss = train_step(model, optimizer, scaler, loss_fn, image, label, args.task, device, amp_dtype,
                              channels_last)
            epoch_loss += loss.item()  # as MONAI's tutorials log it
            volumes += image.shape[0]
            t = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if epoch > 0 or args.epochs == 1:
            speeds.append(volumes / seconds)
            waits.append(wait / seconds)
    return {"loop": name, "vol/s": statistics.mean(speeds), "data_wait": statistics.mean(waits),
            "peak MB": peak_memory_mb(device), "epochs timed": len(speeds)}


def end_to_end(args) -> None:
    device = torch.device(args.device)
    precision, _, reason = resolve_precision(args.precision, device)
    channels_last = resolve_channels_last(args.channels_last == "true")
    size = args.shapes[0]
    logging.basicConfig(level=logging.WARNING)
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.task}, {args.backbone} width "
          f"{args.width}, {size}^3, batch {args.batch_size}, precision {precision} ({reason}), channels_last "
          f"{channels_last}")
    train_volumes = args.subjects - round(args.subjects * 0.25)  # data.val_fraction's default
    # The ceiling times as many steps as the loop's timed epochs take (one epoch's batches per timed epoch).
    steps = max(train_volumes // args.batch_size, 4) * max(args.epochs - 1, 1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="brain3d_bench_"))

    def ceiling() -> dict:
        return compute_only(args.task, args.backbone, size, args.width, args.batch_size, precision, device,
                            steps=steps, warmup=args.warmup, channels_last=channels_last)

    # Shared machines are noisy (+-10% between two identical measurements here), so the rows are measured
    # in turns, `--repeats` times, with the ceiling before and after each turn: every loop is compared to the
    # mean of the ceilings around it, and the median over the turns is reported.
    ceilings = [ceiling()]
    runs: dict[str, list[dict]] = {}
    ratios: dict[str, list[float]] = {}
    monai = None
    for repeat in range(args.repeats):
        turn = []
        for resident in args.resident:
            row, manifest = brain3d_loop(args, work, precision, channels_last, resident)
            turn.append(row)
        if not args.no_monai:
            if monai is None:
                monai = monai_loaders(args, manifest, work / "brain3d_run")
            turn += [monai_loop(args, name, loader, precision, channels_last) for name, loader in monai]
        ceilings.append(ceiling())
        around = (ceilings[-2]["vol/s"] + ceilings[-1]["vol/s"]) / 2
        for row in turn:
            runs.setdefault(row["loop"], []).append(row)
            ratios.setdefault(row["loop"], []).append(row["vol/s"] / around)
    speeds = [c["vol/s"] for c in ceilings]
    print(f"ceiling measured {len(speeds)} times: {', '.join(f'{v:.2f}' for v in speeds)} vol/s")
    print(f"{'loop':<52} | {'vol/s':>8} | {'x ceiling':>9} | {'range':>11} | {'data wait':>9} | {'peak MB':>8}")
    print(f"{'compute-only train step (ceiling)':<52} | {statistics.median(speeds):>8.2f} | {1.0:>9.3f} | "
          f"{'':>11} | {0.0:>9.3f} | {max(c['peak MB'] for c in ceilings):>8.0f}")
    for name, rows in runs.items():
        r = ratios[name]
        print(f"{name:<52} | {statistics.median(x['vol/s'] for x in rows):>8.2f} | {statistics.median(r):>9.3f} | "
              f"{min(r):>5.3f}-{max(r):<5.3f} | {statistics.median(x['data_wait'] for x in rows):>9.3f} | "
              f"{max(x['peak MB'] for x in rows):>8.0f}")
    first_brain3d = next(iter(runs))
    for name in runs:
        if name.startswith("MONAI"):
            paired = [a["vol/s"] / b["vol/s"] for a, b in zip(runs[first_brain3d], runs[name])]
            print(f"brain3d ({first_brain3d.split('(')[1][:-1]}) / {name}: {statistics.median(paired):.2f}x "
                  f"(median over {len(paired)} turns)")
    print(f"vol/s, x ceiling and data wait: medians over {args.repeats} turn(s), each loop timed over "
          f"{args.epochs - 1} epoch(s) after its first and compared to the mean of the ceilings ({steps} steps each) "
          f"before and after its turn")
    if device.type != "cuda":
        print("peak MB on CPU is the process's peak RSS so far (monotonic over the rows, in order of running)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--end-to-end", action="store_true",
                        help="compare brain3d's loop (and MONAI's) to the compute step")
    parser.add_argument("--tasks", nargs="+", default=["classification", "segmentation"], choices=sorted(HEADS),
                        help="default mode: the tasks to time")
    parser.add_argument("--task", default="segmentation", choices=["segmentation"], help="--end-to-end: the task")
    parser.add_argument("--backbone", default="plain", choices=sorted(BACKBONES))
    parser.add_argument("--shapes", nargs="+", type=int, default=[64], help="cubic input sizes (multiples of 16)")
    parser.add_argument("--width", type=float, default=None, help="backbone width (default 1; 0.25 with --end-to-end)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                        help="default fp32; auto with --end-to-end (what trainer.precision=auto picks)")
    parser.add_argument("--channels-last", default="true", choices=["true", "false"],
                        help="channels_last_3d memory format (trainer.channels_last; default true)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="default mode: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--subjects", type=int, default=96, help="--end-to-end: synthetic subjects (75%% train)")
    parser.add_argument("--epochs", type=int, default=4, help="--end-to-end: epochs per loop (the first is not timed)")
    parser.add_argument("--workers", type=int, default=2, help="--end-to-end: data.num_workers / CacheDataset threads")
    parser.add_argument("--monai-workers", type=int, default=2, help="--end-to-end: MONAI DataLoader processes")
    parser.add_argument("--resident", nargs="+", default=["auto"], choices=["auto", "device", "host", "off"],
                        help="--end-to-end: data.resident of brain3d's loop, one row each (the first is compared "
                             "to MONAI)")
    parser.add_argument("--repeats", type=int, default=5, help="--end-to-end: turns of every loop (medians reported)")
    parser.add_argument("--no-monai", action="store_true", help="--end-to-end: skip the MONAI reference loops")
    parser.add_argument("--work-dir", default=None, help="--end-to-end: data and run folder (default: a new temp dir)")
    args = parser.parse_args()
    if args.end_to_end:
        args.width = 0.25 if args.width is None else args.width
        args.precision = args.precision or "auto"
        end_to_end(args)
        return
    args.width = 1.0 if args.width is None else args.width
    precision = args.precision or "fp32"
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    channels_last = resolve_channels_last(args.channels_last == "true")
    rows = [compute_only(t, args.backbone, s, args.width, args.batch_size, precision, device, args.steps, args.warmup,
                         channels_last) for t in args.tasks for s in args.shapes]
    columns = list(rows[0])
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>14.2f}" if isinstance(row[c], float) else f"{row[c]!s:>14}" for c in columns))


if __name__ == "__main__":
    main()
