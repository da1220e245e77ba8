"""FlexAttention plumbing shared by the ops that offer a ``flex`` backend.

On CUDA ``flex_attention`` is only fast compiled (PyTorch warns that eager materializes the scores), so it is
compiled once per process; on the CPU it runs eagerly (forward only), which is what the tests use as a second,
independent reference.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch


@functools.cache
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_bhsd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    score_mod: Callable | None = None,
    block_mask: object | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``flex_attention`` on ``[B, H, S, D]``: compiled on CUDA, eager (quiet about it) on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda:
        return _compiled()(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)
    if not torch.is_grad_enabled():  # flex refuses CPU inputs that require grad, even under no_grad
        query, key, value = query.detach(), key.detach(), value.detach()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)
