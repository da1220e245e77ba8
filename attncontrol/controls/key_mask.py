"""Key-masking self-attention (DesignEdit): fill a hole from its surroundings by hiding the hole's own keys.

Inside the masked region the image still holds the object to be removed. If the region's queries could attend to
its keys, every step would rebuild the object; with those keys hidden, each token of the image (the hole included)
only reads the context around the hole, so the hole fills with background. DesignEdit applies this to every
self-attention layer of the background row for most of the schedule (steps 1..39 of 50) and lets the last steps run
normally to blend the seams.

``target`` picks what is masked, for the comparison the paper ablates:

- ``"key"`` (default): a logit bias ``log(1 - m)`` per key, so keys inside the mask get exactly zero attention weight
  and soft mask edges scale a key's weight by its uncovered fraction;
- ``"key-zero"``: the paper code's literal form, keys multiplied by ``1 - m`` (logits of masked keys become 0, not
  ``-inf``: they keep a small weight);
- ``"query"``: queries multiplied by ``1 - m`` (the paper reports blur);
- ``"value"``: values multiplied by ``1 - m`` (the paper reports distortion).

For Flux's joint attention only the image keys are masked; text keys stay visible.
"""

from __future__ import annotations

import torch

from attncontrol.core.bias import GroupedBias
from attncontrol.core.control import AttentionCall, AttentionControl, StepSpec
from attncontrol.core.layers import LayerInfo, LayerSpec
from attncontrol.core.masks import MaskLike, SpatialMask
from attncontrol.core.state import check_guidance

KEY_MASK_TARGETS = ("key", "key-zero", "query", "value")

#: DesignEdit's active steps: counter 1..39 of 50 (``mask_time=[0, 40]``, exclusive), as fractions of the schedule.
DESIGNEDIT_KEY_MASK_STEPS = (0.02, 0.8)


class KeyMaskedSelfAttention(AttentionControl):
    """Hide a region's image tokens from self-attention (or joint attention) in some batch rows.

    Args:
        mask: the region to hide, anything :class:`attncontrol.SpatialMask` accepts, or a ready ``SpatialMask``.
        image_size: ``(height, width)`` of the generated image (needed unless ``mask`` is a ``SpatialMask``).
        target: ``"key"``, ``"key-zero"``, ``"query"`` or ``"value"`` (see the module docstring).
        guidance: which guidance half is masked: ``"cond"`` (DesignEdit), ``"uncond"`` or ``None`` for both.
        branch: which branch's rows are masked (``None``: every branch).
        refine_mask: an extra region hidden only while ``refine_until`` has not passed (DesignEdit's artifact
            suppression: an outline around leftovers of the object, masked during the first half).
        refine_until: progress in [0, 1] after which only ``mask`` is hidden (DesignEdit: 25 of 50 steps).
        layers: where it applies; default every self-attention (UNet) or joint attention (Flux, SD3) layer.
        steps: when it applies; default DesignEdit's steps 1..39 of 50 as fractions.
        kernel_backend: where ``target="key"`` runs: ``"auto"`` (the Triton region-masked kernel on CUDA, SDPA
            elsewhere), ``"triton"``, ``"flex"`` or ``"torch"``.
    """

    def __init__(
        self,
        mask: MaskLike | SpatialMask,
        *,
        image_size: tuple[int, int] | None = None,
        target: str = "key",
        guidance: str | None = "cond",
        branch: str | None = None,
        refine_mask: MaskLike | SpatialMask | None = None,
        refine_until: float = 0.5,
        layers: LayerSpec = None,
        steps: StepSpec = DESIGNEDIT_KEY_MASK_STEPS,
        kernel_backend: str = "auto",
    ) -> None:
        super().__init__(layers=layers, steps=steps, kernel_backend=kernel_backend)
        if target not in KEY_MASK_TARGETS:
            raise ValueError(f"`target` must be one of {KEY_MASK_TARGETS}, got {target!r}")
        check_guidance(guidance)
        if not 0.0 <= refine_until <= 1.0:
            raise ValueError(f"`refine_until` must be in [0, 1], got {refine_until}")
        self.mask = self._spatial(mask, image_size, "mask")
        self.refine_mask = None if refine_mask is None else self._spatial(refine_mask, image_size, "refine_mask")
        self.target = target
        self.guidance = guidance
        self.branch = branch
        self.refine_until = refine_until
        self._keep_cache: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _spatial(mask: MaskLike | SpatialMask, image_size: tuple[int, int] | None, name: str) -> SpatialMask:
        if isinstance(mask, SpatialMask):
            return mask
        if image_size is None:
            raise ValueError(f"`image_size` is needed to read `{name}` (or pass a SpatialMask)")
        return SpatialMask(mask, image_size, name=name)

    def applies_to_layer(self, layer: LayerInfo) -> bool:
        return layer.kind in ("self", "joint") and super().applies_to_layer(layer)

    def _rows(self, call: AttentionCall) -> list[int]:
        return call.batch.rows(guidance=self.guidance, branch=self.branch)

    def _keep(self, call: AttentionCall, tokens: int, segment: slice, like: torch.Tensor) -> torch.Tensor:
        """``[B, 1, tokens, 1]``: 1 - coverage on the image tokens of the masked rows, 1 elsewhere.

        Built once per resolution, row layout and refine phase, then shared by every layer and step that matches.
        """
        fraction = call.step.fraction
        refining = self.refine_mask is not None and fraction is not None and fraction < self.refine_until
        rows = self._rows(call)
        key = (call.grid, tuple(rows), like.shape[0], tokens, segment.start, segment.stop, like.device, like.dtype)
        key += (refining,)
        keep = self._keep_cache.get(key)
        if keep is None:
            keep = torch.ones(like.shape[0], 1, tokens, 1, device=like.device, dtype=like.dtype)
            if rows:
                coverage = self.mask.at(call.grid, device=like.device)
                if refining:
                    coverage = torch.maximum(coverage, self.refine_mask.at(call.grid, device=like.device))
                keep[rows, 0, segment, 0] = 1.0 - coverage.to(like.dtype)
            self._keep_cache[key] = keep
        return keep

    def edit_qkv(
        self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.target == "key":
            return query, key, value
        if self.target == "query":
            segment = call.query_segments.get("image", slice(0, query.shape[2]))
            return query * self._keep(call, query.shape[2], segment, query), key, value
        segment = call.key_segments.get("image", slice(0, key.shape[2]))
        if self.target == "key-zero":
            return query, key * self._keep(call, key.shape[2], segment, key), value
        return query, key, value * self._keep(call, value.shape[2], segment, value)

    def logit_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> GroupedBias | None:
        if self.target != "key" or not self._rows(call):
            return None
        segment = call.key_segments.get("image", slice(0, key.shape[2]))
        keep = self._keep(call, key.shape[2], segment, key.float())
        # [B, 1, Sk, 1] -> [B, 1, 1, Sk]: one bias row for every query (a grouped bias with one group, so it stays on
        # the region-masked kernel); log(0) = -inf hides a key completely.
        return GroupedBias.key_bias(torch.log(keep).transpose(-1, -2), query.shape[2])

    def reset(self) -> None:
        self._keep_cache = {}
