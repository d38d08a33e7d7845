"""Saliency maps for brain3d models.

Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["grad_cam"]


def grad_cam(model: nn.Module, image: torch.Tensor, head_name: str, target_index: int = 0) -> np.ndarray:
    """Grad-CAM of one head output on the backbone's last feature map f4.

    ``score = model(x)[head_name][:, target_index].sum()`` (for a voxel-wise head this is
    the sum of that channel's logits over all voxels); ``w_c`` = spatial mean of
    d score / d f4_c per sample; ``cam = relu(sum_c w_c * f4_c)``, upsampled (trilinear,
    align_corners=False) to the input's (D, H, W), then divided by its maximum per volume
    so it lies in [0, 1] (a cam that is all zero stays zero).

    f4 is captured with a forward hook on ``model.backbone`` (output ``[f1, f2, f3, f4]``)
    and the gradient is taken with ``torch.autograd.grad`` w.r.t. f4 only, so no
    parameter ``.grad`` is created or changed. The model is put in eval mode for the call
    and its previous mode restored afterwards. Works on any device (grads are enabled
    locally); do not call it inside ``torch.inference_mode()``.

    Args:
        model: a :class:`brain3d.models.model.Brain3DModel` (anything with a ``backbone``
            returning a list of feature maps and a forward returning a dict of outputs).
        image: preprocessed batch (B, 1, D, H, W) on the model's device.
        head_name: key of the head in the model's output dict.
        target_index: which output (column / channel) of the head to explain. Defaults to 0.

    Returns:
        float32 numpy array (B, D, H, W) with values in [0, 1].

    Raises:
        ValueError: a non-5-D image or a missing head.
        RuntimeError: called inside ``torch.inference_mode()``.
    """
    if image.dim() != 5:
        raise ValueError(f"grad_cam: expected a 5-D image (B, C, D, H, W), got shape {tuple(image.shape)}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("grad_cam needs autograd: do not call it inside torch.inference_mode()")
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["f4"] = output[-1]

    was_training = model.training
    model.eval()
    handle = model.backbone.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            # A fresh leaf that requires grad, so f4 is part of a graph even if the
            # parameters are frozen (and even if ``image`` was made in inference mode).
            x = image.detach().clone().requires_grad_(True)
            outputs = model(x)
            if head_name not in outputs:
                raise ValueError(f"model has no head {head_name!r}; heads: {sorted(outputs)}")
            f4 = captured["f4"]
            score = outputs[head_name][:, target_index].float().sum()
            (grads,) = torch.autograd.grad(score, f4, allow_unused=True)
        f4 = f4.detach().float()
        if grads is None:  # the head does not use f4
            grads = torch.zeros_like(f4)
        weights = grads.float().mean(dim=(2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
        cam = torch.relu((weights * f4).sum(dim=1, keepdim=True))  # (B, 1, d, h, w)
        cam = F.interpolate(cam, size=tuple(image.shape[2:]), mode="trilinear", align_corners=False)
        cam = cam[:, 0].clamp_min(0)  # (B, D, H, W)
        peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
        cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
        return cam.clamp_(0, 1).cpu().numpy().astype(np.float32, copy=False)
    finally:
        handle.remove()
        model.train(was_training)
