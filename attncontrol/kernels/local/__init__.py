"""CLEAR's 2-D local-window attention (text tokens dense, a circle over the image grid, optional pooled keys),
``[B, S, H, D]``, one backend switch. See :mod:`.reference` for the exact pattern."""

from __future__ import annotations

import torch

from attncontrol.kernels.backend import resolve_backend
from attncontrol.kernels.local.reference import (
    banded_window_attention_bhsd,
    local_window_attention_reference,
    local_window_attention_torch,
    local_window_mask,
    window_mask,
)


def image_slice(length: int, grid: tuple[int, int], image: slice | None) -> slice:
    """Check where the image tokens sit (default: the last ``H x W``, Flux's text-first order) and return the slice.

    The text tokens must be contiguous: the image slice starts at 0 or ends at ``length``.
    """
    height, width = grid
    if height < 1 or width < 1:
        raise ValueError(f"`grid` must be (height, width) >= 1, got {grid}")
    tokens = height * width
    if tokens > length:
        raise ValueError(f"`grid` {grid} has {tokens} image tokens but the sequence only {length}")
    if image is None:
        return slice(length - tokens, length)
    start, stop, step = image.indices(length)
    if step != 1 or stop - start != tokens:
        raise ValueError(f"`image` {image} must be a contiguous slice of {tokens} = H x W tokens")
    if start != 0 and stop != length:
        raise ValueError(f"`image` {image} must start at 0 or end at {length}: the text tokens must be contiguous")
    return slice(start, stop)


def local_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    radius: float,
    image: slice | None = None,
    pooled_key: torch.Tensor | None = None,
    pooled_value: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Local-window self/joint attention on ``[B, S, H, D]`` tensors.

    Args:
        query, key, value: ``[B, S, H, D]`` (value ``[B, S, H, Dv]``), one sequence of text and image tokens.
        grid: ``(height, width)`` of the image tokens, row-major.
        radius: window radius in tokens (``dy^2 + dx^2 < radius^2``; CLEAR: 8, 16, 32).
        image: where the image tokens sit; default the last ``height x width`` tokens (text first).
        pooled_key, pooled_value: ``[B, P, H, D]`` extra keys every image query sees (CLEAR's down-sampled tokens).
        scale: logit scale, ``D ** -0.5`` when ``None``.
        backend: ``"auto" | "triton" | "flex" | "torch"``; ``torch`` is the banded path (O(S x band) memory).

    Returns:
        ``[B, S, H, Dv]`` in the dtype of ``query``.
    """
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            raise ValueError(f"`{name}` must be [B, S, H, D], got shape {tuple(tensor.shape)}")
    if query.shape[:3] != key.shape[:3] or key.shape[:3] != value.shape[:3] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"`query`, `key`, `value` must share [B, S, H] (and D for q/k): {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not radius > 0:
        raise ValueError(f"`radius` must be > 0, got {radius!r}")
    if (pooled_key is None) != (pooled_value is None):
        raise ValueError("pass `pooled_key` and `pooled_value` together")
    if pooled_key is not None and (
        pooled_key.shape[0] != query.shape[0]
        or pooled_key.shape[2:] != key.shape[2:]
        or pooled_value.shape[:3] != pooled_key.shape[:3]
        or pooled_value.shape[3] != value.shape[3]
    ):
        raise ValueError(
            f"`pooled_key`/`pooled_value` must be [B, P, H, D]/[B, P, H, Dv] like the keys, got "
            f"{tuple(pooled_key.shape)}, {tuple(pooled_value.shape)}"
        )
    grid = (int(grid[0]), int(grid[1]))
    image = image_slice(query.shape[1], grid, image)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(backend, "local", query, key, value, pooled_key, pooled_value)
    kwargs = {"grid": grid, "radius": float(radius), "image": image, "scale": scale}
    kwargs.update(pooled_key=pooled_key, pooled_value=pooled_value)
    if chosen == "triton":
        from attncontrol.kernels.local.triton import local_window_attention_triton

        return local_window_attention_triton(query, key, value, **kwargs)
    if chosen == "flex":
        from attncontrol.kernels.local.flex import local_window_attention_flex

        return local_window_attention_flex(query, key, value, **kwargs)
    return local_window_attention_torch(query, key, value, **kwargs)


__all__ = [
    "banded_window_attention_bhsd",
    "image_slice",
    "local_window_attention",
    "local_window_attention_reference",
    "local_window_attention_torch",
    "local_window_mask",
    "window_mask",
]
