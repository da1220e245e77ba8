"""Colour-shape binding in a shapes model's text encoder: each shape word is asked to name its object's colour.

A text encoder trained only through the denoiser's loss need not bind: the shipped ``shapes-sd`` encoder's first
shape token names its colour to a linear probe every time, the second one in about two of three prompts
(``python benchmarks/text_binding.py``). A UNet that reads "square" then cannot tell which colour the square has,
and its two-object failures are colours shared or swapped between the objects. CLIP is causal and in every
shapes caption the colour word comes right before its shape word, so the shape token *can* know its colour; a linear
head on the encoder's last hidden states (what the UNet attends to) makes it: cross-entropy of the head's colour
logits at every shape token. The head only shapes the training; it is not part of the exported pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attncontrol.core.tokens import token_indices
from attncontrol.shapes.scenes import COLORS, Scene

logger = logging.getLogger(__name__)

COLOR_NAMES = list(COLORS)
# Three objects at most, one shape word each.
MAX_BOUND_TOKENS = 3


def scene_colors(scene: Scene) -> list[tuple[str, str]]:
    """``(colour, shape)`` of every object: what :func:`binding_targets` needs from the ground truth."""
    return [(obj.color, obj.shape) for obj in scene.objects]


@dataclass
class BindingTargets:
    """Per caption: the positions of its shape words ``[N, MAX_BOUND_TOKENS]`` and their objects' colour indices
    (``-100`` where unused, cross-entropy's ignore index)."""

    positions: torch.Tensor
    labels: torch.Tensor

    def __getitem__(self, index: torch.Tensor) -> BindingTargets:
        return BindingTargets(self.positions[index], self.labels[index])


def binding_targets(
    captions: Sequence[str], objects: Sequence[Sequence[tuple[str, str]]], tokenizer: Any
) -> BindingTargets:
    """Find each object's shape word after its colour word ("red circle": the token of "circle")."""
    positions = torch.zeros(len(captions), MAX_BOUND_TOKENS, dtype=torch.long)
    labels = torch.full((len(captions), MAX_BOUND_TOKENS), -100, dtype=torch.long)
    for row, (caption, pairs) in enumerate(zip(captions, objects, strict=True)):
        slot = 0
        for color, shape in dict.fromkeys(pairs):  # identical objects share their phrase's occurrences
            phrase = token_indices(tokenizer, caption, f"{color} {shape}", name="phrase")
            # Every occurrence spans (colour, shape): the shape words are the odd entries.
            for position in phrase[1::2]:
                if slot == MAX_BOUND_TOKENS:
                    raise ValueError(f"caption {caption!r} has more than {MAX_BOUND_TOKENS} shape words")
                positions[row, slot], labels[row, slot] = position, COLOR_NAMES.index(color)
                slot += 1
    return BindingTargets(positions, labels)


class BindingHead(torch.nn.Module):
    """Linear colour logits from a text encoder's hidden states."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, len(COLOR_NAMES))

    def forward(self, hidden_states: torch.Tensor, targets: BindingTargets) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy at the shape tokens of ``targets``, and the share of them whose colour is named right."""
        index = targets.positions.to(hidden_states.device)
        picked = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
        logits = self.proj(picked.float())
        labels = targets.labels.to(hidden_states.device)
        valid = labels != -100
        if not bool(valid.any()):
            return logits.sum() * 0.0, torch.tensor(1.0)
        loss = F.cross_entropy(logits[valid], labels[valid])
        accuracy = (logits[valid].argmax(-1) == labels[valid]).float().mean()
        return loss, accuracy.detach()


@torch.no_grad()
def shape_token_states(tokenizer: Any, text_encoder: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The last hidden states at the first and the second shape word of every two-object prompt of the bench's kind
    (different colours and shapes: 72 prompts), with each word's colour index."""
    import itertools

    from attncontrol.shapes.scenes import SHAPES

    objects = list(itertools.product(COLOR_NAMES, SHAPES))
    pairs = [(a, b) for a, b in itertools.permutations(objects, 2) if a[0] != b[0] and a[1] != b[1]]
    captions = [f"a {a[0]} {a[1]} and a {b[0]} {b[1]}" for a, b in pairs]
    targets = binding_targets(captions, pairs, tokenizer)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    states = text_encoder(ids.input_ids.to(text_encoder.device))[0].float().cpu()
    found = {}
    for slot, name in enumerate(("first", "second")):
        index = targets.positions[:, slot]
        found[name] = (states[torch.arange(len(captions)), index], targets.labels[:, slot])
    return found


def _fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.nn.Linear:
    probe = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # A little L2 keeps the probe from memorizing 60 points in 64 dimensions.
        loss = F.cross_entropy(probe(features), labels) + 1e-2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe


@torch.no_grad()
def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, folds: int = 6, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (``folds``-fold cross-validation, standardized features)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    classes = int(labels.max()) + 1
    right = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = order[torch.arange(len(order)) % folds != fold]
        mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
        probe = _fit_probe((features[train] - mean) / std, labels[train], classes)
        right += int((probe((features[test] - mean) / std).argmax(-1) == labels[test]).sum())
    return right / len(labels)
