"""CLEAR's local-window attention in PyTorch: masks, the banded torch path and the dense reference.

Sequence layout: ``S`` query/key tokens of which ``H x W`` image tokens sit in one contiguous slice (Flux: after the
text, SD3: before it, UNet: all of it); optionally ``P`` pooled image tokens are extra keys. The pattern:

- text queries attend every text and image key (not the pooled ones);
- an image query attends every text key, every pooled key, and the image keys inside a circle of radius ``r`` on
  the grid (``dy^2 + dx^2 < r^2``, rows do not wrap).

:func:`local_window_attention_reference` materializes that mask (the test oracle); the banded path never builds more
than one band of rows against the keys within reach (the ``torch`` backend).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_mask(grid: tuple[int, int], radius: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[HW, HW]`` bool: key token within ``radius`` of query token on the ``(height, width)`` grid."""
    height, width = grid
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    distance = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
    return distance < radius**2


def local_window_mask(
    grid: tuple[int, int],
    radius: float,
    length: int,
    image: slice,
    pooled: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[S, S + P]`` bool of the whole pattern (see the module docstring); O(S^2): for tests and small sizes."""
    allowed = torch.ones(length, length + pooled, dtype=torch.bool, device=device)
    allowed[image, image] = window_mask(grid, radius, device)
    text = torch.ones(length, dtype=torch.bool, device=device)
    text[image] = False
    allowed[text, length:] = False
    return allowed


def local_window_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    radius: float,
    image: slice,
    pooled_key: torch.Tensor | None = None,
    pooled_value: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit fp32 softmax under :func:`local_window_mask`, ``[B, S, H, D]`` in and out (query dtype)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if pooled_key is not None:
        key, value = torch.cat([key, pooled_key], 1), torch.cat([value, pooled_value], 1)
    q, k, v = (tensor.float().transpose(1, 2) for tensor in (query, key, value))
    pooled = 0 if pooled_key is None else pooled_key.shape[1]
    allowed = local_window_mask(grid, radius, query.shape[1], image, pooled, query.device)
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).to(query.dtype)


def banded_window_attention_bhsd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    radius: float,
    image_queries: slice,
    image_keys: slice,
    pooled_key: torch.Tensor | None = None,
    pooled_value: torch.Tensor | None = None,
    scale: float | None = None,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """The pattern on ``[B, H, S, D]`` (SDPA's layout) without an S x S mask: image queries go in bands of grid rows,
    each against the text keys, the pooled keys and the image rows within ``radius``; other queries attend to every
    non-pooled key. Memory is O(S x band); the result equals softmax attention under the window mask."""
    height, width = grid
    reach = max(0, math.ceil(radius) - 1)  # |dy| < radius
    chunk = rows_per_chunk or max(1, 2 * reach + 1)
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    others = torch.ones(query.shape[-2], dtype=torch.bool, device=query.device)
    others[image_queries] = False
    if others.any():
        out[..., others, :] = F.scaled_dot_product_attention(query[..., others, :], key, value, scale=scale)
    not_image_keys = torch.ones(key.shape[-2], dtype=torch.bool, device=key.device)
    not_image_keys[image_keys] = False
    extra_key, extra_value = key[..., not_image_keys, :], value[..., not_image_keys, :]
    if pooled_key is not None:
        extra_key = torch.cat([extra_key, pooled_key], dim=-2)
        extra_value = torch.cat([extra_value, pooled_value], dim=-2)
    num_extra = extra_key.shape[-2]
    columns = torch.arange(width, device=query.device)
    for top in range(0, height, chunk):
        bottom = min(height, top + chunk)
        first, last = max(0, top - reach), min(height, bottom + reach)
        q_rows = slice(image_queries.start + top * width, image_queries.start + bottom * width)
        k_rows = slice(image_keys.start + first * width, image_keys.start + last * width)
        # The band's own circle test, from coordinates: never an HW x HW mask.
        qy = torch.arange(top, bottom, device=query.device).repeat_interleave(width)
        ky = torch.arange(first, last, device=query.device).repeat_interleave(width)
        qx, kx = columns.repeat(bottom - top), columns.repeat(last - first)
        band = (qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2 < radius**2
        allowed = torch.cat([band.new_ones(band.shape[0], num_extra), band], dim=1)
        keys = torch.cat([extra_key, key[..., k_rows, :]], dim=-2)
        values = torch.cat([extra_value, value[..., k_rows, :]], dim=-2)
        out[..., q_rows, :] = F.scaled_dot_product_attention(query[..., q_rows, :], keys, values, allowed, scale=scale)
    return out


def local_window_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    radius: float,
    image: slice,
    pooled_key: torch.Tensor | None = None,
    pooled_value: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The banded path on ``[B, S, H, D]`` (the ``torch`` backend)."""
    transpose = lambda tensor: None if tensor is None else tensor.transpose(1, 2)  # noqa: E731
    out = banded_window_attention_bhsd(
        transpose(query), transpose(key), transpose(value), grid=grid, radius=radius, image_queries=image,
        image_keys=image, pooled_key=transpose(pooled_key), pooled_value=transpose(pooled_value), scale=scale,
    )  # fmt: skip
    return out.transpose(1, 2)
