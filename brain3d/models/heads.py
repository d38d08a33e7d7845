"""Prediction heads. Each takes the backbone's list of 4 feature maps and returns LOGITS.

No head applies a sigmoid/softmax: pair them with ``BCEWithLogitsLoss`` (or similar),
and apply the activation at inference time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from brain3d.models.backbones import Conv3DBlock

DIVISOR = 16  # the backbones downsample 4 times by 2


def _as_channels(feature_channels: Sequence[int]) -> tuple[int, ...]:
    channels = tuple(int(c) for c in feature_channels)
    if len(channels) != 4:
        raise ValueError(f"feature_channels must have 4 entries, got {channels}")
    return channels


def check_segmentation_shape(spatial_shape: Sequence[int]) -> None:
    """Check that every spatial axis (D, H, W) is divisible by 16.

    Args:
        spatial_shape: the input's spatial shape (D, H, W).

    Raises:
        ValueError: when an axis is not divisible by 16; the message names the shape and
            the nearest valid shapes below and above it.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if all(s % DIVISOR == 0 for s in shape):
        return
    lower = tuple(max(DIVISOR, (s // DIVISOR) * DIVISOR) for s in shape)
    upper = tuple(-(-s // DIVISOR) * DIVISOR for s in shape)
    options = f"{lower} or {upper}" if lower != upper else f"{upper}"
    raise ValueError(
        f"input spatial shape {shape} is not divisible by {DIVISOR} in every axis; "
        f"nearest valid shapes: {options}"
    )


class GlobalPoolHead(nn.Module):
    """The seed's classifier/regressor head on the last feature map.

    AdaptiveAvgPool3d(1) -> flatten -> Linear(c4, hidden) -> ReLU -> Dropout ->
    Linear(hidden, out_features). Returns logits (classification) or raw values
    (regression).

    Args:
        feature_channels: the backbone's 4 feature channels; only the last (c4) is used.
        out_features: number of outputs. Defaults to 1.
        hidden_features: hidden width; ``None`` means ``c4 // 2`` (256 at width 1.0, as in
            the seed). Defaults to None.
        dropout: dropout probability. Defaults to 0.5.
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        out_features: int = 1,
        hidden_features: int | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        c4 = _as_channels(feature_channels)[-1]
        hidden = hidden_features if hidden_features is not None else max(1, c4 // 2)
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.mlp = nn.Sequential(
            nn.Linear(c4, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_features),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.global_pool(features[-1])  # (B, c4, 1, 1, 1)
        return self.mlp(torch.flatten(x, 1))  # (B, out_features)


class Decoder3DBlock(nn.Module):
    """The seed's decoder block: ConvTranspose3d(in, in, 2, 2) -> cat(skip) -> Conv3DBlock.

    Args:
        in_channels: channels of the decoder input.
        skip_channels: channels of the skip (encoder) feature map.
        out_channels: output channels.
        norm: ``"batch"``, ``"instance"`` or ``"group"``. Defaults to ``"batch"``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose3d(in_channels, in_channels, 2, 2)
        self.conv = Conv3DBlock(in_channels + skip_channels, out_channels, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.upsample(x), skip], dim=1))


class SegmentationHead(nn.Module):
    """The seed's U-Net-like decoder over the 4 backbone features; returns voxel logits.

    The input's spatial size must be divisible by 16 (see ``check_segmentation_shape``,
    which ``Brain3DModel`` calls).

    Args:
        feature_channels: the backbone's 4 feature channels (c1, c2, c3, c4).
        out_channels: output channels (1 for binary segmentation). Defaults to 1.
        norm: ``"batch"``, ``"instance"`` or ``"group"``. Defaults to ``"batch"``.
        deep_supervision: also predict logits at 1/2 and 1/4 of the input size from the decoder's d2 and d3
            (a 1x1 convolution each, nnU-Net's deep supervision), so the loss reaches the coarse decoder
            stages directly. In training mode the forward then returns ``(logits, [logits/2, logits/4])``;
            in eval mode, and by default, just the full-size logits (the seed's head, unchanged).
    """

    def __init__(self, feature_channels: Sequence[int], out_channels: int = 1, norm: str = "batch",
                 deep_supervision: bool = False) -> None:
        super().__init__()
        c1, c2, c3, c4 = _as_channels(feature_channels)
        self.decoder4 = Decoder3DBlock(c4, c3, c3, norm)
        self.decoder3 = Decoder3DBlock(c3, c2, c2, norm)
        self.decoder2 = Decoder3DBlock(c2, c1, c1, norm)
        c0 = max(1, c1 // 2)
        self.decoder1 = nn.ConvTranspose3d(c1, c0, 2, 2)
        self.final_conv = nn.Conv3d(c0, out_channels, kernel_size=1)
        self.deep_supervision = bool(deep_supervision)
        if self.deep_supervision:  # created after the seed's layers: their initial weights do not change
            self.deep_half = nn.Conv3d(c1, out_channels, kernel_size=1)  # on d2 (D/2)
            self.deep_quarter = nn.Conv3d(c2, out_channels, kernel_size=1)  # on d3 (D/4)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        f1, f2, f3, f4 = features
        d4 = self.decoder4(f4, f3)  # (B, c3, D/8, H/8, W/8)
        d3 = self.decoder3(d4, f2)  # (B, c2, D/4, H/4, W/4)
        d2 = self.decoder2(d3, f1)  # (B, c1, D/2, H/2, W/2)
        d1 = self.decoder1(d2)  # (B, c1 // 2, D, H, W)
        logits = self.final_conv(d1)  # (B, out_channels, D, H, W)
        if self.deep_supervision and self.training:
            return logits, [self.deep_half(d2), self.deep_quarter(d3)]  # (B, out, D/2, ...), (B, out, D/4, ...)
        return logits
