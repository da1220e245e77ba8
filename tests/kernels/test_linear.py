"""Linear attention: the Triton kernels (interpreter) and the torch path against the quadratic fp64 reference,
outputs and gradients, odd lengths, every head dim, three dtypes, transposed strides."""

from __future__ import annotations

import pytest
import torch

from attncontrol.kernels.linear import linear_attention, linear_attention_reference
from tests.kernels.common import DTYPES, assert_close, grads, leaf

# (batch, length, heads, dim, value dim, dtype, feature map, [B, H, S, D] storage)
CASES = [
    (1, 1, 1, 40, 40, "fp32", "elu", False),
    (2, 17, 2, 64, 64, "fp16", "elu", True),
    (1, 77, 1, 80, 80, "bf16", "elu", False),
    (1, 130, 1, 128, 128, "fp32", "elu", True),
    (1, 33, 1, 160, 160, "fp16", "elu", False),
    (2, 130, 1, 40, 40, "bf16", "elu", True),
    (1, 17, 2, 80, 80, "fp32", "identity", False),
    (1, 77, 1, 160, 160, "bf16", "elu", False),
    (1, 64, 2, 128, 128, "fp16", "elu", True),
    (1, 130, 1, 64, 64, "bf16", "elu", False),
    (1, 1, 2, 64, 64, "fp16", "elu", False),
    (1, 17, 1, 128, 128, "bf16", "elu", True),
    (1, 33, 1, 64, 40, "fp32", "elu", False),
    (1, 200, 1, 64, 64, "fp32", "elu", False),  # four sequence splits under the interpreter
    (1, 77, 1, 40, 160, "fp16", "identity", False),
    (1, 9, 1, 80, 80, "fp16", "elu", True),
]


def _case_id(case: tuple) -> str:
    batch, length, heads, dim, dim_v, dtype, feature, heads_first = case
    return f"B{batch}-S{length}-H{heads}-D{dim}x{dim_v}-{dtype}-{feature}" + ("-bhsd" if heads_first else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_the_quadratic_reference(case):
    batch, length, heads, dim, dim_v, name, feature, heads_first = case
    dtype = DTYPES[name]
    generator = torch.Generator().manual_seed(length * dim + dim_v)
    # identity features need positive inputs (the caller's own map); elu + 1 takes any
    shift = 1.5 if feature == "identity" else 0.0
    (q_leaf, q), (k_leaf, k) = (leaf((batch, length, heads, dim), dtype, generator, heads_first=heads_first)
                                for _ in range(2))  # fmt: skip
    v_leaf, v = leaf((batch, length, heads, dim_v), dtype, generator, heads_first=heads_first)
    if shift:
        q, k = (q.abs() + shift).to(dtype), (k.abs() + shift).to(dtype)
    out = linear_attention(q, k, v, feature=feature, backend="triton")
    expected = linear_attention_reference(q, k, v, feature=feature)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "out", "output")
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    leaves = [q_leaf, k_leaf, v_leaf]
    for name_, got, want in zip("qkv", grads(out, leaves, grad_out), grads(expected, leaves, grad_out), strict=True):
        assert_close(got, want, dtype, "grad", f"d{name_}")


@pytest.mark.parametrize(("length", "dim"), [(1, 40), (130, 64), (77, 160)])
def test_torch_path_matches_the_reference(length, dim):
    generator = torch.Generator().manual_seed(length)
    (q_leaf, q), (k_leaf, k), (v_leaf, v) = (leaf((2, length, 2, dim), torch.float32, generator) for _ in range(3))
    out = linear_attention(q, k, v, backend="torch")
    expected = linear_attention_reference(q, k, v)
    assert_close(out, expected, torch.float32, "out", "output")
    grad_out = torch.randn(out.shape, generator=generator)
    for got, want in zip(grads(out, [q_leaf, k_leaf, v_leaf], grad_out), grads(expected, [q_leaf, k_leaf, v_leaf],
                                                                             grad_out), strict=True):  # fmt: skip
        assert_close(got, want, torch.float32, "grad", "grad")


def test_constant_values_come_back_unchanged():
    """Positive features make every output a weighted mean of values: constant values pass through (eps = 0)."""
    q, k = torch.randn(1, 50, 2, 64), torch.randn(1, 50, 2, 64)
    v = torch.full((1, 50, 2, 64), 3.0)
    out = linear_attention(q, k, v, eps=0.0, backend="triton")
    torch.testing.assert_close(out, v, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="`feature_map`"):
        linear_attention(q, q, q, feature="relu")
    with pytest.raises(ValueError, match="`query`"):
        linear_attention(q[0], q, q)
    with pytest.raises(ValueError, match="share"):
        linear_attention(q, torch.randn(1, 5, 1, 8), q)
    with pytest.raises(ValueError, match="`backend`"):
        linear_attention(q, q, q, backend="flex")
