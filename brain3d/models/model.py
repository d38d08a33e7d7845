"""A backbone plus named heads, and a Hydra-config builder."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from brain3d.errors import ConfigError
from brain3d.models.heads import SegmentationHead, check_segmentation_shape

# Output key of a deep-supervised head's coarser logits in training mode: ``{"lesion": (B, 1, D, H, W),
# "lesion:deep": [(B, 1, D/2, H/2, W/2), (B, 1, D/4, H/4, W/4)]}`` (brain3d.tasks.TaskSet.loss reads it).
DEEP_SUFFIX = ":deep"


class Brain3DModel(nn.Module):
    """A backbone shared by one or more named heads.

    Args:
        backbone: module with ``feature_channels`` whose forward maps (B, C, D, H, W) to
            a list of 4 feature maps.
        heads: head name -> head module; each head maps the feature list to logits (a deep-supervised
            segmentation head in training mode also to coarser logits, returned under ``name + DEEP_SUFFIX``).

    Raises:
        ValueError (in forward): when the input is not 5-D (B, C, D, H, W), or when a
            segmentation head is present and D, H, W are not all divisible by 16.
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        if x.dim() != 5:
            raise ValueError(f"expected a 5-D input (B, C, D, H, W), got shape {tuple(x.shape)}")
        if any(isinstance(h, SegmentationHead) for h in self.heads.values()):
            check_segmentation_shape(x.shape[2:])
        features = self.backbone(x)  # [f1 (/2), f2 (/4), f3 (/8), f4 (/16)]
        out: dict[str, Any] = {}
        for name, head in self.heads.items():
            logits = head(features)
            if isinstance(logits, tuple):  # a deep-supervised head while training: (logits, coarser logits)
                logits, out[name + DEEP_SUFFIX] = logits
            out[name] = logits
        return out


def _target(cfg: Any) -> str:
    try:
        return str(cfg.get("_target_"))
    except AttributeError:
        return repr(cfg)


def build_model(backbone_cfg: Any, head_cfg: Any, head_name: str | None = None) -> Brain3DModel:
    """Instantiate a backbone and its head(s) from Hydra configs (with ``_target_``).

    The head is instantiated with ``feature_channels=backbone.feature_channels``.

    Args:
        backbone_cfg: DictConfig or dict, e.g.
            ``{"_target_": "brain3d.models.backbones.PlainBackbone", "width": 1.0}``.
        head_cfg: DictConfig or dict, e.g.
            ``{"_target_": "brain3d.models.heads.GlobalPoolHead", "out_features": 1}``.
        head_name: key of the head in the model's output dict. None: ``head_cfg`` maps each head's name to
            its config (a multi-task model; brain3d.tasks.head_configs).

    Raises:
        TypeError: when the backbone is not an ``nn.Module`` with ``feature_channels``,
            or the head is not an ``nn.Module``; the message names the ``_target_``.
    """
    backbone = _instantiate(backbone_cfg, "backbone")
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "feature_channels"):
        raise TypeError(
            f"backbone target {_target(backbone_cfg)} built {type(backbone).__name__}, "
            "not an nn.Module with a feature_channels attribute"
        )
    strides = tuple(getattr(backbone, "feature_strides", (2, 4, 8, 16)))
    head_cfgs = {head_name: head_cfg} if head_name is not None else dict(head_cfg)
    heads = {}
    after_backbone = torch.random.get_rng_state()
    for name, cfg in head_cfgs.items():
        # Every head starts from the random state the backbone left, as it would alone: adding, removing or
        # reordering heads does not change another head's initial weights, and a multi-task run's heads start
        # where single-task runs of the same seed do.
        torch.random.set_rng_state(after_backbone)
        where = "task.head" if head_name is not None else f"task.heads.{name}.head"
        heads[name] = _instantiate(cfg, where, feature_channels=list(backbone.feature_channels))
        if not isinstance(heads[name], nn.Module):
            raise TypeError(f"head target {_target(cfg)} built {type(heads[name]).__name__}, not an nn.Module")
        if isinstance(heads[name], SegmentationHead) and strides != (2, 4, 8, 16):
            raise ConfigError(f"a segmentation head needs the backbone's features at 1/2, 1/4, 1/8, 1/16 of the "
                              f"input; this backbone gives 1/{', 1/'.join(str(s) for s in strides)}: leave "
                              "backbone.stage1_stride=1 and backbone.stem_stride=2")
    return Brain3DModel(backbone, heads)


def _instantiate(cfg: Any, where: str, **kwargs: Any) -> Any:
    """``instantiate(cfg, **kwargs)``; a key the class does not take is a ConfigError naming it and the keys it
    does take (e.g. ``backbone.depth`` left by a preset for ResNet after ``backbone=plain``)."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as err:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(err.__cause__ or err))
        target = _target(cfg)
        if not found or "." not in target:
            raise
        module, _, name = target.rpartition(".")
        try:
            accepted = [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                        if p not in kwargs and p != "self"]
        except (ImportError, AttributeError, TypeError, ValueError):
            raise err from None
        given = [str(k) for k in (cfg.keys() if hasattr(cfg, "keys") else ()) if not str(k).startswith("_")]
        keys = [k for k in given if k not in accepted] or [found.group(1)]  # all at once, not one per try
        names = ", ".join(f"{where}.{k}" for k in keys)
        removal = " ".join(f"'~{where}.{k}'" for k in keys)
        verb, it = ("is not a setting", "it") if len(keys) == 1 else ("are not settings", "them")
        raise ConfigError(f"{names} {verb} of {target} (it takes {', '.join(accepted)}); remove {it} with {removal} "
                          f"(a preset may set {it} for another {where.split('.')[0]})") from None


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters: ``sum(p.numel() for p in model.parameters())``."""
    return sum(p.numel() for p in model.parameters())
