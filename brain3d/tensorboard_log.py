"""What brain3d writes to TensorBoard: per-epoch scalars, the segmentation overlay, config text, hparams."""

from __future__ import annotations

import numpy as np
import yaml
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


def log_epoch(writer: SummaryWriter, record: dict[str, float], epoch: int, heads=()) -> None:
    """Scalars of one epoch's ``record`` (keys like ``train_loss``, ``val_dice``) as ``train/loss``,
    ``val/dice``…, so TensorBoard groups train and val; ``lr`` and throughput go under ``optim/``.
    A multi-task run's ``heads``: ``val_<head>_<metric>`` goes to ``val/<head>/<metric>``."""
    for key, value in record.items():
        if key == "epoch" or value is None:
            continue
        split, _, name = key.partition("_")
        head = next((h for h in heads if name.startswith(f"{h}_")), None)
        if split in ("train", "val") and head is not None:
            name = f"{head}/{name[len(head) + 1:]}"
        tag = f"{split}/{name}" if split in ("train", "val") else f"optim/{key}"
        writer.add_scalar(tag, value, epoch)


def overlay_mid_slices(image: np.ndarray, target: np.ndarray, probability: np.ndarray,
                       threshold: float = 0.5) -> np.ndarray:
    """RGB panel (H, W, 3) uint8 of the three orthogonal mid-slices of a (D, H, W) volume, side by side:
    grey image, ground truth in green, prediction (probability > threshold) in red, overlap in yellow.
    Each slice sits on a square of side max(D, H, W), enlarged by a whole factor to at least ~192 pixels."""
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    d, h, w = image.shape
    cuts = [(slice(d // 2, d // 2 + 1), slice(None), slice(None)),
            (slice(None), slice(h // 2, h // 2 + 1), slice(None)),
            (slice(None), slice(None), slice(w // 2, w // 2 + 1))]
    panels = []
    size = max(d, h, w)
    for cut in cuts:
        g, t, p = (np.squeeze(v[cut]) for v in (grey, target > 0.5, probability > threshold))
        rgb = np.stack([g, g, g], axis=-1) * 0.7
        rgb[..., 0] += 0.6 * p
        rgb[..., 1] += 0.6 * t
        rgb = np.rot90(np.clip(rgb, 0, 1))  # RAS array -> anatomical "up" at the top
        canvas = np.zeros((size, size, 3))
        canvas[: rgb.shape[0], : rgb.shape[1]] = rgb
        panels.append(canvas)
    panel = np.concatenate(panels, axis=1)
    zoom = max(1, 192 // size)  # small volumes are hard to see: enlarge by whole pixels (nearest)
    panel = panel.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return (panel * 255).astype(np.uint8)


def log_config(writer: SummaryWriter, config: dict) -> None:
    """The resolved config as YAML text (indented four spaces so TensorBoard shows it as code)."""
    text = yaml.safe_dump(config, sort_keys=False)
    writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)


def log_hparams(writer: SummaryWriter, hparam_values: dict, final_metrics: dict[str, float]) -> None:
    """Write hparams with the final metrics into this run itself (``SummaryWriter.add_hparams`` would
    create a sub-run), so a sweep folder shows one row per job in the HPARAMS tab."""
    clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparam_values.items()}
    metric_tags = {f"hparams/{k}": float(v) for k, v in final_metrics.items() if v is not None and np.isfinite(v)}
    experiment, session_start, session_end = hparams(clean, metric_tags)
    file_writer = writer._get_file_writer()
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    for tag, value in metric_tags.items():
        writer.add_scalar(tag, value)
