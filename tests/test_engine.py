"""The loop's numerics: accumulation, clipping, bf16 autocast on CPU, non-finite loss reporting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brain3d import engine
from brain3d.losses import MSELoss
from brain3d.schedulers import warmup_schedule
from brain3d.tasks import single_task


class TinyRegressor(nn.Module):
    """Mean-pools a (B, 1, D, H, W) volume and applies a linear map: no BatchNorm, no dropout, so the
    gradient of a batch equals the mean of its samples' gradients."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        return {"regression": self.linear(x.mean(dim=(2, 3, 4)))}


def batches(images, targets, batch_size):
    return [
        {"image": images[i : i + batch_size], "target": targets[i : i + batch_size],
         "subject_id": [f"sub-{j}" for j in range(i, i + batch_size)]}
        for i in range(0, len(images), batch_size)
    ]


def run_epoch(model, loader, accumulate=1, clip=None, amp_dtype=None, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = warmup_schedule(optimizer, total_steps=10, steps_per_epoch=10, kind="constant", warmup_epochs=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return engine.train_one_epoch(model, loader, MSELoss(), optimizer, scheduler, scaler, single_task("regression"),
                                  torch.device("cpu"), amp_dtype, epoch=1, accumulate_grad_batches=accumulate,
                                  gradient_clip_norm=clip, progress=False)


def data(n=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, 4, generator=g), torch.rand(n, 1, generator=g)


def test_accumulating_two_half_batches_equals_one_full_batch():
    images, targets = data(4)
    torch.manual_seed(0)
    full, accumulated = TinyRegressor(), TinyRegressor()
    accumulated.load_state_dict(full.state_dict())
    run_epoch(full, batches(images, targets, 4), accumulate=1)
    run_epoch(accumulated, batches(images, targets, 2), accumulate=2)
    for a, b in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b)


def test_gradient_clipping_bounds_the_step():
    images, targets = data(4)
    model = TinyRegressor()
    before = [p.detach().clone() for p in model.parameters()]
    run_epoch(model, batches(images, targets * 100, 4), clip=1e-3, lr=1.0)
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < step <= 1e-3 + 1e-7


def test_bf16_autocast_on_cpu_trains_with_float32_loss():
    images, targets = data(4)
    model = TinyRegressor()
    before = model.linear.weight.detach().clone()
    stats = run_epoch(model, batches(images, targets, 2), amp_dtype=torch.bfloat16)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert not torch.equal(before, model.linear.weight)
    with engine.autocast(torch.device("cpu"), torch.bfloat16):
        logits = model(images)["regression"]
        assert logits.dtype == torch.bfloat16
        assert MSELoss()(logits, targets).dtype == torch.float32


def test_non_finite_loss_names_epoch_step_and_subjects():
    images, targets = data(4)
    images[2, 0, 0, 0, 0] = float("nan")  # a bad voxel in the second batch
    with pytest.raises(engine.NonFiniteLossError,
                       match=r"epoch 1, step 2/2; subjects in the batch: \['sub-2', 'sub-3'\]"):
        run_epoch(TinyRegressor(), batches(images, targets, 2))


def test_regression_targets_are_standardised_and_decoded():
    spec = single_task("regression", target_mean=50.0, target_std=10.0)
    assert spec.encode(torch.tensor([60.0])).item() == pytest.approx(1.0)
    assert spec.decode(torch.tensor([-2.0])).item() == pytest.approx(30.0)
    assert single_task("classification").encode(torch.tensor([1.0])).item() == 1.0
