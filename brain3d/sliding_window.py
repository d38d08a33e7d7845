"""Sliding-window inference for models trained on patches (nnU-Net style).

The volume is covered by overlapping windows of the training patch size; each window's
output is weighted by an importance map (a Gaussian centred in the patch, so voxels near
a window's border, which see less context, count less) and the weighted outputs are
averaged. Windows are run on ``compute_device`` (e.g. the GPU) in small batches while the
sums live on ``accumulate_device`` (by default the image's device, e.g. the CPU), so a
whole brain never has to fit in GPU memory.

What is averaged is whatever the predictor returns. Return PROBABILITIES (apply the
sigmoid/softmax inside the predictor): averaging probabilities is what nnU-Net v1 does
(Isensee et al. 2021; its ``inference_apply_nonlin`` runs before the Gaussian-weighted
sum), and it keeps the result in [0, 1] and a confident window from dominating through a
large logit. (nnU-Net v2 changed to averaging logits; both work, pick one and be
consistent with thresholds.)

Example::

    model.eval()
    probs = sliding_window_inference(
        image,  # (1, 1, D, H, W) on the CPU
        lambda x: torch.sigmoid(model(x)["lesion"]),
        patch_size=(128, 128, 128),
        compute_device="cuda",
    )  # (1, 1, D, H, W) float32 on the CPU
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from brain3d.data.patches import _as_patch_size

__all__ = ["gaussian_importance_map", "window_starts", "sliding_window_inference"]

MODES = ("gaussian", "constant")


def gaussian_importance_map(
    patch_size: Sequence[int] | int,
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A Gaussian weight map over a patch, as nnU-Net's.

    ``exp(-sum_i (x_i - c_i)^2 / (2 sigma_i^2))`` with the centre ``c_i = (p_i - 1) / 2``
    (the exact middle, so the map is symmetric under flips) and ``sigma_i = sigma_scale *
    p_i``, normalised to a maximum of 1. Values that underflow to 0 in float32 are raised
    to the smallest nonzero value, so every voxel has a positive weight and the weighted
    mean is always defined (nnU-Net does the same).

    Args:
        patch_size: (pd, ph, pw), or one int for all axes.
        sigma_scale: sigma as a fraction of the patch size, > 0. Defaults to 1/8 (nnU-Net).
        device: device of the result. Defaults to the CPU.

    Returns:
        float32 tensor of shape ``patch_size``, max 1, min > 0.

    Raises:
        ValueError: on a non-positive patch size or ``sigma_scale``.
    """
    size = _as_patch_size(patch_size, 3)
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weights = torch.ones((), dtype=torch.float64)
    for p in size:  # separable: the outer product of 1-D Gaussians (in float64, then cast)
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2
        g = torch.exp(-(x**2) / (2 * (sigma_scale * p) ** 2))
        weights = weights[..., None] * g
    weights = (weights / weights.max()).to(torch.float32)
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights.to(device) if device is not None else weights


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis: every index of ``[0, size)`` is covered.

    ``step = max(1, int(patch * (1 - overlap)))`` (with a 1e-9 guard against float error,
    so e.g. ``patch * (1 - overlap) == 31.999999...`` counts as 32); the starts are
    ``0, step, 2 step, ...`` up to ``size - patch``, then a last window flush with the end
    (``size - patch``) is added if missing. ``[0]`` when ``size <= patch`` (the caller
    pads). E.g. ``window_starts(100, 64, 0.5) == [0, 32, 36]``.

    Args:
        size: length of the axis, > 0.
        patch: window length, > 0.
        overlap: fraction of the window shared by neighbours, in [0, 1).

    Raises:
        ValueError: on a non-positive size/patch or an overlap outside [0, 1).
    """
    size, patch = int(size), int(patch)
    if size <= 0 or patch <= 0:
        raise ValueError(f"size and patch must be positive, got size={size}, patch={patch}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    step = max(1, math.floor(patch * (1.0 - overlap) + 1e-9))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


@torch.no_grad()
def sliding_window_inference(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int] | int,
    overlap: float = 0.5,
    batch_size: int = 4,
    mode: str = "gaussian",
    accumulate_device: torch.device | str | None = None,
    compute_device: torch.device | str | None = None,
    progress: bool = False,
    sigma_scale: float = 0.125,
    accumulate_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Weighted mean of ``predictor`` outputs over overlapping windows of the volume.

    The image is zero-padded (symmetrically, as nnU-Net) to at least ``patch_size`` per
    axis and the padding is removed from the result. Windows (starts from
    :func:`window_starts` per axis) are cut from the image on its own device, batched by
    up to ``batch_size``, moved to ``compute_device`` and passed to ``predictor``; each
    output is moved to ``accumulate_device``, multiplied by the importance map and added
    to a running sum, next to the running sum of weights. The result is ``sum / weights``.

    The function runs under ``torch.no_grad()``; put the model in eval mode yourself (and
    wrap the predictor in ``torch.autocast`` if wanted: outputs of any float dtype are
    accepted).

    Args:
        image: (1, C, D, H, W) tensor, on any device (it may stay on the CPU).
        predictor: maps a (n, C, pd, ph, pw) batch on ``compute_device`` to
            (n, K, pd, ph, pw), e.g. ``lambda x: torch.sigmoid(model(x)["lesion"])``.
            Return probabilities, not logits (see the module docstring).
        patch_size: (pd, ph, pw), or one int for all axes; for the segmentation model each
            must be divisible by 16 (the volume itself need not be).
        overlap: fraction of a window shared with its neighbour, in [0, 1). Defaults to 0.5.
        batch_size: windows per predictor call, >= 1. Defaults to 4.
        mode: ``"gaussian"`` (:func:`gaussian_importance_map`) or ``"constant"`` (uniform
            weights: a plain mean). Defaults to ``"gaussian"``.
        accumulate_device: where the (K, D, H, W) sums live and the result is returned.
            Defaults to ``image.device``.
        compute_device: where windows are sent for ``predictor``. Defaults to ``image.device``.
        progress: show a tqdm bar over the batches. Defaults to False.
        sigma_scale: Gaussian sigma as a fraction of the patch size. Defaults to 1/8.
        accumulate_dtype: dtype of the running sums. Defaults to float64, so that
            averaging identical window outputs returns them exactly (float32 sums are off
            by an ulp); pass ``torch.float32`` to halve the memory (float64 is not
            available on MPS, where float32 is used).

    Returns:
        (1, K, D, H, W) float32 tensor on ``accumulate_device``.

    Raises:
        ValueError: when the image is not 5-D with batch size 1, the patch size is not
            positive, ``overlap`` is outside [0, 1), ``batch_size`` < 1, ``mode`` is
            unknown, or the predictor's output does not have shape (n, K, pd, ph, pw).
    """
    patch = _check_arguments(image, patch_size, overlap, batch_size, mode)
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else image.device
    run_device = torch.device(compute_device) if compute_device is not None else image.device
    if acc_device.type == "mps" and accumulate_dtype == torch.float64:
        accumulate_dtype = torch.float32  # MPS has no float64

    spatial = tuple(int(s) for s in image.shape[2:])
    image, pad_lo = _pad_to_patch(image, patch)
    padded = tuple(int(s) for s in image.shape[2:])
    weight = _window_weight(mode, patch, sigma_scale, acc_device, accumulate_dtype)  # (pd, ph, pw)
    starts = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(padded, patch))))
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]

    total, weight_sum = _accumulate_windows(image, predictor, batches, patch, weight, run_device, progress)
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, spatial))  # the volume without the padding
    total /= weight_sum  # in place: no second full-size buffer
    return total[(slice(None), *crop)].to(torch.float32).contiguous()[None]


