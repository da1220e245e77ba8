"""Regional prompts and layouts: masked and modulated cross-attention, per-region prompts in one pass.

A :class:`Region` says *where* (a mask, a box or a circle) and *what* (a phrase of the prompt, or its own prompt).
:class:`RegionalAttention` turns a resolved layout into logit biases, so it composes with every other control and
costs no extra denoiser pass:

- ``mode="hard"`` (Regional Prompter / attention couple / PrimeComposer's region-constrained cross-attention): a
  region's text tokens are visible only from image tokens inside the region (and, in Flux's joint attention, those
  text tokens see only image tokens inside it). A region's ``weight`` adds ``log(weight)`` to its tokens' logits
  inside the region, so ``weight`` multiplies their share of attention before normalization; 0 hides them.
- ``mode="soft"`` (DenseDiffusion): logits of a region's tokens are pulled toward the row maximum inside the region
  and toward the row minimum outside it, scaled by ``strength * weight * (1 - progress)^5 * (1 - area)``; self-
  attention between image tokens of the same region is boosted the same way. Weight 0 leaves the model untouched.

Per-region prompts are encoded separately and appended to the base prompt's embeddings
(``[base | region 1 | region 2 ...]``); each region's group is one of its "tokens". The negative/unconditional rows
never see the region groups, so classifier-free guidance keeps its stock unconditional branch.

Stated rules for layouts: outside every region only the base prompt speaks (at full weight); inside a region the
base prompt is scaled by ``base_weight``; where regions overlap, each one's tokens are visible and weighted as if
alone; a token owned by several regions is visible inside their union.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from attncontrol.core.bias import GroupedBias, add_biases
from attncontrol.core.control import AttentionCall, AttentionControl, StepSpec
from attncontrol.core.errors import MaskError, RegionError
from attncontrol.core.layers import LayerSpec
from attncontrol.core.masks import MaskLike, SpatialMask, cells_inside, circle_mask
from attncontrol.core.state import StepState

WeightSpec = Union[float, Sequence[float], Callable[[float], float], torch.Tensor]  # noqa: UP007 - runtime alias
Weight = Union[float, torch.Tensor]  # noqa: UP007 - a tensor when the weights are being optimized
REGION_MODES = ("hard", "soft")


@dataclass(frozen=True)
class Circle:
    """A disc centred at ``center`` (x, y) with ``radius``; pixels, or relative units when all values are <= 1."""

    center: tuple[float, float]
    radius: float


@dataclass
class Region:
    """One region of a layout.

    Args:
        mask: where: a mask image/array/tensor (values in [0, 1]), an ``(x0, y0, x1, y1)`` box in pixels or relative
            units (all values <= 1), or a :class:`Circle` (the Spatial-Temporal paper's centroid + radius).
        phrase: what, as a span of the main prompt ("red circle"); its tokens are tied to the region.
        prompt: what, as the region's own prompt ("a red circle"); encoded separately, tied to the region.
        weight: a number, one number per denoising step, or a function of the progress in [0, 1) (the
            Spatial-Temporal paper's time-varying weights). Must be finite and >= 0. A tensor (0-d, or one value
            per step) stays in the autograd graph, so weights can be optimized against a loss
            (:meth:`attncontrol.pipelines.regional.RegionalMixin.optimize_region_weights`).
    """

    mask: MaskLike | Circle
    phrase: str | None = None
    prompt: str | None = None
    weight: WeightSpec = 1.0

    @classmethod
    def box(cls, box: Sequence[float], **kwargs) -> Region:
        return cls(mask=tuple(float(v) for v in box), **kwargs)

    @classmethod
    def circle(cls, center: tuple[float, float], radius: float, **kwargs) -> Region:
        return cls(mask=Circle(center, radius), **kwargs)


def _check_weight_value(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise RegionError(f"`{name}` must be finite and >= 0, got {value}")
    return value


def _step_position(step: StepState, length: int) -> int:
    """Index into a per-step list; a list made for another step count is read at the same progress."""
    if step.index is None:
        return 0
    if step.num_steps and length != step.num_steps:
        return min(length - 1, int((step.fraction or 0.0) * length))
    return min(step.index, length - 1)


def weight_schedule(spec: WeightSpec, name: str = "weight") -> Callable[[StepState], Weight]:
    """A weight as a function of the step: constants, per-step lists (indexed by step) or ``f(progress)``.

    Tensors (0-d or 1-d per step) are returned as tensors, so gradients flow back to them.
    """
    if isinstance(spec, torch.Tensor):
        if spec.dim() > 1 or spec.numel() == 0:
            raise RegionError(
                f"`{name}` as a tensor must be 0-d or 1-d with one value per step, got {tuple(spec.shape)}"
            )
        values = spec.detach()
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise RegionError(f"`{name}` must be finite and >= 0, got {values.tolist()}")
        if spec.dim() == 0:
            return lambda step: spec
        return lambda step: spec[_step_position(step, spec.numel())]
    if callable(spec):

        def from_function(step: StepState) -> float:
            progress = step.fraction if step.fraction is not None else 0.0
            return _check_weight_value(spec(progress), name)

        return from_function
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = _check_weight_value(spec, name)
        return lambda step: value
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
        values = [_check_weight_value(v, f"{name}[{i}]") for i, v in enumerate(spec)]

        def from_list(step: StepState) -> float:
            return values[_step_position(step, len(values))]

        return from_list
    raise RegionError(f"`{name}` must be a number, a non-empty list of numbers or a function, got {spec!r}")


@dataclass
class ResolvedRegion:
    """A region ready for the control: its mask at image size, the text positions it owns, its weight schedule."""

    mask: SpatialMask
    tokens: list[int]
    weight: Callable[[StepState], Weight]
    group: slice | None = None  # its own prompt's positions (per-region prompts), hidden from unconditional rows
    name: str = "region"
    _inside: dict = field(default_factory=dict, repr=False)

    def inside(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Boolean ``[h * w]``: tokens whose cell is at least half covered; never empty (the best cell at least)."""
        key = (tuple(grid), str(device))
        cached = self._inside.get(key)
        if cached is None:
            cached = cells_inside(self.mask.at(grid, device=device))
            self._inside[key] = cached
        return cached

    @property
    def area(self) -> float:
        return float(self.mask.image.mean())


def region_mask(region: Region, image_size: tuple[int, int], name: str) -> SpatialMask:
    """Rasterize a region's mask at the image size, with errors that name the region."""
    mask = region.mask
    if isinstance(mask, Circle):
        plane = circle_mask(mask.center, mask.radius, image_size)
        if float(plane.max()) <= 0:
            raise MaskError(f"`{name}.mask` circle {mask} covers no pixel of the {image_size[1]}x{image_size[0]} image")
        mask = plane
    return SpatialMask(mask, image_size, name=f"{name}.mask")


class RegionalAttention(AttentionControl):
    """Ties text tokens to image regions through logit biases (see the module docstring for the rules).

    Args:
        regions: resolved regions (``attncontrol.pipelines.regional`` builds them from :class:`Region` s).
        mode: ``"hard"`` masking or ``"soft"`` DenseDiffusion modulation.
        base_weight: weight of the base prompt's tokens inside regions (per-region prompts; schedule allowed).
        base_tokens: positions of the base prompt in the text sequence (needed for ``base_weight``).
        cross_strength / self_strength: DenseDiffusion's lambda for cross- and self-attention (soft mode).
        size_strength: DenseDiffusion's size regularization: large regions are modulated less.
        self_strength: DenseDiffusion's self-attention lambda (image tokens of one region attract each other);
            default 0.3 in soft mode, 0 (off) in hard mode.
        modulation_until: progress in [0, 1] after which the soft modulation stops (DenseDiffusion: 0.3); hard
            masks apply at every step the control is active.
        hide_leaks: for causal text encoders (CLIP): inside a region, also hide the tokens that follow another
            region's phrase (they carry it). Not for T5 (Flux), whose every token sees the whole prompt.
        layers / steps: where the control applies at all.
        kernel_backend: where hard masks run: ``"auto"`` (the Triton region-masked kernel on CUDA, SDPA with the
            spelled-out bias elsewhere), ``"triton"``, ``"flex"`` or ``"torch"``.
    """

    def __init__(
        self,
        regions: Sequence[ResolvedRegion],
        *,
        mode: str = "hard",
        base_weight: WeightSpec = 1.0,
        base_tokens: slice | None = None,
        cross_strength: float = 1.0,
        self_strength: float | None = None,
        size_strength: float = 1.0,
        modulation_until: float = 0.3,
        hide_leaks: bool = False,
        layers: LayerSpec = None,
        steps: StepSpec = None,
        kernel_backend: str = "auto",
    ) -> None:
        if mode not in REGION_MODES:
            raise RegionError(f"`mode` must be one of {REGION_MODES}, got {mode!r}")
        if self_strength is None:
            self_strength = 0.3 if mode == "soft" else 0.0
        super().__init__(layers=layers, steps=steps, kernel_backend=kernel_backend)
        if not regions:
            raise RegionError("`regions` is empty: give at least one region")
        self.regions = list(regions)
        self.mode = mode
        self.base_weight = weight_schedule(base_weight, "base_weight")
        self.base_tokens = base_tokens
        for name, value in (("cross_strength", cross_strength), ("self_strength", self_strength)):
            _check_weight_value(value, name)
        self.cross_strength = float(cross_strength)
        self.self_strength = float(self_strength)
        self.size_strength = float(size_strength)
        self.modulation_until = float(modulation_until)
        self.hide_leaks = bool(hide_leaks)
        # Hard biases and soft layouts depend only on the grid, the rows' roles, the weights of this step and the
        # shapes: layers of one resolution share them, and constant weights make them reusable across steps.
        self._bias_cache: dict = {}

    # ---------------------------------------------------------------- selection
    def applies_to_layer(self, layer) -> bool:
        if not super().applies_to_layer(layer):
            return False
        return layer.kind in ("cross", "joint") or (self.self_strength > 0 and layer.kind == "self")

    # ---------------------------------------------------------------- helpers
    def _rows(self, call: AttentionCall, batch: int) -> tuple[list[int], list[int]]:
        if len(call.batch) != batch:
            return list(range(batch)), []
        return call.batch.rows(guidance="cond"), call.batch.rows(guidance="uncond")

    def _region_groups(self) -> list[slice]:
        return [region.group for region in self.regions if region.group is not None]

    def _membership(self, call: AttentionCall, device: torch.device) -> torch.Tensor:
        """``[image_tokens, regions]`` bool: which regions each image token lies in."""
        return torch.stack([region.inside(call.grid, device) for region in self.regions], dim=1)

    def _owners(self, length: int, device: torch.device) -> torch.Tensor:
        """``[text_tokens, regions]`` bool: which regions own each text token."""
        owners = torch.zeros(length, len(self.regions), dtype=torch.bool, device=device)
        for index, region in enumerate(self.regions):
            owners[[t for t in region.tokens if t < length], index] = True
        return owners

    def _text_block(
        self, call: AttentionCall, inside: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-query x text-key biases of a conditional row for image tokens with region memberships ``inside``
        (``[n, regions]``): the full one (ownership + base weight) and the ownership part alone (0 / log weight /
        -inf on owned tokens), each ``[n, text_tokens]``. They depend on a token only through its membership."""
        text = call.key_segments["text"]
        length = text.stop - text.start
        count = inside.shape[0]
        block = torch.zeros(count, length, device=device)
        step = call.step
        base_weight = self.base_weight(step)
        if self.base_tokens is not None and (isinstance(base_weight, torch.Tensor) or base_weight != 1.0):
            base = self.base_tokens
            block[inside.any(dim=1), base.start : base.stop] += _log(base_weight)
        owners = self._owners(length, device)
        log_weights = torch.stack(
            [torch.as_tensor(_log(region.weight(step)), dtype=torch.float32, device=device) for region in self.regions]
        )
        hidden = leaked_tokens([region.tokens for region in self.regions], length, device) if self.hide_leaks else None
        ownership = ownership_bias(inside, owners, log_weights)
        if hidden is not None:
            block = block + leak_bias(inside, hidden)
        return block + ownership, ownership

    # ---------------------------------------------------------------- hooks
    def logit_bias(
        self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor
    ) -> torch.Tensor | GroupedBias | None:
        """Soft mode: a dense bias (it depends on the logits). Hard mode: a :class:`GroupedBias` (plus the dense
        self-attention modulation where ``self_strength`` asks for it)."""
        soft = self._soft_bias(call, query, key)
        if self.mode == "soft":
            return soft
        return add_biases(self._hard_bias(call, query, key), soft)

    def reset(self) -> None:
        self._bias_cache.clear()

    def _hard_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> GroupedBias | None:
        if "text" not in call.key_segments or "image" not in call.query_segments:
            return None
        weights = _weight_key((*(region.weight(call.step) for region in self.regions), self.base_weight(call.step)))
        cache_key = (
            call.grid,
            tuple(call.batch.roles),
            weights,
            tuple(query.shape),
            key.shape[2],
            tuple(sorted((name, (s.start, s.stop)) for name, s in call.query_segments.items())),
            tuple(sorted((name, (s.start, s.stop)) for name, s in call.key_segments.items())),
            query.dtype,
            str(query.device),
        )
        return self._cached(cache_key, lambda: self._build_hard_bias(call, query, key))

    def _cached(self, key: tuple, build: Callable[[], object]) -> Any:
        """Per-resolution layouts and biases, built once and shared by every layer of that grid."""
        value = self._bias_cache.get(key)
        if value is None:
            if len(self._bias_cache) > 64:
                self._bias_cache.clear()
            value = build()
            self._bias_cache[key] = value
        return value

    def _build_hard_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> GroupedBias:
        """The hard layout as a grouped bias: query rows grouped by batch role (conditional, unconditional, other),
        then by region membership (image queries) or by owning regions and prompt group (joint text queries).

        Spelled out (:meth:`GroupedBias.dense`), it is the ``[B, 1, Sq, Sk]`` bias of the rules in the module
        docstring; kept grouped, it costs O(groups x Sk) and stays on the region-masked kernel.
        """
        batch, device = query.shape[0], query.device
        queries, keys = query.shape[2], key.shape[2]
        cond_rows, uncond_rows = self._rows(call, batch)
        text, image_q = call.key_segments["text"], call.query_segments["image"]
        text_q, image_k = call.query_segments.get("text"), call.key_segments.get("image")
        length = text.stop - text.start
        region_groups = self._region_groups()
        parts = [torch.zeros(1, keys, device=device)]  # group 0: no bias (rows of no role, positions of no segment)

        def next_group() -> int:
            return sum(part.shape[0] for part in parts)

        # Conditional rows, image queries: one group per region membership pattern.
        patterns, pattern_of = torch.unique(self._membership(call, device).to(torch.uint8), dim=0, return_inverse=True)
        block, ownership = self._text_block(call, patterns.bool(), device)
        image_rows = torch.zeros(patterns.shape[0], keys, device=device, dtype=block.dtype)
        image_rows[:, text] = block
        cond = torch.zeros(queries, dtype=torch.long, device=device)
        cond[image_q] = next_group() + pattern_of
        parts.append(image_rows)
        if text_q is not None and image_k is not None:
            # Joint attention: a region's text tokens look only at image tokens inside it (its ownership column),
            # and per-region prompts only at their own tokens; text tokens owned alike and in one prompt share rows.
            labels = self._group_labels(length, region_groups, device)
            signature = torch.cat([self._owners(length, device).long(), labels[:, None]], dim=1)
            signatures, signature_of = torch.unique(signature, dim=0, return_inverse=True)
            first = torch.full((signatures.shape[0],), length, dtype=torch.long, device=device)
            first.scatter_reduce_(0, signature_of, torch.arange(length, device=device), reduce="amin")
            text_rows = torch.zeros(signatures.shape[0], keys, device=device, dtype=ownership.dtype)
            text_rows[:, image_k] = ownership[:, first][pattern_of].T
            if region_groups:
                text_rows[:, text] = torch.where(labels[first][:, None] == labels[None, :], 0.0, float("-inf"))
            cond[text_q] = next_group() + signature_of
            parts.append(text_rows)

        # Unconditional rows: the region prompts' tokens are hidden (except from those tokens themselves).
        uncond = torch.zeros(queries, dtype=torch.long, device=device)
        if uncond_rows and region_groups:
            hidden = torch.zeros(1 + len(region_groups), keys, device=device)
            for group in region_groups:
                hidden[:, text.start + group.start : text.start + group.stop] = float("-inf")
            uncond[:] = first_hidden = next_group()
            for index, group in enumerate(region_groups, start=1):
                # The hidden group's own (unused) rows keep its keys visible so they stay finite.
                hidden[index, text.start + group.start : text.start + group.stop] = 0.0
                if text_q is not None:
                    uncond[text_q.start + group.start : text_q.start + group.stop] = first_hidden + index
            parts.append(hidden)

        groups = torch.zeros(batch, queries, dtype=torch.int32, device=device)
        groups[cond_rows] = cond.to(torch.int32)
        groups[uncond_rows] = uncond.to(torch.int32)
        table = torch.cat(parts)[None, None].to(query.dtype)
        return GroupedBias(groups, table, validate=False)

    @staticmethod
    def _group_labels(length: int, groups: list[slice], device: torch.device) -> torch.Tensor:
        """``[text_tokens]``: 0 for the base prompt, ``i`` for the i-th separately encoded region prompt."""
        labels = torch.zeros(length, dtype=torch.long, device=device)
        for index, group in enumerate(groups, start=1):
            labels[group] = index
        return labels

    def _soft_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """DenseDiffusion: pull logits up to the row max where the layout says "attend", down to the row min elsewhere.

        Image queries only; their text keys use ``cross_strength``, their image keys ``self_strength`` (UNet self-
        attention, and the image part of Flux's joint attention).
        """
        progress = call.step.fraction if call.step.fraction is not None else 0.0
        if progress >= self.modulation_until:
            return None
        time_scale = (1.0 - progress) ** 5
        batch, device = query.shape[0], query.device
        cond_rows, _ = self._rows(call, batch)
        image_q = call.query_segments.get("image")
        if not cond_rows or image_q is None:
            return None
        parts = []
        cross, self_ = self.cross_strength * time_scale, self.self_strength * time_scale
        weights = _weight_key(tuple(region.weight(call.step) for region in self.regions))
        if self.mode == "soft" and "text" in call.key_segments and cross > 0:
            text = call.key_segments["text"]
            cache_key = ("cross", call.grid, text.stop - text.start, weights, str(device))
            layout = self._cached(cache_key, lambda: self._cross_layout(call, device))
            parts.append((text, cross, *layout))
        if "image" in call.key_segments and self_ > 0:
            cache_key = ("self", call.grid, weights, str(device))
            layout = self._cached(cache_key, lambda: self._self_layout(call, device))
            parts.append((call.key_segments["image"], self_, *layout))
        parts = [part for part in parts if bool((part[3] != 0).any())]
        if not parts:
            return None
        q = query[cond_rows][:, :, image_q].float()
        # Row max/min run over every key the row sees, as in DenseDiffusion's full logit rows.
        logits = torch.matmul(q, key[cond_rows].float().transpose(-1, -2)) * call.scale
        row_max = logits.amax(-1, keepdim=True)
        row_min = logits.amin(-1, keepdim=True)
        bias = torch.zeros(batch, query.shape[1], query.shape[2], key.shape[2], device=device)
        for keys, strength, attract, gain in parts:
            block = logits[..., keys]
            pull = torch.where(attract, row_max - block, -(block - row_min))
            bias[cond_rows, :, image_q, keys] = strength * gain * pull
        return bias.to(query.dtype)

    def _cross_layout(self, call: AttentionCall, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (image token, text token): attract or repel, and the gain (weight x size regularization; 0 = free)."""
        text = call.key_segments["text"]
        length = text.stop - text.start
        attract = torch.zeros(call.image_tokens, length, dtype=torch.bool, device=device)
        gain = torch.zeros(call.image_tokens, length, device=device)
        for region in self.regions:
            tokens = [t for t in region.tokens if t < length]
            if not tokens:
                continue
            inside = region.inside(call.grid, device)
            columns = torch.as_tensor(tokens, dtype=torch.long, device=device)
            attract[:, columns] |= inside[:, None]
            value = region.weight(call.step) * max(0.0, 1.0 - self.size_strength * region.area)
            gain[:, columns] = torch.maximum(gain[:, columns], torch.as_tensor(value, device=device))
        return attract, gain

    def _self_layout(self, call: AttentionCall, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (image token, image token): same segment (a region, or the uncovered background) attracts.

        A region's rows are scaled by its weight and size term; background rows by the largest region weight, so
        all-zero weights leave self-attention untouched.
        """
        labels = torch.zeros(call.image_tokens, dtype=torch.long, device=device)
        weights = [region.weight(call.step) for region in self.regions]
        gains = [max(weights)]
        for index, (region, weight) in enumerate(zip(self.regions, weights, strict=True), start=1):
            labels[region.inside(call.grid, device)] = index
            gains.append(weight * max(0.0, 1.0 - self.size_strength * region.area))
        attract = labels[:, None] == labels[None, :]
        row_gain = torch.stack([torch.as_tensor(gain, dtype=torch.float32, device=device) for gain in gains])[labels]
        return attract, row_gain[:, None].expand(-1, call.image_tokens)


def leaked_tokens(
    token_lists: Sequence[Sequence[int]], length: int, device: torch.device | None = None
) -> torch.Tensor:
    """``[length, regions]`` bool: the tokens to hide inside each region for a causal text encoder (CLIP).

    With CLIP, "and a", the end token and the padding after "red circle" all carry "red circle": inside the blue
    square's region they would leak it. Every unowned token from the first token of another region's phrase on is
    hidden there; tokens before every other phrase only know the region's own words.
    """
    hidden = torch.zeros(length, len(token_lists), dtype=torch.bool, device=device)
    owned_anywhere = torch.zeros(length, dtype=torch.bool, device=device)
    for tokens in token_lists:
        owned_anywhere[[t for t in tokens if t < length]] = True
    for index in range(len(token_lists)):
        others = [min(other) for position, other in enumerate(token_lists) if position != index and other]
        if others:
            hidden[min(others) :, index] = True
    return hidden & ~owned_anywhere[:, None]


def hard_text_bias(
    inside: torch.Tensor,
    owners: torch.Tensor,
    hidden: torch.Tensor | None = None,
    *,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The hard-mode rule for image queries over text keys, batched: ``[..., n, tokens]`` logit biases.

    A token owned by regions is visible (bias ``log weight``, the largest over the owning regions the query lies
    in) only from queries inside one of them; ``hidden`` tokens of a region are masked from queries inside it;
    other tokens are untouched. One rule for inference (:class:`RegionalAttention`) and for region-masked training.

    Args:
        inside: ``[..., n, regions]`` bool, which regions each image query lies in.
        owners: ``[..., tokens, regions]`` bool, which regions own each text token.
        hidden: ``[..., tokens, regions]`` bool, tokens masked inside each region (:func:`leaked_tokens`).
        log_weights: ``[..., regions]`` log region weights (default 0: weight 1).
    """
    bias = ownership_bias(inside, owners, log_weights)
    return bias if hidden is None else bias + leak_bias(inside, hidden)


def ownership_bias(inside: torch.Tensor, owners: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ownership half of :func:`hard_text_bias`: 0 / log weight / -inf on owned tokens, 0 elsewhere."""
    allowed = inside[..., :, None, :] & owners[..., None, :, :]  # [..., n, tokens, regions]
    if log_weights is None:
        owned = torch.where(allowed.any(-1), 0.0, float("-inf"))
    else:
        values = log_weights[..., None, None, :].to(torch.float32).expand(allowed.shape)
        owned = torch.where(allowed, values, torch.full_like(values, float("-inf"))).amax(-1)
    return torch.where(owners.any(-1)[..., None, :], owned, torch.zeros_like(owned))


def leak_bias(inside: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The leak half of :func:`hard_text_bias`: -inf where a query lies in a region that hides the token, else 0."""
    masked = (inside[..., :, None, :] & hidden[..., None, :, :]).any(-1)
    return torch.zeros(masked.shape, device=masked.device).masked_fill(masked, float("-inf"))


def _log(weight: Weight) -> Weight:
    if isinstance(weight, torch.Tensor):
        return torch.log(weight)
    return math.log(weight) if weight > 0 else float("-inf")


def _weight_key(weights: tuple[Weight, ...]) -> tuple:
    """Cache key for this step's weights: numbers by value; tensors by storage, offset and version, so an
    optimizer's in-place update (or another step's entry) never reuses a stale bias."""
    return tuple(
        (weight.data_ptr(), weight._version, weight.requires_grad) if isinstance(weight, torch.Tensor) else weight
        for weight in weights
    )
