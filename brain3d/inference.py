"""Model outputs for inference: ensembles and flip test-time augmentation (TTA).

Preprocessing (:func:`brain3d.data.preprocess.preprocess_volume`), resampling back
(:func:`brain3d.data.preprocess.invert_geometry`) and writing on the input grid
(:func:`brain3d.data.nifti.save_on_native_grid`) live in the data modules; this module
only turns a preprocessed batch into averaged outputs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["TASKS", "FLIP_AXES", "flip_combinations", "tta_flip_axes", "predict_outputs", "predict_heads"]

TASKS = ("classification", "regression", "segmentation")
FLIP_AXES = (2, 3, 4)  # the spatial axes of a (B, C, D, H, W) batch


def flip_combinations(spatial_axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """The subsets of ``spatial_axes`` (0, 1, 2: the volume's x, y, z; 0 is left-right on the RAS grid) as
    dims of a (B, C, D, H, W) batch, starting with ``()`` (no flip): 8 for all three axes, 2 for ``(0,)``."""
    dims = tuple(FLIP_AXES[a] for a in sorted(spatial_axes))
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


def tta_flip_axes(value, key: str = "tta") -> tuple[int, ...]:
    """The spatial axes a test-time flip setting names: true -> (0, 1, 2), false / null / [] -> (), a list of
    axes (e.g. [0]: left-right only) -> those axes, sorted. Anything else is a ValueError naming ``key``."""
    if value is None or value is False:
        return ()
    if value is True:
        return (0, 1, 2)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key}={value!r} must be true, false or a list of spatial axes among 0, 1, 2 "
                         "(e.g. [0]: left-right flips only)")
    axes = list(value)
    if any(isinstance(a, bool) or not isinstance(a, int) or a not in (0, 1, 2) for a in axes) or \
            len(set(axes)) != len(axes):
        raise ValueError(f"{key}={axes} must list distinct spatial axes among 0, 1, 2 (0: left-right on the "
                         "RAS grid), e.g. [0]")
    return tuple(sorted(axes))


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def predict_outputs(
    models: Sequence[nn.Module],
    image: torch.Tensor,
    head_name: str,
    task: str,
    tta: bool | Sequence[int] = False,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Average one head's outputs over an ensemble and (optionally) axis flips.

    For each model ``logits = model(x)[head_name]``. With ``tta=True`` the input is also
    run flipped along every combination of the 3 spatial axes (8 passes per model); with a
    list of spatial axes, e.g. ``tta=[0]``, along the combinations of those (2 passes: the
    volume and its left-right mirror); a voxel-wise (5-D) output is flipped back before
    averaging, a per-volume (B, K) output is averaged as it is.

    What is averaged depends on ``task``:

    - "classification" / "segmentation": probabilities, ``sigmoid(logits)`` (the logits
      are cast to float32 first), so the result is in [0, 1]; a segmentation head with more
      than one channel (a multi-class head's K+1 logits) gets ``softmax`` over its channels;
    - "regression": the raw head outputs (still standardised; the caller de-standardises).

    Args:
        models: one or more models, already on ``image``'s device and in eval mode (this
            function does not change their mode).
        image: preprocessed batch (B, 1, D, H, W) on the models' device.
        head_name: key of the head in the models' output dicts.
        task: "classification", "regression" or "segmentation".
        tta: average over flips as well: True all 8 combinations of the 3 axes, a list
            of spatial axes (0, 1, 2) the combinations of those (:func:`tta_flip_axes`).
        amp_dtype: run the models under ``torch.autocast(device.type, dtype=amp_dtype)``
            (e.g. torch.bfloat16); None runs in the models' own precision.

    Returns:
        float32 tensor on ``image``'s device: (B, K) for global heads, (B, K, D, H, W) for
        voxel-wise heads.

    Raises:
        ValueError: unknown task, no models, a non-5-D image, or a missing head.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return predict_heads(models, image, {head_name: task}, tta=tta, amp_dtype=amp_dtype)[head_name]


@torch.no_grad()
def predict_heads(
    models: Sequence[nn.Module],
    image: torch.Tensor,
    heads: dict[str, str],
    tta: bool | Sequence[int] = False,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`predict_outputs` for several heads of the same models at once (``heads``: head name -> task),
    one forward pass per model and flip for all of them. Returns ``{head name: averaged output}``."""
    for head_name, task in heads.items():
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r} (head {head_name!r})")
    models = list(models)
    if not models:
        raise ValueError("predict_outputs: need at least one model")
    if image.dim() != 5:
        raise ValueError(f"predict_outputs: expected a 5-D image (B, C, D, H, W), got shape {tuple(image.shape)}")
    flips = flip_combinations(tta_flip_axes(tta))
    totals: dict[str, torch.Tensor] = {}
    for model in models:
        for axes in flips:
            x = torch.flip(image, axes) if axes else image
            with _autocast(image.device, amp_dtype):
                outputs = model(x)
            for head_name, task in heads.items():
                if head_name not in outputs:
                    raise ValueError(f"model has no head {head_name!r}; heads: {sorted(outputs)}")
                out = outputs[head_name].float()
                if task == "segmentation" and out.dim() == 5 and out.shape[1] > 1:  # multi-class: K+1 logits
                    out = torch.softmax(out, dim=1)
                elif task != "regression":
                    out = torch.sigmoid(out)
                if axes and out.dim() == 5:  # voxel-wise: flip back onto the input's grid
                    out = torch.flip(out, axes)
                totals[head_name] = out if head_name not in totals else totals[head_name] + out
    return {name: total / (len(models) * len(flips)) for name, total in totals.items()}
