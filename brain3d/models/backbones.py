"""3D convolutional backbones for brain MRI.

Every backbone follows the same contract so that any head can sit on any backbone:

- attribute ``feature_channels``: a tuple of 4 ints, the channels of the 4 feature maps;
- ``forward(x)`` with ``x`` of shape (B, C, D, H, W) returns a list of 4 tensors
  ``[f1, f2, f3, f4]`` at 1/2, 1/4, 1/8 and 1/16 of the input spatial size.

Initialisation (both backbones): every ``nn.Conv3d`` gets
``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` weights and zero bias; every
norm layer with affine parameters gets weight 1 and bias 0. Heads keep torch defaults.

Gradient checkpointing (both backbones): set ``backbone.grad_checkpointing = True`` (``trainer.grad_checkpointing``)
and each stage's activations are recomputed in backward instead of kept, trading about a third more compute
for much less activation memory. Only in training mode with gradients enabled; results are unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

NORMS = ("batch", "instance", "group")
BASE_CHANNELS = (64, 128, 256, 512)


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build a 3D normalisation layer.

    Args:
        norm: one of ``"batch"`` (BatchNorm3d), ``"instance"`` (InstanceNorm3d with
            ``affine=True``) or ``"group"`` (GroupNorm with the largest number of groups
            ``<= min(8, channels)`` that divides ``channels``).
        channels: number of channels to normalise.

    Raises:
        ValueError: when ``norm`` is not one of the allowed names.
    """
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "group":
        groups = min(8, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(repr(n) for n in NORMS)}")


def scale_channels(width: float) -> tuple[int, int, int, int]:
    """Scale (64, 128, 256, 512) by ``width``: ``max(1, round(c * width))``.

    Args:
        width: channel multiplier, must be > 0 (1.0 gives the seed's 64/128/256/512).

    Raises:
        ValueError: when ``width`` is not > 0.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return tuple(max(1, round(c * width)) for c in BASE_CHANNELS)  # type: ignore[return-value]


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) conv weights, zero conv bias; norm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _KeepNormStatistics:
    """Context for the recomputed forward of a checkpointed stage: BatchNorm updates its running statistics
    in every training forward, so the recomputation would update them a second time; this puts them back."""

    def __init__(self, stage: nn.Module) -> None:
        self.norms = [m for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [[b.clone() for b in m.buffers()] for m in self.norms]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for m, saved in zip(self.norms, self.saved):
                for buffer, value in zip(m.buffers(), saved):
                    buffer.copy_(value)


def run_stage(backbone: nn.Module, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)``, under activation checkpointing when ``backbone.grad_checkpointing`` is set and gradients
    are being recorded (non-reentrant checkpointing: works with inputs that need no grad, and keeps the RNG)."""
    if getattr(backbone, "grad_checkpointing", False) and backbone.training and torch.is_grad_enabled():
        return checkpoint(stage, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _KeepNormStatistics(stage)))
    return stage(x)


class Conv3DBlock(nn.Module):
    """Conv3d -> norm -> ReLU (the seed's basic block, with a choice of norm).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel size. Defaults to 3.
        stride: convolution stride. Defaults to 1.
        padding: convolution padding. Defaults to 1.
        norm: ``"batch"``, ``"instance"`` or ``"group"``. Defaults to ``"batch"``.

    Raises:
        ValueError: when ``norm`` is unknown.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding)
        self.norm = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.norm(self.conv(x)))


class PlainBackbone(nn.Module):
    """The seed's ``FeatureExtractor3D``: four stride-2 Conv3DBlocks.

    With ``width=1.0`` and ``norm="batch"`` it has exactly the seed's architecture and
    parameters (channels 64, 128, 256, 512).

    Args:
        in_channels: input image channels. Defaults to 1.
        width: channel multiplier, each of (64, 128, 256, 512) becomes
            ``max(1, round(c * width))``. Defaults to 1.0.
        norm: ``"batch"``, ``"instance"`` or ``"group"``. Defaults to ``"batch"``.

    Raises:
        ValueError: when ``width`` is not > 0 or ``norm`` is unknown.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0, norm: str = "batch") -> None:
        super().__init__()
        c1, c2, c3, c4 = self.feature_channels = scale_channels(width)
        self.conv1 = Conv3DBlock(in_channels, c1, stride=2, norm=norm)
        self.conv2 = Conv3DBlock(c1, c2, stride=2, norm=norm)
        self.conv3 = Conv3DBlock(c2, c3, stride=2, norm=norm)
        self.conv4 = Conv3DBlock(c3, c4, stride=2, norm=norm)
        self.grad_checkpointing = False  # trainer.grad_checkpointing (see the module docstring)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = run_stage(self, self.conv1, x)  # (B, c1, D/2, H/2, W/2)
        f2 = run_stage(self, self.conv2, f1)  # (B, c2, D/4, H/4, W/4)
        f3 = run_stage(self, self.conv3, f2)  # (B, c3, D/8, H/8, W/8)
        f4 = run_stage(self, self.conv4, f3)  # (B, c4, D/16, H/16, W/16)
        return [f1, f2, f3, f4]


