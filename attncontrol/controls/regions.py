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

from attncontrol.core.control import AttentionCall, AttentionControl, StepSpec
from attncontrol.core.errors import MaskError, RegionError
from attncontrol.core.layers import LayerSpec
from attncontrol.core.masks import MaskLike, SpatialMask, circle_mask
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
            coverage = self.mask.at(grid, device=device)
            cached = coverage >= 0.5
            if not bool(cached.any()):
                cached = coverage >= coverage.max()
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
    ) -> None:
        if mode not in REGION_MODES:
            raise RegionError(f"`mode` must be one of {REGION_MODES}, got {mode!r}")
        if self_strength is None:
            self_strength = 0.3 if mode == "soft" else 0.0
        super().__init__(layers=layers, steps=steps)
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

    def _text_block(self, call: AttentionCall, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``[image_tokens, text_tokens]`` biases for image queries x text keys of a conditional row: the full one
        (ownership + base weight) and the ownership part alone (0 / log weight / -inf on owned tokens)."""
        text = call.key_segments["text"]
        length = text.stop - text.start
        block = torch.zeros(call.image_tokens, length, device=device)
        step = call.step
        base_weight = self.base_weight(step)
        if self.base_tokens is not None and (isinstance(base_weight, torch.Tensor) or base_weight != 1.0):
            inside_any = torch.zeros(call.image_tokens, dtype=torch.bool, device=device)
            for region in self.regions:
                inside_any |= region.inside(call.grid, device)
            base = self.base_tokens
            block[inside_any, base.start : base.stop] += _log(base_weight)
        owned = torch.full((call.image_tokens, length), float("-inf"), device=device)
        is_owned = torch.zeros(length, dtype=torch.bool, device=device)
        for region in self.regions:
            tokens = torch.as_tensor([t for t in region.tokens if t < length], dtype=torch.long, device=device)
            if tokens.numel() == 0:
                continue
            inside = region.inside(call.grid, device)
            value = torch.where(inside, _log(region.weight(step)), float("-inf"))[:, None]
            owned[:, tokens] = torch.maximum(owned[:, tokens], value.expand(-1, tokens.numel()))
            is_owned[tokens] = True
        ownership = torch.where(is_owned[None, :], owned, torch.zeros_like(owned))
        if self.hide_leaks:
            block = block + self._leak_bias(call, length, device)
        return block + ownership, ownership

    def _leak_bias(self, call: AttentionCall, length: int, device: torch.device) -> torch.Tensor:
        """Inside a region, hide the unowned tokens a causal encoder wrote after another region's phrase.

        With CLIP, "and a", the end token and the padding after "red circle" all carry "red circle": they would
        leak it into the blue square's region. Tokens before every other phrase only know the region's own words.
        """
        bias = torch.zeros(call.image_tokens, length, device=device)
        owned_anywhere = torch.zeros(length, dtype=torch.bool, device=device)
        for region in self.regions:
            owned_anywhere[[t for t in region.tokens if t < length]] = True
        for region in self.regions:
            others = [min(other.tokens) for other in self.regions if other is not region and other.tokens]
            if not others:
                continue
            leaked = torch.zeros(length, dtype=torch.bool, device=device)
            leaked[min(others) :] = True
            leaked &= ~owned_anywhere
            inside = region.inside(call.grid, device)
            bias[inside[:, None] & leaked[None, :]] = float("-inf")
        return bias

    # ---------------------------------------------------------------- hooks
    def logit_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        soft = self._soft_bias(call, query, key)
        if self.mode == "soft":
            return soft
        hard = self._hard_bias(call, query, key)
        if hard is None or soft is None:
            return hard if soft is None else soft
        return hard + soft

    def reset(self) -> None:
        self._bias_cache.clear()

    def _hard_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
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

    def _build_hard_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        batch, device = query.shape[0], query.device
        cond_rows, uncond_rows = self._rows(call, batch)
        text, image_q = call.key_segments["text"], call.query_segments["image"]
        bias = torch.zeros(batch, 1, query.shape[2], key.shape[2], device=device)
        block, ownership = self._text_block(call, device)
        bias[cond_rows, :, image_q, text] = block
        text_q = call.query_segments.get("text")
        image_k = call.key_segments.get("image")
        if text_q is not None and image_k is not None:
            # Joint attention: a region's text tokens look only at image tokens inside it (same ownership, transposed).
            bias[cond_rows, :, text_q, image_k] = ownership.T
            groups = self._region_groups()
            if groups:
                bias[cond_rows, :, text_q, text] = self._group_isolation(text.stop - text.start, groups, device)
        self._hide_groups(bias, uncond_rows, call)
        return bias.to(query.dtype)

    def _group_isolation(self, length: int, groups: list[slice], device: torch.device) -> torch.Tensor:
        """Text-to-text bias: each separately encoded prompt attends only within itself, like its own encoder."""
        labels = torch.zeros(length, dtype=torch.long, device=device)
        for index, group in enumerate(groups, start=1):
            labels[group] = index
        same = labels[:, None] == labels[None, :]
        return torch.where(same, 0.0, float("-inf"))

    def _hide_groups(self, bias: torch.Tensor, rows: list[int], call: AttentionCall) -> None:
        groups = self._region_groups()
        if not rows or not groups:
            return
        text = call.key_segments["text"]
        for group in groups:
            columns = slice(text.start + group.start, text.start + group.stop)
            bias[rows, :, :, columns] = float("-inf")
            text_q = call.query_segments.get("text")
            if text_q is not None:
                # The hidden group's own (unused) rows keep one visible key so they stay finite.
                rows_q = slice(text_q.start + group.start, text_q.start + group.stop)
                bias[rows, :, rows_q, columns] = 0.0

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
