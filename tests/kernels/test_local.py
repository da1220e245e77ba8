"""CLEAR's local window: the block-sparse Triton kernel (interpreter), the banded torch path and FlexAttention
against the explicit fp32 softmax under the full mask; gradients of q, k, v and the pooled keys/values; the tile
schedule against a brute-force count."""

from __future__ import annotations

import pytest
import torch

from attncontrol.kernels.local import (
    local_window_attention,
    local_window_attention_reference,
    local_window_mask,
    window_mask,
)
from attncontrol.kernels.local.triton import GPU_TILE_TOKENS, default_tile, tile_schedule
from tests.kernels.common import DTYPES, assert_close, grads, leaf

# (batch, grid, text tokens, text first, radius, pooled keys, heads, dim, dtype, [B, H, S, D] storage)
CASES = [
    (1, (5, 7), 5, True, 2.5, 0, 2, 40, "fp32", False),
    (2, (3, 9), 3, False, 1.0, 0, 1, 64, "fp16", True),
    (1, (6, 6), 0, True, 2.0, 4, 2, 80, "fp32", False),
    (1, (4, 5), 1, True, 100.0, 3, 1, 160, "bf16", False),
    (1, (8, 8), 7, True, 6.0, 0, 1, 128, "fp32", True),  # full tiles (inside the circle) and partial ones
    (1, (1, 13), 0, True, 1.5, 0, 1, 64, "bf16", False),
    (1, (9, 8), 17, True, 3.0, 0, 1, 40, "fp16", False),
    (2, (8, 8), 0, True, 5.7, 0, 1, 64, "bf16", True),
    (1, (7, 5), 2, False, 2.2, 5, 1, 128, "fp16", False),
    (1, (12, 8), 0, True, 4.5, 0, 1, 80, "bf16", False),
    (1, (4, 4), 77, True, 1.0, 0, 1, 64, "fp32", False),  # long text segment, a window of one token
    (1, (10, 3), 1, False, 30.0, 0, 2, 160, "fp32", False),
    (1, (16, 8), 0, True, 6.0, 2, 1, 64, "fp16", False),
    (1, (5, 5), 9, True, 1.5, 0, 1, 128, "bf16", True),
    (2, (2, 17), 4, True, 2.0, 0, 1, 40, "fp32", False),
    (1, (13, 1), 3, False, 4.0, 1, 1, 80, "fp16", False),
    (1, (3, 3), 2, True, 1.5, 0, 1, 160, "fp16", False),
]


def _case_id(case: tuple) -> str:
    batch, grid, text, text_first, radius, pooled, heads, dim, dtype, heads_first = case
    parts = [f"B{batch}", f"{grid[0]}x{grid[1]}", f"T{text}" + ("" if text_first else "-after"), f"r{radius}"]
    parts += [f"P{pooled}" if pooled else "", f"H{heads}", f"D{dim}", dtype, "bhsd" if heads_first else ""]
    return "-".join(part for part in parts if part)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_the_masked_softmax(case):
    batch, grid, text, text_first, radius, pooled, heads, dim, name, heads_first = case
    dtype = DTYPES[name]
    tokens = grid[0] * grid[1]
    length = tokens + text
    image = slice(text, length) if text_first else slice(0, tokens)
    generator = torch.Generator().manual_seed(length * 7 + pooled)
    made = [leaf((batch, length, heads, dim), dtype, generator, heads_first=heads_first) for _ in range(3)]
    if pooled:
        made += [leaf((batch, pooled, heads, dim), dtype, generator) for _ in range(2)]
    leaves, views = [m[0] for m in made], [m[1] for m in made]
    kwargs = {"grid": grid, "radius": radius, "image": image}
    if pooled:
        kwargs.update(pooled_key=views[3], pooled_value=views[4])
    out = local_window_attention(*views[:3], backend="triton", **kwargs)
    expected = local_window_attention_reference(*views[:3], **kwargs)
    assert_close(out, expected, dtype, "out", "output")
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    labels = ["dq", "dk", "dv", "dpooled_key", "dpooled_value"]
    for label, got, want in zip(labels, grads(out, leaves, grad_out), grads(expected, leaves, grad_out), strict=False):
        assert_close(got, want, dtype, "grad", label)


