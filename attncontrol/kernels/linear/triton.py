"""Normalized non-causal linear attention as Triton kernels, forward and backward, on ``[B, S, H, D]`` tensors.

Forward, two phases:

1. ``_state_kernel``: the reduction ``phi(K)^T V / N`` and ``sum phi(K) / N``, split over the sequence so that the
   grid has ``splits x B*H x (D/BK)*(Dv/BV)`` programs (at diffusion shapes B*H alone is 10-40: far too few for a
   GPU). Each split writes an fp32 partial; the partials are summed by one small torch reduction (deterministic).
2. ``_output_kernel``: token-parallel ``o_i = phi(q_i) S / (phi(q_i) . z + eps)``.

The feature map, the 1/N scale and eps are applied on the loaded tiles, never as separate passes. Backward mirrors
it: a split reduction for dS and dz, then token-parallel dQ, dK and dV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attncontrol.kernels._triton import INTERPRET, autotune, last_dim_contiguous, lowp, mm32, pick_configs, row_strides
from attncontrol.kernels.linear.reference import check_feature_map

FEATURE_CODES = {"identity": 0, "elu": 1}

#: the largest BLOCK_S of the configs: split lengths are multiples of it, so any config's tiles fit a split
SPLIT_QUANTUM = 32 if INTERPRET else 128


def _configs(reduction: bool) -> list[triton.Config]:
    gpu = []
    for block_s in (64, 128) if reduction else (32, 64, 128):
        for block_k, block_v in ((32, 32), (64, 64), (32, 64)):
            for warps in (4, 8):
                gpu.append(triton.Config({"BLOCK_S": block_s, "BLOCK_K": block_k, "BLOCK_V": block_v}, num_warps=warps))
    return pick_configs(gpu, triton.Config({"BLOCK_S": 32, "BLOCK_K": 64, "BLOCK_V": 64}, num_warps=4))


_REDUCTION_CONFIGS = _configs(reduction=True)
_TOKEN_CONFIGS = _configs(reduction=False)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    return tl.full(x.shape, 1.0, tl.float32)


@autotune(configs=_REDUCTION_CONFIGS, key=["S", "D", "DV"])
@triton.jit
def _state_kernel(
    k_ptr, v_ptr, state_ptr, z_ptr,
    S, H, D, DV, CHUNK, SPLITS,
    skb, sks, skh, svb, svs, svh,
    inv_n,
    FEATURE: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Partial ``phi(K)^T V / N`` [BK, BV] and ``sum phi(K) / N`` [BK] of one split of the sequence."""
    split, bh, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_v = tl.cdiv(DV, BLOCK_V)
    offs_k = (kv // n_v) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = (kv % n_v) * BLOCK_V + tl.arange(0, BLOCK_V)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, S)
    for first in range(start, stop, BLOCK_S):
        offs_s = first + tl.arange(0, BLOCK_S)
        rows = offs_s < stop
        k_mask = rows[:, None] & (offs_k[None, :] < D)
        k = tl.load(k_base + offs_s[:, None].to(tl.int64) * sks + offs_k[None, :], mask=k_mask, other=0.0)
        k = tl.where(k_mask, _phi(k.to(tl.float32), FEATURE), 0.0)  # phi(0) = 1: padding must stay 0
        v = tl.load(
            v_base + offs_s[:, None].to(tl.int64) * svs + offs_v[None, :],
            mask=rows[:, None] & (offs_v[None, :] < DV),
            other=0.0,
        )
        if LOWP:
            state += tl.dot(tl.trans(k.to(v.dtype)), v, out_dtype=tl.float32)
        else:
            state += tl.dot(tl.trans(k), v.to(tl.float32), input_precision="ieee")
        zsum += tl.sum(k, 0)
    part = (bh * SPLITS + split).to(tl.int64)
    tl.store(
        state_ptr + (part * D + offs_k[:, None]) * DV + offs_v[None, :],
        state * inv_n,
        mask=(offs_k[:, None] < D) & (offs_v[None, :] < DV),
    )
    if kv % n_v == 0:
        tl.store(z_ptr + part * D + offs_k, zsum * inv_n, mask=offs_k < D)


@autotune(configs=_TOKEN_CONFIGS, key=["S", "D", "DV"])
@triton.jit
def _output_kernel(
    q_ptr, state_ptr, z_ptr, o_ptr, den_ptr,
    S, H, D, DV,
    sqb, sqs, sqh, sob, sos, soh,
    eps,
    FEATURE: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """``o = phi(q) S / (phi(q) . z + eps)`` for BLOCK_S tokens and BLOCK_V output features; keeps the denominator."""
    tile, bh, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_v = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = offs_s < S
    q_base = q_ptr + b * sqb + h * sqh + offs_s[:, None].to(tl.int64) * sqs
    acc = tl.zeros([BLOCK_S, BLOCK_V], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q_mask = rows[:, None] & (offs_k[None, :] < D)
        q = tl.load(q_base + offs_k[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q = tl.where(q_mask, _phi(q, FEATURE), 0.0)
        state = tl.load(
            state_ptr + (bh.to(tl.int64) * D + offs_k[:, None]) * DV + offs_v[None, :],
            mask=(offs_k[:, None] < D) & (offs_v[None, :] < DV),
            other=0.0,
        )
        z = tl.load(z_ptr + bh.to(tl.int64) * D + offs_k, mask=offs_k < D, other=0.0)
        acc += mm32(q, state, LOWP)
        den += tl.sum(q * z[None, :], 1)
    den = tl.where(rows, den + eps, 1.0)  # padding rows: no 0 / 0 (eps may be 0)
    out = acc / den[:, None]
    tl.store(
        o_ptr + b * sob + h * soh + offs_s[:, None].to(tl.int64) * sos + offs_v[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=rows[:, None] & (offs_v[None, :] < DV),
    )
    if iv == 0:
        tl.store(den_ptr + bh.to(tl.int64) * S + offs_s, den, mask=rows)


@autotune(configs=_REDUCTION_CONFIGS, key=["S", "D", "DV"])
@triton.jit
def _grad_state_kernel(
    q_ptr, do_ptr, den_ptr, delta_ptr, dstate_ptr, dz_ptr,
    S, H, D, DV, CHUNK, SPLITS,
    sqb, sqs, sqh, sdb, sds, sdh,
    FEATURE: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Partial ``dS = sum_i phi(q_i)^T dO_i / den_i`` and ``dz = -sum_i phi(q_i) (dO_i . o_i) / den_i`` of a split."""
    split, bh, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_v = tl.cdiv(DV, BLOCK_V)
    offs_k = (kv // n_v) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = (kv % n_v) * BLOCK_V + tl.arange(0, BLOCK_V)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdb + h * sdh
    dstate = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    dz = tl.zeros([BLOCK_K], dtype=tl.float32)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, S)
    for first in range(start, stop, BLOCK_S):
        offs_s = first + tl.arange(0, BLOCK_S)
        rows = offs_s < stop
        q_mask = rows[:, None] & (offs_k[None, :] < D)
        q = tl.load(q_base + offs_s[:, None].to(tl.int64) * sqs + offs_k[None, :], mask=q_mask, other=0.0)
        q = tl.where(q_mask, _phi(q.to(tl.float32), FEATURE), 0.0)
        do = tl.load(
            do_base + offs_s[:, None].to(tl.int64) * sds + offs_v[None, :],
            mask=rows[:, None] & (offs_v[None, :] < DV),
            other=0.0,
        ).to(tl.float32)
        den = tl.load(den_ptr + bh.to(tl.int64) * S + offs_s, mask=rows, other=1.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * S + offs_s, mask=rows, other=0.0)
        dstate += mm32(tl.trans(q), do / den[:, None], LOWP)
        dz += tl.sum(q * (-delta / den)[:, None], 0)
    part = (bh * SPLITS + split).to(tl.int64)
    tl.store(
        dstate_ptr + (part * D + offs_k[:, None]) * DV + offs_v[None, :],
        dstate,
        mask=(offs_k[:, None] < D) & (offs_v[None, :] < DV),
    )
    if kv % n_v == 0:
        tl.store(dz_ptr + part * D + offs_k, dz, mask=offs_k < D)


@autotune(configs=_TOKEN_CONFIGS, key=["S", "D", "DV"])
@triton.jit
def _grad_query_kernel(
    q_ptr, do_ptr, den_ptr, delta_ptr, state_ptr, z_ptr, dq_ptr,
    S, H, D, DV,
    sqb, sqs, sqh, sdb, sds, sdh, sgb, sgs, sgh,
    FEATURE: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """``dq_i = (S dO_i / den_i - z (dO_i . o_i) / den_i) * phi'(q_i)`` for BLOCK_S tokens and BLOCK_K features."""
    tile, bh, ik = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = ik * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_s < S
    den = tl.load(den_ptr + bh.to(tl.int64) * S + offs_s, mask=rows, other=1.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S + offs_s, mask=rows, other=0.0)
    do_base = do_ptr + b * sdb + h * sdh + offs_s[:, None].to(tl.int64) * sds
    acc = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        do = tl.load(do_base + offs_v[None, :], mask=rows[:, None] & (offs_v[None, :] < DV), other=0.0)
        state = tl.load(
            state_ptr + (bh.to(tl.int64) * D + offs_k[:, None]) * DV + offs_v[None, :],
            mask=(offs_k[:, None] < D) & (offs_v[None, :] < DV),
            other=0.0,
        )
        acc += mm32(do.to(tl.float32) / den[:, None], tl.trans(state), LOWP)
    z = tl.load(z_ptr + bh.to(tl.int64) * D + offs_k, mask=offs_k < D, other=0.0)
    acc += (-delta / den)[:, None] * z[None, :]
    q_mask = rows[:, None] & (offs_k[None, :] < D)
    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_s[:, None].to(tl.int64) * sqs + offs_k[None, :], mask=q_mask, other=0.0
    )
    dq = acc * _dphi(q.to(tl.float32), FEATURE)
    tl.store(
        dq_ptr + b * sgb + h * sgh + offs_s[:, None].to(tl.int64) * sgs + offs_k[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=q_mask,
    )


@autotune(configs=_TOKEN_CONFIGS, key=["S", "D", "DV"])
@triton.jit
def _grad_key_kernel(
    k_ptr, v_ptr, dstate_ptr, dz_ptr, dk_ptr,
    S, H, D, DV,
    skb, sks, skh, svb, svs, svh, sgb, sgs, sgh,
    inv_n,
    FEATURE: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """``dk_j = (dS v_j + dz) / N * phi'(k_j)`` for BLOCK_S tokens and BLOCK_K features."""
    tile, bh, ik = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = ik * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_s < S
    v_base = v_ptr + b * svb + h * svh + offs_s[:, None].to(tl.int64) * svs
    acc = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v = tl.load(v_base + offs_v[None, :], mask=rows[:, None] & (offs_v[None, :] < DV), other=0.0)
        dstate = tl.load(
            dstate_ptr + (bh.to(tl.int64) * D + offs_k[:, None]) * DV + offs_v[None, :],
            mask=(offs_k[:, None] < D) & (offs_v[None, :] < DV),
            other=0.0,
        )
        acc += mm32(v.to(tl.float32), tl.trans(dstate), LOWP)
    dz = tl.load(dz_ptr + bh.to(tl.int64) * D + offs_k, mask=offs_k < D, other=0.0)
    k_mask = rows[:, None] & (offs_k[None, :] < D)
    k = tl.load(
        k_ptr + b * skb + h * skh + offs_s[:, None].to(tl.int64) * sks + offs_k[None, :], mask=k_mask, other=0.0
    )
    dk = (acc + dz[None, :]) * inv_n * _dphi(k.to(tl.float32), FEATURE)
    tl.store(
        dk_ptr + b * sgb + h * sgh + offs_s[:, None].to(tl.int64) * sgs + offs_k[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=k_mask,
    )


@autotune(configs=_TOKEN_CONFIGS, key=["S", "D", "DV"])
@triton.jit
def _grad_value_kernel(
    k_ptr, dstate_ptr, dv_ptr,
    S, H, D, DV,
    skb, sks, skh, sgb, sgs, sgh,
    inv_n,
    FEATURE: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """``dv_j = phi(k_j) dS / N`` for BLOCK_S tokens and BLOCK_V features."""
    tile, bh, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_v = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = offs_s < S
    k_base = k_ptr + b * skb + h * skh + offs_s[:, None].to(tl.int64) * sks
    acc = tl.zeros([BLOCK_S, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = rows[:, None] & (offs_k[None, :] < D)
        k = tl.load(k_base + offs_k[None, :], mask=k_mask, other=0.0).to(tl.float32)
        k = tl.where(k_mask, _phi(k, FEATURE), 0.0)
        dstate = tl.load(
            dstate_ptr + (bh.to(tl.int64) * D + offs_k[:, None]) * DV + offs_v[None, :],
            mask=(offs_k[:, None] < D) & (offs_v[None, :] < DV),
            other=0.0,
        )
        acc += mm32(k, dstate, LOWP)
    tl.store(
        dv_ptr + b * sgb + h * sgh + offs_s[:, None].to(tl.int64) * sgs + offs_v[None, :],
        (acc * inv_n).to(dv_ptr.dtype.element_ty),
        mask=rows[:, None] & (offs_v[None, :] < DV),
    )


def _splits(length: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(chunk, splits): enough sequence splits that the reduction fills the GPU (~4 programs per SM), each a
    multiple of SPLIT_QUANTUM tokens."""
    # On the CPU (the interpreter): a few splits, so the tests cover the cross-split sum.
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = max(1, min(triton.cdiv(length, SPLIT_QUANTUM), triton.cdiv(target, max(1, programs))))
    chunk = SPLIT_QUANTUM * triton.cdiv(triton.cdiv(length, SPLIT_QUANTUM), wanted)
    return chunk, triton.cdiv(length, chunk)


def _reduction_grid(splits: int, bh: int, d: int, dv: int):
    return lambda meta: (splits, bh, triton.cdiv(d, meta["BLOCK_K"]) * triton.cdiv(dv, meta["BLOCK_V"]))


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, feature: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, length, heads, dim = q.shape
    dim_v = v.shape[-1]
    bh = batch * heads
    low = lowp(q.dtype)
    chunk, splits = _splits(length, bh * triton.cdiv(dim, 64) * triton.cdiv(dim_v, 64), q.device)
    state = torch.empty(bh, splits, dim, dim_v, device=q.device, dtype=torch.float32)
    z = torch.empty(bh, splits, dim, device=q.device, dtype=torch.float32)
    _state_kernel[_reduction_grid(splits, bh, dim, dim_v)](
        k, v, state, z, length, heads, dim, dim_v, chunk, splits, *row_strides(k), *row_strides(v), 1.0 / length,
        FEATURE=feature, LOWP=low,
    )  # fmt: skip
    state, z = state.sum(1), z.sum(1)
    out = torch.empty(batch, length, heads, dim_v, device=q.device, dtype=q.dtype)
    den = torch.empty(bh, length, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_S"]), bh, triton.cdiv(dim_v, meta["BLOCK_V"]))  # noqa: E731
    _output_kernel[grid](
        q, state, z, out, den, length, heads, dim, dim_v, *row_strides(q), *row_strides(out), eps,
        FEATURE=feature, LOWP=low,
    )  # fmt: skip
    return out, state, z, den


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eps: float, feature: int):
        out, state, z, den = _forward(q, k, v, eps, feature)
        ctx.save_for_backward(q, k, v, out, state, z, den)
        ctx.feature = feature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, state, z, den = ctx.saved_tensors
        feature = ctx.feature
        grad_out = last_dim_contiguous(grad_out)
        batch, length, heads, dim = q.shape
        dim_v = v.shape[-1]
        bh = batch * heads
        low = lowp(q.dtype)
        delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # dO . o, [B, H, S]
        chunk, splits = _splits(length, bh * triton.cdiv(dim, 64) * triton.cdiv(dim_v, 64), q.device)
        dstate = torch.empty(bh, splits, dim, dim_v, device=q.device, dtype=torch.float32)
        dz = torch.empty(bh, splits, dim, device=q.device, dtype=torch.float32)
        _grad_state_kernel[_reduction_grid(splits, bh, dim, dim_v)](
            q, grad_out, den, delta, dstate, dz, length, heads, dim, dim_v, chunk, splits,
            *row_strides(q), *row_strides(grad_out), FEATURE=feature, LOWP=low,
        )  # fmt: skip
        dstate, dz = dstate.sum(1), dz.sum(1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        by_key = lambda meta: (triton.cdiv(length, meta["BLOCK_S"]), bh, triton.cdiv(dim, meta["BLOCK_K"]))  # noqa: E731
        by_value = lambda meta: (triton.cdiv(length, meta["BLOCK_S"]), bh, triton.cdiv(dim_v, meta["BLOCK_V"]))  # noqa: E731
        _grad_query_kernel[by_key](
            q, grad_out, den, delta, state, z, dq, length, heads, dim, dim_v,
            *row_strides(q), *row_strides(grad_out), *row_strides(dq), FEATURE=feature, LOWP=low,
        )  # fmt: skip
        _grad_key_kernel[by_key](
            k, v, dstate, dz, dk, length, heads, dim, dim_v,
            *row_strides(k), *row_strides(v), *row_strides(dk), 1.0 / length, FEATURE=feature, LOWP=low,
        )  # fmt: skip
        _grad_value_kernel[by_value](
            k, dstate, dv, length, heads, dim, dim_v,
            *row_strides(k), *row_strides(dv), 1.0 / length, FEATURE=feature, LOWP=low,
        )  # fmt: skip
        return dq, dk, dv, None, None


def linear_attention_triton(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, eps: float, feature: str = "elu"
) -> torch.Tensor:
    """Triton linear attention on ``[B, S, H, D]`` tensors (any strides with a contiguous last dim)."""
    code = FEATURE_CODES[check_feature_map(feature)]
    query, key, value = (last_dim_contiguous(t) for t in (query, key, value))
    return _LinearAttention.apply(query, key, value, float(eps), code)
