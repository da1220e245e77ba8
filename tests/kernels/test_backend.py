"""The backend switch: what ``auto`` picks, and clear errors naming the argument for every impossible choice."""

from __future__ import annotations

import pytest
import torch

from attncontrol.kernels import backend as backends
from attncontrol.kernels.backend import BACKENDS, resolve_backend


def test_auto_is_torch_on_the_cpu_even_under_the_interpreter():
    assert backends.interpreting()  # tests/conftest.py sets TRITON_INTERPRET=1
    tensor = torch.randn(2, 3)
    for op in ("linear", "local", "masked"):
        assert resolve_backend("auto", op, tensor) == "torch"


def test_explicit_choices_on_the_cpu():
    tensor = torch.randn(2, 3)
    assert resolve_backend("triton", "masked", tensor) == "triton"  # the interpreter runs it
    assert resolve_backend("torch", "masked", tensor) == "torch"
    assert resolve_backend("flex", "local", tensor) == "flex"  # forward-only on the CPU
    with pytest.raises(ValueError, match="forward-only"):
        resolve_backend("flex", "masked", tensor.requires_grad_())
    with torch.no_grad():
        assert resolve_backend("flex", "masked", tensor) == "flex"


def test_errors_name_the_argument():
    tensor = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        resolve_backend("cuda", "masked", tensor)
    with pytest.raises(ValueError, match=r"`kernel_backend` must be one of"):
        resolve_backend("fast", "masked", tensor, name="kernel_backend")
    with pytest.raises(ValueError, match="no flex implementation"):
        resolve_backend("flex", "linear", tensor)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        resolve_backend("triton", "linear", tensor.double())
    with pytest.raises(ValueError, match="unknown kernel op"):
        resolve_backend("auto", "conv", tensor)
    assert resolve_backend("auto", "linear", tensor.double()) == "torch"  # auto never fails


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", "linear", torch.randn(2))


def test_backends_list():
    assert BACKENDS == ("auto", "triton", "flex", "torch")
