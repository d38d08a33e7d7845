"""Loss functions for classification, regression and binary and multi-class segmentation.

Every loss is a small ``nn.Module`` whose ``forward(logits, target)`` returns a
scalar tensor (unless a ``reduction="none"`` is asked for). Models return
LOGITS, so the losses apply the sigmoid (or, for multi-class segmentation, the softmax)
themselves where one is needed.

All losses compute in float32: both ``logits`` and ``target`` are cast with
``.float()`` and the computation runs with autocast disabled, so calling them on
bf16/fp16 logits inside a ``torch.autocast`` region gives the same float32
result as calling them on float32 logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BCELoss", "MSELoss", "L1Loss", "HuberLoss", "DiceLoss", "DiceBCELoss", "DiceCELoss"]

_DICE_REDUCTIONS = ("mean", "sum", "none")


def _float32_loss(name: str, fn, logits: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """``fn(logits, target)`` in float32 with autocast off, after checking the shapes match."""
    _check_same_shape(logits, target, name)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return fn(logits.float(), target.float(), **kwargs)


def _check_same_shape(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if logits.shape != target.shape:
        raise ValueError(
            f"{name}: logits and target must have the same shape, "
            f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}."
        )


def _check_pos_weight(pos_weight: float | None) -> float | None:
    if pos_weight is None:
        return None
    if isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)):
        raise ValueError(f"pos_weight must be a positive float or None, got {pos_weight!r}.")
    if not math.isfinite(pos_weight) or pos_weight <= 0:
        raise ValueError(f"pos_weight must be a positive finite float or None, got {pos_weight!r}.")
    return float(pos_weight)


def _check_weight(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a non-negative float, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite float, got {value!r}.")
    return float(value)


def _check_term_weights(**weights: float) -> list[float]:
    """The weights of a two-term loss (``dice_weight=..., bce_weight=...``), each checked, not both zero."""
    checked = [_check_weight(value, name) for name, value in weights.items()]
    if not any(checked):
        names = " and ".join(weights)
        given = ", ".join(f"{name}={value!r}" for name, value in weights.items())
        raise ValueError(f"{names} must not both be zero, got {given}.")
    return checked


def _check_smooth(smooth: float) -> float:
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)):
        raise ValueError(f"smooth must be a positive float, got {smooth!r}.")
    if not math.isfinite(smooth) or smooth <= 0:
        raise ValueError(f"smooth must be a positive finite float (it keeps empty masks defined), got {smooth!r}.")
    return float(smooth)


class BCELoss(nn.Module):
    """Binary cross-entropy on logits (``F.binary_cross_entropy_with_logits``), in float32.

    Args:
        pos_weight: weight of the positive class (a scalar), e.g. ``n_negative / n_positive``
            to balance an imbalanced data set. ``None`` (default) weighs both classes equally.

    Raises:
        ValueError: when ``pos_weight`` is not ``None`` and not a positive finite number.

    Shapes:
        - logits: any shape, e.g. (B, 1) for classification or (B, 1, D, H, W) for segmentation.
        - target: same shape as ``logits``, values in [0, 1] (bool or 0/1 accepted).
        - output: scalar, the mean over all elements.
    """

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = _check_pos_weight(pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean binary cross-entropy.

        Raises:
            ValueError: when ``logits`` and ``target`` shapes differ.
        """
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = torch.tensor(self.pos_weight, dtype=torch.float32, device=logits.device)
        return _float32_loss("BCELoss", F.binary_cross_entropy_with_logits, logits, target, pos_weight=pos_weight)

    def extra_repr(self) -> str:
        return f"pos_weight={self.pos_weight}"


class MSELoss(nn.Module):
    """Mean squared error (``F.mse_loss``) in float32.

    Shapes:
        - logits: (B, 1) predictions (raw model outputs).
        - target: same shape as ``logits``.
        - output: scalar.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean squared error.

        Raises:
            ValueError: when ``logits`` and ``target`` shapes differ (no silent broadcasting).
        """
        return _float32_loss("MSELoss", F.mse_loss, logits, target)


class L1Loss(nn.Module):
    """Mean absolute error (``F.l1_loss``) in float32.

    Shapes:
        - logits: (B, 1) predictions (raw model outputs).
        - target: same shape as ``logits``.
        - output: scalar.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean absolute error.

        Raises:
            ValueError: when ``logits`` and ``target`` shapes differ (no silent broadcasting).
        """
        return _float32_loss("L1Loss", F.l1_loss, logits, target)


