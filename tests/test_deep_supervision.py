"""Deep supervision of the segmentation head (``task.head.deep_supervision=true``): the head's coarser logits,
the loss against a hand computation, small lesions kept in the coarse targets, and a run end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F

from brain3d.checkpoint import load_checkpoint
from brain3d.data.synthetic import synthetic_cache_dir
from brain3d.errors import ConfigError
from brain3d.losses import BCELoss, DiceBCELoss
from brain3d.models.heads import SegmentationHead
from brain3d.models.model import DEEP_SUFFIX, build_model
from brain3d.tasks import SegmentationTask, TaskSet, _head_for_classes, deep_supervised_loss

from tests.conftest import read_summary, run_train, tiny_overrides
from tests.test_predict import predict_here

CHANNELS = [4, 8, 16, 32]


def features(batch: int = 2, size: int = 32) -> list[torch.Tensor]:
    """Backbone-like features of a (batch, 1, size, size, size) input: 1/2, 1/4, 1/8, 1/16 of its size."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, size // 2**(i + 1), size // 2**(i + 1), size // 2**(i + 1), generator=gen)
            for i, c in enumerate(CHANNELS)]


def test_head_gives_coarser_logits_in_training_only_and_keeps_the_seed_layers_weights():
    torch.manual_seed(3)
    plain = SegmentationHead(CHANNELS)
    torch.manual_seed(3)
    deep = SegmentationHead(CHANNELS, deep_supervision=True)
    # the seed's layers start from the same weights; only the two 1x1 convolutions are added
    plain_state, deep_state = plain.state_dict(), deep.state_dict()
    assert set(deep_state) - set(plain_state) == {"deep_half.weight", "deep_half.bias", "deep_quarter.weight",
                                                  "deep_quarter.bias"}
    assert all(torch.equal(plain_state[k], deep_state[k]) for k in plain_state)

    feats = features()
    deep.train()
    logits, coarse = deep(feats)
    assert torch.equal(logits, plain.train()(feats))  # (and both BatchNorms update their statistics alike)
    assert logits.shape == (2, 1, 32, 32, 32)
    assert [tuple(c.shape) for c in coarse] == [(2, 1, 16, 16, 16), (2, 1, 8, 8, 8)]
    deep.eval()
    plain.eval()
    out = deep(feats)
    assert isinstance(out, torch.Tensor) and torch.equal(out, plain(feats))  # eval: the seed head's output


def test_model_puts_the_coarser_logits_under_the_deep_key_while_training():
    model = build_model({"_target_": "brain3d.models.backbones.PlainBackbone", "width": 0.125},
                        {"_target_": "brain3d.models.heads.SegmentationHead", "deep_supervision": True}, "lesion")
    x = torch.randn(2, 1, 32, 32, 32)
    out = model.train()(x)
    assert set(out) == {"lesion", "lesion" + DEEP_SUFFIX}
    assert [tuple(c.shape) for c in out["lesion" + DEEP_SUFFIX]] == [(2, 1, 16, 16, 16), (2, 1, 8, 8, 8)]
    assert set(model.eval()(x)) == {"lesion"}


def test_deep_supervised_loss_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(1)
    target = (torch.rand(2, 1, 8, 8, 8, generator=gen) > 0.7).float()
    full = torch.randn(2, 1, 8, 8, 8, generator=gen)
    half = torch.randn(2, 1, 4, 4, 4, generator=gen)
    quarter = torch.randn(2, 1, 2, 2, 2, generator=gen)
    loss_fn = BCELoss()
    got = deep_supervised_loss(loss_fn, loss_fn(full, target), [half, quarter], target)

    def bce(logits, t):  # mean binary cross-entropy with soft targets, written out
        p = torch.sigmoid(logits)
        return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()

    # the coarse targets are block means of the mask: 2^3 and 4^3 blocks
    t_half = target.reshape(2, 1, 4, 2, 4, 2, 4, 2).mean(dim=(3, 5, 7))
    t_quarter = target.reshape(2, 1, 2, 4, 2, 4, 2, 4).mean(dim=(3, 5, 7))
    expected = (bce(full, target) + 0.5 * bce(half, t_half) + 0.25 * bce(quarter, t_quarter)) / 1.75
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_three_voxel_lesion_stays_positive_in_every_coarse_target():
    target = torch.zeros(1, 1, 16, 16, 16)
    target[0, 0, 5, 9, 6:9] = 1.0  # 3 voxels, crossing a 4-voxel block border (z 6,7 | 8)
    for block in (2, 4):
        coarse = F.avg_pool3d(target, block)
        assert coarse.sum().item() * block**3 == pytest.approx(3.0)  # the lesion's volume is kept
        assert (coarse > 0).any()
        nearest = target[..., ::block, ::block, ::block]  # nearest-neighbour downsampling loses it
        assert not nearest.any()
    # with a confident "no lesion" everywhere, the coarse terms add loss (they see the lesion)
    logits = torch.full((1, 1, 16, 16, 16), -8.0)
    coarse_logits = [torch.full((1, 1, 8, 8, 8), -8.0), torch.full((1, 1, 4, 4, 4), -8.0)]
    loss_fn = DiceBCELoss(batch=True)
    full = loss_fn(logits, target)
    assert deep_supervised_loss(loss_fn, full, coarse_logits, target).item() > 0.9 * full.item()


