"""What every kernel test shares: the tolerances (one table, per dtype), input makers and the comparison.

Tolerances compare a kernel's output or gradient, in its dtype, with the reference computed in fp32/fp64 from the
same (rounded) inputs; `assert_close` passes when |actual - expected| <= atol + rtol * |expected| everywhere.
fp32 runs exact fp32 products under the interpreter; fp16 runs the GPU's path (fp16 operands, fp32 accumulation:
probabilities and logit gradients are rounded to fp16 before their matmuls); bf16 is upcast under the interpreter,
so its error is the final rounding to bf16 (8 bits of mantissa) plus the rounded inputs.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: (atol, rtol) per dtype for outputs and for gradients
TOLERANCES: dict[torch.dtype, dict[str, tuple[float, float]]] = {
    torch.float32: {"out": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    torch.float16: {"out": (4e-3, 4e-3), "grad": (1e-2, 1e-2)},
    torch.bfloat16: {"out": (2e-2, 2e-2), "grad": (5e-2, 3e-2)},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str, what: str) -> None:
    """``actual`` within the ``kind`` ("out"/"grad") tolerance of ``expected``, and finite (NaN = unwritten)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten buffer?)"
    atol, rtol = TOLERANCES[dtype][kind]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def leaf(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, *, heads_first: bool = False,
         scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A leaf tensor requiring grad and the ``[B, S, H, D]`` view the kernel gets: ``heads_first`` stores it as
    ``[B, H, S, D]`` (the processors' layout), so the kernel sees transposed strides."""
    batch, length, heads, dim = shape
    stored = (batch, heads, length, dim) if heads_first else shape
    tensor = (torch.randn(stored, generator=generator) * scale).to(dtype).requires_grad_()
    return tensor, tensor.transpose(1, 2) if heads_first else tensor


def grads(output: torch.Tensor, tensors: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``(output * grad_out).sum()`` with respect to ``tensors`` (leaves), without touching ``.grad``."""
    return list(torch.autograd.grad(output, tensors, grad_out, retain_graph=True))
