"""Region-masked flash attention in Triton: online softmax under a grouped bias, forward and backward.

Each query tile loads its rows' group ids once; each key tile then gathers ``table[group, key]`` (a G x Sk table
that stays in cache) instead of reading an Sq x Sk bias from memory. Rows whose every key is masked keep
``l = 0`` and are written as zeros with an infinite log-sum-exp, so backward gives them zero gradients.

Gradients: query, key, value, and the table (when it requires one and has at most ``MAX_TABLE_GRAD_GROUPS``
groups: the per-group sums are a one-hot matmul kept on chip).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attncontrol.kernels._triton import (
    LOG2E,
    LOG2E_C,
    autotune,
    finish_rows,
    flash_configs,
    kv_step,
    last_dim_contiguous,
    lowp,
    mm,
    pow2,
    prune_flash_configs,
    row_step,
    row_strides,
)
from attncontrol.kernels.masked import MAX_TABLE_GRAD_GROUPS

_CONFIGS = flash_configs()
_PRUNE = {"early_config_prune": prune_flash_configs}


@autotune(configs=_CONFIGS, key=["SQ", "SK", "BLOCK_D", "BLOCK_DV", "HAS_BIAS", "DQ"], prune_configs_by=_PRUNE)
@triton.jit
def _rows_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, grp_ptr, tab_ptr, out_ptr, lse_ptr, delta_ptr,
    SQ, SK, H, D, DV,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sob, sos, soh,
    sgb, sgs, stb, sth, stg, stk,
    qk_scale, sm_scale,
    HAS_BIAS: tl.constexpr, DQ: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One query tile against every key tile: the forward pass (``DQ`` False) or dQ (``DQ`` True)."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m < SQ
    rows64 = offs_m.to(tl.int64)
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows64[:, None] * sqs + offs_d[None, :],
        mask=rows[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    row_ptr = bh.to(tl.int64) * SQ + rows64
    if DQ:
        do = tl.load(
            do_ptr + b * sdb + h * sdh + rows64[:, None] * sds + offs_dv[None, :],
            mask=rows[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        m_i = tl.load(lse_ptr + row_ptr, mask=rows, other=float("inf"))
        l_i = tl.load(delta_ptr + row_ptr, mask=rows, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    else:
        do = q  # unused by the forward step
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_BIAS:
        group = tl.load(grp_ptr + b * sgb + rows64 * sgs, mask=rows, other=0)
        bias_rows = tab_ptr + b * stb + h * sth + group.to(tl.int64) * stg
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for first in range(0, SK, BLOCK_N):
        offs_n = first + tl.arange(0, BLOCK_N)
        cols = offs_n < SK
        cols64 = offs_n.to(tl.int64)
        k = tl.load(
            k_base + cols64[:, None] * sks + offs_d[None, :], mask=cols[:, None] & (offs_d[None, :] < D), other=0.0
        )
        v = tl.load(
            v_base + cols64[:, None] * svs + offs_dv[None, :], mask=cols[:, None] & (offs_dv[None, :] < DV), other=0.0
        )
        s = mm(q, tl.trans(k), LOWP) * qk_scale
        if HAS_BIAS:
            bias = tl.load(
                bias_rows[:, None] + cols64[None, :] * stk, mask=rows[:, None] & cols[None, :], other=float("-inf")
            )
            s += bias.to(tl.float32) * LOG2E_C
        s = tl.where(cols[None, :], s, float("-inf"))
        acc, m_i, l_i = row_step(acc, m_i, l_i, s, k, v, do, LOWP, DQ)
    out_rows = out_ptr + b * sob + h * soh + rows64[:, None] * sos
    if DQ:
        tl.store(
            out_rows + offs_d[None, :],
            (acc * sm_scale).to(out_ptr.dtype.element_ty),
            mask=rows[:, None] & (offs_d[None, :] < D),
        )
    else:
        out, lse = finish_rows(acc, m_i, l_i)
        tl.store(
            out_rows + offs_dv[None, :], out.to(out_ptr.dtype.element_ty), mask=rows[:, None] & (offs_dv[None, :] < DV)
        )
        tl.store(lse_ptr + row_ptr, lse, mask=rows)


@autotune(configs=_CONFIGS, key=["SQ", "SK", "BLOCK_D", "BLOCK_DV", "HAS_BIAS", "TABLE_GRAD"], prune_configs_by=_PRUNE)
@triton.jit
def _keys_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, grp_ptr, tab_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dtab_ptr,
    SQ, SK, H, D, DV, G,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    sgb, sgs, stb, sth, stg, stk,
    qk_scale, sm_scale,
    HAS_BIAS: tl.constexpr, TABLE_GRAD: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_G: tl.constexpr,
):  # fmt: skip
    """One key tile against every query tile: dK, dV and (``TABLE_GRAD``) the table gradient of its columns."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = offs_n < SK
    cols64 = offs_n.to(tl.int64)
    k = tl.load(
        k_ptr + b * skb + h * skh + cols64[:, None] * sks + offs_d[None, :],
        mask=cols[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * svb + h * svh + cols64[:, None] * svs + offs_dv[None, :],
        mask=cols[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dtab = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for first in range(0, SQ, BLOCK_M):
        offs_m = first + tl.arange(0, BLOCK_M)
        rows = offs_m < SQ
        rows64 = offs_m.to(tl.int64)
        q = tl.load(
            q_ptr + b * sqb + h * sqh + rows64[:, None] * sqs + offs_d[None, :],
            mask=rows[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        do = tl.load(
            do_ptr + b * sdb + h * sdh + rows64[:, None] * sds + offs_dv[None, :],
            mask=rows[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        lse = tl.load(lse_ptr + bh.to(tl.int64) * SQ + rows64, mask=rows, other=float("inf"))
        delta = tl.load(delta_ptr + bh.to(tl.int64) * SQ + rows64, mask=rows, other=0.0)
        s = mm(q, tl.trans(k), LOWP) * qk_scale
        if HAS_BIAS:
            group = tl.load(grp_ptr + b * sgb + rows64 * sgs, mask=rows, other=0)
            bias = tl.load(
                tab_ptr + b * stb + h * sth + group.to(tl.int64)[:, None] * stg + cols64[None, :] * stk,
                mask=rows[:, None] & cols[None, :],
                other=float("-inf"),
            )
            s += bias.to(tl.float32) * LOG2E_C
        s = tl.where(cols[None, :], s, float("-inf"))
        dk, dv, ds = kv_step(dk, dv, s, q, do, lse, delta, v, LOWP)
        if TABLE_GRAD:
            one_hot = (group[:, None] == tl.arange(0, BLOCK_G)[None, :]).to(tl.float32)
            dtab += tl.dot(tl.trans(one_hot), ds, input_precision="ieee")
    tl.store(
        dk_ptr + b * sdkb + h * sdkh + cols64[:, None] * sdks + offs_d[None, :],
        (dk * sm_scale).to(dk_ptr.dtype.element_ty),
        mask=cols[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        dv_ptr + b * sdvb + h * sdvh + cols64[:, None] * sdvs + offs_dv[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=cols[:, None] & (offs_dv[None, :] < DV),
    )
    if TABLE_GRAD:
        offs_g = tl.arange(0, BLOCK_G)
        tl.store(
            dtab_ptr + (bh.to(tl.int64) * G + offs_g[:, None]) * SK + cols64[None, :],
            dtab,
            mask=(offs_g[:, None] < G) & cols[None, :],
        )


def _bias_strides(groups: torch.Tensor | None, table: torch.Tensor | None) -> tuple[int, ...]:
    """Strides of groups (batch, query) and table (batch, head, group, key); 0 where a size-1 dim broadcasts."""
    if table is None:
        return (0,) * 6
    broadcast = lambda tensor, dim: tensor.stride(dim) if tensor.shape[dim] > 1 else 0  # noqa: E731
    return (
        broadcast(groups, 0), groups.stride(1),
        broadcast(table, 0), broadcast(table, 1), table.stride(2), table.stride(3),
    )  # fmt: skip


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, groups, table, scale: float):
        batch, sq, heads, dim = q.shape
        sk, dim_v = k.shape[1], v.shape[-1]
        out = torch.empty(batch, sq, heads, dim_v, device=q.device, dtype=q.dtype)
        lse = torch.empty(batch, heads, sq, device=q.device, dtype=torch.float32)
        has_bias = table is not None
        grp, tab = (groups, table) if has_bias else (q, q)
        grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _rows_kernel[grid](
            q, k, v, q, grp, tab, out, lse, lse,
            sq, sk, heads, dim, dim_v,
            *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(q), *row_strides(out),
            *_bias_strides(groups, table), scale * LOG2E, scale,
            HAS_BIAS=has_bias, DQ=False, LOWP=lowp(q.dtype), BLOCK_D=pow2(dim), BLOCK_DV=pow2(dim_v),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, groups, table)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, groups, table = ctx.saved_tensors
        scale = ctx.scale
        grad_out = last_dim_contiguous(grad_out)
        batch, sq, heads, dim = q.shape
        sk, dim_v = k.shape[1], v.shape[-1]
        has_bias = table is not None
        grp, tab = (groups, table) if has_bias else (q, q)
        low = lowp(q.dtype)
        delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Sq]
        dq = torch.empty_like(q)
        grid_q = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _rows_kernel[grid_q](
            q, k, v, grad_out, grp, tab, dq, lse, delta,
            sq, sk, heads, dim, dim_v,
            *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(grad_out), *row_strides(dq),
            *_bias_strides(groups, table), scale * LOG2E, scale,
            HAS_BIAS=has_bias, DQ=True, LOWP=low, BLOCK_D=pow2(dim), BLOCK_DV=pow2(dim_v),
        )  # fmt: skip
        table_grad = has_bias and ctx.needs_input_grad[4]
        num_groups = table.shape[2] if has_bias else 1
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dtab = torch.empty(batch, heads, num_groups, sk, device=q.device, dtype=torch.float32) if table_grad else q
        grid_k = lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), batch * heads)  # noqa: E731
        _keys_kernel[grid_k](
            q, k, v, grad_out, grp, tab, lse, delta, dk, dv, dtab,
            sq, sk, heads, dim, dim_v, num_groups,
            *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(grad_out),
            *row_strides(dk), *row_strides(dv),
            *_bias_strides(groups, table), scale * LOG2E, scale,
            HAS_BIAS=has_bias, TABLE_GRAD=table_grad, LOWP=low, BLOCK_D=pow2(dim), BLOCK_DV=pow2(dim_v),
            BLOCK_G=pow2(num_groups) if table_grad else 16,
        )  # fmt: skip
        grad_table = None
        if table_grad:
            if table.shape[0] == 1:
                dtab = dtab.sum(0, keepdim=True)
            if table.shape[1] == 1:
                dtab = dtab.sum(1, keepdim=True)
            grad_table = dtab.to(table.dtype)
        return dq, dk, dv, None, grad_table, None


def masked_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    groups: torch.Tensor | None,
    table: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Triton attention under a grouped bias on ``[B, S, H, D]`` tensors (checked by the caller)."""
    needs_grad = table is not None and table.requires_grad and torch.is_grad_enabled()
    if needs_grad and table.shape[2] > MAX_TABLE_GRAD_GROUPS:
        raise ValueError(
            f"`table` requires a gradient and has {table.shape[2]} groups; the Triton kernel accumulates table "
            f"gradients for at most {MAX_TABLE_GRAD_GROUPS} (use backend='torch')"
        )
    query, key, value = (last_dim_contiguous(t) for t in (query, key, value))
    if table is not None:
        table = table if table.stride(-1) == 1 else table.contiguous()
    return _MaskedAttention.apply(query, key, value, groups, table, float(scale))
