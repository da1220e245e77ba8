"""Kernels: pure tensor functions on ``[B, S, H, D]`` tensors, a torch reference beside each Triton kernel.

They know nothing of diffusers. Every op takes ``backend="auto" | "triton" | "flex" | "torch"`` (see
:mod:`attncontrol.kernels.backend`); Triton modules are imported only when a Triton backend runs.

- :func:`linear_attention`: LinFusion's normalized non-causal linear attention (``kernels/linear``);
- :func:`local_window_attention`: CLEAR's 2-D local window with dense text tokens (``kernels/local``);
- :func:`masked_attention`: softmax attention under a grouped (region / key-mask) bias (``kernels/masked``).
"""

from attncontrol.kernels.backend import BACKENDS, check_backend, resolve_backend
from attncontrol.kernels.linear import linear_attention, linear_attention_reference
from attncontrol.kernels.local import local_window_attention, local_window_attention_reference, window_mask
from attncontrol.kernels.masked import grouped_bias_dense, masked_attention, masked_attention_reference

__all__ = [
    "BACKENDS",
    "check_backend",
    "grouped_bias_dense",
    "linear_attention",
    "linear_attention_reference",
    "local_window_attention",
    "local_window_attention_reference",
    "masked_attention",
    "masked_attention_reference",
    "resolve_backend",
    "window_mask",
]
