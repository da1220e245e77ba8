"""Kernel tests run with deterministic algorithms on, so every ``torch.empty`` buffer starts as NaN (ints at their
maximum): a kernel that leaves part of an output or partial buffer unwritten shows up as NaN in the comparison."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def nan_filled_buffers():
    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = fill
