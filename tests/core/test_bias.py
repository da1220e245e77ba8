"""Grouped biases: spelled out exactly, added without losing structure where possible, and routed by
``compute.attention`` to the masked kernel (Triton under the interpreter, flex) or the dense paths with the same
result; controls vote on the kernel backend."""

from __future__ import annotations

import pytest
import torch

from attncontrol import AttentionControl, ControllerStateError, attention
from attncontrol.core.bias import GroupedBias, add_biases, dense_bias
from attncontrol.core.layers import LayerInfo
from attncontrol.core.processors import _kernel_backend


def _grouped(batch: int = 2, queries: int = 6, keys: int = 5, groups: int = 3, seed: int = 0) -> GroupedBias:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, groups, (batch, queries), generator=generator, dtype=torch.int32)
    table = torch.randn(batch, 1, groups, keys, generator=generator)
    table[table < -1.2] = float("-inf")
    return GroupedBias(ids, table)


def test_dense_reads_the_table_by_group():
    bias = _grouped()
    dense = bias.dense()
    assert dense.shape == (2, 1, 6, 5)
    for b in range(2):
        for q in range(6):
            assert torch.equal(dense[b, 0, q], bias.table[b, 0, int(bias.groups[b, q])])


def test_one_group_stays_a_per_key_bias():
    keep = torch.tensor([[[[0.0, float("-inf"), -0.5]]]]).expand(2, 1, 1, 3)
    bias = GroupedBias.key_bias(keep, queries=7)
    assert bias.dense().shape == (2, 1, 1, 3)  # broadcast over queries, never [.., 7, 3]


def test_sums_stay_grouped_and_exact():
    first, second = _grouped(seed=1), _grouped(groups=2, seed=2)
    key_only = torch.randn(2, 1, 1, 5)
    full = torch.randn(2, 1, 6, 5)
    merged = add_biases(first, second)
    assert isinstance(merged, GroupedBias) and merged.num_groups <= 6
    torch.testing.assert_close(merged.dense(), first.dense() + second.dense())
    with_keys = add_biases(first, key_only)
    assert isinstance(with_keys, GroupedBias)
    torch.testing.assert_close(with_keys.dense(), first.dense() + key_only)
    spelled = add_biases(full, first)
    assert isinstance(spelled, torch.Tensor)
    torch.testing.assert_close(spelled, full + first.dense())
    assert add_biases(None, first) is first and add_biases(first, None) is first
    torch.testing.assert_close((first + full), first.dense() + full)
    torch.testing.assert_close(dense_bias(first), first.dense())


def test_rows_wraps_any_dense_bias():
    dense = torch.randn(1, 2, 6, 5)
    torch.testing.assert_close(GroupedBias.rows(dense).dense(), dense)


def test_invalid_groups_are_named():
    with pytest.raises(ValueError, match="`groups` ids"):
        GroupedBias(torch.tensor([[0, 3]], dtype=torch.int32), torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="`table`"):
        GroupedBias(torch.tensor([[0, 1]], dtype=torch.int32), torch.zeros(1, 3, 4))


@pytest.mark.parametrize("kernel_backend", ["torch", "triton", "flex"])
def test_attention_routes_grouped_biases_with_the_same_result(kernel_backend):
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 16, generator=generator) for n in (6, 5, 5))
    bias = _grouped(seed=4)
    bias.table[0, 0, int(bias.groups[0, 0])] = float("-inf")  # a fully masked row
    expected = attention(q, k, v, bias=bias.dense(), probs_hook=lambda p: p)  # the explicit fp32 reference
    with torch.no_grad():
        out = attention(q, k, v, bias=bias, scale=None, kernel_backend=kernel_backend)
        dense_route = attention(q, k, v, bias=bias.dense(), kernel_backend=kernel_backend)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(dense_route, expected, atol=2e-6, rtol=2e-5)
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))


def test_dense_biases_take_the_kernel_when_it_is_named():
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, n, 16, generator=generator) for n in (6, 5, 5))
    for bias in (torch.randn(2, 1, 6, 5, generator=generator), torch.randn(2, 1, 1, 5, generator=generator)):
        expected = attention(q, k, v, bias=bias, probs_hook=lambda p: p)
        torch.testing.assert_close(
            attention(q, k, v, bias=bias, kernel_backend="triton"), expected, atol=2e-6, rtol=2e-5
        )


def test_table_gradient_through_the_kernel_matches_the_explicit_path():
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for n in (6, 5, 5))
    base = _grouped(batch=1, seed=7)
    table = base.table.clone().requires_grad_()
    out = attention(q, k, v, bias=GroupedBias(base.groups, table), kernel_backend="triton")
    (fused,) = torch.autograd.grad(out.square().sum(), table)
    out = attention(q, k, v, bias=GroupedBias(base.groups, table), kernel_backend="torch")  # explicit path
    (explicit,) = torch.autograd.grad(out.square().sum(), table)
    finite = torch.isfinite(base.table)
    torch.testing.assert_close(fused[finite], explicit[finite], atol=1e-5, rtol=1e-4)


def test_controls_vote_on_the_kernel_backend():
    layer = LayerInfo(name="down_blocks.0.attn1", family="unet", kind="self", block="down", block_index=0, index=0)
    auto, torch_, triton_ = (AttentionControl(kernel_backend=name) for name in ("auto", "torch", "triton"))
    assert _kernel_backend([auto, auto], layer) == "auto"
    assert _kernel_backend([auto, torch_], layer) == "torch"
    with pytest.raises(ControllerStateError, match="different kernel backends"):
        _kernel_backend([torch_, triton_], layer)
    with pytest.raises(ValueError, match="`kernel_backend`"):
        AttentionControl(kernel_backend="cuda")
