"""Masks from what users have (PIL images, arrays, tensors, boxes, circles) to what layers need (token grids).

Everything is validated up front with an error that names the argument: wrong rank, values outside [0, 1], NaN,
an empty mask, or an aspect ratio that differs from the image's (such a mask is never silently stretched).
:class:`SpatialMask` resizes to each layer's grid once per resolution and caches the result, so controls do not
resample masks on every step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attncontrol.core.errors import MaskError

Box = Sequence[float]
MaskLike = Union[Image.Image, np.ndarray, torch.Tensor, Box]  # noqa: UP007 - a runtime alias, kept readable


def _mean_keeping_dtype(array: np.ndarray) -> np.ndarray:
    """Channel mean that keeps uint8 masks in 0..255 (so they are still scaled, not rejected as floats > 1)."""
    mean = array.mean(axis=-1)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return mean.round().astype(array.dtype)
    return mean


def _channels_to_plane(array: np.ndarray, name: str) -> np.ndarray:
    """[H, W, C] -> [H, W]: alpha when it carries information, else the mean of the colour channels."""
    channels = array.shape[-1]
    if channels == 1:
        return array[..., 0]
    if channels in (2, 4):
        alpha = array[..., -1]
        if np.any(alpha != alpha.max()) or alpha.max() == 0:
            return alpha
        return _mean_keeping_dtype(array[..., :-1])
    if channels == 3:
        return _mean_keeping_dtype(array)
    raise MaskError(f"`{name}` has {channels} channels in its last axis; expected 1, 3 or 4 (or a 2-D mask)")


def _to_float_plane(value: np.ndarray, name: str) -> np.ndarray:
    if value.dtype == bool:
        return value.astype(np.float32)
    if np.issubdtype(value.dtype, np.integer):
        if value.min() < 0 or value.max() > 255:
            raise MaskError(f"`{name}` has integer values outside 0..255 (min {value.min()}, max {value.max()})")
        return value.astype(np.float32) / 255.0
    value = value.astype(np.float32)
    if np.isnan(value).any():
        raise MaskError(f"`{name}` contains NaN")
    if value.min() < 0.0 or value.max() > 1.0:
        raise MaskError(
            f"`{name}` has float values outside [0, 1] (min {value.min():.3g}, max {value.max():.3g}); "
            "scale it to [0, 1] or pass uint8 0..255"
        )
    return value


def _is_box(mask: object) -> bool:
    return (
        isinstance(mask, (tuple, list))
        and len(mask) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mask)
    )


def box_mask(box: Box, size: tuple[int, int], *, name: str = "box") -> torch.Tensor:
    """A [H, W] mask of an ``(x0, y0, x1, y1)`` box, in pixels or, when every value is <= 1, relative units."""
    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)
    if any(math.isnan(v) for v in (x0, y0, x1, y1)):
        raise MaskError(f"`{name}` {tuple(box)} contains NaN")
    if max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    if not (x0 < x1 and y0 < y1):
        raise MaskError(f"`{name}` {tuple(box)} must satisfy x0 < x1 and y0 < y1 (format: x0, y0, x1, y1)")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise MaskError(f"`{name}` {tuple(box)} lies entirely outside the {width}x{height} image")
    mask = torch.zeros(height, width)
    mask[max(0, round(y0)) : min(height, round(y1)), max(0, round(x0)) : min(width, round(x1))] = 1.0
    return mask


def circle_mask(center: tuple[float, float], radius: float, size: tuple[int, int]) -> torch.Tensor:
    """A [H, W] disc around ``center`` (x, y); pixel units, or relative units when center and radius are <= 1."""
    height, width = size
    cx, cy = center
    if radius <= 0:
        raise MaskError(f"`radius` must be positive, got {radius}")
    if max(abs(cx), abs(cy), radius) <= 1.0:
        cx, cy, radius = cx * width, cy * height, radius * min(height, width)
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= radius**2).float()


def load_mask(
    mask: MaskLike,
    *,
    name: str = "mask",
    image_size: tuple[int, int] | None = None,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Validate ``mask`` and return it as a float32 ``[H, W]`` tensor in [0, 1].

    Args:
        mask: a PIL image (alpha used when present), a numpy array or tensor (2-D, ``[1, H, W]`` or ``[H, W, C]``;
            bool, uint8 0..255 or float 0..1), or a box ``(x0, y0, x1, y1)``.
        name: the argument name used in error messages.
        image_size: ``(height, width)`` of the image the mask belongs to. A mask of the same aspect ratio (to within
            one pixel) is resized to it; another aspect ratio is an error. Required for boxes.
        allow_empty: accept a mask with no pixel set.
    """
    if _is_box(mask):
        if image_size is None:
            raise MaskError(f"`{name}` is a box; the image size is needed to rasterize it")
        plane = box_mask(mask, image_size, name=name)
    else:
        if isinstance(mask, Image.Image):
            array = np.asarray(mask.convert("L") if mask.mode in ("1", "P", "I", "I;16", "F") else mask)
        elif isinstance(mask, torch.Tensor):
            array = mask.detach().cpu().numpy()
        elif isinstance(mask, np.ndarray):
            array = mask
        else:
            raise MaskError(
                f"`{name}` must be a PIL image, numpy array, torch tensor or (x0, y0, x1, y1) box, "
                f"got {type(mask).__name__}"
            )
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 3:
            array = _channels_to_plane(array, name)
        if array.ndim != 2:
            raise MaskError(f"`{name}` must be 2-D (H, W), [1, H, W] or [H, W, C]; got shape {tuple(array.shape)}")
        if 0 in array.shape:
            raise MaskError(f"`{name}` has an empty shape {tuple(array.shape)}")
        plane = torch.from_numpy(np.ascontiguousarray(_to_float_plane(array, name)))
        if image_size is not None and tuple(plane.shape) != tuple(image_size):
            plane = _resize_same_aspect(plane, image_size, name)
    if not allow_empty and float(plane.max()) <= 0.0:
        raise MaskError(f"`{name}` is empty: no pixel is set")
    return plane