def test_task_set_loss_uses_the_deep_logits_and_keeps_only_labelled_samples():
    task = SegmentationTask("lesion", "mask", DiceBCELoss(batch=True))
    gen = torch.Generator().manual_seed(2)
    target = (torch.rand(3, 1, 8, 8, 8, generator=gen) > 0.8).float()
    logits = {"lesion": torch.randn(3, 1, 8, 8, 8, generator=gen),
              "lesion" + DEEP_SUFFIX: [torch.randn(3, 1, 4, 4, 4, generator=gen),
                                       torch.randn(3, 1, 2, 2, 2, generator=gen)]}
    loss, _ = TaskSet([task], multi=False).loss(logits, {"lesion": target}, {"lesion": None})
    expected = deep_supervised_loss(task.loss_fn, task.loss_fn(logits["lesion"], target),
                                    logits["lesion" + DEEP_SUFFIX], target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(task.loss_fn(logits["lesion"], target).item(), rel=1e-3)

    keep = torch.tensor([True, False, True])  # multi-task: the second subject has no mask
    _, per_head = TaskSet([task], multi=True).loss(logits, {"lesion": target}, {"lesion": keep})
    kept = deep_supervised_loss(task.loss_fn, task.loss_fn(logits["lesion"][keep], target[keep]),
                                [c[keep] for c in logits["lesion" + DEEP_SUFFIX]], target[keep])
    assert per_head["lesion"].item() == pytest.approx(kept.item(), rel=1e-6)


def test_multi_class_with_deep_supervision_is_a_clear_error():
    head = {"_target_": "brain3d.models.heads.SegmentationHead", "out_channels": 1, "deep_supervision": True}
    with pytest.raises(ConfigError, match=r"task.head.deep_supervision=true works with binary segmentation only "
                       r"\(num_classes=1\); with num_classes=3 add task.head.deep_supervision=false"):
        _head_for_classes(head, "segmentation", 3, "task.head")


def test_a_deep_supervised_run_trains_saves_the_coarse_layers_and_predicts(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_train(["task=segmentation", "task.head.deep_supervision=true", *tiny_overrides(cache_dir),
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    summary = read_summary(run_dir)
    assert len(summary["history"]) == 2
    assert all(0.0 <= h["val_dice"] <= 1.0 and h["train_loss"] > 0 for h in summary["history"])
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert state["config"]["task"]["head"]["deep_supervision"] is True
    assert {"heads.segmentation.deep_half.weight", "heads.segmentation.deep_quarter.weight"} <= set(state["model"])
    # predict runs the head in eval mode: one mask per subject, from the full-size logits only
    manifest = synthetic_cache_dir(Path(cache_dir) / "synthetic", 12, (32, 32, 32), 0) / "manifest.csv"
    rows = list(csv.DictReader(open(manifest)))[:2]
    subset = tmp_path / "two.csv"
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{**r, "image": str(manifest.parent / r["image"]), "mask": str(manifest.parent / r["mask"])}
                          for r in rows])
    predict_here([f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"data.manifest={subset}",
                  f"output_dir={tmp_path / 'pred'}"])
    for row in rows:
        mask = nib.load(tmp_path / "pred" / f"{row['subject_id']}_mask.nii.gz")
        assert mask.shape == nib.load(manifest.parent / row["image"]).shape
