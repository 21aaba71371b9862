"""Encoders (ResNet-18/50 with an ImageNet or CIFAR stem, a small CNN) and the SimCLR projection head.

Written here because torchvision has no CPU wheel for this torch; the ResNets follow torchvision's
layout (BasicBlock / Bottleneck, zero-initialisable last BN) with the classifier removed.
"""

from __future__ import annotations

from typing import List, Type, Union

import torch
import torch.nn as nn

__all__ = ["ARCHS", "build_encoder", "ProjectionHead", "SimCLRModel", "SmallCNN", "ResNet"]

ARCHS = ("smallcnn", "resnet18", "resnet50")


def _conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, 3, stride, 1, bias=False)


class _ResidualBlock(nn.Module):
    """relu(bn_n(conv_n(... relu(bn1(conv1(x))) ...)) + shortcut(x)) on (B, C, H, W) images: the convs
    conv1..conv_n, each followed by its BN bn1..bn_n and a ReLU but the last; the shortcut is the
    identity, or ``downsample`` (1x1 conv + BN) when the block changes the stride or the width."""

    def __init__(self, inplanes, convs, stride):
        """convs: one (in channels, out channels, kernel size, stride) per conv, padded to keep the size."""
        super().__init__()
        self.depth = len(convs)
        for n, (i, o, size, s) in enumerate(convs, 1):
            setattr(self, f"conv{n}", nn.Conv2d(i, o, size, s, size // 2, bias=False))
            setattr(self, f"bn{n}", nn.BatchNorm2d(o))
        self.relu = nn.ReLU(inplace=True)
        out = convs[-1][1]
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = x
        for n in range(1, self.depth + 1):
            out = getattr(self, f"bn{n}")(getattr(self, f"conv{n}")(out))
            if n < self.depth:
                out = self.relu(out)
        return self.relu(out + idt)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN before the sum (zero-initialised: the block starts as its shortcut)."""
        return getattr(self, f"bn{self.depth}")


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (the first strided), width planes."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__(inplanes, [(inplanes, planes, 3, stride), (planes, planes, 3, 1)], stride)


class Bottleneck(_ResidualBlock):
    """1x1 reduce to planes, 3x3 (strided), 1x1 expand to 4 * planes."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__(inplanes, [(inplanes, planes, 1, 1), (planes, planes, 3, stride),
                                    (planes, planes * self.expansion, 1, 1)], stride)


class ResNet(nn.Module):
    """ResNet trunk; ``stem="cifar"`` is the 3x3 stride-1 conv without max-pool used for 32x32 images."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], in_channels=3,
                 stem="imagenet", zero_init_residual=True):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(_conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"--stem: unknown stem {stem!r}; choose 'cifar' or 'imagenet'")
        self.inplanes = 64
        self.layer1 = self._make(block, 64, layers[0], 1)
        self.layer2 = self._make(block, 128, layers[1], 2)
        self.layer3 = self._make(block, 256, layers[2], 2)
        self.layer4 = self._make(block, 512, layers[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _ResidualBlock):
                    nn.init.zeros_(m.last_bn().weight)

    def _make(self, block, planes, n, stride):
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


class SmallCNN(nn.Module):
    """A small conv net for tiny images (the 8x8 digits default): 3 conv-BN-ReLU stages + pooling."""

    def __init__(self, in_channels=1, width=32):
        super().__init__()
        w = width

        def cbr(i, o):
            return [nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *cbr(in_channels, w), *cbr(w, w), nn.MaxPool2d(2),
            *cbr(w, 2 * w), *cbr(2 * w, 2 * w), nn.MaxPool2d(2),
            *cbr(2 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 4 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return torch.flatten(self.pool(self.features(x)), 1)


def build_encoder(arch: str, in_channels: int, image_size: int, stem: str = "auto", width: int = 32) -> nn.Module:
    if stem == "auto":
        stem = "cifar" if image_size <= 64 else "imagenet"
    if arch == "smallcnn":
        return SmallCNN(in_channels, width)
    if arch == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, stem)
    if arch == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3], in_channels, stem)
    raise ValueError(f"--arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


class ProjectionHead(nn.Module):
    """SimCLR's 2-layer MLP head: Linear -> BN -> ReLU -> Linear (-> BN without affine, as SimCLR v2)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
        )

    def forward(self, h):
        return self.net(h)


class SimCLRModel(nn.Module):
    def __init__(self, encoder: nn.Module, hidden_dim: int, proj_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.out_dim, hidden_dim, proj_dim)

    def forward(self, x):
        return self.head(self.encoder(x))
