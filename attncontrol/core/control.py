"""The control protocol: what a method may do to one attention call, and where it applies.

A processor runs the active controls of a call in a fixed order:

1. ``edit_qkv``    share, inject or key-mask queries/keys/values;
2. ``logit_bias``  additive logit bias (region masks, modulation): a dense tensor, or a
                   :class:`~attncontrol.core.bias.GroupedBias` when the bias is constant over groups of queries (it
                   then stays on the fused region-masked kernel); biases of several controls add up;
3. ``edit_probs``  rewrite probabilities (only if ``wants_probs`` says so: forces the explicit path);
4. ``observe``     read the final probabilities (attention maps);
5. ``edit_output`` rewrite the attention output before the output projection.

A control may also ``compute`` the attention itself (linear attention, a local-window kernel) instead of softmax
attention: at most one per call, and not where another control needs the probabilities.

Controls compose: several run in one processor in one denoiser pass.

Every control carries a ``kernel_backend`` (``"auto" | "triton" | "flex" | "torch"``, default ``"auto"``): the
backend of the kernels it runs itself (linear attention, the local window) and its vote for the processor's biased
attention. Explicit choices of the controls active in one call must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attncontrol.core.bias import GroupedBias
from attncontrol.core.layers import LayerInfo, LayerSpec, make_layer_filter
from attncontrol.core.state import BatchLayout, StepState
from attncontrol.kernels.backend import check_backend

StepSpec = None | tuple[int, int] | tuple[float, float] | Callable[[StepState], bool]


@dataclass
class AttentionCall:
    """Everything a control may need to know about one attention call.

    Attributes:
        layer: the layer being run.
        step: the sampler's step state at this call.
        batch: roles of the batch rows.
        grid: (height, width) of this layer's image-token grid.
        query_segments / key_segments: where image and text tokens sit in the query and key sequences
            (``{"image": slice, "text": slice}``; UNet cross-attention keys are all text, self-attention all image).
            A control that concatenates extra keys must extend ``key_segments``.
        heads: number of attention heads.
        scale: the logit scale the layer uses.
        hidden_states: the layer's input as its query projection saw it, ``[B, S, C]`` (UNet layers; ``None`` for
            the joint-attention families), for controls that re-project it (LinFusion's query/key MLPs).
    """

    layer: LayerInfo
    step: StepState
    batch: BatchLayout
    grid: tuple[int, int]
    query_segments: dict[str, slice]
    key_segments: dict[str, slice]
    heads: int
    scale: float
    hidden_states: torch.Tensor | None = None

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def _make_step_filter(spec: StepSpec) -> Callable[[StepState], bool]:
    if spec is None:
        return lambda step: True
    if callable(spec):
        return spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise TypeError(f"`steps` must be None, a (start, end) pair or a callable, got {spec!r}")
    start, end = spec
    if isinstance(start, float) or isinstance(end, float):
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"`steps` fractions must satisfy 0 <= start <= end <= 1, got {spec!r}")

        def in_fraction(step: StepState) -> bool:
            fraction = step.fraction
            return fraction is not None and start <= fraction < end

        return in_fraction
    if start < 0 or end < start:
        raise ValueError(f"`steps` indices must satisfy 0 <= start <= end, got {spec!r}")
    return lambda step: step.index is not None and start <= step.index < end


class AttentionControl:
    """Base class of every control. Override the hooks you need; the defaults change nothing.

    Args:
        layers: where the control applies (see :func:`attncontrol.core.layers.make_layer_filter`). Default: all.
        steps: ``(start, end)`` step indices (end exclusive), ``(0.0, 0.5)``-style fractions of the schedule, or a
            callable on :class:`StepState`. Default: every step.
        kernel_backend: ``"auto" | "triton" | "flex" | "torch"``: which kernels run this control's attention (see
            the module docstring and :mod:`attncontrol.kernels.backend`). Also settable as an attribute.
    """

    _kernel_backend = "auto"

    def __init__(self, *, layers: LayerSpec = None, steps: StepSpec = None, kernel_backend: str = "auto") -> None:
        self._layer_filter = make_layer_filter(layers)
        self._step_filter = _make_step_filter(steps)
        self.kernel_backend = kernel_backend

    @property
    def kernel_backend(self) -> str:
        return self._kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, value: str) -> None:
        self._kernel_backend = check_backend(value, "kernel_backend")

    def applies_to_layer(self, layer: LayerInfo) -> bool:
        """Static part of the selection, evaluated once per layer at install time."""
        return self._layer_filter(layer)

    def applies_at(self, call: AttentionCall) -> bool:
        """Dynamic part of the selection, evaluated per call."""
        return self._step_filter(call.step)

    def wants_probs(self, call: AttentionCall) -> bool:
        """Whether ``edit_probs``/``observe`` must see explicit probabilities at this call."""
        return False

    def edit_qkv(
        self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return query, key, value

    def logit_bias(
        self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor
    ) -> torch.Tensor | GroupedBias | None:
        return None

    def compute(
        self,
        call: AttentionCall,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | GroupedBias | None,
    ) -> torch.Tensor | None:
        """Compute the attention output ``[B, H, Sq, Dv]`` instead of softmax attention, or ``None`` to leave it to
        the processor. ``bias`` is what the other controls asked for; a control that cannot honour it must raise."""
        return None

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        return None

    def edit_output(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        return output

    def reset(self) -> None:
        """Forget per-generation state; the controller calls it when a new generation starts."""
        return None
