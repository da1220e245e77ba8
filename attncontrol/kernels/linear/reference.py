"""Normalized non-causal linear attention (LinFusion) in PyTorch, on ``[B, S, H, D]`` tensors.

    o_i = phi(q_i) (phi(K)^T V / N) / (phi(q_i) . mean_j phi(k_j) + eps)

:func:`linear_attention_torch` computes it in O(S D^2) in fp32 (the ``torch`` backend);
:func:`linear_attention_reference` goes through the S x S matrix of ``phi(q_i) . phi(k_j)`` in fp64: the check
every fast path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: LinFusion's normalizer epsilon (added to phi(q) . mean phi(k))
LINEAR_EPS = 1e-4

FEATURE_MAPS = ("elu", "identity")


def check_feature_map(name: str) -> str:
    if name not in FEATURE_MAPS:
        raise ValueError(f"`feature_map` must be one of {FEATURE_MAPS}, got {name!r}")
    return name


def feature_map(tensor: torch.Tensor, kind: str = "elu") -> torch.Tensor:
    """phi(t) = elu(t) + 1 (``"elu"``: positive, so the normalizer never vanishes) or t (``"identity"``: the caller
    applied its own map)."""
    if check_feature_map(kind) == "identity":
        return tensor
    return F.elu(tensor) + 1.0


def linear_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    eps: float = LINEAR_EPS,
    feature: str = "elu",
) -> torch.Tensor:
    """O(S D^2) linear attention in fp32: the d x d state ``phi(K)^T V / N`` and the mean key are reduced once, then
    every query reads them. ``[B, S, H, D]`` in, ``[B, S, H, Dv]`` out in the dtype of ``query``."""
    q = feature_map(query.float(), feature).transpose(1, 2)
    k = feature_map(key.float(), feature).transpose(1, 2)
    v = value.float().transpose(1, 2)
    length = k.shape[-2]
    state = (k.transpose(-1, -2) * length**-0.5) @ (v * length**-0.5)  # [B, H, D, Dv]
    normalizer = q @ k.mean(dim=-2, keepdim=True).transpose(-1, -2) + eps  # [B, H, S, 1]
    return (q @ state / normalizer).transpose(1, 2).to(query.dtype)


def linear_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    eps: float = LINEAR_EPS,
    feature: str = "elu",
) -> torch.Tensor:
    """The same formula through the S x S matrix of ``phi(q_i) . phi(k_j)``, in fp64: the O(S^2) check."""
    q = feature_map(query.double(), feature).transpose(1, 2)
    k = feature_map(key.double(), feature).transpose(1, 2)
    scores = q @ k.transpose(-1, -2)
    length = key.shape[1]
    out = (scores @ value.double().transpose(1, 2)) / (scores.sum(-1, keepdim=True) + length * eps)
    return out.transpose(1, 2).to(query.dtype)
