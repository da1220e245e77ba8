"""Region-masked attention: the Triton kernel (interpreter) and the torch/flex paths against the explicit fp32
softmax under the spelled-out grouped bias; gradients of q, k, v and the table; fully masked rows give zeros."""

from __future__ import annotations

import pytest
import torch

from attncontrol.kernels.masked import grouped_bias_dense, masked_attention, masked_attention_reference
from tests.kernels.common import DTYPES, assert_close, grads, leaf

# (batch, queries, keys, heads, dim, dtype, groups (0 = no bias), table heads, shared table/groups batch,
#  table gradient, a fully masked group, [B, H, S, D] storage)
CASES = [
    (1, 130, 77, 2, 40, "fp32", 3, 1, False, True, True, False),
    (2, 17, 17, 1, 64, "fp16", 2, 1, False, False, False, True),
    (1, 77, 130, 2, 160, "bf16", 5, 2, False, True, False, False),
    (1, 1, 1, 1, 80, "fp32", 1, 1, False, True, False, False),
    (2, 33, 20, 2, 64, "fp32", 0, 1, False, False, False, True),
    (2, 64, 77, 1, 128, "fp16", 4, 1, True, True, True, False),
    (1, 130, 1, 1, 64, "bf16", 2, 1, False, False, False, False),
    (1, 17, 130, 2, 80, "fp16", 3, 2, False, True, False, True),
    (2, 77, 77, 1, 40, "bf16", 6, 1, True, False, True, False),
    (1, 33, 64, 1, 160, "fp32", 2, 1, False, True, False, False),
    (1, 130, 33, 1, 128, "bf16", 3, 1, False, True, True, True),
    (1, 64, 17, 2, 64, "fp32", 17, 1, False, True, False, False),
    (2, 20, 50, 1, 80, "bf16", 0, 1, False, False, False, False),
    (1, 50, 20, 1, 40, "fp16", 1, 1, False, False, True, False),
    (1, 17, 77, 1, 128, "fp32", 70, 1, False, False, False, False),  # more groups than the table-grad limit
    (1, 77, 17, 2, 160, "fp16", 2, 2, True, False, False, False),
    (2, 1, 33, 1, 64, "bf16", 2, 1, False, True, False, False),
    (1, 130, 130, 1, 64, "fp16", 8, 1, False, True, True, False),
    (1, 9, 5, 1, 40, "fp32", 2, 1, False, True, False, True),
]


def _case_id(case: tuple) -> str:
    batch, queries, keys, heads, dim, dtype, count, table_heads, shared, table_grad, dead, heads_first = case
    parts = [f"B{batch}", f"Sq{queries}", f"Sk{keys}", f"H{heads}", f"D{dim}", dtype, f"G{count}"]
    parts += ["Ht" if table_heads > 1 else "", "shared" if shared else "", "dtable" if table_grad else "",
              "dead" if dead else "", "bhsd" if heads_first else ""]  # fmt: skip
    return "-".join(part for part in parts if part)


def _bias(case: tuple, generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    batch, queries, keys, _, _, _, count, table_heads, shared, table_grad, dead, _ = case
    if count == 0:
        return None, None
    rows = 1 if shared else batch
    groups = torch.randint(0, count, (rows, queries), generator=generator, dtype=torch.int32)
    table = torch.randn(rows, table_heads, count, keys, generator=generator)
    table[torch.rand(table.shape, generator=generator) < 0.3] = float("-inf")  # masked keys
    if dead:
        table[:, :, 0] = float("-inf")  # group 0 sees no key at all
        groups[..., :3] = 0
    return groups, table.requires_grad_(table_grad)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_the_reference(case):
    batch, queries, keys, heads, dim, name, _, _, _, table_grad, dead, heads_first = case
    dtype = DTYPES[name]
    generator = torch.Generator().manual_seed(queries * 31 + keys)
    q_leaf, q = leaf((batch, queries, heads, dim), dtype, generator, heads_first=heads_first)
    (k_leaf, k), (v_leaf, v) = (leaf((batch, keys, heads, dim), dtype, generator, heads_first=heads_first)
                                for _ in range(2))  # fmt: skip
    groups, table = _bias(case, generator)
    out = masked_attention(q, k, v, groups=groups, table=table, backend="triton")
    expected = masked_attention_reference(q, k, v, groups=groups, table=table)
    assert_close(out, expected, dtype, "out", "output")
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    leaves = [q_leaf, k_leaf, v_leaf] + ([table] if table_grad else [])
    got, want = grads(out, leaves, grad_out), grads(expected, leaves, grad_out)
    for label, a, b in zip(["dq", "dk", "dv", "dtable"], got, want, strict=False):
        finite = torch.isfinite(b)  # the reference's table gradient is finite everywhere too (0 at masked keys)
        assert_close(a[finite] if label == "dtable" else a, b[finite] if label == "dtable" else b, dtype, "grad", label)
    if dead:
        rows = (groups.expand(batch, -1) == 0)[:, :, None, None].expand_as(out)  # [B, Sq, H, Dv]
        assert torch.equal(out[rows], torch.zeros_like(out[rows])), "fully masked rows must be exactly zero"
        dq = got[0].transpose(1, 2) if heads_first else got[0]
        assert torch.equal(dq[rows], torch.zeros_like(dq[rows])), "fully masked rows must get zero gradients"


def test_grouped_bias_spells_out_per_query_rows():
    groups = torch.tensor([[0, 2, 1, 2]], dtype=torch.int32)
    table = torch.arange(3 * 5, dtype=torch.float32).reshape(1, 1, 3, 5)
    dense = grouped_bias_dense(groups.expand(2, -1), table)
    assert dense.shape == (2, 1, 4, 5)
    assert torch.equal(dense[1, 0, 1], table[0, 0, 2]) and torch.equal(dense[0, 0, 2], table[0, 0, 1])


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_other_backends_match_the_reference(backend):
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 33, 2, 64, generator=generator)
    k, v = torch.randn(2, 20, 2, 64, generator=generator), torch.randn(2, 20, 2, 64, generator=generator)
    groups, table = _bias((2, 33, 20, 2, 64, "fp32", 3, 2, False, False, True, False), generator)
    with torch.no_grad():
        out = masked_attention(q, k, v, groups=groups, table=table, backend=backend)
    expected = masked_attention_reference(q, k, v, groups=groups, table=table)
    assert_close(out, expected, torch.float32, "out", backend)


def test_bad_arguments_are_named():
    q = torch.randn(1, 4, 1, 16)
    groups, table = torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="together"):
        masked_attention(q, q, q, groups=groups)
    with pytest.raises(ValueError, match="`groups` ids"):
        masked_attention(q, q, q, groups=groups + 2, table=table)
    with pytest.raises(ValueError, match="`groups` must be an integer"):
        masked_attention(q, q, q, groups=groups.float(), table=table)
    with pytest.raises(ValueError, match="`table` must be"):
        masked_attention(q, q, q, groups=groups, table=table[:, :, :, :3])
    with pytest.raises(ValueError, match="`table` requires a gradient"):
        big = torch.zeros(1, 1, 65, 4, requires_grad=True)
        masked_attention(q, q, q, groups=groups, table=big, backend="triton")