def _resize_same_aspect(plane: torch.Tensor, image_size: tuple[int, int], name: str) -> torch.Tensor:
    mask_h, mask_w = plane.shape
    image_h, image_w = image_size
    if abs(mask_h * image_w / image_h - mask_w) > 1.0:
        raise MaskError(
            f"`{name}` is {mask_h}x{mask_w} (HxW) but the image is {image_h}x{image_w}: the aspect ratios differ. "
            "attncontrol does not stretch masks; crop or pad the mask to the image's aspect ratio"
        )
    return F.interpolate(plane[None, None], size=tuple(image_size), mode="bilinear", align_corners=False)[0, 0]


def resize_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-average a ``[H, W]`` mask down (or bilinear up) to a token grid: each token gets its coverage."""
    height, width = grid
    if mask.shape[-2] >= height and mask.shape[-1] >= width:
        return F.adaptive_avg_pool2d(mask[None, None], (height, width))[0, 0]
    return F.interpolate(mask[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def cells_inside(coverage: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., cells]`` from coverage ``[..., cells]``: cells at least half covered, never none (the best
    cell at least). The one membership rule of regions, at inference and in region-masked training."""
    inside = coverage >= 0.5
    return inside | ((coverage >= coverage.amax(-1, keepdim=True)) & ~inside.any(-1, keepdim=True))


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a ``[H, W]`` mask by ``pixels`` (square structuring element); negative values erode."""
    if pixels == 0:
        return mask
    size = 2 * abs(pixels) + 1
    if pixels > 0:
        return F.max_pool2d(mask[None, None], size, stride=1, padding=abs(pixels))[0, 0]
    return -F.max_pool2d(-mask[None, None], size, stride=1, padding=abs(pixels))[0, 0]


def feather(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Soften a mask's edges with a Gaussian of standard deviation ``radius`` pixels."""
    if radius <= 0:
        return mask
    half = max(1, math.ceil(3 * radius))
    coords = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-(coords**2) / (2 * radius**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(mask[None, None], (half, half, half, half), mode="replicate")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1))
    return blurred[0, 0].clamp(0.0, 1.0)


class SpatialMask:
    """A validated image-space mask that hands out per-layer token grids, each computed once.

    Args:
        mask: anything :func:`load_mask` accepts.
        image_size: ``(height, width)`` of the generated image.
        name: argument name for error messages.
        dilation: pixels to grow (positive) or shrink (negative) the mask by, in image space.
        soft_edge: Gaussian feathering radius in image pixels.
        allow_empty: accept an empty mask.
    """

    def __init__(
        self,
        mask: MaskLike,
        image_size: tuple[int, int],
        *,
        name: str = "mask",
        dilation: int = 0,
        soft_edge: float = 0.0,
        allow_empty: bool = False,
    ) -> None:
        plane = load_mask(mask, name=name, image_size=image_size, allow_empty=allow_empty)
        self.image = feather(dilate(plane, dilation), soft_edge)
        self.name = name
        self._grids: dict[tuple, torch.Tensor] = {}

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.image.shape)

    def at(
        self, grid: tuple[int, int], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Coverage of each token of a ``grid`` (height, width) in [0, 1], flattened to ``[h * w]`` row-major."""
        key = (tuple(grid), str(device), dtype)
        cached = self._grids.get(key)
        if cached is None:
            cached = resize_to_grid(self.image, grid).flatten().to(device=device, dtype=dtype)
            self._grids[key] = cached
        return cached


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean ``[H, W]`` mask, each as an array of (y, x) coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start_y, start_x in zip(*np.nonzero(mask), strict=True):
        if seen[start_y, start_x]:
            continue
        queue = deque([(start_y, start_x)])
        seen[start_y, start_x] = True
        pixels = []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(np.array(pixels))
    return found


def drop_small_pieces(masks: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[N, h, w]`` boolean masks without the 4-connected pieces smaller than ``fraction`` of each mask's largest."""
    if fraction <= 0:
        return masks
    kept = np.zeros(masks.shape, dtype=bool)
    for index, mask in enumerate(masks.bool().cpu().numpy()):
        pieces = connected_components(mask)
        largest = max((len(piece) for piece in pieces), default=0)
        for piece in pieces:
            if len(piece) >= fraction * largest:
                kept[index, piece[:, 0], piece[:, 1]] = True
    return torch.from_numpy(kept).to(masks.device)
