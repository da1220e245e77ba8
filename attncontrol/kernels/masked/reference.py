"""Attention under a grouped logit bias, in PyTorch, on ``[B, S, H, D]`` tensors.

A grouped bias gives every query row a small integer group and every group one bias row over the keys:
``bias[b, h, q, k] = table[b, h, groups[b, q], k]`` (``-inf`` masks a key). It is exact for every bias that is
piecewise constant over queries (hard region masks, overlapping regions as membership combinations, key masking
with one group) and costs O(G x Sk) memory instead of O(Sq x Sk).

:func:`grouped_bias_dense` spells the bias out; :func:`masked_attention_torch` is SDPA under it (the ``torch``
backend); :func:`masked_attention_reference` an explicit fp32 softmax (the check). Rows whose every key is masked
give zeros, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_bias_dense(groups: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[max(Bg, Bt), Ht, Sq, Sk]`` bias of ``groups`` ``[Bg, Sq]`` and ``table`` ``[Bt, Ht, G, Sk]``."""
    batch = max(groups.shape[0], table.shape[0])
    heads, _, keys = table.shape[1:]
    index = groups.long()[:, None, :, None].expand(batch, heads, groups.shape[1], keys)
    return torch.gather(table.expand(batch, -1, -1, -1), 2, index)


def _dense_or_none(groups: torch.Tensor | None, table: torch.Tensor | None) -> torch.Tensor | None:
    return None if table is None else grouped_bias_dense(groups, table)


def masked_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    groups: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA with the bias spelled out (O(Sq x Sk) memory), fully masked rows set to zero."""
    bias = _dense_or_none(groups, table)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
    bias = bias.masked_fill(dead, 0.0).to(query.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.masked_fill(dead, 0.0).transpose(1, 2)


def masked_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    groups: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V in fp32 with explicit probabilities; ``[B, Sq, H, Dv]`` in the query dtype."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (tensor.float().transpose(1, 2) for tensor in (query, key, value))
    logits = q @ k.transpose(-1, -2) * scale
    bias = _dense_or_none(groups, table)
    if bias is None:
        return (logits.softmax(-1) @ v).transpose(1, 2).to(query.dtype)
    bias = bias.float()
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
    probs = (logits + bias.masked_fill(dead, 0.0)).softmax(-1).masked_fill(dead, 0.0)
    return (probs @ v).transpose(1, 2).to(query.dtype)
