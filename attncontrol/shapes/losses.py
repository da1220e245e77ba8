"""Differentiable scores of generated shapes-world images, for optimizing controls against them.

The Spatial-Temporal Attention paper optimizes its region weights against CLIP similarity of each region's crop to
the region's text. The shapes world has no CLIP, but it has exact colours: :func:`region_color_loss` asks each
region to hold a blob of the colour its text names and none of the colours the other regions name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attncontrol.controls.regions import Region, region_mask
from attncontrol.core.errors import RegionError
from attncontrol.shapes.scenes import COLORS


def region_color(region: Region) -> str | None:
    """The shapes-world colour a region's phrase or prompt names, if any."""
    text = region.phrase if region.phrase is not None else region.prompt or ""
    words = [word.strip(".,;") for word in text.lower().split()]
    return next((word for word in words if word in COLORS), None)


def color_match(images: torch.Tensor, color: str, sharpness: float) -> torch.Tensor:
    """``[B, H, W]`` in (0, 1]: how close each pixel is to ``color`` (a Gaussian of the RGB distance)."""
    target = torch.tensor(COLORS[color], dtype=images.dtype, device=images.device) / 255.0
    distance = (images - target[None, :, None, None]).pow(2).sum(dim=1)
    return torch.exp(-sharpness * distance)


def region_color_loss(
    images: torch.Tensor, regions: Sequence[Region], *, fill: float = 0.2, sharpness: float = 20.0
) -> torch.Tensor:
    """Mean over images and coloured regions of ``shortfall + intrusion``.

    ``shortfall``: how far the share of the region's pixels in its own colour is below ``fill`` (an object covers
    a good part of its box), relative to ``fill``; ``intrusion``: the share in colours other regions name.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1] (``output_type="pt"``), with their graph.
        regions: the layout; regions whose text names no colour are skipped.
        fill: share of a region that should carry its colour.
        sharpness: ``1 / (2 sigma^2)`` of the colour match, in [0, 1] RGB units.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise RegionError(f"`images` must be [B, 3, H, W], got {tuple(images.shape)}")
    colors = [region_color(region) for region in regions]
    if not any(colors):
        raise RegionError(f"no region names a colour of the shapes world ({', '.join(COLORS)})")
    size = (int(images.shape[2]), int(images.shape[3]))
    matches = {color: color_match(images, color, sharpness) for color in set(colors) if color}
    total = images.new_zeros(())
    for index, (region, color) in enumerate(zip(regions, colors, strict=True)):
        if color is None:
            continue
        mask = region_mask(region, size, f"regions[{index}]").image.to(images)
        area = mask.sum().clamp_min(1.0)
        share = (matches[color] * mask).sum(dim=(1, 2)) / area
        shortfall = torch.relu(fill - share) / fill
        others = [matches[other] for other in set(colors) if other and other != color]
        intrusion = sum(((match * mask).sum(dim=(1, 2)) / area for match in others), images.new_zeros(len(images)))
        total = total + (shortfall + intrusion).mean()
    return total / sum(color is not None for color in colors)