def _check_arguments(image: torch.Tensor, patch_size: Sequence[int] | int, overlap: float, batch_size: int,
                     mode: str) -> tuple[int, int, int]:
    """:func:`sliding_window_inference`'s checks, in its order; returns the patch size (pd, ph, pw)."""
    if image.dim() != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be 5-D (1, C, D, H, W), got shape {tuple(image.shape)}")
    patch = _as_patch_size(patch_size, 3)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return patch


def _pad_to_patch(image: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad (1, C, D, H, W) symmetrically to at least ``patch`` per axis; returns it and the low pads."""
    spatial = tuple(int(s) for s in image.shape[2:])
    pad_lo = [max(0, p - s) // 2 for s, p in zip(spatial, patch)]
    pad_hi = [max(0, p - s) - lo for s, p, lo in zip(spatial, patch, pad_lo)]
    if any(pad_lo) or any(pad_hi):
        # F.pad takes (last axis lo, hi, ..., first axis lo, hi)
        image = F.pad(image, [v for lo, hi in zip(reversed(pad_lo), reversed(pad_hi)) for v in (lo, hi)])
    return image, pad_lo


def _window_weight(mode: str, patch: tuple[int, int, int], sigma_scale: float, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """The (pd, ph, pw) importance map of ``mode``: Gaussian, or all ones (a plain mean)."""
    if mode == "gaussian":
        return gaussian_importance_map(patch, sigma_scale, device=device).to(dtype)
    return torch.ones(patch, dtype=dtype, device=device)


def _checked_output(out, n: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """The predictor's output if it is a (n, K, *patch) tensor; ValueError otherwise."""
    if (not isinstance(out, torch.Tensor) or out.dim() != 5 or out.shape[0] != n
            or tuple(out.shape[2:]) != patch):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"predictor must return a (n={n}, K, *{patch}) tensor, got {got}")
    return out


def _accumulate_windows(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    batches: list[list[tuple[int, ...]]],
    patch: tuple[int, int, int],
    weight: torch.Tensor,
    run_device: torch.device,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``predictor`` on every batch of window starts of the padded ``image`` (1, C, *padded).

    Returns ``(total, weight_sum)``: the weighted sum of the outputs (K, *padded) and the sum of the
    weights (*padded), both on ``weight``'s device and in its dtype.
    """
    padded = tuple(int(s) for s in image.shape[2:])
    acc_device, acc_dtype = weight.device, weight.dtype
    total: torch.Tensor | None = None  # (K, *padded), allocated once K is known
    weight_sum = torch.zeros(padded, dtype=acc_dtype, device=acc_device)
    for batch in tqdm(batches, desc="sliding window", disable=not progress, dynamic_ncols=True, leave=False):
        windows = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in batch]
        x = torch.cat([image[(slice(None), slice(None), *w)] for w in windows]).to(run_device)  # (n, C, *patch)
        out = _checked_output(predictor(x), len(batch), patch)  # (n, K, *patch)
        out = out.to(device=acc_device, dtype=acc_dtype)
        if total is None:
            total = torch.zeros((out.shape[1], *padded), dtype=acc_dtype, device=acc_device)
        elif out.shape[1] != total.shape[0]:
            raise ValueError(f"predictor returned {out.shape[1]} channels, earlier {total.shape[0]}")
        for w, o in zip(windows, out):
            total[(slice(None), *w)] += o * weight
            weight_sum[w] += weight
    assert total is not None  # there is always at least one window
    return total, weight_sum
