"""The one backend switch every kernel op goes through: ``"auto" | "triton" | "flex" | "torch"``.

- ``"torch"``: the PyTorch implementation beside each kernel (runs anywhere, autograd included);
- ``"triton"``: the fused Triton kernels; on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the
  tests check them on machines without a GPU);
- ``"flex"``: ``torch.nn.attention.flex_attention`` (softmax ops only); compiled on CUDA, eager and forward-only on
  the CPU (PyTorch has no CPU backward for it);
- ``"auto"``: Triton on CUDA when it is installed and the op has a Triton kernel for the dtype, else torch. On the CPU
  ``auto`` is always torch, also under the interpreter: the interpreter is a test tool, not a fast path.

The choice is an argument, never module state: the processors pass the ``kernel_backend`` of their controls.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "flex", "torch")

#: ops and the backends that implement them (besides ``torch``, which all have)
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "linear": ("triton", "torch"),
    "local": ("triton", "flex", "torch"),
    "masked": ("triton", "flex", "torch"),
}

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend(backend: object, name: str = "backend") -> str:
    """Return ``backend`` if it names a backend, else raise a ``ValueError`` naming the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"`{name}` must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` would work (it is an optional dependency: ``pip install attncontrol[triton]``)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, set before the kernels were imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def flex_available() -> bool:
    """Whether this torch ships ``flex_attention`` (torch >= 2.5)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve_backend(backend: str, op: str, *tensors: torch.Tensor | None, name: str = "backend") -> str:
    """The backend that will run ``op`` on ``tensors``: ``"auto"`` resolved, explicit choices checked.

    Raises ``ValueError`` (naming ``name``) for an unknown backend, a backend the op lacks, or one that cannot run on
    these tensors (Triton without CUDA or the interpreter; flex with gradients on the CPU).
    """
    check_backend(backend, name)
    if op not in OP_BACKENDS:
        raise ValueError(f"unknown kernel op {op!r}; known: {sorted(OP_BACKENDS)}")
    present = [tensor for tensor in tensors if tensor is not None]
    on_cuda = bool(present) and all(tensor.is_cuda for tensor in present)
    dtypes_ok = all(tensor.dtype in KERNEL_DTYPES for tensor in present if tensor.is_floating_point())
    supported = OP_BACKENDS[op]
    if backend == "auto":
        if on_cuda and dtypes_ok and "triton" in supported and triton_available():
            return "triton"
        return "torch"
    if backend == "torch":
        return "torch"
    if backend not in supported:
        raise ValueError(f"`{name}`={backend!r}: the {op} op has no {backend} implementation; use one of {supported}")
    if not dtypes_ok:
        kinds = sorted({str(tensor.dtype) for tensor in present})
        raise ValueError(f"`{name}`={backend!r} runs float32/float16/bfloat16 tensors, got {kinds}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"`{name}`='triton' but triton is not installed (pip install 'attncontrol[triton]')")
        if not on_cuda and not interpreting():
            raise ValueError(
                f"`{name}`='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import, to test on the CPU)"
            )
        return "triton"
    if not flex_available():
        raise ValueError(f"`{name}`='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    if not on_cuda and torch.is_grad_enabled() and any(tensor.requires_grad for tensor in present):
        raise ValueError(
            f"`{name}`='flex' on the CPU is forward-only (PyTorch has no CPU backward for flex_attention): "
            "use 'torch' when gradients are needed, or run under torch.no_grad()"
        )
    return "flex"


__all__ = [
    "BACKENDS",
    "OP_BACKENDS",
    "check_backend",
    "flex_available",
    "interpreting",
    "resolve_backend",
    "triton_available",
]
