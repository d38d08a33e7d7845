"""trainer.ema: an exponential moving average of the weights, validated and saved instead of the last step's.

With batches of 2-4 volumes each optimizer step moves the weights noisily, and the last step's weights are one
sample of that noise: a validation curve of them jumps from epoch to epoch. The average over the last few
hundred steps (Polyak averaging; timm's ModelEmaV2, MONAI and nnU-Net-style recipes use it) is smoother and
usually at least as good. The averaged model is what validation runs, what best.pt / last.pt hold under
``model`` and so what brain3d-predict uses; the training weights travel in the checkpoint as
``train_weights`` so a resume continues the optimisation itself.

Float buffers (BatchNorm's running mean / var) are averaged like the weights; integer ones (the batch
counter) are copied. With ``trainer.precise_bn_batches`` the averaged model's BatchNorm statistics are then
re-estimated with its own weights before each validation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """The averaged copy of ``model``: after each optimizer step ``average = d * average + (1 - d) * weights``
    with ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update (n = 1, 2, ...), so the first updates
    follow the fast-moving weights instead of staying near the initialisation (the warm-up of TensorFlow's
    and timm's EMA).

    Args:
        model: the training model (plain module, not the compiled or DDP wrapper).
        decay: in (0, 1), e.g. 0.99: the average's horizon is about 1 / (1 - decay) steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"trainer.ema={decay!r} must be a decay between 0 and 1 (e.g. 0.99), or null for off")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One optimizer step's update from ``model``'s weights and buffers."""
        self.updates += 1
        d = self.current_decay()
        averaged, current = self.module.state_dict(), model.state_dict()
        for name, value in averaged.items():
            new = current[name].detach()
            if value.dtype.is_floating_point:
                value.lerp_(new.to(value.dtype), 1.0 - d)
            else:
                value.copy_(new)

    def state(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}

    def load(self, weights: dict, state: dict | None) -> None:
        """Continue from a checkpoint: its averaged weights and the update count."""
        self.module.load_state_dict(weights)
        self.updates = int((state or {}).get("updates", 0))
