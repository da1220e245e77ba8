"""The dense, bias and explicit attention paths agree; fully masked rows give zeros, never NaN."""

from __future__ import annotations

import pytest
import torch

from attncontrol import attention, attention_probs


def reference(query, key, value, scale=None, bias=None):
    probs = attention_probs(query, key, scale=scale, bias=bias)
    return probs @ value.float()


@pytest.mark.parametrize(("batch", "heads", "queries", "keys", "dim"), [(2, 3, 17, 5, 8), (1, 2, 63, 63, 16)])
def test_paths_match_the_softmax_reference(batch, heads, queries, keys, dim):
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim) for n in (queries, keys, keys))
    bias = torch.randn(batch, 1, queries, keys)
    expected = reference(q, k, v, scale=0.3, bias=bias)
    dense = attention(q, k, v, scale=0.3, bias=bias)
    explicit = attention(q, k, v, scale=0.3, bias=bias, probs_hook=lambda p: p)
    assert torch.allclose(dense, expected, atol=1e-5)
    assert torch.allclose(explicit, expected, atol=1e-5)


def test_fully_masked_rows_are_zero_not_nan():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    bias = torch.zeros(1, 1, 6, 5)
    bias[..., 2, :] = float("-inf")  # query 2 may attend to nothing
    bias[..., 4, 1:] = float("-inf")  # query 4 only to key 0
    for out in (attention(q, k, v, bias=bias), attention(q, k, v, bias=bias, probs_hook=lambda p: p)):
        assert not torch.isnan(out).any()
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
        assert torch.allclose(out[:, :, 4], v[:, :, 0], atol=1e-6)


def test_probs_hook_sees_masked_rows_as_zero_and_can_edit():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    bias = torch.zeros(1, 1, 3, 4)
    bias[..., 0, :] = float("-inf")
    seen = {}

    def hook(probs):
        seen["probs"] = probs.clone()
        edited = torch.zeros_like(probs)
        edited[..., 3] = 1.0  # every query copies value 3
        return edited

    out = attention(q, k, v, bias=bias, probs_hook=hook)
    assert torch.equal(seen["probs"][0, 0, 0], torch.zeros(4))
    assert torch.allclose(seen["probs"][0, 0, 1:].sum(-1), torch.ones(2))
    assert torch.allclose(out[0, 0, 1:], v[0, 0, 3].expand(2, 4), atol=1e-6)
    assert torch.equal(out[0, 0, 0], torch.zeros(4))  # a dead row stays dead whatever the hook returns


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_fp32_softmax(dtype):
    torch.manual_seed(0)
    q, k, v = ((torch.randn(1, 2, 32, 16) * 4).to(dtype) for _ in range(3))
    expected = reference(q.float(), k.float(), v.float())
    out = attention(q, k, v, probs_hook=lambda p: p)
    assert out.dtype == dtype
    # Only the final rounding to the low-precision dtype may differ from the fp32 computation.
    assert torch.allclose(out.float(), expected, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("with_hook", [False, True])
def test_cpu_autocast_runs_the_core_in_fp32(with_hook):
    # bf16 training on the CPU: q/k/v arrive in bf16 from autocast's linear layers; the core must not be recast.
    torch.manual_seed(0)
    q, k, v = ((torch.randn(2, 2, 24, 16) * 3).to(torch.bfloat16) for _ in range(3))
    bias = torch.randn(2, 1, 24, 24)
    seen = {}

    def hook(probs):
        seen["dtype"] = probs.dtype
        return probs

    expected = reference(q.float(), k.float(), v.float(), bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, bias=bias, probs_hook=hook if with_hook else None)
    assert out.dtype == torch.bfloat16
    # fp32 inside, one rounding to bf16 at the end (a bf16 matmul of the logits would be off by far more).
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
    if with_hook:
        assert seen["dtype"] == torch.float32
