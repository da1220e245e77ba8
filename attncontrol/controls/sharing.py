"""Attention sharing and steering: a target generation borrows a source generation's attention in the same batch.

One mechanism, four methods:

- :class:`SharedAttention` (MasaCtrl's mutual self-attention, DiffUHaul's sharing, StyleAligned with ``adain``):
  the target rows' image queries attend to a source row's keys and values, instead of (``mode="replace"``) or as
  well as (``mode="concat"``) their own. With masks, sharing is per region: target tokens inside ``target_mask``
  read only the source's tokens inside ``source_mask`` (the object) and every other target token reads only the
  source's other tokens (the background). :class:`ShareRegion` s give any pairing, from several source rows.
- :class:`AnchoredSharing` (DiffUHaul's soft anchoring): early steps blend the shared and the target's own
  attention output with a weight that falls from 1 to 0; late steps keep the target's own attention and copy, for
  each target object token, the attention output of its most similar source object token (localized feature
  passing).
- :class:`CorrelationSteering` (PrimeComposer): in the target rows, the attention logits of the object's tokens
  (their columns: how everyone attends to them; their rows: how they attend to everyone) are overwritten by the
  logits of a correlation pass against the reference object's keys.

Rows are found by branch through the batch layout (``BatchLayout``), one source row per target row, in the same
guidance half and image slot, so these controls compose with regional prompts and key masking in one pass. In
Flux's joint attention only the image keys are shared; text keys stay the target's own.

Which keys each target query may read is a logit bias of ``0`` / ``-inf``. A region whose source tokens vanish at a
coarse grid falls back to any source token it touches; a target query in no region reads its own keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attncontrol.core import compute
from attncontrol.core.control import AttentionCall, AttentionControl, StepSpec
from attncontrol.core.layers import LayerInfo, LayerSpec
from attncontrol.core.masks import MaskLike, SpatialMask
from attncontrol.core.state import check_guidance

SHARE_MODES = ("replace", "concat")
#: MasaCtrl: from step 4 of 50 on (``start_step=4``).
MASACTRL_STEPS = (0.08, 1.0)
#: MasaCtrl's ``start_layer=10`` of SD's 16 transformer blocks is the decoder: the up blocks (and the same blocks of
#: SDXL). Flux has no encoder/decoder split; its joint layers are shared at every block.
MASACTRL_LAYERS = ("up", "dual", "single")
#: PrimeComposer's same-domain ``tau_a = 0.3``: steering during the first 30% of the steps.
PRIMECOMPOSER_STEPS = (0.0, 0.3)


@dataclass(frozen=True)
class ShareRegion:
    """Target image tokens inside ``target_mask`` read the ``source`` rows' image tokens inside ``source_mask``.

    ``None`` masks mean everywhere. Masks are :class:`SpatialMask` s of the generated image's size. The sources'
    keys are appended after the row's own keys in the order the regions first name them (what an attention store
    records for the target rows).
    """

    source: str
    target_mask: SpatialMask | None = None
    source_mask: SpatialMask | None = None


def _spatial(mask: MaskLike | SpatialMask | None, image_size: tuple[int, int] | None, name: str) -> SpatialMask | None:
    if mask is None or isinstance(mask, SpatialMask):
        return mask
    if image_size is None:
        raise ValueError(f"`image_size` is needed to read `{name}` (or pass a SpatialMask)")
    return SpatialMask(mask, image_size, name=name)


def _complement(mask: SpatialMask) -> SpatialMask:
    """``1 - mask``: the background of an object mask."""
    return SpatialMask(1.0 - mask.image, mask.image_size, name=f"1 - {mask.name}", allow_empty=True)


def _pairs(call: AttentionCall, guidance: str | None, target: str, source: str) -> list[tuple[int, int]]:
    """(target row, source row) pairs: same guidance half and image slot."""
    pairs = []
    for row in call.batch.rows(guidance=guidance, branch=target):
        role = call.batch.roles[row]
        matches = [
            index
            for index in call.batch.rows(guidance=role.guidance, branch=source)
            if call.batch.roles[index].image == role.image
        ]
        if matches:
            pairs.append((row, matches[0]))
    return pairs


def _adain(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give ``target`` [H, S, D] the per-channel token mean and std of ``source`` (StyleAligned's AdaIN)."""
    mean_t, std_t = target.mean(-2, keepdim=True), target.std(-2, keepdim=True)
    mean_s, std_s = source.mean(-2, keepdim=True), source.std(-2, keepdim=True)
    return (target - mean_t) / (std_t + 1e-5) * std_s + mean_s


