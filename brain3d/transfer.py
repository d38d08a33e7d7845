"""Backbone transfer: start a run from another brain3d checkpoint, freeze the backbone, scale its learning rate.

* ``trainer.init_from=PATH``: :func:`load_init_checkpoint` reads the checkpoint and checks, before anything is
  written, that its backbone config is this run's (same ``_target_``, width, norm, depth...: a ConfigError names
  both otherwise); :func:`apply_init_checkpoint` then loads the backbone and every head whose name and tensor
  shapes match, and reports what it loaded and skipped (the rest keeps its fresh initialisation).
* ``trainer.freeze_backbone=true``: :func:`freeze_backbone` stops gradients to the backbone and keeps its
  BatchNorm layers in eval mode, so only the heads train.
* ``optimizer.backbone_lr_scale``: :func:`optimizer_param_groups` gives the backbone ``lr * scale``.

Plain functions of a model and a checkpoint dict (as ``brain3d.checkpoint.load_checkpoint`` returns it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from brain3d.checkpoint import load_checkpoint
from brain3d.errors import ConfigError


def _short(target: Any) -> str:
    """``brain3d.models.backbones.PlainBackbone`` -> ``PlainBackbone``."""
    return str(target).rsplit(".", 1)[-1]


def _describe(backbone: dict, keys) -> str:
    """``PlainBackbone width 0.25, norm batch`` (the class and the given keys)."""
    return f"{_short(backbone.get('_target_'))} " + ", ".join(f"{k} {backbone[k]}" for k in keys if k in backbone)


def check_backbone_matches(saved: dict, current: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose backbone is another class or differs in any key both configs have
    (``width``, ``norm``, ``depth``, ``in_channels``: each changes the tensors). A key only one side has (added
    by a newer brain3d) is left to the tensor check of :func:`apply_init_checkpoint`.

    Raises:
        ConfigError: ``trainer.init_from: PATH has backbone PlainBackbone width 0.25; this run's is
            PlainBackbone width 0.5 ...``.
    """
    if saved.get("_target_") != current.get("_target_"):
        saved_keys, current_keys = [k for k in saved if k != "_target_"], [k for k in current if k != "_target_"]
        hint = "choose the backbone= option it was trained with, or a checkpoint of this backbone"
    else:
        saved_keys = current_keys = [k for k in current if k != "_target_" and k in saved and saved[k] != current[k]]
        hint = ("set " + " ".join(f"backbone.{k}={saved[k]}" for k in saved_keys) + " to match it, "
                "or start from a checkpoint of this backbone")
    if current_keys or saved.get("_target_") != current.get("_target_"):
        raise ConfigError(f"trainer.init_from: {path} has backbone {_describe(saved, saved_keys)}; this run's is "
                          f"{_describe(current, current_keys)} ({hint})")


def load_init_checkpoint(path: str | Path, backbone_config: dict) -> dict:
    """The checkpoint ``trainer.init_from`` names, after checking its backbone against ``backbone_config``
    (this run's resolved ``backbone`` config as a plain dict): its ``model`` and ``config``, read on the CPU;
    nothing is loaded into a model yet.

    Raises:
        ConfigError: no such file, not a brain3d checkpoint, or another backbone (:func:`check_backbone_matches`).
    """
    path = Path(str(path)).expanduser()
    try:
        state = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"trainer.init_from: {err}") from err
    saved = state["config"].get("backbone") if isinstance(state["config"], dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"trainer.init_from: {path} records no backbone config (state['config']['backbone'])")
    check_backbone_matches(saved, backbone_config, path)
    return {"model": state["model"], "config": state["config"]}  # not the optimizer state: memory until loaded


def _shape_problem(prefix: str, saved: dict, own: dict) -> str | None:
    """Why the tensors under ``prefix`` do not fit (missing / unexpected names, a shape), or None when they do."""
    def names(keys: list[str]) -> str:  # "mlp.0.weight (+3 more)"
        return keys[0][len(prefix):] + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")

    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        parts = ([f"the checkpoint lacks {names(missing)}"] if missing else []) + (
            [f"it has {names(unexpected)} that this model lacks"] if unexpected else [])
        return "other tensors: " + ", ".join(parts)
    for name in own:
        if tuple(saved[name].shape) != tuple(own[name].shape):
            return f"{name[len(prefix):]} shape {tuple(saved[name].shape)} != {tuple(own[name].shape)}"
    return None


