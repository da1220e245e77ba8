"""Attention under a grouped bias through FlexAttention: the bias as a ``score_mod`` reading the group table."""

from __future__ import annotations

import torch

from attncontrol.kernels._flex import flex_attention_bhsd


def masked_attention_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    groups: torch.Tensor | None,
    table: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``[B, S, H, D]`` in and out; FlexAttention gives fully masked rows zeros itself."""
    q, k, v = (tensor.transpose(1, 2) for tensor in (query, key, value))
    score_mod = None
    if table is not None:
        batch, heads = q.shape[0], q.shape[1]
        full_table = table.expand(batch, heads, -1, -1)
        full_groups = groups.long().expand(batch, -1)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + full_table[b, h, full_groups[b, q_idx], kv_idx]

    return flex_attention_bhsd(q, k, v, score_mod=score_mod, scale=scale).transpose(1, 2)