class SharedAttention(AttentionControl):
    """Target rows attend to source rows' keys and values (see the module docstring).

    Args:
        source: branch of the rows shared from (``"source"``), when ``regions`` is not given.
        target: branch of the rows that borrow (``"target"``).
        mode: ``"replace"`` (MasaCtrl: the target reads only the source) or ``"concat"`` (StyleAligned, MasaCtrl's
            union: the source's keys are added to the target's own).
        target_mask / source_mask: the object in the target and in the source; with both, object tokens read the
            source object and all other tokens the source background.
        regions: explicit pairings instead (e.g. background from one row, object from another).
        image_size: ``(height, width)`` of the generated image, to read masks that are not ``SpatialMask`` s.
        adain: normalize the target's queries and keys to the source's statistics first (StyleAligned).
        guidance: ``None`` (both halves, MasaCtrl), ``"cond"`` or ``"uncond"``.
        layers / steps: default MasaCtrl's: decoder self-attention from step 4 of 50.
    """

    def __init__(
        self,
        source: str = "source",
        *,
        target: str = "target",
        mode: str = "replace",
        target_mask: MaskLike | SpatialMask | None = None,
        source_mask: MaskLike | SpatialMask | None = None,
        regions: Sequence[ShareRegion] | None = None,
        image_size: tuple[int, int] | None = None,
        adain: bool = False,
        guidance: str | None = None,
        layers: LayerSpec = MASACTRL_LAYERS,
        steps: StepSpec = MASACTRL_STEPS,
    ) -> None:
        super().__init__(layers=layers, steps=steps)
        if mode not in SHARE_MODES:
            raise ValueError(f"`mode` must be one of {SHARE_MODES}, got {mode!r}")
        check_guidance(guidance)
        target_mask = _spatial(target_mask, image_size, "target_mask")
        source_mask = _spatial(source_mask, image_size, "source_mask")
        if regions is not None:
            if target_mask is not None or source_mask is not None:
                raise ValueError("give either `regions` or `target_mask`/`source_mask`, not both")
            regions = list(regions)
            if not regions or not all(isinstance(region, ShareRegion) for region in regions):
                raise ValueError("`regions` must be a non-empty list of ShareRegion")
        elif (target_mask is None) != (source_mask is None):
            raise ValueError("`target_mask` and `source_mask` go together: where the object is in each row")
        elif target_mask is not None:
            regions = [
                ShareRegion(source, target_mask, source_mask),
                ShareRegion(source, _complement(target_mask), _complement(source_mask)),
            ]
        else:
            regions = [ShareRegion(source)]
        if any(region.source == target for region in regions):
            raise ValueError(f"a row cannot share from its own branch {target!r}")
        self.regions = regions
        self.target = target
        self.mode = mode
        self.adain = adain
        self.guidance = guidance
        self._sources = list(dict.fromkeys(region.source for region in regions))
        self.reset()

    def applies_to_layer(self, layer: LayerInfo) -> bool:
        return layer.kind in ("self", "joint") and super().applies_to_layer(layer)

    # ------------------------------------------------------------------ helpers
    def _row_sources(self, call: AttentionCall) -> list[tuple[int, list[int]]]:
        """Each target row with its source row per source branch (in ``self._sources`` order)."""
        per_branch = [dict(_pairs(call, self.guidance, self.target, branch)) for branch in self._sources]
        rows = []
        for row in call.batch.rows(guidance=self.guidance, branch=self.target):
            if all(row in pairs for pairs in per_branch):
                rows.append((row, [pairs[row] for pairs in per_branch]))
        return rows

    @property
    def _plain_replace(self) -> bool:
        """One source, no masks, replace: a straight swap of K/V, no bias (the dense path stays available)."""
        only = self.regions[0]
        unmasked = only.target_mask is None and only.source_mask is None
        return self.mode == "replace" and len(self.regions) == 1 and unmasked

    def _visible(self, call: AttentionCall, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per region: ``[Sq_img]`` target queries inside it, ``[Sk_img]`` source keys it reads."""
        tokens = call.image_tokens
        queries, keys = [], []
        for region in self.regions:
            inside = (
                torch.ones(tokens, dtype=torch.bool, device=device)
                if region.target_mask is None
                else region.target_mask.at(call.grid, device=device) >= 0.5
            )
            if region.source_mask is None:
                readable = torch.ones(tokens, dtype=torch.bool, device=device)
            else:
                coverage = region.source_mask.at(call.grid, device=device)
                readable = coverage >= 0.5
                if not bool(readable.any()):
                    readable = coverage > 0  # a small object at a coarse grid: any token it touches
            queries.append(inside & bool(readable.any()))
            keys.append(readable)
        return torch.stack(queries), keys

    def _shared_bias(
        self, call: AttentionCall, batch: int, own_keys: int, target_rows: list[int], device: torch.device
    ) -> torch.Tensor:
        """``[B, 1, Sq, Sk + n_sources * Sk_img]``: which of own + appended source keys each query reads."""
        q_image = call.query_segments.get("image")
        k_image = call.key_segments.get("image")
        spans = tuple((span.start, span.stop) if span is not None else None for span in (q_image, k_image))
        key = (call.grid, batch, own_keys, tuple(target_rows), spans, str(device))
        cached = self._bias_cache.get(key)
        if cached is not None:
            return cached
        tokens = call.image_tokens
        total_queries = q_image.stop if q_image is not None else tokens
        length = own_keys + len(self._sources) * tokens
        visible = torch.zeros(batch, total_queries, length, dtype=torch.bool, device=device)
        visible[:, :, :own_keys] = True  # non-target rows and text queries: their own keys only
        in_region, readable = self._visible(call, device)
        q_rows = torch.arange(q_image.start, q_image.stop, device=device) if q_image else torch.arange(tokens)
        q_rows = q_rows.to(device)
        covered = in_region.any(0)
        shared = torch.zeros(tokens, len(self._sources) * tokens, dtype=torch.bool, device=device)
        for region, inside, keys in zip(self.regions, in_region, readable, strict=True):
            start = self._sources.index(region.source) * tokens
            shared[:, start : start + tokens] |= inside[:, None] & keys[None, :]
        own_image = slice(k_image.start, k_image.stop) if k_image else slice(0, own_keys)
        bias = torch.zeros(visible.shape, device=device)
        for row in target_rows:
            if self.mode == "replace":
                # A covered query reads no own image key; text keys (Flux) stay visible.
                block = visible[row, q_rows, own_image.start : own_image.stop]
                visible[row, q_rows, own_image.start : own_image.stop] = block & ~covered[:, None]
            else:
                # Own and shared image keys split the weight the image had, so text keeps its share (Flux) and an
                # identical source changes nothing.
                halve = torch.where(covered, -math.log(2.0), 0.0)[:, None]
                bias[row, q_rows, own_image.start : own_image.stop] += halve
                bias[row, q_rows, own_keys:] += halve
            visible[row, q_rows, own_keys:] = shared
        bias = bias.masked_fill(~visible, float("-inf"))[:, None]
        self._bias_cache[key] = bias
        return bias

    # ------------------------------------------------------------------ hooks
    def edit_qkv(
        self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self._row_sources(call) if len(call.batch) == query.shape[0] else []
        self._active_rows, self._own_keys = rows, None
        if not rows:
            return query, key, value
        k_image = call.key_segments.get("image", slice(0, key.shape[2]))
        q_image = call.query_segments.get("image", slice(0, query.shape[2]))
        if self.adain:
            query, key = query.clone(), key.clone()
            for row, sources in rows:
                query[row, :, q_image] = _adain(query[row, :, q_image], query[sources[0], :, q_image])
                key[row, :, k_image] = _adain(key[row, :, k_image], key[sources[0], :, k_image])
        if self._plain_replace:
            key, value = key.clone(), value.clone()
            for row, sources in rows:
                key[row, :, k_image] = key[sources[0], :, k_image]
                value[row, :, k_image] = value[sources[0], :, k_image]
            return query, key, value
        # Append every source branch's image keys/values to every row; the bias decides who reads them.
        extra_keys, extra_values = [], []
        for index in range(len(self._sources)):
            order = torch.arange(key.shape[0], device=key.device)
            for row, sources in rows:
                order[row] = sources[index]
            extra_keys.append(key[order][:, :, k_image])
            extra_values.append(value[order][:, :, k_image])
        self._own_keys = key.shape[2]
        key, value = torch.cat([key, *extra_keys], dim=2), torch.cat([value, *extra_values], dim=2)
        call.key_segments = {**call.key_segments, "shared": slice(self._own_keys, key.shape[2])}
        return query, key, value

    def logit_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        # Set by edit_qkv of this same call: the processor runs the hooks of one call back to back.
        if not self._active_rows or self._own_keys is None:
            return None
        target_rows = [row for row, _ in self._active_rows]
        return self._shared_bias(call, query.shape[0], self._own_keys, target_rows, query.device)

    def reset(self) -> None:
        self._bias_cache = {}
        self._active_rows: list[tuple[int, list[int]]] = []
        self._own_keys: int | None = None


class AnchoredSharing(SharedAttention):
    """DiffUHaul's soft anchoring on top of masked sharing (see the module docstring).

    Args:
        interpolate_until: progress in [0, 1] until which shared and own attention are blended, the shared weight
            falling linearly from 1 to 0 (the layout forms while appearance comes from the source).
        pass_from: progress from which object tokens copy their nearest source object token's attention output
            (fine detail passes locally, so the object keeps its texture at its new place).
        other arguments: as :class:`SharedAttention` (``target_mask`` and ``source_mask`` are required). Steps and
            layers default to every step and every self-attention layer: the two phases decide what happens when.

    DiffUHaul's own coefficients are not public; these defaults are attncontrol's.
    """

    def __init__(
        self,
        source: str = "source",
        *,
        target_mask: MaskLike | SpatialMask,
        source_mask: MaskLike | SpatialMask,
        interpolate_until: float = 0.5,
        pass_from: float = 0.5,
        layers: LayerSpec = None,
        steps: StepSpec = None,
        **kwargs: object,
    ) -> None:
        if not 0.0 <= interpolate_until <= pass_from <= 1.0:
            raise ValueError(
                f"need 0 <= interpolate_until <= pass_from <= 1, got interpolate_until={interpolate_until}, "
                f"pass_from={pass_from}"
            )
        super().__init__(source, target_mask=target_mask, source_mask=source_mask, layers=layers, steps=steps, **kwargs)
        self.interpolate_until = interpolate_until
        self.pass_from = pass_from
        self._object = self.regions[0]

    def _phase(self, call: AttentionCall) -> str | None:
        fraction = call.step.fraction
        if fraction is None:
            return None
        if fraction < self.interpolate_until:
            return "interpolate"
        if fraction >= self.pass_from:
            return "pass"
        return None

    def applies_at(self, call: AttentionCall) -> bool:
        return super().applies_at(call) and self._phase(call) is not None

    def edit_qkv(
        self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._own = (query, key, value)
        if self._phase(call) == "pass":
            self._active_rows = self._row_sources(call) if len(call.batch) == query.shape[0] else []
            self._own_keys = None
            return query, key, value  # own attention; detail is passed in edit_output
        return super().edit_qkv(call, query, key, value)

    def logit_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        if self._phase(call) == "pass":
            return None
        return super().logit_bias(call, query, key)

    def edit_output(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        rows = self._active_rows
        if not rows:
            return output
        query, key, value = self._own
        q_image = call.query_segments.get("image", slice(0, query.shape[2]))
        output = output.clone()
        if self._phase(call) == "interpolate":
            weight = 1.0 - call.step.fraction / self.interpolate_until if self.interpolate_until > 0 else 0.0
            targets = [row for row, _ in rows]
            own = compute.attention(query[targets], key[targets], value[targets], scale=call.scale)
            output[targets] = weight * output[targets] + (1.0 - weight) * own
            return output
        target_inside = self._object.target_mask.at(call.grid, device=output.device) >= 0.5
        source_inside = self._object.source_mask.at(call.grid, device=output.device) >= 0.5
        if not bool(target_inside.any()) or not bool(source_inside.any()):
            return output
        offset = q_image.start
        t_index = torch.nonzero(target_inside).flatten() + offset
        s_index = torch.nonzero(source_inside).flatten() + offset
        for row, sources in rows:
            source = sources[0]
            target_q = torch.nn.functional.normalize(query[row, :, t_index].float(), dim=-1)
            source_q = torch.nn.functional.normalize(query[source, :, s_index].float(), dim=-1)
            nearest = (target_q @ source_q.transpose(-1, -2)).argmax(-1)  # [H, n_target]
            picked = torch.gather(output[source][:, s_index], 1, nearest[..., None].expand(-1, -1, output.shape[-1]))
            output[row][:, t_index] = picked
        return output


class CorrelationSteering(AttentionControl):
    """PrimeComposer's attention steering: object rows and columns of the target's logits come from a correlation
    pass against the reference object's keys.

    The reference row holds the reference object at the same place and size as in the target (the composition
    pipeline transforms the reference image so), so object token ``j`` of the target corresponds to object token
    ``j`` of the reference. With ``S = Q_corr K_ref[obj]^T * scale`` (all queries x object tokens), the target's
    logits become ``logits[:, obj] = S`` (columns) and then ``logits[obj, image] = S^T`` (rows), as the paper's
    code writes them, before the softmax. Applied as an additive bias (desired - current logits).

    Args:
        object_mask: the object's place in the target (and in the reference).
        image_size: needed unless ``object_mask`` is a ``SpatialMask``.
        reference / target: branches of the reference and target rows.
        correlation: branch whose queries form the correlation pass; ``None`` uses the target rows' own queries.
            PrimeComposer's correlation pass denoises the background with the generator's current object pasted
            in, which is what the composition pipeline's target row holds while it is blended, so no extra pass is
            needed; name a branch to run a separate one.
        guidance: ``"cond"`` (the paper steers the conditional half).
        layers / steps: default every self-attention layer, the first 30% of the steps (``tau_a = 0.3``).
    """

    def __init__(
        self,
        object_mask: MaskLike | SpatialMask,
        *,
        image_size: tuple[int, int] | None = None,
        reference: str = "reference",
        target: str = "target",
        correlation: str | None = None,
        guidance: str | None = "cond",
        layers: LayerSpec = None,
        steps: StepSpec = PRIMECOMPOSER_STEPS,
    ) -> None:
        super().__init__(layers=layers, steps=steps)
        check_guidance(guidance)
        if reference == target:
            raise ValueError("`reference` and `target` must be different branches")
        self.object_mask = _spatial(object_mask, image_size, "object_mask")
        self.reference = reference
        self.target = target
        self.correlation = correlation
        self.guidance = guidance

    def applies_to_layer(self, layer: LayerInfo) -> bool:
        return layer.kind in ("self", "joint") and super().applies_to_layer(layer)

    def logit_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        if len(call.batch) != query.shape[0]:
            return None
        inside = self.object_mask.at(call.grid, device=query.device) >= 0.5
        if not bool(inside.any()):
            return None
        pairs = _pairs(call, self.guidance, self.target, self.reference)
        if not pairs:
            return None
        correlation = dict(_pairs(call, self.guidance, self.target, self.correlation)) if self.correlation else {}
        q_image = call.query_segments.get("image", slice(0, query.shape[2]))
        k_image = call.key_segments.get("image", slice(0, key.shape[2]))
        q_obj = torch.nonzero(inside).flatten() + q_image.start
        k_obj = torch.nonzero(inside).flatten() + k_image.start
        k_img = torch.arange(k_image.start, k_image.stop, device=query.device)
        bias = torch.zeros(query.shape[0], query.shape[1], query.shape[2], key.shape[2], device=query.device)
        for row, reference in pairs:
            queries = query[correlation.get(row, row)].float()  # [H, Sq, D]
            current = torch.matmul(query[row].float(), key[row].float().transpose(-1, -2)) * call.scale
            # S: every correlation query against the reference object's keys, [H, Sq, n_obj].
            steered = torch.matmul(queries, key[reference][:, k_obj].float().transpose(-1, -2)) * call.scale
            desired = current.clone()
            desired[:, :, k_obj] = steered
            # Rows: object token j attends to image key i with S[i, j] (queries and keys share the image tokens).
            desired[:, q_obj[:, None], k_img[None, :]] = steered[:, q_image.start : q_image.stop].transpose(-1, -2)
            bias[row] = desired - current
        return bias
