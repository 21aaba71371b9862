"""Batched, on-device SimCLR augmentations (kornia).

A whole batch of ``uint8`` images is moved to the device once and augmented there, twice, to give
the two views; every image in the batch gets its own random parameters.  Random numbers come from
torch's global generator (whose state the checkpoints save, so resumed runs are bit-identical).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["build_augmentation", "Preprocess"]


def _kornia():
    import kornia.augmentation as K  # imported lazily: only the trainer needs kornia

    return K


class Preprocess(nn.Module):
    """uint8 (N,C,H,W) -> float in [0,1], resized to ``size`` if needed (no randomness)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                          antialias=True, align_corners=False)
        return x


class Augment(nn.Module):
    def __init__(self, size: int, ops: Sequence[nn.Module], mean, std):
        super().__init__()
        K = _kornia()
        self.pre = Preprocess(size)
        self.ops = nn.Sequential(*ops)
        self.normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.ops(self.pre(x)))


class Normalize(nn.Module):
    """The evaluation transform: preprocess + normalise, no randomness."""

    def __init__(self, size: int, mean, std):
        super().__init__()
        K = _kornia()
        self.pre = Preprocess(size)
        self.normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.pre(x))


def augmentation_ops(dataset: str, size: int, channels: int, strength: float = 1.0):
    """SimCLR's augmentation recipe for ``dataset`` (a list of kornia modules)."""
    K = _kornia()
    if dataset == "digits":
        # 8x8 grayscale digits: no colour, no flips (digits are not mirror-symmetric); mild
        # crops, a small affine jitter and a little blur/noise.
        return [
            K.RandomResizedCrop((size, size), scale=(0.5, 1.0), ratio=(0.75, 1.333)),
            K.RandomAffine(degrees=10.0 * strength, translate=(0.1 * strength, 0.1 * strength),
                           scale=(0.9, 1.1), shear=5.0 * strength, p=0.8),
            K.RandomGaussianBlur((3, 3), sigma=(0.1, 1.0), p=0.3),
            K.RandomGaussianNoise(mean=0.0, std=0.05 * strength, p=0.3),
        ]
    s = strength
    ops = [
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
    ]
    if channels == 3:
        ops += [
            K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8),
            K.RandomGrayscale(p=0.2),
        ]
    else:
        ops += [K.ColorJitter(0.8 * s, 0.8 * s, 0.0, 0.0, p=0.8)]
    if dataset not in ("cifar10", "cifar100"):
        # SimCLR blurs ImageNet-sized images (kernel ~10% of the side), not CIFAR
        k = max(3, int(0.1 * size) // 2 * 2 + 1)
        ops.append(K.RandomGaussianBlur((k, k), sigma=(0.1, 2.0), p=0.5))
    return ops


def build_augmentation(dataset: str, size: int, channels: int, mean, std, strength: float = 1.0) -> Augment:
    return Augment(size, augmentation_ops(dataset, size, channels, strength), mean, std)


def build_eval_transform(size: int, mean, std) -> Normalize:
    return Normalize(size, mean, std)
