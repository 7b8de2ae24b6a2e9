"""Batched tensor augmentation and normalisation (runs on the GPU when there is one).

One ``aug_strength`` s in [0, 1] scales everything: rotation up to ±30°·s, zoom ±15%·s, shift
±10%·s, brightness ±0.2·s, contrast ×(1 ± 0.3·s), and a horizontal flip with probability 0.5
when s > 0. At s = 0 the batch is returned unchanged. Val and test are never augmented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mura_tune.constants import IMAGENET_MEAN, IMAGENET_STD


def augment(
    x: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomly transform a batch ``(B, 1, S, S)`` of floats in [0, 1]."""
    if strength <= 0:
        return x
    b, device = x.shape[0], x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device="cpu").to(device) * (high - low) + low

    angle = uniform(-30.0 * strength, 30.0 * strength) * (math.pi / 180.0)
    zoom = uniform(1.0 - 0.15 * strength, 1.0 + 0.15 * strength)
    tx, ty = uniform(-0.1 * strength, 0.1 * strength), uniform(-0.1 * strength, 0.1 * strength)
    flip = torch.where(torch.rand(b, generator=generator).to(device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = uniform(-0.2 * strength, 0.2 * strength).view(b, 1, 1, 1).to(x.dtype)
    contrast = uniform(1.0 - 0.3 * strength, 1.0 + 0.3 * strength).view(b, 1, 1, 1).to(x.dtype)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


class Normalize(torch.nn.Module):
    """uint8 ``(B, S, S)`` → float ``(B, 3, S, S)``: scale to [0, 1], replicate, ImageNet-normalise."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


def to_unit(batch_u8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``(B, S, S)`` → float ``(B, 1, S, S)`` in [0, 1]."""
    return batch_u8.unsqueeze(1).to(dtype).div_(255.0)