class BasicBlock3D(nn.Module):
    """3D residual basic block (He et al. 2016): conv3-norm-relu-conv3-norm + shortcut, relu.

    The shortcut is a 1x1x1 conv + norm when the stride or the channels change,
    otherwise the identity.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv (and of the shortcut). Defaults to 1.
        norm: ``"batch"``, ``"instance"`` or ``"group"``. Defaults to ``"batch"``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride, bias=False),
                make_norm(norm, out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """3D ResNet-10/18 backbone in the style of MedicalNet.

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
        Chen, Ma and Zheng, "Med3D: Transfer Learning for 3D Medical Image Analysis",
        arXiv:1904.00625, 2019 (MedicalNet).

    Layout: stem Conv3DBlock(in, c1, kernel 3, stride 2) then four stages of
    BasicBlock3D; stage 1 has stride 1 (f1 at /2), stages 2-4 stride 2 (f2 /4, f3 /8,
    f4 /16). Unlike MedicalNet there is no 7x7x7 stem nor max-pool, so that f1 sits at
    /2 like the plain backbone's and the segmentation head works on both.

    Args:
        in_channels: input image channels. Defaults to 1.
        width: channel multiplier on (64, 128, 256, 512), ``max(1, round(c * width))``.
            Defaults to 1.0.
        norm: ``"batch"``, ``"instance"`` or ``"group"``. Defaults to ``"batch"``.
        depth: 10 (1 block per stage) or 18 (2 blocks per stage). Defaults to 18.
        stage1_stride: 1 (f1 at /2, the default) or 2: stage 1 also halves the size, so the features sit at
            /4, /8, /16, /32 and stage 1, the costliest (most voxels), runs on 1/8 of the voxels. For
            classification and regression (global pooling); the segmentation head needs f1 at /2.
        stem_stride: 2 (the default: a 3x3x3 convolution of stride 2) or 4: a 4x4x4 convolution of stride 4
            without padding ("patchify", as ConvNeXt's stem), whose output has 1/8 of the voxels: a stem
            convolution of one input channel is the costliest layer of a small ResNet on CPU (its weight
            gradient, norm and ReLU run on the largest feature map). Features then sit at
            ``stem_stride * stage1_stride * (1, 2, 4, 8)``; input sizes divisible by 4 are covered whole.

    Raises:
        ValueError: when ``depth`` is not 10 or 18, ``stage1_stride`` not 1 or 2, ``stem_stride`` not 2 or 4,
            ``width`` is not > 0 or ``norm`` is unknown.
    """

    BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}

    def __init__(self, in_channels: int = 1, width: float = 1.0, norm: str = "batch", depth: int = 18,
                 stage1_stride: int = 1, stem_stride: int = 2) -> None:
        super().__init__()
        if depth not in self.BLOCKS:
            raise ValueError(f"unsupported ResNet depth {depth!r}; allowed: 10, 18")
        if stage1_stride not in (1, 2) or isinstance(stage1_stride, bool):
            raise ValueError(f"backbone.stage1_stride must be 1 or 2, got {stage1_stride!r}")
        if stem_stride not in (2, 4) or isinstance(stem_stride, bool):
            raise ValueError(f"backbone.stem_stride must be 2 or 4, got {stem_stride!r}")
        self.feature_channels = scale_channels(width)
        self.feature_strides = tuple(stem_stride * stage1_stride * 2**i for i in range(4))  # f1..f4 vs the input
        c1 = self.feature_channels[0]
        if stem_stride == 2:
            self.stem = Conv3DBlock(in_channels, c1, kernel_size=3, stride=2, padding=1, norm=norm)
        else:  # non-overlapping 4x4x4 patches
            self.stem = Conv3DBlock(in_channels, c1, kernel_size=4, stride=4, padding=0, norm=norm)
        stages = []
        prev = c1
        for i, (channels, n_blocks) in enumerate(zip(self.feature_channels, self.BLOCKS[depth])):
            stride = stage1_stride if i == 0 else 2
            blocks = [BasicBlock3D(prev, channels, stride, norm)]
            blocks += [BasicBlock3D(channels, channels, 1, norm) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.grad_checkpointing = False  # trainer.grad_checkpointing (see the module docstring)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = run_stage(self, self.stem, x)  # (B, c1, D/2, H/2, W/2); /4 with stem_stride=4
        f1 = run_stage(self, self.layer1, x)  # (B, c1, D/2, H/2, W/2); /4 with stage1_stride=2
        f2 = run_stage(self, self.layer2, f1)  # (B, c2, D/4, H/4, W/4)
        f3 = run_stage(self, self.layer3, f2)  # (B, c3, D/8, H/8, W/8)
        f4 = run_stage(self, self.layer4, f3)  # (B, c4, D/16, H/16, W/16)
        return [f1, f2, f3, f4]
