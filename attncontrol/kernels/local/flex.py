"""CLEAR's local window through FlexAttention: the pattern as a ``mask_mod`` and a block mask (raster order, as
CLEAR itself runs it), cached per layout."""

from __future__ import annotations

import functools

import torch

from attncontrol.kernels._flex import flex_attention_bhsd


@functools.lru_cache(maxsize=32)
def _block_mask(
    grid: tuple[int, int], radius: float, length: int, image_start: int, pooled: int, device: str
) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    height, width = grid
    image_stop = image_start + height * width
    limit = radius * radius

    def mask_mod(b, h, q_idx, kv_idx):
        q_image = (q_idx >= image_start) & (q_idx < image_stop)
        k_image = (kv_idx >= image_start) & (kv_idx < image_stop)
        k_pooled = kv_idx >= length
        qy, qx = (q_idx - image_start) // width, (q_idx - image_start) % width
        ky, kx = (kv_idx - image_start) // width, (kv_idx - image_start) % width
        near = (qy - ky) * (qy - ky) + (qx - kx) * (qx - kx) < limit
        return (~q_image & ~k_pooled) | (q_image & (~k_image | near))

    cuda = device.startswith("cuda")
    # compiled on CUDA: the eager builder evaluates the mask over all S x (S + P) pairs at once
    return create_block_mask(
        mask_mod, None, None, length, length + pooled, device=device, BLOCK_SIZE=128 if cuda else 16, _compile=cuda
    )


def local_window_attention_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    radius: float,
    image: slice,
    pooled_key: torch.Tensor | None,
    pooled_value: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``[B, S, H, D]`` in and out; pooled keys are appended to the keys (FlexAttention takes one key tensor)."""
    pooled = 0
    if pooled_key is not None:
        key, value = torch.cat([key, pooled_key], 1), torch.cat([value, pooled_value], 1)
        pooled = pooled_key.shape[1]
    mask = _block_mask(tuple(grid), float(radius), query.shape[1], image.start, pooled, str(query.device))
    q, k, v = (tensor.transpose(1, 2) for tensor in (query, key, value))
    return flex_attention_bhsd(q, k, v, block_mask=mask, scale=scale).transpose(1, 2)
