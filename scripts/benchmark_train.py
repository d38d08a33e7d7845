#!/usr/bin/env python
"""Training-step throughput of brain3d's models: volumes/s and peak memory per task, shape and width.

Times forward + backward + optimizer step on random volumes (no data loading), after warm-up steps, on CPU
or CUDA, in fp32 / bf16 / fp16. Prints a table; use it to size data.shape, data.batch_size and
trainer.max_epochs for a machine.

Example:
    python scripts/benchmark_train.py --tasks segmentation classification --shapes 48 64 --batch-size 2
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from brain3d.engine import autocast
from brain3d.models.model import build_model, count_parameters

HEADS = {
    "classification": {"_target_": "brain3d.models.heads.GlobalPoolHead"},
    "regression": {"_target_": "brain3d.models.heads.GlobalPoolHead"},
    "segmentation": {"_target_": "brain3d.models.heads.SegmentationHead"},
}
BACKBONES = {"plain": "brain3d.models.backbones.PlainBackbone", "resnet": "brain3d.models.backbones.ResNetBackbone"}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def benchmark(task: str, backbone: str, size: int, width: float, batch_size: int, precision: str, device: torch.device,
              steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build_model({"_target_": BACKBONES[backbone], "width": width}, HEADS[task], head_name=task).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.randn(batch_size, 1, size, size, size, device=device)  # (B, 1, D, H, W)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device, DTYPES[precision]):
            logits = model(x)[task]
        loss = logits.float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - start
    return {"task": task, "backbone": backbone, "shape": f"{size}^3", "width": width, "batch": batch_size,
            "precision": precision, "params": count_parameters(model), "vol/s": steps * batch_size / seconds, "peak MB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["classification", "segmentation"], choices=sorted(HEADS))
    parser.add_argument("--backbone", default="plain", choices=sorted(BACKBONES))
    parser.add_argument("--shapes", nargs="+", type=int, default=[64], help="cubic input sizes (multiples of 16)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = [benchmark(t, args.backbone, s, args.width, args.batch_size, args.precision, device, args.steps, args.warmup)
            for t in args.tasks for s in args.shapes]
    columns = list(rows[0])
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>14.2f}" if isinstance(row[c], float) else f"{row[c]!s:>14}" for c in columns))


if __name__ == "__main__":
    main()