def apply_init_checkpoint(model: nn.Module, state: dict, path: str | Path) -> dict[str, Any]:
    """Load the backbone of ``state["model"]`` into ``model.backbone``, and each head whose name is one of
    ``model.heads`` and whose every tensor (BatchNorm statistics included) has this model's name and shape;
    the others keep their fresh initialisation. A head is loaded whole or not at all.

    Returns:
        ``{"path", "loaded": ["backbone", "heads.NAME", ...], "skipped": {"heads.NAME": reason},
        "fresh": [parts of this model left at their initialisation], "num_tensors": loaded tensor count}``.

    Raises:
        ConfigError: the backbone tensors do not fit although the configs matched (e.g. another brain3d version).
    """
    saved = state["model"]
    own = model.state_dict()
    saved_backbone = {k: v for k, v in saved.items() if k.startswith("backbone.")}
    own_backbone = {k: v for k, v in own.items() if k.startswith("backbone.")}
    problem = _shape_problem("backbone.", saved_backbone, own_backbone)
    if problem:
        raise ConfigError(f"trainer.init_from: the backbone tensors in {path} do not fit this run's backbone: "
                          f"{problem}")
    selected = dict(saved_backbone)
    loaded, skipped = ["backbone"], {}
    saved_heads = sorted({k.split(".")[1] for k in saved if k.startswith("heads.")})
    own_heads = list(model.heads.keys())
    for name in saved_heads:
        prefix = f"heads.{name}."
        if name not in own_heads:
            skipped[f"heads.{name}"] = f"head '{name}' not in this model (its heads: {', '.join(own_heads)})"
            continue
        saved_head = {k: v for k, v in saved.items() if k.startswith(prefix)}
        problem = _shape_problem(prefix, saved_head, {k: v for k, v in own.items() if k.startswith(prefix)})
        if problem:
            skipped[f"heads.{name}"] = f"head '{name}': {problem}"
            continue
        selected.update(saved_head)
        loaded.append(f"heads.{name}")
    result = model.load_state_dict(selected, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every selected name was checked against own
    return {"path": str(Path(str(path)).expanduser().resolve()), "loaded": loaded, "skipped": skipped,
            "fresh": [f"heads.{name}" for name in own_heads if f"heads.{name}" not in loaded],
            "num_tensors": len(selected)}


def describe_init(report: dict[str, Any]) -> str:
    """One log line: ``loaded backbone (28 tensors); skipped head 'segmentation' not in this model (its heads:
    regression); initialised fresh: heads.regression``."""
    parts = [f"loaded {', '.join(report['loaded'])} ({report['num_tensors']} tensors)"]
    if report["skipped"]:
        parts.append("skipped " + "; ".join(report["skipped"].values()))  # each reason names its head
    if report["fresh"]:
        parts.append("initialised fresh: " + ", ".join(report["fresh"]))
    return f"trainer.init_from={report['path']}: " + "; ".join(parts)


class FrozenBatchNorm3d(nn.BatchNorm3d):
    """A BatchNorm3d that stays in eval mode: ``train()`` leaves it normalising with its running statistics,
    which it never updates. Same parameters, buffers and state_dict names as ``nn.BatchNorm3d``, so a checkpoint
    of a frozen run loads into a plain model (brain3d-predict, another init_from)."""

    def train(self, mode: bool = True) -> FrozenBatchNorm3d:
        return super().train(False)


def freeze_backbone(model: nn.Module) -> int:
    """``trainer.freeze_backbone``: no gradient for the backbone's parameters (the optimizer leaves them out) and
    its BatchNorm layers fixed to the statistics it came with (eval mode through every ``model.train()`` the loop
    calls, by turning each into a :class:`FrozenBatchNorm3d`): with batches of 2-4 volumes, batch statistics
    would otherwise drift from those the transferred weights were trained with. Returns the number of frozen
    parameter values."""
    frozen = 0
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
        frozen += parameter.numel()
    for module in model.backbone.modules():
        if type(module) is nn.BatchNorm3d:
            module.__class__ = FrozenBatchNorm3d  # a subclass with no state of its own: only train() changes
            module.eval()
    return frozen


def optimizer_param_groups(model: nn.Module, lr: float | None, backbone_lr_scale: float = 1.0):
    """What the optimizer trains: the parameters that need gradients (a frozen backbone's do not). With
    ``backbone_lr_scale`` 1 that is one list, exactly as ``model.parameters()`` was; otherwise two param groups,
    the heads at ``lr`` first (``param_groups[0]`` is what the loop logs as the learning rate) and the backbone
    at ``lr * backbone_lr_scale``. Schedulers scale each group from its own starting lr.

    Raises:
        ConfigError: ``backbone_lr_scale`` is not a number > 0, or the optimizer has no ``lr`` to scale.
    """
    try:
        scale = float(backbone_lr_scale)
    except (TypeError, ValueError):
        scale = float("nan")
    if not scale > 0:
        raise ConfigError(f"optimizer.backbone_lr_scale={backbone_lr_scale!r} must be a number > 0 "
                          "(to train only the heads, set trainer.freeze_backbone=true)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    backbone = getattr(model, "backbone", None)
    if scale == 1.0 or not isinstance(backbone, nn.Module):
        return trainable
    if lr is None:
        raise ConfigError("optimizer.backbone_lr_scale needs optimizer.lr to scale")
    in_backbone = {id(p) for p in backbone.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in in_backbone]}]
    backbone_params = [p for p in trainable if id(p) in in_backbone]
    if backbone_params:  # none when the backbone is frozen
        groups.append({"params": backbone_params, "lr": float(lr) * scale})
    return groups

