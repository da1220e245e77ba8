"""Normalized non-causal linear attention (LinFusion): ``[B, S, H, D]`` in, one backend switch.

``linear_attention(q, k, v, backend="auto")`` runs the Triton kernels on CUDA and the fp32 torch implementation
elsewhere; :func:`linear_attention_reference` is the quadratic fp64 check.
"""

from __future__ import annotations

import torch

from attncontrol.kernels.backend import resolve_backend
from attncontrol.kernels.linear.reference import (
    FEATURE_MAPS,
    LINEAR_EPS,
    check_feature_map,
    feature_map,
    linear_attention_reference,
    linear_attention_torch,
)


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != 4:
            raise ValueError(f"`{name}` must be [B, S, H, D], got shape {tuple(tensor.shape)}")
    if query.shape[:3] != key.shape[:3] or key.shape[:3] != value.shape[:3]:
        raise ValueError(
            "`query`, `key` and `value` must share [B, S, H] (non-causal self-attention), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"`query` and `key` head dims differ: {query.shape[-1]} vs {key.shape[-1]}")
    if query.shape[1] == 0:
        raise ValueError("`query` has no tokens")


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    eps: float = LINEAR_EPS,
    feature: str = "elu",
    backend: str = "auto",
) -> torch.Tensor:
    """``o_i = phi(q_i) (phi(K)^T V / N) / (phi(q_i) . mean phi(K) + eps)`` on ``[B, S, H, D]`` tensors.

    Args:
        query, key: ``[B, S, H, D]``; value: ``[B, S, H, Dv]``.
        eps: added to the normalizer (LinFusion: 1e-4).
        feature: ``"elu"`` (phi = elu + 1, applied inside) or ``"identity"`` (already applied by the caller).
        backend: ``"auto" | "triton" | "torch"`` (see :mod:`attncontrol.kernels.backend`).

    Returns:
        ``[B, S, H, Dv]`` in the dtype of ``query``; accumulation is fp32 on every backend.
    """
    check_feature_map(feature)
    _check_inputs(query, key, value)
    if resolve_backend(backend, "linear", query, key, value) == "triton":
        from attncontrol.kernels.linear.triton import linear_attention_triton

        return linear_attention_triton(query, key, value, eps=eps, feature=feature)
    return linear_attention_torch(query, key, value, eps=eps, feature=feature)


__all__ = [
    "FEATURE_MAPS",
    "LINEAR_EPS",
    "feature_map",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_torch",
]
