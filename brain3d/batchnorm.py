"""Precise BatchNorm: re-estimate the running statistics on training batches before validation.

With batches of 2-4 volumes, BatchNorm's running mean and variance are an exponential average (momentum 0.1)
of very noisy per-batch estimates taken while the weights move; eval-mode outputs then jump between epochs
although the weights barely changed (a regression head's val MAE most of all). Re-estimating them with the
final weights, as an equal-weight average over ``num_batches`` training batches, removes that noise
("precise BN": Wu & Johnson, Rethinking "Batch" in BatchNorm, 2021). The re-estimated statistics are what
validation uses and what the checkpoints hold, so brain3d-predict sees the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from brain3d.engine import autocast, to_memory_format
from brain3d.transfer import FrozenBatchNorm3d


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that track running statistics and are not frozen (trainer.freeze_backbone)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and not isinstance(m, FrozenBatchNorm3d)]


@torch.no_grad()
def recompute_batchnorm_statistics(model: nn.Module, batches, num_batches: int, device: torch.device,
                                   amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> int:
    """Replace every BatchNorm layer's running mean / var by their average over ``num_batches`` batches.

    Each layer's statistics are reset and accumulated with ``momentum=None`` (torch's cumulative moving
    average): after k batches the running mean is the mean of the k batch means and the running var the mean
    of the k unbiased batch variances. Only BatchNorm layers are in training mode during the passes (dropout
    stays off); the model's modes and the layers' momenta are restored afterwards.

    Args:
        model: the model (its forward returns a dict of head outputs, or a tensor).
        batches: an iterable of batches (dicts with ``"image"`` (B, C, D, H, W)), e.g. the training loader.
        num_batches: how many batches to average over (fewer if ``batches`` ends first).
        device, amp_dtype, channels_last: as training runs the model.

    Returns:
        The number of batches used (0: the model has no such layer, or ``num_batches`` < 1; nothing changed).
    """
    layers = batchnorm_layers(model)
    if not layers or num_batches < 1:
        return 0
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every batch counts equally
        layer.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            image = batch["image"].to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                model(to_memory_format(image, channels_last))
            used += 1
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, mode in was_training.items():
            module.train(mode)
    return used