class HuberLoss(nn.Module):
    """Huber loss (``F.huber_loss``) in float32.

    For an error ``e = logits - target``: ``0.5 * e**2`` when ``|e| <= delta``,
    else ``delta * (|e| - 0.5 * delta)``; averaged over all elements.

    Args:
        delta: threshold between the quadratic and the linear regime. Defaults to 1.0.

    Raises:
        ValueError: when ``delta`` is not a positive finite number.

    Shapes:
        - logits: (B, 1) predictions (raw model outputs).
        - target: same shape as ``logits``.
        - output: scalar.
    """

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        if isinstance(delta, bool) or not isinstance(delta, (int, float)):
            raise ValueError(f"delta must be a positive float, got {delta!r}.")
        if not math.isfinite(delta) or delta <= 0:
            raise ValueError(f"delta must be a positive finite float, got {delta!r}.")
        self.delta = float(delta)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean Huber loss.

        Raises:
            ValueError: when ``logits`` and ``target`` shapes differ (no silent broadcasting).
        """
        return _float32_loss("HuberLoss", F.huber_loss, logits, target, delta=self.delta)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


class DiceLoss(nn.Module):
    """Soft Dice loss on ``sigmoid(logits)`` for binary segmentation, in float32.

    With ``p = sigmoid(logits)`` and target ``t``::

        dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)
        loss = 1 - dice

    The sums run over the voxels of each sample (``batch=False``, one Dice per
    sample, then reduced) or over all voxels of the batch (``batch=True``, one
    Dice for the whole batch, as nnU-Net's ``batch_dice``).

    Empty masks: thanks to ``smooth`` the loss is always defined and never NaN.
    An empty target with an all-zero prediction gives ``dice = smooth / smooth = 1``,
    i.e. loss 0; an empty target with a confident positive prediction gives
    ``dice ≈ smooth / (sum(p) + smooth) ≈ 0``, i.e. loss ≈ 1.

    Args:
        smooth: added to numerator and denominator; must be > 0 so that empty
            masks give a defined value. Defaults to 1e-5.
        batch: if True, compute one Dice over all voxels of the batch; if False
            (default), one Dice per sample.
        reduction: how per-sample losses are reduced when ``batch=False``:
            ``"mean"`` (default), ``"sum"`` or ``"none"`` (returns shape (B,)).
            Ignored when ``batch=True``, which always returns a scalar.

    Raises:
        ValueError: when ``smooth`` is not a positive finite number or ``reduction``
            is not one of ``"mean"``, ``"sum"``, ``"none"``.

    Shapes:
        - logits: (B, 1, D, H, W) (any (B, ...) with at least 2 dims works).
        - target: same shape as ``logits``, binary (bool or 0/1).
        - output: scalar, or (B,) for ``batch=False, reduction="none"``.
    """

    def __init__(self, smooth: float = 1e-5, batch: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        self.smooth = _check_smooth(smooth)
        if reduction not in _DICE_REDUCTIONS:
            raise ValueError(f"reduction must be one of {_DICE_REDUCTIONS}, got {reduction!r}.")
        self.batch = bool(batch)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the soft Dice loss.

        Raises:
            ValueError: when ``logits`` has fewer than 2 dims or the shapes differ.
        """
        if logits.ndim < 2:
            raise ValueError(
                f"DiceLoss expects logits of shape (B, 1, D, H, W) (at least 2 dims), "
                f"got shape {tuple(logits.shape)}."
            )
        _check_same_shape(logits, target, "DiceLoss")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probs = torch.sigmoid(logits.float())
            target = target.float()
            dims = tuple(range(logits.ndim)) if self.batch else tuple(range(1, logits.ndim))
            intersection = (probs * target).sum(dim=dims)
            denominator = probs.sum(dim=dims) + target.sum(dim=dims)
            dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth)
            loss = 1.0 - dice
            if self.batch or self.reduction == "mean":
                return loss.mean()
            if self.reduction == "sum":
                return loss.sum()
            return loss

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, batch={self.batch}, reduction={self.reduction!r}"


