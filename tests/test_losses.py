"""Tests for brain3d.losses: values against hand computations, dtypes, gradients, validation."""

from __future__ import annotations

import math

import pytest
import torch

from brain3d.losses import BCELoss, DiceBCELoss, DiceLoss, HuberLoss, L1Loss, MSELoss

BIG = 30.0  # sigmoid(±30) is 1 / ~1e-13: a "hard" 0/1 probability


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- BCE


def test_bce_matches_hand_formula():
    xs = [0.0, 2.0, -1.0, 3.0, -0.5]
    ts = [1.0, 0.0, 0.0, 1.0, 1.0]
    expected = sum(
        -(t * math.log(_sigmoid(x)) + (1 - t) * math.log(1 - _sigmoid(x))) for x, t in zip(xs, ts)
    ) / len(xs)
    logits = torch.tensor(xs).reshape(-1, 1)
    target = torch.tensor(ts).reshape(-1, 1)
    assert BCELoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_bce_logit_zero_is_log2():
    loss = BCELoss()(torch.zeros(3, 1), torch.tensor([[1.0], [0.0], [1.0]]))
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_bce_pos_weight_scales_positive_term():
    xs = [0.0, 2.0, -1.0, 3.0]
    ts = [1.0, 0.0, 0.0, 1.0]
    w = 3.0
    expected = sum(
        -(w * t * math.log(_sigmoid(x)) + (1 - t) * math.log(1 - _sigmoid(x))) for x, t in zip(xs, ts)
    ) / len(xs)
    loss = BCELoss(pos_weight=w)(torch.tensor(xs).reshape(-1, 1), torch.tensor(ts).reshape(-1, 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bce_accepts_bool_and_int_targets():
    logits = torch.tensor([[0.3], [-1.2]])
    ref = BCELoss()(logits, torch.tensor([[1.0], [0.0]]))
    assert BCELoss()(logits, torch.tensor([[True], [False]])).item() == pytest.approx(ref.item())
    assert BCELoss()(logits, torch.tensor([[1], [0]])).item() == pytest.approx(ref.item())


# ----------------------------------------------------------------------------- regression losses

PRED = torch.tensor([[1.0], [2.0], [3.0]])
TARGET = torch.tensor([[1.0], [4.0], [0.0]])  # errors 0, -2, 3


def test_mse_hand_value():
    assert MSELoss()(PRED, TARGET).item() == pytest.approx((0 + 4 + 9) / 3)


def test_l1_hand_value():
    assert L1Loss()(PRED, TARGET).item() == pytest.approx((0 + 2 + 3) / 3)


def test_huber_hand_values():
    # delta=1: |e|=0 -> 0; |e|=2 -> 1*(2-0.5)=1.5; |e|=3 -> 1*(3-0.5)=2.5
    assert HuberLoss()(PRED, TARGET).item() == pytest.approx((0 + 1.5 + 2.5) / 3)
    # delta=2.5: |e|=2 -> 0.5*4=2; |e|=3 -> 2.5*(3-1.25)=4.375
    assert HuberLoss(delta=2.5)(PRED, TARGET).item() == pytest.approx((0 + 2.0 + 4.375) / 3)


@pytest.mark.parametrize("loss_cls", [MSELoss, L1Loss, HuberLoss, BCELoss])
def test_elementwise_losses_reject_shape_mismatch(loss_cls):
    # (B, 1) vs (B,) would silently broadcast to (B, B) in torch.
    with pytest.raises(ValueError, match=r"same shape.*\(3, 1\).*\(3,\)"):
        loss_cls()(torch.zeros(3, 1), torch.zeros(3))


# ----------------------------------------------------------------------------- Dice


def test_dice_soft_hand_example_2x2x2():
    probs = [0.9, 0.8, 0.5, 0.25, 0.2, 0.1, 0.1, 0.1]
    target = [1, 1, 1, 0, 0, 0, 0, 0]
    logits = torch.tensor([_logit(p) for p in probs]).reshape(1, 1, 2, 2, 2)
    t = torch.tensor(target, dtype=torch.float32).reshape(1, 1, 2, 2, 2)
    smooth = 1e-5
    inter = 0.9 + 0.8 + 0.5  # 2.2
    expected = 1.0 - (2 * inter + smooth) / (sum(probs) + sum(target) + smooth)  # ≈ 1.55 / 5.95
    assert expected == pytest.approx(1.55 / 5.95, rel=1e-5)
    assert DiceLoss(smooth=smooth)(logits, t).item() == pytest.approx(expected, abs=1e-6)


def _hard_logits(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), torch.tensor(BIG), torch.tensor(-BIG))


def _two_sample_case():
    pred = torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool)
    target = torch.zeros(2, 1, 2, 2, 2)
    # sample 0: prediction = 2 voxels, target = 4 voxels, overlap 2 -> Dice 2*2/(2+4) = 2/3
    pred[0].view(-1)[[0, 1]] = True
    target[0].view(-1)[[0, 1, 2, 3]] = 1
    # sample 1: prediction = target = 1 voxel -> Dice 1
    pred[1].view(-1)[0] = True
    target[1].view(-1)[0] = 1
    return _hard_logits(pred), target


