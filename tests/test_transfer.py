"""Backbone transfer (brain3d.transfer): trainer.init_from, trainer.freeze_backbone, optimizer.backbone_lr_scale."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from brain3d import transfer
from brain3d.checkpoint import load_checkpoint, save_checkpoint
from brain3d.errors import ConfigError
from brain3d.models.model import build_model
from brain3d.train import build_optimizer

from tests.conftest import CONFIG_DIR, read_summary, run_train, tiny_overrides

CPU = torch.device("cpu")
BACKBONE = {"_target_": "brain3d.models.backbones.PlainBackbone", "in_channels": 1, "width": 0.125, "norm": "batch"}
SEGMENTATION_HEAD = {"_target_": "brain3d.models.heads.SegmentationHead", "out_channels": 1, "norm": "batch"}
POOL_HEAD = {"_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 1, "hidden_features": None,
             "dropout": 0.5}


def save_source(path, model, head_name: str, backbone=BACKBONE) -> None:
    """A checkpoint with the keys train.py's checkpoint_state writes that transfer reads."""
    save_checkpoint({"model": model.state_dict(), "config": {"backbone": dict(backbone)}, "head_name": head_name,
                     "task": head_name}, path)


def trained_source(head_cfg, head_name: str) -> torch.nn.Module:
    """A model whose BatchNorm statistics are not the init's (one forward in train mode)."""
    torch.manual_seed(1)
    model = build_model(BACKBONE, head_cfg, head_name=head_name)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32, 32))
    return model


def tensors(model_or_state, prefix: str) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {k: v.clone() for k, v in state.items() if k.startswith(prefix)}


def test_init_from_loads_exactly_the_backbone_and_the_matching_heads(tmp_path):
    source = trained_source(SEGMENTATION_HEAD, "segmentation")
    save_source(tmp_path / "seg.pt", source, "segmentation")
    torch.manual_seed(2)
    target = build_model(BACKBONE, POOL_HEAD, head_name="regression")
    fresh = {k: v.clone() for k, v in target.state_dict().items()}

    state = transfer.load_init_checkpoint(tmp_path / "seg.pt", BACKBONE)
    report = transfer.apply_init_checkpoint(target, state, tmp_path / "seg.pt")

    loaded = target.state_dict()
    source_backbone = tensors(source, "backbone.")
    assert source_backbone and all(torch.equal(loaded[k], v) for k, v in source_backbone.items())  # BN stats too
    assert any(not torch.equal(fresh[k], v) for k, v in source_backbone.items())  # the load changed something
    assert all(torch.equal(loaded[k], fresh[k]) for k in fresh if k.startswith("heads."))  # the head stays fresh
    assert report["loaded"] == ["backbone"] and report["fresh"] == ["heads.regression"]
    assert report["num_tensors"] == len(source_backbone)
    assert report["skipped"] == {"heads.segmentation": "head 'segmentation' not in this model (its heads: regression)"}

    # A head of the same name is loaded when every shape matches, skipped with the tensor at fault otherwise.
    pool_source = trained_source(POOL_HEAD, "regression")
    save_source(tmp_path / "reg.pt", pool_source, "regression")
    same = build_model(BACKBONE, POOL_HEAD, head_name="regression")
    report = transfer.apply_init_checkpoint(same, load_checkpoint(tmp_path / "reg.pt"), tmp_path / "reg.pt")
    assert report["loaded"] == ["backbone", "heads.regression"] and not report["skipped"]
    assert all(torch.equal(same.state_dict()[k], v) for k, v in pool_source.state_dict().items())
    narrower = build_model(BACKBONE, {**POOL_HEAD, "hidden_features": 16}, head_name="regression")  # 32 saved
    fresh_head = tensors(narrower, "heads.")
    report = transfer.apply_init_checkpoint(narrower, load_checkpoint(tmp_path / "reg.pt"), tmp_path / "reg.pt")
    assert report["skipped"] == {"heads.regression": "head 'regression': mlp.0.weight shape (32, 64) != (16, 64)"}
    assert report["loaded"] == ["backbone"] and report["fresh"] == ["heads.regression"]
    assert all(torch.equal(narrower.state_dict()[k], v) for k, v in fresh_head.items())


def test_freeze_backbone_keeps_backbone_weights_and_statistics_after_a_step():
    torch.manual_seed(0)
    model = build_model(BACKBONE, POOL_HEAD, head_name="regression")
    frozen = transfer.freeze_backbone(model)
    assert frozen == sum(p.numel() for p in model.backbone.parameters())
    optimizer = build_optimizer(OmegaConf.load(CONFIG_DIR / "optimizer" / "adamw.yaml"), model, CPU)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.heads.parameters()))
    backbone_before, head_before = tensors(model, "backbone."), tensors(model, "heads.")

    model.train()  # as engine.train_one_epoch does: the frozen BatchNorm stays in eval mode
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm3d))
    loss = model(torch.randn(2, 1, 32, 32, 32))["regression"].square().mean()
    loss.backward()
    optimizer.step()

    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())  # weights and running statistics
    assert any(not torch.equal(after[k], v) for k, v in head_before.items())
    # a frozen model's state_dict loads into a plain one (brain3d-predict)
    build_model(BACKBONE, POOL_HEAD, head_name="regression").load_state_dict(after)