class DiceBCELoss(nn.Module):
    """Weighted sum ``dice_weight * DiceLoss + bce_weight * BCELoss``, in float32.

    Args:
        dice_weight: weight of the soft Dice term (mean-reduced). Defaults to 1.0.
            A term with weight 0 is not computed.
        bce_weight: weight of the binary cross-entropy term. Defaults to 1.0.
        smooth: Dice smoothing term, see :class:`DiceLoss`. Defaults to 1e-5.
        batch: batch Dice (True) or per-sample Dice (False, default), see :class:`DiceLoss`.
        pos_weight: positive-class weight of the BCE term, see :class:`BCELoss`. Defaults to None.

    Raises:
        ValueError: when a weight is negative or not finite, when both weights are
            zero, or when ``smooth``/``pos_weight`` are invalid.

    Shapes:
        - logits: (B, 1, D, H, W).
        - target: same shape as ``logits``, binary (bool or 0/1).
        - output: scalar.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = 1e-5,
        batch: bool = False,
        pos_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.dice_weight, self.bce_weight = _check_term_weights(dice_weight=dice_weight, bce_weight=bce_weight)
        self.dice = DiceLoss(smooth=smooth, batch=batch, reduction="mean")
        self.bce = BCELoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``dice_weight * dice + bce_weight * bce``.

        Raises:
            ValueError: when ``logits`` has fewer than 2 dims or the shapes differ.
        """
        loss = None
        if self.dice_weight > 0:
            loss = self.dice_weight * self.dice(logits, target)
        if self.bce_weight > 0:
            bce = self.bce_weight * self.bce(logits, target)
            loss = bce if loss is None else loss + bce
        return loss

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}"


class DiceCELoss(nn.Module):
    """Multi-class segmentation: ``dice_weight * soft Dice + ce_weight * cross-entropy``, in float32.

    For K labels plus background the head gives K+1 logits per voxel; with ``p = softmax(logits, dim=1)``
    and ``t`` the one-hot of the integer label map, for every class ``c``::

        dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)

    The Dice term is ``1 - mean(dice_c)`` over the K foreground classes (class 0, the background, is left out,
    as nnU-Net does), the sums running over each sample's voxels (``batch=False``: one Dice per sample and
    class, then averaged) or over the whole batch (``batch=True``: one per class, nnU-Net's batch dice), as
    :class:`DiceLoss`. The cross-entropy (``F.cross_entropy``) is the mean over all voxels and the K+1 classes.
    A label absent from a sample's target and prediction scores Dice 1 (loss 0) thanks to ``smooth``.

    Args:
        dice_weight: weight of the soft Dice term. Defaults to 1.0. A term with weight 0 is not computed.
        ce_weight: weight of the cross-entropy term. Defaults to 1.0.
        smooth: added to numerator and denominator, > 0. Defaults to 1e-5.
        batch: one Dice per class over the whole batch (True) or per sample (False, default).

    Raises:
        ValueError: a weight negative or not finite, both weights zero, or ``smooth`` not a positive number.

    Shapes:
        - logits: (B, K+1, D, H, W), K >= 1 (any (B, C, ...) with C >= 2).
        - target: (B, 1, D, H, W) integer labels 0..K (any dtype: float labels are rounded to long).
        - output: scalar.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, smooth: float = 1e-5,
                 batch: bool = False) -> None:
        super().__init__()
        self.dice_weight, self.ce_weight = _check_term_weights(dice_weight=dice_weight, ce_weight=ce_weight)
        self.smooth = _check_smooth(smooth)
        self.batch = bool(batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return ``dice_weight * dice + ce_weight * ce``.

        Raises:
            ValueError: ``logits`` with fewer than 2 channels, or a ``target`` that is not (B, 1, *spatial).
        """
        if logits.ndim < 3 or logits.shape[1] < 2:
            raise ValueError(
                f"DiceCELoss expects logits (B, K+1, D, H, W) with K+1 >= 2 classes, got shape {tuple(logits.shape)}."
            )
        if target.shape != (logits.shape[0], 1, *logits.shape[2:]):
            raise ValueError(
                f"DiceCELoss: target must be the label map (B, 1, *spatial) of logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}."
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            labels = torch.round(target[:, 0].float()).long() if target.is_floating_point() else target[:, 0].long()
            loss = None
            if self.dice_weight > 0:
                probs = torch.softmax(logits, dim=1)  # (B, K+1, ...)
                one_hot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).float()  # (B, K+1, ...)
                dims = (0, *range(2, logits.ndim)) if self.batch else tuple(range(2, logits.ndim))
                intersection = (probs * one_hot).sum(dim=dims)  # (K+1,) or (B, K+1)
                denominator = probs.sum(dim=dims) + one_hot.sum(dim=dims)
                dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth)
                loss = self.dice_weight * (1.0 - dice[..., 1:].mean())  # the K foreground classes
            if self.ce_weight > 0:
                ce = self.ce_weight * F.cross_entropy(logits, labels)
                loss = ce if loss is None else loss + ce
            return loss

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}, ce_weight={self.ce_weight}, smooth={self.smooth}, batch={self.batch}"