def test_dice_per_sample_vs_batch_exact_numbers():
    logits, target = _two_sample_case()
    per_sample = DiceLoss(reduction="none")(logits, target)
    assert per_sample.shape == (2,)
    assert per_sample.tolist() == pytest.approx([1 / 3, 0.0], abs=1e-6)
    assert DiceLoss()(logits, target).item() == pytest.approx((1 / 3 + 0.0) / 2, abs=1e-6)
    assert DiceLoss(reduction="sum")(logits, target).item() == pytest.approx(1 / 3, abs=1e-6)
    # batch Dice: overlap 3, |pred| 3, |target| 5 -> Dice 6/8 = 0.75
    batch = DiceLoss(batch=True)(logits, target)
    assert batch.ndim == 0
    assert batch.item() == pytest.approx(0.25, abs=1e-6)
    # reduction is ignored for batch Dice
    assert DiceLoss(batch=True, reduction="none")(logits, target).item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("batch", [False, True])
def test_dice_empty_target_confident_negative_is_zero(batch):
    logits = torch.full((2, 1, 2, 2, 2), -BIG)
    target = torch.zeros(2, 1, 2, 2, 2)
    loss = DiceLoss(batch=batch)(logits, target)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # probabilities exactly zero: smooth / smooth = 1 -> loss exactly 0
    exact = DiceLoss(batch=batch)(torch.full((2, 1, 2, 2, 2), -math.inf), target)
    assert exact.item() == 0.0


@pytest.mark.parametrize("batch", [False, True])
def test_dice_empty_target_positive_prediction_is_one(batch):
    logits = torch.full((2, 1, 2, 2, 2), BIG)
    target = torch.zeros(2, 1, 2, 2, 2)
    loss = DiceLoss(batch=batch)(logits, target)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "loss_fn",
    [DiceLoss(), DiceLoss(batch=True), DiceBCELoss(pos_weight=2.0), BCELoss()],
    ids=["dice", "batch_dice", "dice_bce", "bce"],
)
def test_low_precision_logits_give_float32_result(dtype, loss_fn):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 1, 4, 4, 4, generator=gen) * 3).to(dtype)
    target = (torch.rand(2, 1, 4, 4, 4, generator=gen) > 0.7).float()
    reference = loss_fn(logits.float(), target)
    out = loss_fn(logits, target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(reference.item(), abs=1e-6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out_ac = loss_fn(logits, target.to(dtype))
    assert out_ac.dtype == torch.float32
    assert out_ac.item() == pytest.approx(reference.item(), abs=1e-6)


@pytest.mark.parametrize("loss_cls", [MSELoss, L1Loss, HuberLoss])
def test_regression_losses_float32_under_autocast(loss_cls):
    pred = torch.tensor([[1.5], [2.25], [-3.0]], dtype=torch.bfloat16)
    target = torch.tensor([[1.0], [4.0], [0.0]])
    reference = loss_cls()(pred.float(), target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = loss_cls()(pred, target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    "loss_fn", [DiceLoss(), DiceLoss(batch=True), DiceBCELoss()], ids=["dice", "batch_dice", "dice_bce"]
)
@pytest.mark.parametrize("empty_target", [False, True])
def test_dice_gradients_are_finite(loss_fn, empty_target):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 4, 4, 4, generator=gen, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4, 4)
    if not empty_target:
        target[:, :, 1:3, 1:3, 1:3] = 1
    loss_fn(logits, target).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Dice + BCE


@pytest.mark.parametrize("batch", [False, True])
def test_dice_bce_is_weighted_sum(batch):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 4, 4, 4, generator=gen)
    target = (torch.rand(3, 1, 4, 4, 4, generator=gen) > 0.6).float()
    combo = DiceBCELoss(dice_weight=0.3, bce_weight=2.0, smooth=1e-3, batch=batch, pos_weight=4.0)
    dice = DiceLoss(smooth=1e-3, batch=batch)(logits, target)
    bce = BCELoss(pos_weight=4.0)(logits, target)
    assert combo(logits, target).item() == pytest.approx(0.3 * dice.item() + 2.0 * bce.item(), rel=1e-6)
    # a zero weight drops the term
    assert DiceBCELoss(dice_weight=0.0)(logits, target).item() == pytest.approx(
        BCELoss()(logits, target).item(), rel=1e-6
    )
    assert DiceBCELoss(bce_weight=0.0, batch=batch)(logits, target).item() == pytest.approx(
        DiceLoss(batch=batch)(logits, target).item(), rel=1e-6
    )


# ----------------------------------------------------------------------------- validation


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match=r"reduction must be one of .*'mean'.*got 'avg'"):
        DiceLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"smooth must be a positive.*got 0"):
        DiceLoss(smooth=0)
    with pytest.raises(ValueError, match=r"smooth must be a positive.*got -1"):
        DiceBCELoss(smooth=-1.0)
    with pytest.raises(ValueError, match=r"dice_weight must be a non-negative.*got -0.5"):
        DiceBCELoss(dice_weight=-0.5)
    with pytest.raises(ValueError, match=r"bce_weight must be a non-negative.*got nan"):
        DiceBCELoss(bce_weight=float("nan"))
    with pytest.raises(ValueError, match=r"must not both be zero"):
        DiceBCELoss(dice_weight=0.0, bce_weight=0.0)
    with pytest.raises(ValueError, match=r"pos_weight must be a positive.*got -2"):
        BCELoss(pos_weight=-2.0)
    with pytest.raises(ValueError, match=r"pos_weight must be a positive.*got '3'"):
        DiceBCELoss(pos_weight="3")
    with pytest.raises(ValueError, match=r"delta must be a positive.*got 0"):
        HuberLoss(delta=0)


def test_dice_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"DiceLoss: logits and target must have the same shape"):
        DiceLoss()(torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"at least 2 dims.*\(8,\)"):
        DiceLoss()(torch.zeros(8), torch.zeros(8))
