"""Token grounding for training text-to-image models on the shapes world (TokenCompose's token loss).

A small model trained from scratch on "a yellow triangle and a blue circle" learns to draw both shapes long before
it learns which colour goes with which: the colours leak (the shipped model's main two-object failure). The
scenes come with exact object masks, so the cross-attention of each object's words (its colour and its shape) can
be told where the object is: the loss is ``(1 - share of the word's attention inside its object)^2``, averaged over
words and cross-attention layers. Each word then carries its object to one place, which is what binding is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attncontrol.core.controller import AttentionController
from attncontrol.core.masks import resize_to_grid
from attncontrol.core.store import AttentionStore
from attncontrol.core.tokens import token_indices
from attncontrol.shapes.scenes import Scene

logger = logging.getLogger(__name__)

# Up to three objects, two words each.
MAX_GROUNDED_TOKENS = 6


def scene_objects(scene: Scene, grid: int) -> list[tuple[str, torch.Tensor]]:
    """``(phrase, coverage)`` per distinct "colour shape" of the scene: the share of each cell of a ``grid`` x
    ``grid`` division covered by the objects of that phrase (identical objects share one union mask)."""
    return [
        (phrase, resize_to_grid(torch.from_numpy(mask.astype(np.float32)), (grid, grid)).reshape(-1).half())
        for phrase, mask in scene.phrase_masks().items()
    ]


@dataclass
class GroundingTargets:
    """Per caption: which token positions are grounded and where their objects are.

    ``positions`` ``[N, P]`` (0 where unused), ``masks`` ``[N, P, grid * grid]`` coverage, ``valid`` ``[N, P]``.
    """

    positions: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor
    grid: int


def grounding_targets(
    captions: Sequence[str], objects: Sequence[list[tuple[str, torch.Tensor]]], tokenizer: Any, grid: int
) -> GroundingTargets:
    """Find every object's colour and shape tokens in its caption (all occurrences) and pair them with its mask."""
    count = len(captions)
    positions = torch.zeros(count, MAX_GROUNDED_TOKENS, dtype=torch.long)
    masks = torch.zeros(count, MAX_GROUNDED_TOKENS, grid * grid, dtype=torch.float16)
    valid = torch.zeros(count, MAX_GROUNDED_TOKENS, dtype=torch.bool)
    for row, (caption, phrases) in enumerate(zip(captions, objects, strict=True)):
        slot = 0
        for phrase, coverage in phrases:
            for position in token_indices(tokenizer, caption, phrase, name="phrase"):
                if slot == MAX_GROUNDED_TOKENS:
                    raise ValueError(f"caption {caption!r} has more than {MAX_GROUNDED_TOKENS} object words")
                positions[row, slot], masks[row, slot], valid[row, slot] = position, coverage, True
                slot += 1
    return GroundingTargets(positions, masks, valid, grid)


def grounding_loss(
    records: Sequence[Any], positions: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, grid: int
) -> torch.Tensor:
    """Mean over cross-attention layers and grounded words of ``(1 - attention share inside the object)^2``.

    Args:
        records: the step's cross-attention records (``probs`` ``[B, queries, keys]``, head-averaged, with grads),
            each on a square grid that divides ``grid``.
        positions, masks, valid: this batch's rows of :class:`GroundingTargets` (``masks`` on ``grid``).
    """
    if not records:
        raise ValueError("no cross-attention was recorded; the grounding loss needs the UNet's cross-attention maps")
    weight = valid.float()
    if weight.sum() == 0:
        return records[0].probs.sum() * 0.0
    # Masks per attention grid, pooled once per resolution rather than once per layer.
    masks_at: dict[int, torch.Tensor] = {grid: masks.float()}
    total = 0.0
    for record in records:
        probs = record.probs.float()  # [B, Q, K]
        height, width = record.grid
        if height != width or grid % height:
            raise ValueError(f"a cross-attention grid {record.grid} does not divide the mask grid {grid}")
        if height not in masks_at:
            pooled = F.avg_pool2d(masks_at[grid].reshape(-1, 1, grid, grid), grid // height)
            masks_at[height] = pooled.reshape(*masks.shape[:2], height * width)
        layer_masks = masks_at[height]
        index = positions[:, :, None].expand(-1, -1, probs.shape[1])
        word_maps = probs.transpose(1, 2).gather(1, index)  # [B, P, Q]
        inside = (word_maps * layer_masks).sum(-1) / word_maps.sum(-1).clamp_min(1e-8)
        total = total + ((1 - inside) ** 2 * weight).sum() / weight.sum()
    return total / len(records)


class GroundingTerm:
    """The grounding loss inside a training loop: from step ``start`` on, the denoiser's cross-attention (UNet) or
    image-query x text-key attention (Flux) is recorded with gradients and scored against the pool's targets.

    Call :meth:`begin_step` with the loop's controller (:func:`~attncontrol.training.common.training_controller`)
    before each forward pass; after it, :meth:`loss` is the step's term while :attr:`active`.
    """

    def __init__(self, targets: GroundingTargets, weight: float, start: int = 0) -> None:
        self.targets, self.weight, self.start = targets, weight, start
        self.store = AttentionStore(kinds="cross", keep_grad=True)
        self.active = False

    def begin_step(self, controller: AttentionController, step: int) -> None:
        if not self.active and step >= self.start:
            controller.add(self.store)
            self.active = True
            logger.info("grounding loss on from step %d", step)
        self.store.reset()

    def loss(self, index: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """The unweighted term for pool rows ``index`` captioned ``texts`` (dropped, empty captions ground nothing)."""
        targets = self.targets
        keep = torch.tensor([bool(text) for text in texts])
        rows = targets.valid[index] & keep[:, None]
        records = self.store.records("cross")
        return grounding_loss(records, targets.positions[index], targets.masks[index], rows, targets.grid)
