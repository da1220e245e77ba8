"""Controlled attention processors: one per attention family, each running a chain of controls.

With no control active they compute exactly what the stock diffusers processor computes (same projections, same
SDPA / dispatcher call), so installing attncontrol changes nothing until a control says so. The control chain itself
lives in :meth:`ControlledProcessor._attend`, shared by all families; the family classes only differ in how they
project, order (Flux: text first; SD3: image first) and split tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.models.embeddings import apply_rotary_emb

from attncontrol.core import compute
from attncontrol.core.bias import add_biases
from attncontrol.core.control import AttentionCall, AttentionControl
from attncontrol.core.errors import ControllerStateError
from attncontrol.core.layers import LayerInfo

if TYPE_CHECKING:
    from attncontrol.core.controller import AttentionController


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Stock attention masks are either boolean (True = keep) or additive floats; controls add floats."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _kernel_backend(controls: list[AttentionControl], layer: LayerInfo) -> str:
    """The kernel backend the active controls agree on: ``auto`` unless some name one (they must name the same)."""
    named = {control.kernel_backend for control in controls} - {"auto"}
    if len(named) > 1:
        raise ControllerStateError(
            f"the controls at layer {layer.name} ask for different kernel backends {sorted(named)}: "
            "set the same `kernel_backend` on them (or leave all but one at 'auto')"
        )
    return named.pop() if named else "auto"


class ControlledProcessor:
    """Shared state and control chain of the family processors.

    Args:
        controller: owner of the step, grid and batch state this processor reads.
        layer: the layer this processor instance serves.
        controls: controls whose layer selection includes ``layer``, in run order.
    """

    # diffusers' ``set_attention_backend`` only switches processors that carry these attributes.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, controller: AttentionController, layer: LayerInfo, controls: list[AttentionControl]) -> None:
        self.controller = controller
        self.layer = layer
        self.controls = controls

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ for c in self.controls)
        return f"{type(self).__name__}({self.layer.name}, controls=[{names}])"

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float | None,
        attn_mask: torch.Tensor | None,
        query_segments: dict[str, slice] | None = None,
        key_segments: dict[str, slice] | None = None,
        grid: tuple[int, int] | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the control chain on ``[B, H, S, D]`` tensors and return ``[B, H, Sq, D]``."""
        bias = _mask_to_bias(attn_mask, query.dtype)
        call, active, probs_hook = None, [], None
        if self.controls:
            controller = self.controller
            call = AttentionCall(
                layer=self.layer,
                step=controller.step,
                batch=controller.batch_layout,
                grid=grid if grid is not None else self.layer.grid(controller.base_grid),
                query_segments=query_segments or {},
                key_segments=key_segments or {},
                heads=query.shape[1],
                scale=scale if scale is not None else query.shape[-1] ** -0.5,
                hidden_states=hidden_states,
            )
            active = [control for control in self.controls if control.applies_at(call)]
        if active:
            for control in active:
                query, key, value = control.edit_qkv(call, query, key, value)
            for control in active:
                bias = add_biases(bias, control.logit_bias(call, query, key))
            probs_controls = [control for control in active if control.wants_probs(call)]
            if probs_controls:

                def probs_hook(probs: torch.Tensor) -> torch.Tensor:
                    # Every edit happens before any observation, so observers see what the layer really uses.
                    for control in probs_controls:
                        probs = control.edit_probs(call, probs)
                    for control in probs_controls:
                        control.observe(call, probs)
                    return probs

        out = None
        for control in active:
            computed = control.compute(call, query, key, value, bias)
            if computed is None:
                continue
            if out is not None:
                raise ControllerStateError(
                    f"two controls compute attention at layer {self.layer.name}; at most one may replace it"
                )
            if probs_hook is not None:
                raise ControllerStateError(
                    f"{type(control).__name__} computes attention at layer {self.layer.name} without probabilities, "
                    "but another control there needs them (an attention store?): select other layers for one of them"
                )
            out = computed
        if out is None:
            out = compute.attention(
                query,
                key,
                value,
                scale=scale,
                bias=bias,
                probs_hook=probs_hook,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
                kernel_backend=_kernel_backend(active, self.layer),
            )
        for control in active:
            out = control.edit_output(call, out)
        return out


class UNetAttnProcessor(ControlledProcessor):
    """Controlled twin of ``AttnProcessor2_0`` for the UNet ``Attention`` of SD 1.x/2.x and SDXL."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        num_queries, num_keys = query.shape[2], key.shape[2]
        hidden_states = self._attend(
            query,
            key,
            value,
            scale=attn.scale,
            attn_mask=attention_mask,
            query_segments={"image": slice(0, num_queries)},
            key_segments={"text" if is_cross else "image": slice(0, num_keys)},
            hidden_states=hidden_states,
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FluxJointAttnProcessor(ControlledProcessor):
    """Controlled twin of diffusers' ``FluxAttnProcessor``: dual-stream and single-stream blocks, text tokens first."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        dual_stream = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if dual_stream:
            if attn.fused_projections:
                text_q, text_k, text_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_q = attn.add_q_proj(encoder_hidden_states)
                text_k = attn.add_k_proj(encoder_hidden_states)
                text_v = attn.add_v_proj(encoder_hidden_states)
            text_q = attn.norm_added_q(text_q.unflatten(-1, (-1, attn.head_dim)))
            text_k = attn.norm_added_k(text_k.unflatten(-1, (-1, attn.head_dim)))
            text_v = text_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        segments = grid = None
        if self.controls:
            grid = self.layer.grid(self.controller.base_grid)
            total = query.shape[1]
            text_len = encoder_hidden_states.shape[1] if dual_stream else total - grid[0] * grid[1]
            segments = {"text": slice(0, text_len), "image": slice(text_len, total)}
        hidden_states = self._attend(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            scale=None,
            attn_mask=attention_mask,
            query_segments=segments,
            key_segments=segments,
            grid=grid,
        )
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if not dual_stream:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class SD3JointAttnProcessor(ControlledProcessor):
    """Controlled twin of ``JointAttnProcessor2_0`` (SD3/SD3.5): image tokens first, then text."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The stock processor ignores ``attention_mask``; so do we, to stay equivalent.
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        def heads_first(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = attn.to_k(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = heads_first(attn.to_q(hidden_states))
        key = heads_first(key)
        value = heads_first(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        num_image = query.shape[2]
        if encoder_hidden_states is not None:
            text_q = heads_first(attn.add_q_proj(encoder_hidden_states))
            text_k = heads_first(attn.add_k_proj(encoder_hidden_states))
            text_v = heads_first(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query = torch.cat([query, text_q], dim=2)
            key = torch.cat([key, text_k], dim=2)
            value = torch.cat([value, text_v], dim=2)

        total = query.shape[2]
        segments = {"image": slice(0, num_image)}
        if total > num_image:
            segments["text"] = slice(num_image, total)
        hidden_states = self._attend(
            query, key, value, scale=attn.scale, attn_mask=None, query_segments=segments, key_segments=segments
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


PROCESSOR_CLASSES: dict[str, type[ControlledProcessor]] = {
    "unet": UNetAttnProcessor,
    "flux": FluxJointAttnProcessor,
    "sd3": SD3JointAttnProcessor,
}
