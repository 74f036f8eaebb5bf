"""Augmentation of training batches on their device, a whole batch at a time (imports torch only).

`train.shift` alone moves each image by whole pixels with a gather (engine.shifted). With a
rotation, a scale or an elastic distortion on, each image gets its own warp instead: one affine
matrix per image (rotation, scale, and the same whole-pixel shift), an optional smooth random
displacement field added to the sampling grid, and one `F.grid_sample` for the batch. The random
numbers of a batch are drawn on the CPU by `draw` (from the training's generator, for the global
batch, before it is sharded), so the same seed gives the same batches on any device and world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# Control points per side of the elastic displacement field: 4 points 9 pixels apart on 28 pixels,
# interpolated bicubically, bend a stroke smoothly rather than jitter single pixels.
ELASTIC_GRID = 4


@dataclass(frozen=True)
class Augment:
    """What the training images go through (train.shift, rotate, scale, elastic); all 0: nothing."""

    shift: int = 0  # whole pixels, each axis, either way
    rotate: float = 0.0  # degrees either way
    scale: float = 0.0  # a zoom by a factor in [1 - scale, 1 + scale]
    elastic: float = 0.0  # pixels: the largest displacement of the field, about

    @property
    def warps(self) -> bool:
        """Whether images are resampled (grid_sample) rather than only shifted (a gather)."""
        return self.rotate > 0 or self.scale > 0 or self.elastic > 0

    @property
    def on(self) -> bool:
        return self.shift > 0 or self.warps

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The random numbers of `n` images, (n, columns) float32 on the CPU: (dy, dx) whole pixels,
        then the angle (radians) and the zoom factor, then 2 x ELASTIC_GRID^2 field values in [-1, 1]
        when elastic is on. The shift is drawn first and as train.shift alone draws it."""
        columns = []
        if self.shift:
            columns.append(torch.randint(-self.shift, self.shift + 1, (n, 2), generator=generator).float())
        else:
            columns.append(torch.zeros(n, 2))
        u = 2 * torch.rand(n, 2, generator=generator) - 1  # (n, 2) in [-1, 1): angle, zoom
        columns.append(u * torch.tensor([math.radians(self.rotate), self.scale]) + torch.tensor([0.0, 1.0]))
        if self.elastic:
            columns.append(2 * torch.rand(n, 2 * ELASTIC_GRID**2, generator=generator) - 1)
        return torch.cat(columns, 1)


def affine(draws: torch.Tensor, size: int) -> torch.Tensor:
    """The (B, 2, 3) matrices F.affine_grid takes, from draws' first 4 columns: each maps an output
    pixel to where it samples the input, so that the image turns counterclockwise (as shown, row 0
    on top) by the angle, zooms by the factor, then moves by (dy, dx) pixels."""
    offsets, angle, zoom = draws[:, :2], draws[:, 2], draws[:, 3]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # The inverse of the forward map: x right, y down, a counterclockwise turn is [[c, s], [-s, c]].
    m = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    t = offsets.flip(1) * (2 / size)  # (B, 2): (dx, dy) in grid units, one pixel is 2 / size
    return torch.cat([m, -(m @ t[:, :, None])], 2)  # (B, 2, 3)


def warped(images: torch.Tensor, draws: torch.Tensor, aug: Augment) -> torch.Tensor:
    """Each image of (B, 1, H, W) (H = W, any dtype) warped by its row of `draws` (Augment.draw, on
    images' device): float32 pixels on the same scale, the background (0) filled in at the borders."""
    b, _, h, w = images.shape
    grid = F.affine_grid(affine(draws, w), [b, 1, h, w], align_corners=False)  # (B, H, W, 2) in [-1, 1]
    if aug.elastic:
        field = draws[:, 4:].view(b, 2, ELASTIC_GRID, ELASTIC_GRID)
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)  # (B, 2, H, W)
        grid = grid + field.permute(0, 2, 3, 1) * (2 * aug.elastic / w)  # pixels -> grid units
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
