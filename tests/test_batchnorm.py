"""Precise BatchNorm (trainer.precise_bn_batches): statistics re-estimated on training batches."""

from __future__ import annotations

import torch
from torch import nn

from brain3d.batchnorm import recompute_batchnorm_statistics
from brain3d.transfer import FrozenBatchNorm3d

from tests.conftest import tiny_overrides


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm3d(2)
        self.drop = nn.Dropout(0.5)
        self.frozen = FrozenBatchNorm3d(2)

    def forward(self, x):
        return {"out": self.frozen(self.drop(self.bn(x)))}


def test_statistics_are_the_average_of_the_batches_and_modes_are_restored():
    torch.manual_seed(0)
    model = Tiny()
    model.bn.running_mean.fill_(5.0)  # stale statistics from training
    model.frozen.running_mean.fill_(7.0)
    batches = [{"image": torch.randn(2, 2, 3, 3, 3) * (k + 1) + k} for k in range(4)]
    model.train()
    used = recompute_batchnorm_statistics(model, iter(batches), 3, torch.device("cpu"))
    assert used == 3
    # hand computation: the mean of the three batch means, and of the three unbiased batch variances, per channel
    means = torch.stack([b["image"].mean(dim=(0, 2, 3, 4)) for b in batches[:3]])
    variances = torch.stack([b["image"].transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for b in batches[:3]])
    assert torch.allclose(model.bn.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(model.bn.running_var, variances.mean(0), atol=1e-5)
    assert model.bn.momentum == 0.1 and model.training and model.drop.training  # restored
    assert torch.all(model.frozen.running_mean == 7.0)  # a frozen backbone's statistics stay as loaded
    model.eval()
    recompute_batchnorm_statistics(model, iter(batches), 10, torch.device("cpu"))  # fewer batches than asked: 4
    assert torch.allclose(model.bn.running_mean, torch.stack([b["image"].mean(dim=(0, 2, 3, 4))
                                                              for b in batches]).mean(0), atol=1e-6)
    assert not model.training and not model.bn.training


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.InstanceNorm3d(2))
    assert recompute_batchnorm_statistics(model, iter([{"image": torch.randn(1, 1, 2, 2, 2)}]), 4,
                                          torch.device("cpu")) == 0


def test_a_run_with_precise_bn_saves_the_re_estimated_statistics(tmp_path, cache_dir):
    """The checkpoint holds the re-estimated statistics validation used: every BatchNorm layer counts the 2
    batches of the re-estimate (training alone would leave the 4 optimizer steps of the epoch)."""
    from tests.conftest import run_train

    run_dir = tmp_path / "run"
    run_train([*tiny_overrides(cache_dir), "task=regression", "trainer.max_epochs=1", "trainer.precise_bn_batches=2",
               "augment=none", "trainer.channels_last=false", "trainer.precision=fp32", f"hydra.run.dir={run_dir}"],
              cwd=tmp_path)
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    saved = {k: v for k, v in state["model"].items() if k.endswith("running_mean")}
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    assert all(v == 2 for k, v in state["model"].items() if k.endswith("num_batches_tracked"))  # 2 batches, reset
