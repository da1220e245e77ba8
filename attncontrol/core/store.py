"""Attention store: aggregated cross- and self-attention maps by token, layer, resolution and step (DAAM-style).

The store is a control that only observes. It keeps head-averaged probabilities of the batch rows it is told to
keep, either summed over steps (the default, memory bounded by the number of layers) or one record per step, and
stops recording with a warning once ``max_bytes`` would be exceeded. For joint attention (Flux, SD3) the "cross" map
is the image-query x text-key block of the joint softmax and the "self" map the image x image block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attncontrol.core.control import AttentionCall, AttentionControl, StepSpec
from attncontrol.core.errors import TokenIndexError
from attncontrol.core.layers import LayerInfo, LayerSpec, make_layer_filter

logger = logging.getLogger(__name__)

MAP_KINDS = ("cross", "self")


@dataclass
class AttentionRecord:
    """Head-averaged probabilities of one layer: ``probs`` is ``[rows, queries, keys]``, queries row-major on ``grid``.

    ``step`` is the step index for per-step records and ``None`` for records summed over steps (then ``count`` says
    how many calls were summed and ``probs`` is already the mean).
    """

    layer: LayerInfo
    kind: str
    step: int | None
    grid: tuple[int, int]
    probs: torch.Tensor
    count: int = 1


class AttentionStore(AttentionControl):
    """Observe attention probabilities and turn them into per-token maps and heat-map images.

    Args:
        kinds: which maps to keep: ``"cross"`` (image queries x text keys), ``"self"`` (image x image) or both.
        layers, steps: where to record (see :class:`AttentionControl`).
        guidance, branch: keep only batch rows with these roles (e.g. ``guidance="cond"``). Default: all rows.
        per_step: keep one record per step instead of the mean over steps.
        max_image_tokens: skip layers whose image grid has more tokens (self-attention maps grow quadratically).
        max_bytes: memory cap for stored maps; recording stops with one warning when reached.
        keep_grad: keep the autograd graph (for attention losses in training); otherwise maps are detached.
    """

    def __init__(
        self,
        *,
        kinds: str | Sequence[str] = ("cross",),
        layers: LayerSpec = None,
        steps: StepSpec = None,
        guidance: str | None = None,
        branch: str | None = None,
        per_step: bool = False,
        max_image_tokens: int | None = None,
        max_bytes: int = 512 * 2**20,
        keep_grad: bool = False,
    ) -> None:
        super().__init__(layers=layers, steps=steps)
        self.kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = set(self.kinds) - set(MAP_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"`kinds` must be a subset of {MAP_KINDS}, got {kinds!r}")
        self.guidance = guidance
        self.branch = branch
        self.per_step = per_step
        self.max_image_tokens = max_image_tokens
        self.max_bytes = max_bytes
        self.keep_grad = keep_grad
        self.reset()

    # ------------------------------------------------------------------ recording
    def reset(self) -> None:
        self._records: dict[tuple, AttentionRecord] = {}
        self.bytes_used = 0
        self.dropped = 0

    def applies_to_layer(self, layer: LayerInfo) -> bool:
        if layer.kind != "joint" and layer.kind not in self.kinds:
            return False
        return super().applies_to_layer(layer)

    def wants_probs(self, call: AttentionCall) -> bool:
        return self.max_image_tokens is None or call.image_tokens <= self.max_image_tokens

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        rows = call.batch.rows(guidance=self.guidance, branch=self.branch)
        if len(call.batch) != probs.shape[0]:
            rows = list(range(probs.shape[0]))
        if not rows:
            return
        mean = probs[rows].mean(dim=1)
        if not self.keep_grad:
            mean = mean.detach()
        image_q = call.query_segments.get("image", slice(None))
        for kind in self.kinds:
            key_segment = call.key_segments.get("text" if kind == "cross" else "image")
            if call.layer.kind != "joint":
                if call.layer.kind != kind:
                    continue
                key_segment = slice(None)
            if key_segment is None:
                continue
            self._record(call, kind, mean[:, image_q, key_segment])

    def _record(self, call: AttentionCall, kind: str, probs: torch.Tensor) -> None:
        step = call.step.index if self.per_step else None
        key = (kind, call.layer.name, step)
        existing = self._records.get(key)
        if existing is not None and not self.per_step:
            # Running mean over steps: memory stays one map per layer.
            existing.count += 1
            existing.probs = existing.probs + (probs - existing.probs) / existing.count
            return
        size = probs.numel() * probs.element_size()
        if self.bytes_used + size > self.max_bytes:
            if self.dropped == 0:
                logger.warning(
                    "AttentionStore reached max_bytes=%d; further maps are not recorded (raise max_bytes, set "
                    "max_image_tokens, or use per_step=False)",
                    self.max_bytes,
                )
            self.dropped += 1
            return
        self.bytes_used += size
        self._records[key] = AttentionRecord(call.layer, kind, step, call.grid, probs)

    # ------------------------------------------------------------------ reading
    def records(
        self, kind: str = "cross", *, layers: LayerSpec = None, steps: Iterable[int] | None = None
    ) -> list[AttentionRecord]:
        """Stored records of ``kind``, filtered by layer selection and step indices (per-step stores only)."""
        if kind not in MAP_KINDS:
            raise ValueError(f"`kind` must be one of {MAP_KINDS}, got {kind!r}")
        layer_filter = make_layer_filter(layers)
        wanted_steps = None if steps is None else set(steps)
        return [
            record
            for record in self._records.values()
            if record.kind == kind
            and layer_filter(record.layer)
            and (wanted_steps is None or record.step in wanted_steps)
        ]

    def maps(
        self,
        kind: str = "cross",
        *,
        layers: LayerSpec = None,
        steps: Iterable[int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Mean map over the selected records, ``[rows, height, width, keys]``.

        Cross maps from every resolution are resized (bilinear) to ``size`` (default: the largest grid recorded).
        Self maps can only be averaged within one resolution: pass ``size`` to pick it when several were recorded.
        """
        records = self.records(kind, layers=layers, steps=steps)
        if not records:
            raise ValueError(f"no {kind} attention maps were recorded for this selection (layers={layers!r})")
        grids = sorted({record.grid for record in records}, key=lambda g: g[0] * g[1])
        if kind == "self":
            if size is None and len(grids) > 1:
                raise ValueError(f"self-attention maps exist at grids {grids}; pass `size=` to choose one")
            target = tuple(size) if size is not None else grids[0]
            records = [record for record in records if record.grid == target]
            if not records:
                raise ValueError(f"no self-attention maps at grid {target}; recorded grids: {grids}")
            stacked = torch.stack([record.probs for record in records]).mean(0)
            return stacked.reshape(stacked.shape[0], *target, stacked.shape[-1])
        target = tuple(size) if size is not None else grids[-1]
        total = None
        for record in records:
            rows, _, keys = record.probs.shape
            grid_maps = record.probs.transpose(1, 2).reshape(rows, keys, *record.grid).float()
            if record.grid != target:
                grid_maps = F.interpolate(grid_maps, size=target, mode="bilinear", align_corners=False)
            total = grid_maps if total is None else total + grid_maps
        return (total / len(records)).permute(0, 2, 3, 1)

    def token_map(
        self,
        tokens: int | Sequence[int],
        *,
        layers: LayerSpec = None,
        steps: Iterable[int] | None = None,
        size: tuple[int, int] | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Summed cross-attention of ``tokens`` (indices into the encoded prompt), ``[rows, height, width]``.

        With ``normalize`` each row is scaled to [0, 1] by its maximum (DAAM's convention for display).
        """
        maps = self.maps("cross", layers=layers, steps=steps, size=size)
        indices = [tokens] if isinstance(tokens, int) else list(tokens)
        num_keys = maps.shape[-1]
        for index in indices:
            if not 0 <= index < num_keys:
                raise TokenIndexError(
                    f"`tokens` index {index} is outside the {num_keys} text tokens the maps were recorded with"
                )
        heat = maps[..., indices].sum(-1)
        if normalize:
            peak = heat.flatten(1).amax(1).clamp_min(1e-12)
            heat = heat / peak[:, None, None]
        return heat

    def heatmap(
        self,
        tokens: int | Sequence[int],
        *,
        image: Image.Image | None = None,
        row: int = -1,
        size: tuple[int, int] | None = None,
        alpha: float = 0.6,
        layers: LayerSpec = None,
        steps: Iterable[int] | None = None,
    ) -> Image.Image:
        """A heat-map picture of ``tokens`` for batch row ``row``, over ``image`` when given.

        The map is upsampled (bicubic) to the image size, or to ``size`` (height, width) without an image, and
        stretched to the full colour range (min-max), so where a token is attended *more* stands out even when
        attention is spread thinly.
        """
        heat = self.token_map(tokens, layers=layers, steps=steps, normalize=False)[row].detach().float().cpu()
        out_size = (image.height, image.width) if image is not None else (size or tuple(heat.shape))
        heat = F.interpolate(heat[None, None], size=out_size, mode="bicubic", align_corners=False)[0, 0]
        low, high = float(heat.min()), float(heat.max())
        heat = (heat - low) / max(high - low, 1e-12)
        colored = Image.fromarray(colorize(heat.clamp(0, 1).numpy()))
        if image is None:
            return colored
        return Image.blend(image.convert("RGB"), colored, alpha)


# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp (anchor colours of a "turbo"-like map).
_RAMP = np.array(
    [
        [48, 18, 59],
        [70, 107, 227],
        [41, 187, 236],
        [49, 242, 153],
        [163, 253, 61],
        [237, 208, 58],
        [251, 128, 34],
        [208, 47, 5],
        [122, 4, 3],
    ],
    dtype=np.float32,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] of shape ``[H, W]`` to ``uint8`` RGB ``[H, W, 3]``."""
    positions = np.linspace(0.0, 1.0, len(_RAMP))
    flat = np.clip(values, 0.0, 1.0).ravel()
    channels = [np.interp(flat, positions, _RAMP[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).reshape(*values.shape, 3).round().astype(np.uint8)
