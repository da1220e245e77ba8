"""Region-masked attention: softmax attention under a grouped logit bias, ``[B, S, H, D]``, one backend switch.

``bias[b, h, q, k] = table[b, h, groups[b, q], k]``: regional prompts (queries grouped by the regions they are in)
and key masking (one group) stay on the fused path without an Sq x Sk bias. See :mod:`.reference`.
"""

from __future__ import annotations

import torch

from attncontrol.kernels.backend import resolve_backend
from attncontrol.kernels.masked.reference import (
    grouped_bias_dense,
    masked_attention_reference,
    masked_attention_torch,
)

#: the most groups whose table gradient the Triton kernel accumulates on chip
MAX_TABLE_GRAD_GROUPS = 64


def check_grouped_bias(
    groups: torch.Tensor | None,
    table: torch.Tensor | None,
    *,
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    check_values: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``groups`` or ``table`` when they do not describe a bias for these shapes."""
    if (groups is None) != (table is None):
        raise ValueError("pass `groups` and `table` together (or neither)")
    if table is None:
        return
    if groups.dim() != 2 or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"`groups` must be an integer [B, Sq] tensor, got {groups.dtype} {tuple(groups.shape)}")
    if groups.shape[0] not in (1, batch) or groups.shape[1] != queries:
        raise ValueError(f"`groups` must be [1 or {batch}, {queries}], got {tuple(groups.shape)}")
    if table.dim() != 4 or not table.dtype.is_floating_point:
        raise ValueError(f"`table` must be a float [B, H, G, Sk] tensor, got {table.dtype} {tuple(table.shape)}")
    if table.shape[0] not in (1, batch) or table.shape[1] not in (1, heads) or table.shape[3] != keys:
        raise ValueError(f"`table` must be [1 or {batch}, 1 or {heads}, G, {keys}], got {tuple(table.shape)}")
    if table.shape[2] == 0:
        raise ValueError("`table` has no groups")
    if check_values and groups.numel():
        low, high = int(groups.min()), int(groups.max())
        if low < 0 or high >= table.shape[2]:
            raise ValueError(f"`groups` ids must lie in [0, {table.shape[2]}), got [{low}, {high}]")
    if groups.device != table.device:
        raise ValueError(f"`groups` is on {groups.device} but `table` on {table.device}")


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    groups: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """softmax(Q K^T * scale + table[groups]) V on ``[B, S, H, D]``; fully masked rows give zeros.

    Args:
        query: ``[B, Sq, H, D]``; key: ``[B, Sk, H, D]``; value: ``[B, Sk, H, Dv]``.
        groups: ``[B or 1, Sq]`` integer group of each query row.
        table: ``[B or 1, H or 1, G, Sk]`` float bias per group and key (``-inf`` masks). The Triton backend also
            returns its gradient (up to 64 groups); flex does not.
        scale: logit scale, ``D ** -0.5`` when ``None``.
        backend: ``"auto" | "triton" | "flex" | "torch"`` (see :mod:`attncontrol.kernels.backend`).
        validate: check that group ids lie in ``[0, G)`` (a device sync on CUDA; out-of-range ids would read
            outside the table); callers that built the groups themselves pass ``False``.

    Returns:
        ``[B, Sq, H, Dv]`` in the dtype of ``query``.
    """
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            raise ValueError(f"`{name}` must be [B, S, H, D], got shape {tuple(tensor.shape)}")
    batch, queries, heads, dim = query.shape
    if key.shape[0] != batch or key.shape[2] != heads or key.shape[3] != dim or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"`key`/`value` do not match `query` {tuple(query.shape)}: {tuple(key.shape)}, {tuple(value.shape)}"
        )
    check_grouped_bias(
        groups, table, batch=batch, heads=heads, queries=queries, keys=key.shape[1], check_values=validate
    )
    scale = dim**-0.5 if scale is None else float(scale)
    chosen = resolve_backend(backend, "masked", query, key, value, table)
    if chosen == "triton":
        from attncontrol.kernels.masked.triton import masked_attention_triton

        return masked_attention_triton(query, key, value, groups=groups, table=table, scale=scale)
    if chosen == "flex":
        from attncontrol.kernels.masked.flex import masked_attention_flex

        return masked_attention_flex(query, key, value, groups=groups, table=table, scale=scale)
    return masked_attention_torch(query, key, value, groups=groups, table=table, scale=scale)


__all__ = [
    "MAX_TABLE_GRAD_GROUPS",
    "check_grouped_bias",
    "grouped_bias_dense",
    "masked_attention",
    "masked_attention_reference",
    "masked_attention_torch",
]
