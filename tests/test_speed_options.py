"""Speed options: trainer.compile, trainer.channels_last, trainer.grad_checkpointing."""

from __future__ import annotations

import pytest
import torch

from brain3d.checkpoint import load_checkpoint
from brain3d.models.backbones import PlainBackbone, ResNetBackbone
from brain3d.models.model import build_model

from tests.conftest import read_summary, run_train, tiny_overrides


def _loss_and_grads(backbone, x):
    features = backbone(x)
    loss = sum((f.float() ** 2).mean() for f in features)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in backbone.named_parameters()}
    backbone.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("make", [lambda: PlainBackbone(width=0.125), lambda: ResNetBackbone(width=0.125, depth=10)],
                         ids=["plain", "resnet"])
def test_grad_checkpointing_gives_the_same_loss_gradients_and_norm_statistics(make):
    torch.manual_seed(0)
    plain = make()
    checkpointed = make()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.grad_checkpointing = True
    x = torch.randn(2, 1, 32, 32, 32)
    loss_a, grads_a = _loss_and_grads(plain.train(), x)
    loss_b, grads_b = _loss_and_grads(checkpointed.train(), x)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)
    # the recomputation in backward must not update BatchNorm's running statistics a second time
    for (name, a), (_, b) in zip(plain.state_dict().items(), checkpointed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # evaluation and no-grad forwards do not checkpoint
    with torch.no_grad():
        for a, b in zip(plain.eval()(x), checkpointed.eval()(x)):
            torch.testing.assert_close(a, b)


def _tiny(option, tmp_path, cache_dir, task="segmentation"):
    run_dir = tmp_path / "run"
    run_train([f"task={task}", *tiny_overrides(cache_dir), "trainer.max_epochs=1", option, f"hydra.run.dir={run_dir}"],
              cwd=tmp_path)
    summary = read_summary(run_dir)
    assert summary["epochs_completed"] == 1
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not any(k.startswith("_orig_mod.") for k in state["model"]), "save the uncompiled module's state"
    config = state["config"]
    model = build_model(config["backbone"], config["task"]["head"], head_name=task)
    model.load_state_dict(state["model"])  # strict: the names of a plain model
    return summary


def test_channels_first_run_completes(tmp_path, cache_dir):
    summary = _tiny("trainer.channels_last=false", tmp_path, cache_dir)  # channels_last is the default
    assert summary["final_train"]["loss"] > 0 and summary["channels_last"] is False


def test_grad_checkpointing_run_completes(tmp_path, cache_dir):
    summary = _tiny("trainer.grad_checkpointing=true", tmp_path, cache_dir, task="classification")
    assert summary["final_train"]["loss"] > 0


@pytest.mark.slow  # torch.compile on CPU (~10 s)
def test_compiled_run_saves_plain_state_dict_names(tmp_path, cache_dir):
    # aot_eager: the torch.compile wrapper (graph capture, the _orig_mod. prefix) without generating C++ kernels
    summary = _tiny("trainer.compile=aot_eager", tmp_path, cache_dir, task="classification")
    assert summary["final_train"]["loss"] > 0


@pytest.mark.slow  # the default inductor backend compiles C++ kernels (needs a compiler; ~35 s on 2 CPU cores)
def test_compile_with_inductor_run_completes(tmp_path, cache_dir):
    summary = _tiny("trainer.compile=true", tmp_path, cache_dir, task="classification")
    assert summary["final_train"]["loss"] > 0
