"""Region-masked training: some captions are seen through the hard region masks of the regional controls.

A model trained only on full captions draws an object where its starting noise favours one, and the hard masks of
:class:`~attncontrol.controls.RegionalAttention` can then only decide *which* object a spot shows, not *where*
objects appear: on the shipped shapes model a single "red circle" region in a corner leaves the circle where the
seed put it, and objects that the noise puts on a region border come out as blends. GLIGEN and InstanceDiffusion
teach a model layouts by training with them. Here the layout is the attention mask itself: for a share of the
rows, each object's colour and shape words are visible only inside a random box around that object, with the leak
rule of the inference control (:func:`~attncontrol.controls.regions.hard_text_bias`), so at sampling time a
region says where its object must be, in the same terms. In Flux's joint attention the words also see only the
image tokens inside their box, as the control's hard mode has them at sampling time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attncontrol.controls.regions import hard_text_bias, leaked_tokens, ownership_bias
from attncontrol.core.control import AttentionCall, AttentionControl
from attncontrol.core.controller import AttentionController
from attncontrol.core.masks import cells_inside
from attncontrol.core.tokens import token_indices
from attncontrol.shapes.scenes import IMAGE_SIZE, Scene, mask_box

logger = logging.getLogger(__name__)

MAX_OBJECTS = 3
MAX_PHRASE_TOKENS = 2 * MAX_OBJECTS  # "colour shape", once per object of that phrase


def scene_boxes(scene: Scene) -> list[tuple[str, tuple[int, int, int, int]]]:
    """``(phrase, box)`` per distinct "colour shape" of the scene; identical objects share their union box."""
    return [(phrase, mask_box(mask)) for phrase, mask in scene.phrase_masks().items()]


@dataclass
class LayoutTargets:
    """Per caption: each object's token positions and pixel box.

    ``tokens`` ``[N, O, T]`` (``-1`` where unused), ``boxes`` ``[N, O, 4]`` (x0, y0, x1, y1 exclusive, pixels),
    ``valid`` ``[N, O]``.
    """

    tokens: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor


def layout_targets(
    captions: Sequence[str], layouts: Sequence[list[tuple[str, tuple[int, int, int, int]]]], tokenizer: Any
) -> LayoutTargets:
    count = len(captions)
    tokens = torch.full((count, MAX_OBJECTS, MAX_PHRASE_TOKENS), -1, dtype=torch.long)
    boxes = torch.zeros(count, MAX_OBJECTS, 4)
    valid = torch.zeros(count, MAX_OBJECTS, dtype=torch.bool)
    for row, (caption, phrases) in enumerate(zip(captions, layouts, strict=True)):
        if len(phrases) > MAX_OBJECTS:
            raise ValueError(f"caption {caption!r} has more than {MAX_OBJECTS} objects")
        for slot, (phrase, box) in enumerate(phrases):
            found = token_indices(tokenizer, caption, phrase, name="phrase")
            if len(found) > MAX_PHRASE_TOKENS:
                raise ValueError(f"caption {caption!r} names {phrase!r} more than {MAX_OBJECTS} times")
            tokens[row, slot, : len(found)] = torch.as_tensor(found)
            boxes[row, slot] = torch.as_tensor(box, dtype=torch.float32)
            valid[row, slot] = True
    return LayoutTargets(tokens, boxes, valid)


def random_regions(
    boxes: torch.Tensor, max_margin: float, generator: torch.Generator | None = None, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Each box grown by an independent random margin in ``[0, max_margin]`` pixels per side, clipped to the image:
    regions hold their object anywhere inside them, from a tight box to about half the image."""
    margins = torch.rand(*boxes.shape, generator=generator) * max_margin
    grown = boxes + margins * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    return grown.clamp(0, size)


