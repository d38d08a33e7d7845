"""Every option of every config group composes and instantiates; task defaults pick their loss."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from brain3d.data.preprocess import validate_settings
from brain3d.train import ConfigError, build_loss, build_optimizer, check_input_geometry

from tests.conftest import CONFIG_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("task,loss", [("classification", "bce"), ("regression", "l1"), ("segmentation", "dice_bce")])
def test_task_picks_its_default_loss_and_override_wins(task, loss):
    assert compose_train([f"task={task}"]).loss.name == loss
    other = {"classification": "bce", "regression": "mse", "segmentation": "dice"}[task]
    assert compose_train([f"task={task}", f"loss={other}"]).loss.name == other


def test_every_option_instantiates():
    model = torch.nn.Linear(2, 1)
    for backbone in options("backbone"):
        cfg = compose_train([f"backbone={backbone}", "backbone.width=0.125"])
        net = instantiate(cfg.backbone)
        assert len(net.feature_channels) == 4
    for loss in options("loss"):
        task = {"bce": "classification", "dice": "segmentation", "dice_bce": "segmentation",
                "dice_ce": "segmentation task.num_classes=3"}.get(loss, "regression")
        cfg = compose_train([*f"task={task}".split(), f"loss={loss}"])
        assert isinstance(build_loss(cfg), torch.nn.Module)
    for opt in options("optimizer"):
        optimizer = build_optimizer(compose_train([f"optimizer={opt}"]).optimizer, model, torch.device("cpu"))
        assert isinstance(optimizer, torch.optim.Optimizer)
        for sched in options("scheduler"):
            scheduler = instantiate(compose_train([f"scheduler={sched}"]).scheduler)(optimizer, total_steps=10,
                                                                                     steps_per_epoch=2)
            optimizer.step()
            scheduler.step()
            assert 0 < scheduler.get_last_lr()[0] <= optimizer.defaults["lr"]
    for data in options("data"):
        assert compose_train([f"data={data}"]).data.source == data
    assert compose_train(["debug=fast"]).trainer.max_epochs == 2


def test_data_sources_extend_one_base_that_is_not_an_option():
    """configs/data/base/common.yaml holds the keys every source shares (the cache root among them, once); each
    source composes with all of them, and the base is neither an option of the data group nor in --help."""
    from brain3d.cli import group_options, groups_help

    base = OmegaConf.load(CONFIG_DIR / "data" / "base" / "common.yaml")
    assert options("data") == group_options("data") == ["bids", "msd", "nifti", "synthetic"]
    assert "base" not in groups_help("train")
    for data in options("data"):
        cfg = compose_train([f"data={data}"])
        assert set(base) <= set(cfg.data) and cfg.data.source == data
        assert OmegaConf.to_container(cfg.data)["cache_dir"] == OmegaConf.to_container(base)["cache_dir"]
        assert "cache_dir" not in OmegaConf.load(CONFIG_DIR / "data" / f"{data}.yaml")


def test_misfit_loss_is_refused_with_valid_list():
    with pytest.raises(ConfigError, match="valid losses for regression: l1, mse, huber"):
        build_loss(compose_train(["task=regression", "loss=bce"]))


def test_experiment_lesion_patches_sets_patch_training_for_segmentation():
    cfg = compose_train(["experiment=lesion_patches"])
    assert (cfg.task.name, cfg.loss.name, cfg.preprocess.mode) == ("segmentation", "dice_bce", "spacing")
    assert list(cfg.data.patch_size) == [96, 96, 96] and cfg.data.shape is None and cfg.preprocess.shape is None
    assert cfg.data.batch_size == 2
    overridden = compose_train(["experiment=lesion_patches", "data.patch_size=[64,64,64]", "loss=dice"])
    assert list(overridden.data.patch_size) == [64, 64, 64] and overridden.loss.name == "dice"  # the command line wins


def test_experiment_brain_age_sets_regression_with_l1():
    cfg = compose_train(["experiment=brain_age"])
    assert (cfg.task.name, cfg.loss.name, cfg.data.target_col) == ("regression", "l1", "age")
    assert list(cfg.augment.flip_axes) == [0] and cfg.task.head.dropout == 0.0
    assert (cfg.trainer.precise_bn_batches, cfg.trainer.ema, list(cfg.trainer.val_flip_axes)) == (38, 0.995, [0])
    assert cfg.trainer.max_epochs == 200  # the budget decides on a fast CPU (100 capped it at 8 of the 10 minutes)
    assert cfg.backbone._target_.endswith("ResNetBackbone")
    backbone = cfg.backbone
    assert (backbone.depth, backbone.width, backbone.stem_stride, backbone.stage1_stride) == (10, 0.25, 4, 1)
    assert (cfg.augment.affine_prob, list(cfg.augment.scale_range)) == (0.5, [0.95, 1.05])
    assert (cfg.augment.gamma_prob, cfg.augment.noise_prob, cfg.optimizer.weight_decay) == (0.0, 0.0, 0.05)
    assert compose_train(["experiment=brain_age", "loss=huber"]).loss.name == "huber"


def test_experiment_sex_and_lesion_presets():
    sex = compose_train(["experiment=sex"])
    assert (sex.task.name, sex.loss.name, sex.data.target_col) == ("classification", "bce", "sex")
    assert sex.backbone.width == 0.5 and sex.optimizer.weight_decay == 0.05
    assert (sex.trainer.precise_bn_batches, sex.trainer.ema, list(sex.augment.flip_axes)) == (8, 0.99, [0])
    lesion = compose_train(["experiment=lesion"])
    assert (lesion.task.name, lesion.loss.name, lesion.loss.batch) == ("segmentation", "dice_bce", True)
    assert list(lesion.data.patch_size) == [64, 64, 64] and lesion.data.samples_per_volume == 2
    assert lesion.trainer.val_every_n_epochs == 2 and lesion.task.head.deep_supervision is False
    assert lesion.task.min_lesion_voxels == 4
    # a preset leaves the data source and the shape to the user
    assert compose_train(["experiment=lesion", "data.shape=[96,112,96]"]).data.shape == [96, 112, 96]
    assert lesion.data.source == "synthetic" and list(lesion.data.shape) == [64, 64, 64]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_into_a_runnable_config(experiment):
    """Each preset composes, its loss fits its task and its shapes pass the checks made before any data is read."""
    cfg = compose_train([f"experiment={experiment}"])
    assert isinstance(build_loss(cfg), torch.nn.Module)
    check_input_geometry(cfg.task.name, validate_settings(cfg.preprocess), cfg.data.patch_size)
    instantiate(cfg.augment)
