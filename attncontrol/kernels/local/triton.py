"""CLEAR's 2-D local-window attention as block-sparse Triton kernels, forward and backward.

Token order: the kernels address image tokens by 2-D tiles of ``TH x TW`` grid cells (the tile-permuted order of
NATTEN / attention-gym's tiled masks) through index arithmetic on the loads, so no permuted copy of q/k/v is made
and each tile row is ``TW`` contiguous tokens. With tiles, most (query tile, key tile) pairs are entirely inside or
entirely outside the circle; a schedule built once per (grid, radius, tile) lists for every query tile the key
tiles that are *full* (no mask evaluated) and *partial* (the circle test on coordinates); all other tiles are
skipped. Text keys (and pooled keys) are one dense segment every image query reads; text queries read every
non-pooled key densely.

Backward is FlashAttention-2 style: a query-side kernel for dQ (the forward's schedule) and a key-side kernel for
dK/dV (the circle is symmetric and tiles are square-shaped alike, so the same schedule read by key tile).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attncontrol.kernels._triton import (
    INTERPRET,
    LOG2E,
    autotune,
    finish_rows,
    kv_step,
    last_dim_contiguous,
    lowp,
    mm,
    pick_configs,
    pow2,
    row_step,
    row_strides,
)

#: tokens per tile (BLOCK_M = BLOCK_N): 16 under the interpreter (small grids still get full and partial tiles)
INTERPRETER_TILE_TOKENS = 16

_CONFIGS = pick_configs(
    [triton.Config({}, num_warps=warps, num_stages=stages) for warps in (4, 8) for stages in (2, 3)],
    triton.Config({}, num_warps=4, num_stages=1),
)


#: tokens per GPU tile by (element size, padded head dim): the tiles' shared memory stays under the ~227 KB of an
#: H100 block (measured by compiling the kernels for sm_90: fp32 at 128 tokens x 64 dims needs ~262 KB for dQ)
GPU_TILE_TOKENS = {(2, 64): 128, (2, 128): 64, (2, 256): 64, (4, 64): 64, (4, 128): 32, (4, 256): 16}


def default_tile(grid: tuple[int, int], head_dim: int, element_size: int = 2) -> tuple[int, int]:
    """``(TH, TW)`` of a tile: 128 tokens for fp16/bf16 heads up to 64 wide, fewer for wider heads and fp32 (see
    ``GPU_TILE_TOKENS``), at most 16 columns wide and narrower on narrow grids so tiles are not mostly padding."""
    if INTERPRET:
        tokens = INTERPRETER_TILE_TOKENS
    else:
        tokens = GPU_TILE_TOKENS[(min(4, max(2, element_size)), max(64, pow2(head_dim)))]
    width = min(triton.next_power_of_2(grid[1]), 4 if INTERPRET else 16, tokens)
    return tokens // width, width


@functools.lru_cache(maxsize=64)
def tile_schedule(
    grid: tuple[int, int], radius: float, tile: tuple[int, int], device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every tile: the tiles entirely inside its window (``full``) and those cut by it (``partial``).

    Returns ``full [T, F]``, ``full_count [T]``, ``partial [T, P]``, ``partial_count [T]`` (int32, padded rows).
    A pair is full when every pair of cells is within the radius and neither tile is clipped by the grid border; the
    relation is symmetric, so the key-side backward reads the same lists. Cached per resolution and radius.
    """
    height, width = grid
    tile_h, tile_w = tile
    rows, cols = triton.cdiv(height, tile_h), triton.cdiv(width, tile_w)
    index = torch.arange(rows * cols)
    ty, tx = index // cols, index % cols
    y0, x0 = ty * tile_h, tx * tile_w
    y1, x1 = torch.clamp(y0 + tile_h, max=height) - 1, torch.clamp(x0 + tile_w, max=width) - 1
    clipped = (y0 + tile_h > height) | (x0 + tile_w > width)

    def gaps(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nearest = torch.clamp(torch.maximum(lo[None, :] - hi[:, None], lo[:, None] - hi[None, :]), min=0)
        farthest = torch.maximum((hi[:, None] - lo[None, :]).abs(), (hi[None, :] - lo[:, None]).abs())
        return nearest, farthest

    near_y, far_y = gaps(y0, y1)
    near_x, far_x = gaps(x0, x1)
    limit = float(radius) ** 2
    touches = (near_y**2 + near_x**2) < limit
    full = touches & ((far_y**2 + far_x**2) < limit) & ~clipped[:, None] & ~clipped[None, :]
    partial = touches & ~full

    def listing(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = flags.sum(1)
        order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, : max(1, int(counts.max()))]
        return order.to(torch.int32).contiguous().to(device), counts.to(torch.int32).to(device)

    return (*listing(full), *listing(partial))


@triton.jit
def _tile_tokens(tile, TILES_X, GH, GW, start, TH: tl.constexpr, TW: tl.constexpr):
    """Sequence positions, grid rows/columns and validity of the tokens of ``tile`` (row-major tiles)."""
    i = tl.arange(0, TH * TW)
    y = (tile // TILES_X) * TH + i // TW
    x = (tile % TILES_X) * TW + i % TW
    valid = (y < GH) & (x < GW)
    return (start + y * GW + x).to(tl.int64), y, x, valid


@triton.jit
def _dense_keys(
    acc, m_i, l_i, q, do, k_base, v_base, sks, svs, start, stop, qk_scale, D, DV,
    LOWP: tl.constexpr, DQ: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Rows ``q`` against the contiguous keys ``[start, stop)`` with no mask but the end of the segment."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for first in range(start, stop, BLOCK):
        offs_n = first + tl.arange(0, BLOCK)
        cols = offs_n < stop
        cols64 = offs_n.to(tl.int64)
        k = tl.load(
            k_base + cols64[:, None] * sks + offs_d[None, :], mask=cols[:, None] & (offs_d[None, :] < D), other=0.0
        )
        v = tl.load(
            v_base + cols64[:, None] * svs + offs_dv[None, :], mask=cols[:, None] & (offs_dv[None, :] < DV), other=0.0
        )
        s = tl.where(cols[None, :], mm(q, tl.trans(k), LOWP) * qk_scale, float("-inf"))
        acc, m_i, l_i = row_step(acc, m_i, l_i, s, k, v, do, LOWP, DQ)
    return acc, m_i, l_i


@triton.jit
def _dense_queries(
    dk, dv, k, v, q_base, do_base, sqs, sds, lse_base, delta_base, start, stop, qk_scale, D, DV,
    LOWP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """dK/dV of keys ``k``/``v`` from the contiguous queries ``[start, stop)`` that all see them."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for first in range(start, stop, BLOCK):
        offs_m = first + tl.arange(0, BLOCK)
        rows = offs_m < stop
        rows64 = offs_m.to(tl.int64)
        q = tl.load(
            q_base + rows64[:, None] * sqs + offs_d[None, :], mask=rows[:, None] & (offs_d[None, :] < D), other=0.0
        )
        do = tl.load(
            do_base + rows64[:, None] * sds + offs_dv[None, :], mask=rows[:, None] & (offs_dv[None, :] < DV), other=0.0
        )
        lse = tl.load(lse_base + rows64, mask=rows, other=float("inf"))
        delta = tl.load(delta_base + rows64, mask=rows, other=0.0)
        s = mm(q, tl.trans(k), LOWP) * qk_scale
        dk, dv, _ = kv_step(dk, dv, s, q, do, lse, delta, v, LOWP)
    return dk, dv


@autotune(configs=_CONFIGS, key=["S", "P", "BLOCK_D", "BLOCK_DV", "TH", "TW", "IMAGE", "DQ"])
@triton.jit
def _query_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, do_ptr, out_ptr, lse_ptr, delta_ptr,
    full_ptr, full_count_ptr, part_ptr, part_count_ptr,
    S, T, TSTART, ISTART, P, GH, GW, TILES_X, MAX_FULL, MAX_PART, R2, H, D, DV,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, spkb, spks, spkh, spvb, spvs, spvh,
    sdb, sds, sdh, sob, sos, soh,
    qk_scale, sm_scale,
    IMAGE: tl.constexpr, HAS_POOLED: tl.constexpr, DQ: tl.constexpr, LOWP: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Forward (``DQ`` False) or dQ of one query block: an image tile (``IMAGE``) or a block of text queries."""
    BLOCK: tl.constexpr = TH * TW
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if IMAGE:
        rows64, qy, qx, rows = _tile_tokens(pid, TILES_X, GH, GW, ISTART, TH, TW)
    else:
        offs = TSTART + pid * BLOCK + tl.arange(0, BLOCK)
        rows, rows64 = offs < TSTART + T, offs.to(tl.int64)
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows64[:, None] * sqs + offs_d[None, :],
        mask=rows[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    row_ptr = bh.to(tl.int64) * S + rows64
    if DQ:
        do = tl.load(
            do_ptr + b * sdb + h * sdh + rows64[:, None] * sds + offs_dv[None, :],
            mask=rows[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        m_i = tl.load(lse_ptr + row_ptr, mask=rows, other=float("inf"))
        l_i = tl.load(delta_ptr + row_ptr, mask=rows, other=0.0)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    else:
        do = q  # unused by the forward step
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    if IMAGE:
        acc, m_i, l_i = _dense_keys(
            acc, m_i, l_i, q, do, k_base, v_base, sks, svs, TSTART, TSTART + T, qk_scale, D, DV,
            LOWP, DQ, BLOCK, BLOCK_D, BLOCK_DV,
        )  # fmt: skip
        if HAS_POOLED:
            acc, m_i, l_i = _dense_keys(
                acc, m_i, l_i, q, do, pk_ptr + b * spkb + h * spkh, pv_ptr + b * spvb + h * spvh, spks, spvs, 0, P,
                qk_scale, D, DV, LOWP, DQ, BLOCK, BLOCK_D, BLOCK_DV,
            )  # fmt: skip
        for j in range(0, tl.load(full_count_ptr + pid)):
            tile = tl.load(full_ptr + pid * MAX_FULL + j)
            cols64, ky, kx, cols = _tile_tokens(tile, TILES_X, GH, GW, ISTART, TH, TW)
            k = tl.load(k_base + cols64[:, None] * sks + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
            v = tl.load(v_base + cols64[:, None] * svs + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
            s = mm(q, tl.trans(k), LOWP) * qk_scale
            acc, m_i, l_i = row_step(acc, m_i, l_i, s, k, v, do, LOWP, DQ)
        for j in range(0, tl.load(part_count_ptr + pid)):
            tile = tl.load(part_ptr + pid * MAX_PART + j)
            cols64, ky, kx, cols = _tile_tokens(tile, TILES_X, GH, GW, ISTART, TH, TW)
            k = tl.load(
                k_base + cols64[:, None] * sks + offs_d[None, :], mask=cols[:, None] & (offs_d[None, :] < D), other=0.0
            )
            v = tl.load(
                v_base + cols64[:, None] * svs + offs_dv[None, :],
                mask=cols[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            dy = qy[:, None] - ky[None, :]
            dx = qx[:, None] - kx[None, :]
            inside = ((dy * dy + dx * dx).to(tl.float32) < R2) & cols[None, :]
            s = tl.where(inside, mm(q, tl.trans(k), LOWP) * qk_scale, float("-inf"))
            acc, m_i, l_i = row_step(acc, m_i, l_i, s, k, v, do, LOWP, DQ)
    else:
        acc, m_i, l_i = _dense_keys(
            acc, m_i, l_i, q, do, k_base, v_base, sks, svs, 0, S, qk_scale, D, DV, LOWP, DQ, BLOCK, BLOCK_D, BLOCK_DV
        )
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


@autotune(configs=_CONFIGS, key=["S", "P", "BLOCK_D", "BLOCK_DV", "TH", "TW", "KIND"])
@triton.jit
def _key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    full_ptr, full_count_ptr, part_ptr, part_count_ptr,
    S, T, TSTART, ISTART, P, GH, GW, TILES_X, MAX_FULL, MAX_PART, R2, H, D, DV,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    qk_scale, sm_scale,
    KIND: tl.constexpr, LOWP: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key block: text keys (``KIND`` 0), an image tile (1) or pooled keys (2; ``k_ptr``/``v_ptr``
    then point at the pooled tensors)."""
    BLOCK: tl.constexpr = TH * TW
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if KIND == 1:
        cols64, ky, kx, cols = _tile_tokens(pid, TILES_X, GH, GW, ISTART, TH, TW)
    elif KIND == 0:
        offs = TSTART + pid * BLOCK + tl.arange(0, BLOCK)
        cols, cols64 = offs < TSTART + T, offs.to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        cols, cols64 = offs < P, offs.to(tl.int64)
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
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdb + h * sdh
    lse_base = lse_ptr + bh.to(tl.int64) * S
    delta_base = delta_ptr + bh.to(tl.int64) * S
    if KIND == 0:
        dk, dv = _dense_queries(
            dk, dv, k, v, q_base, do_base, sqs, sds, lse_base, delta_base, 0, S, qk_scale, D, DV,
            LOWP, BLOCK, BLOCK_D, BLOCK_DV,
        )  # fmt: skip
    elif KIND == 2:
        dk, dv = _dense_queries(
            dk, dv, k, v, q_base, do_base, sqs, sds, lse_base, delta_base, ISTART, ISTART + GH * GW, qk_scale, D, DV,
            LOWP, BLOCK, BLOCK_D, BLOCK_DV,
        )  # fmt: skip
    else:
        dk, dv = _dense_queries(
            dk, dv, k, v, q_base, do_base, sqs, sds, lse_base, delta_base, TSTART, TSTART + T, qk_scale, D, DV,
            LOWP, BLOCK, BLOCK_D, BLOCK_DV,
        )  # fmt: skip
        for j in range(0, tl.load(full_count_ptr + pid)):
            tile = tl.load(full_ptr + pid * MAX_FULL + j)
            rows64, qy, qx, rows = _tile_tokens(tile, TILES_X, GH, GW, ISTART, TH, TW)
            q = tl.load(q_base + rows64[:, None] * sqs + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
            do = tl.load(do_base + rows64[:, None] * sds + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
            lse = tl.load(lse_base + rows64)
            delta = tl.load(delta_base + rows64)
            s = mm(q, tl.trans(k), LOWP) * qk_scale
            dk, dv, _ = kv_step(dk, dv, s, q, do, lse, delta, v, LOWP)
        for j in range(0, tl.load(part_count_ptr + pid)):
            tile = tl.load(part_ptr + pid * MAX_PART + j)
            rows64, qy, qx, rows = _tile_tokens(tile, TILES_X, GH, GW, ISTART, TH, TW)
            q = tl.load(
                q_base + rows64[:, None] * sqs + offs_d[None, :], mask=rows[:, None] & (offs_d[None, :] < D), other=0.0
            )
            do = tl.load(
                do_base + rows64[:, None] * sds + offs_dv[None, :],
                mask=rows[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            lse = tl.load(lse_base + rows64, mask=rows, other=float("inf"))
            delta = tl.load(delta_base + rows64, mask=rows, other=0.0)
            dy = qy[:, None] - ky[None, :]
            dx = qx[:, None] - kx[None, :]
            inside = (dy * dy + dx * dx).to(tl.float32) < R2
            s = tl.where(inside, mm(q, tl.trans(k), LOWP) * qk_scale, float("-inf"))
            dk, dv, _ = kv_step(dk, dv, s, q, do, lse, delta, v, LOWP)
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


class _Plan:
    """Shapes, layout and schedule of one call, shared by forward and backward."""

    def __init__(
        self, q: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], radius: float, image: slice, pooled: int,
        tile: tuple[int, int],
    ) -> None:  # fmt: skip
        self.batch, self.length, self.heads, self.dim = q.shape
        self.dim_v = v.shape[-1]
        self.grid = grid
        self.image_tokens = grid[0] * grid[1]
        self.text = self.length - self.image_tokens
        self.image_start = image.start
        self.text_start = 0 if image.start > 0 else self.image_tokens
        self.pooled = pooled
        self.tile = tile
        self.block = tile[0] * tile[1]
        self.tiles_x = triton.cdiv(grid[1], tile[1])
        self.tiles = triton.cdiv(grid[0], tile[0]) * self.tiles_x
        self.r2 = float(radius) ** 2
        self.schedule = tile_schedule(grid, float(radius), tile, str(q.device))

    def scalars(self) -> tuple:
        full, _, part, _ = self.schedule
        return (
            *self.schedule,
            self.length, self.text, self.text_start, self.image_start, self.pooled, self.grid[0], self.grid[1],
            self.tiles_x, full.shape[1], part.shape[1], self.r2, self.heads, self.dim, self.dim_v,
        )  # fmt: skip

    def constants(self, low: bool) -> dict:
        return {
            "LOWP": low, "TH": self.tile[0], "TW": self.tile[1],
            "BLOCK_D": pow2(self.dim), "BLOCK_DV": pow2(self.dim_v),
        }  # fmt: skip


def _query_pass(plan: _Plan, q, k, v, pk, pv, do, out, lse, delta, scale: float, dq: bool) -> None:
    """Launch the query-side kernel over image tiles and text blocks (forward, or dQ into ``out``)."""
    has_pooled = pk is not None
    pk, pv = (pk, pv) if has_pooled else (k, v)
    args = (
        q, k, v, pk, pv, do, out, lse, delta, *plan.scalars(),
        *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(pk), *row_strides(pv),
        *row_strides(do), *row_strides(out), scale * LOG2E, scale,
    )  # fmt: skip
    constants = {**plan.constants(lowp(q.dtype)), "HAS_POOLED": has_pooled, "DQ": dq}
    bh = plan.batch * plan.heads
    _query_kernel[(plan.tiles, bh)](*args, IMAGE=True, **constants)
    if plan.text:
        _query_kernel[(triton.cdiv(plan.text, plan.block), bh)](*args, IMAGE=False, **constants)


class _LocalWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, plan: _Plan, scale: float):
        out = torch.empty(plan.batch, plan.length, plan.heads, plan.dim_v, device=q.device, dtype=q.dtype)
        lse = torch.empty(plan.batch, plan.heads, plan.length, device=q.device, dtype=torch.float32)
        _query_pass(plan, q, k, v, pk, pv, q, out, lse, lse, scale, dq=False)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        grad_out = last_dim_contiguous(grad_out)
        delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        dq = torch.empty_like(q)
        _query_pass(plan, q, k, v, pk, pv, grad_out, dq, lse, delta, scale, dq=True)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        bh = plan.batch * plan.heads
        constants = plan.constants(lowp(q.dtype))
        common = (plan.scalars(), row_strides(q), row_strides(grad_out))

        def launch(kind: int, programs: int, keys: torch.Tensor, values: torch.Tensor, gk, gv) -> None:
            scalars, q_strides, do_strides = common
            _key_kernel[(programs, bh)](
                q, keys, values, grad_out, lse, delta, gk, gv, *scalars,
                *q_strides, *row_strides(keys), *row_strides(values), *do_strides, *row_strides(gk), *row_strides(gv),
                scale * LOG2E, scale, KIND=kind, **constants,
            )  # fmt: skip

        launch(1, plan.tiles, k, v, dk, dv)
        if plan.text:
            launch(0, triton.cdiv(plan.text, plan.block), k, v, dk, dv)
        dpk = dpv = None
        if pk is not None:
            dpk, dpv = torch.empty_like(pk), torch.empty_like(pv)
            launch(2, triton.cdiv(plan.pooled, plan.block), pk, pv, dpk, dpv)
        return dq, dk, dv, dpk, dpv, None, None


def local_window_attention_triton(
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
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Triton local-window attention on ``[B, S, H, D]`` (arguments checked by the caller)."""
    tile = tuple(tile) if tile is not None else default_tile(grid, query.shape[-1], query.element_size())
    if tile[0] * tile[1] < 16 or tile[0] * tile[1] & (tile[0] * tile[1] - 1) or tile[1] & (tile[1] - 1):
        raise ValueError(f"`tile` must be (rows, columns) powers of two with at least 16 cells, got {tile}")
    query, key, value = (last_dim_contiguous(t) for t in (query, key, value))
    pooled = 0
    if pooled_key is not None:
        pooled_key, pooled_value = last_dim_contiguous(pooled_key), last_dim_contiguous(pooled_value)
        pooled = pooled_key.shape[1]
    plan = _Plan(query, value, grid, radius, image, pooled, tile)
    return _LocalWindowAttention.apply(query, key, value, pooled_key, pooled_value, plan, float(scale))