class RegionMaskedTraining(AttentionControl):
    """Hard region masks on the text attention of chosen training rows (UNet cross-attention, Flux's joint
    attention); the other rows are untouched.

    Call :meth:`begin_step` before each forward pass with the batch's pool rows and captions; from step ``start``
    on, a ``fraction`` of the rows with objects get random regions around their objects (:func:`random_regions`).
    """

    def __init__(
        self,
        targets: LayoutTargets,
        *,
        fraction: float,
        start: int = 0,
        max_margin: float = 24.0,
        text_length: int = 77,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"`fraction` must be in (0, 1], got {fraction}")
        self.targets, self.fraction, self.start = targets, float(fraction), int(start)
        self.max_margin, self.text_length = float(max_margin), int(text_length)
        self.seed = int(seed)
        self.generator = torch.Generator()
        self.installed = False
        self._rows: torch.Tensor | None = None  # batch positions that are masked this step
        self._regions: torch.Tensor | None = None  # [masked rows, O, 4] pixels
        self._owners: torch.Tensor | None = None  # [masked rows, text, O]
        self._hidden: torch.Tensor | None = None  # [masked rows, text, O]
        self._valid: torch.Tensor | None = None  # [masked rows, O]: which object slots are used
        self._bias: dict[tuple, torch.Tensor] = {}  # per (grid, queries, keys), for this step

    def applies_to_layer(self, layer) -> bool:
        return super().applies_to_layer(layer) and layer.kind in ("cross", "joint")

    def begin_step(self, controller: AttentionController, step: int, index: torch.Tensor, texts: Sequence[str]) -> int:
        """Choose this step's masked rows and their regions; returns how many rows are masked."""
        self._bias.clear()
        self._rows = None
        if step < self.start:
            return 0
        # Seeded by the step: a resumed run draws the same regions as an uninterrupted one.
        self.generator.manual_seed(self.seed * 1_000_003 + step)
        if not self.installed:
            controller.add(self)
            self.installed = True
            logger.info("region-masked training on from step %d (%.0f%% of the rows)", step, self.fraction * 100)
        has_objects = self.targets.valid[index].any(1) & torch.tensor([bool(text) for text in texts])
        chosen = has_objects & (torch.rand(len(index), generator=self.generator) < self.fraction)
        if not chosen.any():
            return 0
        rows = chosen.nonzero().squeeze(1)
        pool_rows = index[rows]
        valid = self.targets.valid[pool_rows]  # [M, O]
        regions = random_regions(self.targets.boxes[pool_rows], self.max_margin, self.generator)
        owners = torch.zeros(len(rows), self.text_length, MAX_OBJECTS, dtype=torch.bool)
        hidden = torch.zeros_like(owners)
        for position, pool_row in enumerate(pool_rows.tolist()):
            lists = []
            for slot in range(MAX_OBJECTS):
                tokens = self.targets.tokens[pool_row, slot]
                tokens = tokens[(tokens >= 0) & (tokens < self.text_length)].tolist()
                owners[position, tokens, slot] = True
                lists.append(tokens if valid[position, slot] else [])
            hidden[position] = leaked_tokens(lists, self.text_length)
        self._rows, self._regions, self._owners, self._hidden = rows, regions, owners, hidden
        self._valid = valid
        return len(rows)

    def _inside(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[M, cells, O]`` bool, by the inference rule (:func:`~attncontrol.core.masks.cells_inside` of each box's
        area coverage); unused slots are nowhere."""
        centres = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
        boxes = self._regions[..., None]  # [M, O, 4, 1]
        columns = (centres >= boxes[:, :, 0]) & (centres < boxes[:, :, 2])  # [M, O, W]
        rows = (centres >= boxes[:, :, 1]) & (centres < boxes[:, :, 3])  # [M, O, H]
        pixels = (rows[..., :, None] & columns[..., None, :]).float()  # [M, O, H, W]
        coverage = F.adaptive_avg_pool2d(pixels.flatten(0, 1)[:, None], grid).reshape(*pixels.shape[:2], -1)
        return cells_inside(coverage).transpose(1, 2) & self._valid[:, None, :]

    def logit_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """The masked rows' bias, by the inference control's hard rule: image queries over text keys (UNet cross-
        attention, and that block of Flux's joint attention), and in joint attention also text queries over image
        keys, where an object's words see only the image tokens inside its region."""
        text, image_q = call.key_segments.get("text"), call.query_segments.get("image")
        if self._rows is None or text is None or image_q is None:
            return None
        batch, queries, keys = query.shape[0], query.shape[2], key.shape[2]
        cache = (call.grid, queries, keys)
        if cache not in self._bias:
            length = text.stop - text.start
            if image_q.stop - image_q.start != call.grid[0] * call.grid[1] or length > self.text_length:
                raise ValueError(
                    f"region-masked training: layer {call.layer.name} has {image_q.stop - image_q.start} image "
                    f"queries on grid {call.grid} and {length} text keys (text length {self.text_length})"
                )
            inside = self._inside(call.grid)
            owners, hidden = self._owners[:, :length], self._hidden[:, :length]
            masked = torch.zeros(len(self._rows), queries, keys)
            masked[:, image_q, text] = hard_text_bias(inside, owners, hidden)
            text_q, image_k = call.query_segments.get("text"), call.key_segments.get("image")
            if text_q is not None and image_k is not None:
                masked[:, text_q, image_k] = ownership_bias(inside, owners).transpose(1, 2)
            bias = torch.zeros(batch, 1, queries, keys)
            bias[self._rows, 0] = masked
            self._bias[cache] = bias.to(device=query.device)
        return self._bias[cache].to(query.dtype)


def region_training(
    config: Any, captions: Sequence[str], boxes: Sequence[list[tuple[str, tuple[int, int, int, int]]]], tokenizer: Any
) -> RegionMaskedTraining:
    """The shapes scripts' :class:`RegionMaskedTraining` from their ``region_*`` settings, on the tokens of the text
    encoder whose keys the masks hide (CLIP's for the UNet's cross-attention, T5's for Flux's joint attention)."""
    return RegionMaskedTraining(
        layout_targets(captions, boxes, tokenizer),
        fraction=config.region_fraction,
        start=config.region_start,
        max_margin=config.region_margin,
        text_length=config.max_length,
        seed=config.seed,
    )
