"""Every option of every config group composes and instantiates; task defaults pick their loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from brain3d.train import build_loss, ConfigError

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
        task = {"bce": "classification", "dice": "segmentation", "dice_bce": "segmentation"}.get(loss, "regression")
        cfg = compose_train([f"task={task}", f"loss={loss}"])
        assert isinstance(build_loss(cfg), torch.nn.Module)
    for opt in options("optimizer"):
        optimizer = instantiate(compose_train([f"optimizer={opt}"]).optimizer)(model.parameters())
        assert isinstance(optimizer, torch.optim.Optimizer)
        for sched in options("scheduler"):
            scheduler = instantiate(compose_train([f"scheduler={sched}"]).scheduler)(optimizer, total_steps=10, steps_per_epoch=2)
            optimizer.step()
            scheduler.step()
            assert 0 < scheduler.get_last_lr()[0] <= optimizer.defaults["lr"]
    for data in options("data"):
        assert compose_train([f"data={data}"]).data.source == data
    assert compose_train(["debug=fast"]).trainer.max_epochs == 2


def test_misfit_loss_is_refused_with_valid_list():
    with pytest.raises(ConfigError, match="valid losses for regression: l1, mse, huber"):
        build_loss(compose_train(["task=regression", "loss=bce"]))