@pytest.mark.parametrize(
    ("grid", "text", "text_first", "radius", "pooled"),
    [((5, 7), 5, True, 1.5, 0), ((4, 4), 3, False, 2.0, 2), ((6, 3), 0, True, 3.0, 0), ((3, 9), 7, True, 8.0, 3)],
)
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_banded_and_flex_match_the_masked_softmax(grid, text, text_first, radius, pooled, backend):
    tokens = grid[0] * grid[1]
    image = slice(text, text + tokens) if text_first else slice(0, tokens)
    generator = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(2, text + tokens, 2, 16, generator=generator) for _ in range(3))
    pk, pv = (torch.randn(2, pooled, 2, 16, generator=generator) if pooled else None for _ in range(2))
    kwargs = {"grid": grid, "radius": radius, "image": image, "pooled_key": pk, "pooled_value": pv, "scale": 0.3}
    with torch.no_grad():
        out = local_window_attention(q, k, v, backend=backend, **kwargs)
    assert_close(out, local_window_attention_reference(q, k, v, **kwargs), torch.float32, "out", backend)


def test_schedule_lists_every_touching_tile_and_full_ones_exactly():
    """Brute force over cells: a (query tile, key tile) pair is listed iff some pair of cells is within the radius;
    "full" iff every pair is (and neither tile is clipped by the border)."""
    grid, radius, tile = (10, 9), 4.5, (4, 4)
    full, full_count, part, part_count = tile_schedule(grid, radius, tile, "cpu")
    near = window_mask(grid, radius)
    rows, cols = -(-grid[0] // tile[0]), -(-grid[1] // tile[1])

    def cells(index: int) -> torch.Tensor:
        ty, tx = divmod(index, cols)
        ys = torch.arange(ty * tile[0], min(grid[0], (ty + 1) * tile[0]))
        xs = torch.arange(tx * tile[1], min(grid[1], (tx + 1) * tile[1]))
        return (ys[:, None] * grid[1] + xs[None, :]).flatten()

    kinds = set()
    for a in range(rows * cols):
        listed_full = set(full[a, : full_count[a]].tolist())
        listed_part = set(part[a, : part_count[a]].tolist())
        assert not listed_full & listed_part
        for b in range(rows * cols):
            block = near[cells(a)][:, cells(b)]
            clipped = len(cells(a)) < 16 or len(cells(b)) < 16
            if not block.any():
                assert b not in listed_full | listed_part
            elif block.all() and not clipped:
                assert b in listed_full
                kinds.add("full")
            else:
                assert b in listed_part
                kinds.add("partial")
    assert kinds == {"full", "partial"}


def test_full_mask_rules():
    mask = local_window_mask((2, 3), 1.0, 8, slice(2, 8), pooled=2)
    assert mask[:2, :8].all() and not mask[:2, 8:].any()  # text queries: all but the pooled keys
    assert mask[2:, :2].all() and mask[2:, 8:].all()  # image queries: text and pooled keys
    assert torch.equal(mask[2:, 2:8], torch.eye(6, dtype=torch.bool))  # radius 1: only itself


def test_default_tiles_are_gpu_legal_shapes():
    for grid in [(64, 64), (3, 9), (1, 13), (256, 256)]:
        for dim in (40, 64, 128, 160):
            for size in (2, 4):
                height, width = default_tile(grid, dim, size)
                assert height * width >= 16 and width & (width - 1) == 0 and height & (height - 1) == 0
    assert all(tokens >= 16 for tokens in GPU_TILE_TOKENS.values())


def test_bad_arguments_are_named():
    q = torch.randn(1, 10, 1, 16)
    with pytest.raises(ValueError, match="`image`"):
        local_window_attention(q, q, q, grid=(2, 3), radius=1.0, image=slice(2, 8))
    with pytest.raises(ValueError, match="`grid`"):
        local_window_attention(q, q, q, grid=(4, 3), radius=1.0)
    with pytest.raises(ValueError, match="`radius`"):
        local_window_attention(q, q, q, grid=(2, 3), radius=0)
    with pytest.raises(ValueError, match="`pooled_key`"):
        local_window_attention(q, q, q, grid=(2, 3), radius=1.0, pooled_key=q)
