"""Augmentation of training batches on their device, a whole batch at a time (imports torch only).

`train.shift` alone moves each image by whole pixels with a gather (engine.shifted). With a
rotation, a scale or an elastic distortion on, each image gets its own warp instead: one affine
matrix per image (rotation, scale, and the same whole-pixel shift), an optional smooth random
displacement field added to the sampling grid, and one `F.grid_sample` for the batch. The random
numbers of a batch are drawn on the CPU by `draw` (from the training's generator, for the global
batch, before it is sharded), so the same seed gives the same batches on any device and world size.
`train.flip` mirrors half the images left to right (a negated x row of the affine matrix when
warping, a `torch.where` on a mirrored copy otherwise); `train.erase` zeroes a random square of each
image (cutout). Each draws its numbers only when on, after the others, so runs without it are unchanged.
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
    """What the training images go through (train.shift, rotate, scale, elastic, flip, erase); all 0: nothing."""

    shift: int = 0  # whole pixels, each axis, either way
    rotate: float = 0.0  # degrees either way
    scale: float = 0.0  # a zoom by a factor in [1 - scale, 1 + scale]
    elastic: float = 0.0  # pixels: the largest displacement of the field, about
    flip: bool = False  # mirror each image left to right with probability 1/2
    erase: int = 0  # pixels: the largest side of the square zeroed in each image

    @property
    def warps(self) -> bool:
        """Whether images are resampled (grid_sample) rather than only shifted (a gather)."""
        return self.rotate > 0 or self.scale > 0 or self.elastic > 0

    @property
    def on(self) -> bool:
        return self.shift > 0 or self.warps or self.flip or self.erase > 0

    def draw_flips(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) bool: which images are mirrored; nothing drawn when train.flip is off (all False)."""
        if not self.flip:
            return torch.zeros(n, dtype=torch.bool)
        return torch.rand(n, generator=generator) < 0.5

    def draw_erase(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 3) float: each image's erased square as its side in whole pixels, in [0, erase], and
        its centre (row, column) as fractions of the image in [0, 1) (erased places it); all 0 and
        nothing drawn when train.erase is off."""
        if not self.erase:
            return torch.zeros(n, 3)
        side = torch.randint(0, self.erase + 1, (n, 1), generator=generator).float()
        return torch.cat([side, torch.rand(n, 2, generator=generator)], 1)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The random numbers of `n` images, (n, columns) float32 on the CPU: (dy, dx) whole pixels,
        then the angle (radians) and the zoom factor, then 2 x ELASTIC_GRID^2 field values in [-1, 1]
        when elastic is on, then a flip sign (-1 mirrored, 1 not) when flip is on. The shift is drawn
        first and as train.shift alone draws it."""
        columns = []
        if self.shift:
            columns.append(torch.randint(-self.shift, self.shift + 1, (n, 2), generator=generator).float())
        else:
            columns.append(torch.zeros(n, 2))
        u = 2 * torch.rand(n, 2, generator=generator) - 1  # (n, 2) in [-1, 1): angle, zoom
        columns.append(u * torch.tensor([math.radians(self.rotate), self.scale]) + torch.tensor([0.0, 1.0]))
        if self.elastic:
            columns.append(2 * torch.rand(n, 2 * ELASTIC_GRID**2, generator=generator) - 1)
        if self.flip:
            columns.append(1 - 2 * self.draw_flips(n, generator)[:, None].float())
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
    theta = affine(draws, w)
    if aug.flip:  # the input mirrored first: its x coordinate negated (grid x is symmetric about 0)
        theta = theta * torch.stack([draws[:, -1:], torch.ones_like(draws[:, -1:])], 1)  # rows (x, y)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)  # (B, H, W, 2) in [-1, 1]
    if aug.elastic:
        field = draws[:, 4 : 4 + 2 * ELASTIC_GRID**2].view(b, 2, ELASTIC_GRID, ELASTIC_GRID)
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)  # (B, 2, H, W)
        grid = grid + field.permute(0, 2, 3, 1) * (2 * aug.elastic / w)  # pixels -> grid units
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def flipped(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Images (B, 1, H, W) with those where `flips` (B,) is True mirrored left to right."""
    return torch.where(flips[:, None, None, None], images.flip(3), images)


def erased(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Images (B, 1, H, W) with each one's square, a row of `boxes` (B, 3) from Augment.draw_erase,
    set to 0 (the background); a square at the border is cut by it, as in cutout."""
    h, w = images.shape[2:]
    side = boxes[:, 0, None]  # (B, 1)
    top = (boxes[:, 1, None] * h).floor() - torch.div(side, 2, rounding_mode="floor")  # (B, 1)
    left = (boxes[:, 2, None] * w).floor() - torch.div(side, 2, rounding_mode="floor")
    rows = torch.arange(h, device=images.device, dtype=boxes.dtype)[None, :]  # (1, H)
    cols = torch.arange(w, device=images.device, dtype=boxes.dtype)[None, :]  # (1, W)
    inside_rows = (rows >= top) & (rows < top + side)  # (B, H)
    inside_cols = (cols >= left) & (cols < left + side)  # (B, W)
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])  # (B, H, W)
    return images * keep[:, None].to(images.dtype)