def test_backbone_lr_scale_gives_the_backbone_its_own_param_group():
    model = build_model(BACKBONE, POOL_HEAD, head_name="regression")
    cfg = OmegaConf.load(CONFIG_DIR / "optimizer" / "adamw.yaml")
    assert cfg.backbone_lr_scale == 1.0
    assert len(build_optimizer(cfg, model, CPU).param_groups) == 1  # the default: as before, one group
    cfg.backbone_lr_scale = 0.1
    heads, backbone = build_optimizer(cfg, model, CPU).param_groups
    assert heads["lr"] == pytest.approx(1e-3) and backbone["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.heads.parameters()}
    sgd = OmegaConf.load(CONFIG_DIR / "optimizer" / "sgd.yaml")
    sgd.backbone_lr_scale = 0.5
    assert [g["lr"] for g in build_optimizer(sgd, model, CPU).param_groups] == pytest.approx([1e-2, 5e-3])
    cfg.backbone_lr_scale = 0
    with pytest.raises(ConfigError, match="optimizer.backbone_lr_scale=0 must be a number > 0"):
        build_optimizer(cfg, model, CPU)


def test_a_checkpoint_of_another_width_or_backbone_is_refused_naming_both(tmp_path):
    save_source(tmp_path / "seg.pt", build_model(BACKBONE, SEGMENTATION_HEAD, "segmentation"), "segmentation")
    with pytest.raises(ConfigError, match=r"has backbone PlainBackbone width 0.125; this run's is PlainBackbone "
                                          r"width 0.25 \(set backbone.width=0.125 to match it"):
        transfer.load_init_checkpoint(tmp_path / "seg.pt", {**BACKBONE, "width": 0.25})
    resnet = {**BACKBONE, "_target_": "brain3d.models.backbones.ResNetBackbone", "depth": 10}
    with pytest.raises(ConfigError, match="has backbone PlainBackbone in_channels 1, .*this run's is ResNetBackbone"):
        transfer.load_init_checkpoint(tmp_path / "seg.pt", resnet)
    with pytest.raises(ConfigError, match="trainer.init_from: checkpoint not found"):
        transfer.load_init_checkpoint(tmp_path / "missing.pt", BACKBONE)


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory, cache_dir):
    """A tiny segmentation run: the source of the end-to-end transfers."""
    run_dir = tmp_path_factory.mktemp("seg_source")
    run_train(["task=segmentation", *tiny_overrides(cache_dir), f"hydra.run.dir={run_dir}"], cwd=run_dir)
    return run_dir


@pytest.mark.slow  # 8-17 s on 2 fp32 CPU cores: the default suite stays under 10 minutes
def test_regression_run_starts_from_a_segmentation_checkpoint_with_a_frozen_backbone(segmentation_run, cache_dir,
                                                                                      tmp_path):
    source = segmentation_run / "checkpoints" / "best.pt"
    args = ["task=regression", *tiny_overrides(cache_dir), f"trainer.init_from={source}",
            "trainer.freeze_backbone=true", f"hydra.run.dir={tmp_path}", "trainer.resume=auto"]
    run_train(args, cwd=tmp_path)
    assert "loaded backbone (28 tensors); skipped head 'segmentation'" in (tmp_path / "train.log").read_text()
    summary = read_summary(tmp_path)
    assert summary["init_from"]["path"] == str(source.resolve())
    assert summary["init_from"]["loaded"] == ["backbone"] and summary["init_from"]["fresh"] == ["heads.regression"]
    assert list(summary["init_from"]["skipped"]) == ["heads.segmentation"]
    # Frozen: after two epochs the backbone (weights and BatchNorm statistics) is still the source's, bit for bit.
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    source_backbone = tensors(load_checkpoint(source)["model"], "backbone.")
    assert all(torch.equal(last["model"][k], v) for k, v in source_backbone.items())
    # A resume wins over init_from: the run continues from its own last.pt, and its summary keeps the record.
    run_train([*args, "trainer.max_epochs=3"], cwd=tmp_path)
    assert "not applied: resuming from" in (tmp_path / "train.log").read_text()
    summary = read_summary(tmp_path)
    assert summary["epochs_completed"] == 3 and summary["init_from"]["loaded"] == ["backbone"]


def test_a_width_mismatch_exits_2_with_one_line(segmentation_run, cache_dir, tmp_path):
    source = segmentation_run / "checkpoints" / "best.pt"
    proc = run_train(["task=regression", *tiny_overrides(cache_dir), f"trainer.init_from={source}",
                      "backbone.width=0.25", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "has backbone PlainBackbone width 0.125; this run's is PlainBackbone width 0.25" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
