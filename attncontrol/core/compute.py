"""The ways a controlled processor computes attention, all on ``[B, H, S, D]`` tensors.

- dense: no bias and nobody needs the probabilities -> the same SDPA / dispatcher call as the stock processor;
- bias: an additive logit bias (region masks, modulation) -> SDPA with a float ``attn_mask``;
- masked kernel: a grouped bias (:class:`~attncontrol.core.bias.GroupedBias`: regions, key masks) and a fused
  kernel backend (``kernel_backend`` resolving to ``"triton"`` or ``"flex"``) -> the region-masked kernel, which
  never builds the Sq x Sk bias; with ``"torch"`` (the default on the CPU) the grouped bias is spelled out and takes
  the bias path, with the same numbers as a dense bias;
- explicit: a control edits or observes the probabilities, or the bias needs a gradient -> softmax(QK^T * scale +
  bias) in fp32, then P @ V.

Rows whose every key is masked (bias ``-inf`` everywhere) give zeros, never NaN, on every path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attncontrol.core.bias import GroupedBias
from attncontrol.kernels.backend import resolve_backend
from attncontrol.kernels.masked import MAX_TABLE_GRAD_GROUPS, masked_attention

ProbsHook = Callable[[torch.Tensor], torch.Tensor]


def _dispatch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    backend: object | None,
    parallel_config: object | None,
) -> torch.Tensor:
    if backend is None and parallel_config is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    # diffusers' dispatcher takes [B, S, H, D]; transposes are views, so no copy is made.
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=attn_mask,
        scale=scale,
        backend=backend,
        parallel_config=parallel_config,
    )
    return out.transpose(1, 2)


def _identity(probs: torch.Tensor) -> torch.Tensor:
    return probs


def fully_masked_rows(bias: torch.Tensor) -> torch.Tensor | None:
    """Boolean ``[..., Q, 1]`` marking query rows whose every key is ``-inf``; ``None`` when there are none."""
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
    return dead if bool(dead.any()) else None


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | GroupedBias | None = None,
    probs_hook: ProbsHook | None = None,
    backend: object | None = None,
    parallel_config: object | None = None,
    kernel_backend: str = "auto",
) -> torch.Tensor:
    """Attention over ``[B, H, S, D]`` tensors with an optional additive ``bias`` and probability hook.

    Args:
        query, key, value: ``[B, H, Sq, D]``, ``[B, H, Sk, D]``, ``[B, H, Sk, Dv]``.
        scale: logit scale; ``None`` means ``D ** -0.5`` as in SDPA.
        bias: float tensor broadcastable to ``[B, H, Sq, Sk]`` or a :class:`GroupedBias`; ``-inf`` masks a key.
        probs_hook: called with the fp32 probabilities ``[B, H, Sq, Sk]``; returns the probabilities to use. Forces
            the explicit path.
        backend, parallel_config: forwarded to diffusers' attention dispatcher on the dense and bias paths (a
            dispatcher backend or parallel config keeps biases off the masked kernel).
        kernel_backend: ``"auto" | "triton" | "flex" | "torch"`` for biased attention. ``auto`` sends grouped
            biases to the Triton masked kernel on CUDA and dense biases to SDPA; an explicit ``"triton"``/``"flex"``
            sends dense biases to the kernel too (one group per query row).

    Returns:
        ``[B, H, Sq, Dv]`` in the dtype of ``query``.

    Under CPU autocast (bf16 training on the CPU) the core runs in fp32 with autocast off: the explicit path's fp32
    logits would otherwise be recast to bf16 by autocast, and PyTorch's bf16 SDPA backward on the CPU is several
    times slower than its fp32 one (``benchmarks/training_precision.py``), while bf16 convolutions are faster.
    """
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = attention(
                query.float(),
                key.float(),
                value.float(),
                scale=scale,
                bias=bias.float() if isinstance(bias, torch.Tensor) else bias,
                probs_hook=probs_hook,
                backend=backend,
                parallel_config=parallel_config,
                kernel_backend=kernel_backend,
            )
        return out.to(query.dtype)
    if bias is not None:
        fused = _masked_kernel(query, key, value, scale, bias, probs_hook, backend, parallel_config, kernel_backend)
        if fused is not None:
            return fused
        if isinstance(bias, GroupedBias):
            bias = bias.dense()
    dead = fully_masked_rows(bias) if bias is not None else None
    if dead is not None:
        bias = bias.masked_fill(dead, 0.0)

    if probs_hook is None and bias is not None and bias.requires_grad and torch.is_grad_enabled():
        # A bias being optimized (region weights) needs its gradient; not every fused kernel returns one.
        probs_hook = _identity
    if probs_hook is None:
        if bias is not None:
            bias = bias.to(query.dtype)
        out = _dispatch(query, key, value, bias, scale, backend, parallel_config)
    else:
        probs = attention_probs(query, key, scale=scale, bias=bias)
        if dead is not None:
            probs = probs.masked_fill(dead, 0.0)
        probs = probs_hook(probs)
        out = torch.matmul(probs, value.float()).to(query.dtype)

    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out


def _masked_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    bias: torch.Tensor | GroupedBias,
    probs_hook: ProbsHook | None,
    backend: object | None,
    parallel_config: object | None,
    kernel_backend: str,
) -> torch.Tensor | None:
    """The region-masked kernel's output when the call may take it, else ``None`` (the caller's dense paths)."""
    if probs_hook is not None or backend is not None or parallel_config is not None:
        return None
    chosen = resolve_backend(kernel_backend, "masked", query, key, value, name="kernel_backend")
    if chosen == "torch":
        return None
    if not isinstance(bias, GroupedBias):
        if kernel_backend == "auto":
            return None  # dense biases stay on SDPA unless a fused backend is asked for by name
        queries = query.shape[2]
        per_key = bias.dim() < 2 or bias.shape[-2] == 1
        bias = GroupedBias.key_bias(bias, queries) if per_key else GroupedBias.rows(bias)
    wants_grad = bias.requires_grad and torch.is_grad_enabled()
    if wants_grad and (chosen == "flex" or bias.num_groups > MAX_TABLE_GRAD_GROUPS):
        return None  # the explicit path returns the bias gradient
    table = bias.table
    out = masked_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        groups=bias.groups,
        table=table if table.dtype.is_floating_point else table.float(),
        scale=scale,
        backend=chosen,
        validate=False,
    )
    return out.transpose(1, 2)


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) in fp32, ``[B, H, Sq, Sk]``: the reference the other paths must match."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)
