"""Concept extraction from one image (Break-A-Scene, AttenCraft): inputs, losses, masks from attention, loading.

One image holds several objects; training learns one new token per object (and LoRA adapters), so each object can
be generated alone or in new scenes. This module holds what the training script and a user share:

- :func:`prepare_concepts` validates the image, masks and token strings *before* training starts;
- :func:`cross_attention_loss` ties each token's cross-attention map to its mask (Break-A-Scene's MSE on
  max-normalized maps, or AttenCraft's Jensen-Shannon divergence of the softmaxed maps);
- :func:`masked_diffusion_loss` only scores the latent pixels the sampled objects cover;
- :func:`attention_masks` finds the objects without user masks, from the model's own cross- and self-attention
  (AttenCraft's propagation rule, or self-attention clusters labelled by the tokens' cross-attention);
- :func:`load_concepts` / :func:`unload_concepts` put a trained folder into a stock pipeline with diffusers' own
  ``load_textual_inversion`` and ``load_lora_weights``.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attncontrol.core.errors import ConceptError
from attncontrol.core.masks import MaskLike, connected_components, dilate, drop_small_pieces, load_mask, resize_to_grid

logger = logging.getLogger(__name__)

MANIFEST = "concepts.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: a concept mask that lies this much inside another one "overlaps completely": the two cannot be told apart
MAX_CONTAINMENT = 0.95


def default_tokens(count: int) -> list[str]:
    """Break-A-Scene's placeholder names: ``<asset0>``, ``<asset1>``, ..."""
    return [f"<asset{i}>" for i in range(count)]


def concept_prompt(tokens: Sequence[str], template: str = "a photo of {}") -> str:
    """``"a photo of <asset0> and <asset1>"``: the union-sampling prompt of the chosen tokens."""
    return template.format(" and ".join(tokens))


@dataclass
class ConceptInputs:
    """The validated training inputs: pixels in [-1, 1] ``[3, H, W]``, masks ``[N, H, W]`` in {0, 1} (``None`` when
    they come from attention), and one token string per concept."""

    pixels: torch.Tensor
    masks: torch.Tensor | None
    tokens: list[str]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.pixels.shape[-2:])


def _load_image(image: str | Path | Image.Image | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        if not Path(image).exists():
            raise ConceptError(f"`image` {str(image)!r} does not exist")
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ConceptError(f"`image` must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
    rgb = image.convert("RGB")
    if (rgb.height, rgb.width) != tuple(size):
        raise ConceptError(
            f"`image` is {rgb.width}x{rgb.height} (WxH) but the model trains at {size[1]}x{size[0]}: resize or crop it "
            "to that size first (or pass the size the model was trained at with --resolution)"
        )
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def check_token_strings(tokenizers: Sequence[Any], tokens: Sequence[str]) -> None:
    """Refuse token strings that are empty, repeated, or already mean something to a tokenizer."""
    if not tokens:
        raise ConceptError("`tokens` is empty: name one new token per concept (e.g. <asset0> <asset1>)")
    if len(set(tokens)) != len(tokens):
        raise ConceptError(f"`tokens` repeats a token: {list(tokens)}")
    for token in tokens:
        if not token or re.search(r"\s", token):
            raise ConceptError(f"`tokens` entry {token!r} must be one word without spaces")
        for tokenizer in tokenizers:
            if token in tokenizer.get_vocab():
                raise ConceptError(
                    f"`tokens` entry {token!r} is already in the tokenizer's vocabulary; choose a new string such as "
                    f"'<{token.strip('<>')}-concept>'"
                )


def check_masks(masks: torch.Tensor, names: Sequence[str]) -> None:
    """Refuse masks that are empty or that (almost) coincide with or lie inside another: no token could tell them
    apart."""
    areas = masks.flatten(1).sum(1)
    for index, area in enumerate(areas.tolist()):
        if area <= 0:
            raise ConceptError(f"`masks` entry {names[index]!r} is empty after binarizing at 0.5")
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            shared = float((masks[i] * masks[j]).sum())
            smaller = float(min(areas[i], areas[j]))
            if shared >= MAX_CONTAINMENT * smaller:
                raise ConceptError(
                    f"`masks` {names[i]!r} and {names[j]!r} overlap completely ({shared / smaller:.0%} of the smaller "
                    "one is inside the other): each concept needs its own region"
                )


def prepare_concepts(
    image: str | Path | Image.Image | np.ndarray,
    masks: Sequence[MaskLike] | None,
    tokens: Sequence[str] | None,
    *,
    size: tuple[int, int],
    tokenizers: Sequence[Any],
    num_concepts: int | None = None,
) -> ConceptInputs:
    """Validate everything training needs and raise :class:`ConceptError` naming the argument at fault.

    Args:
        image: the one training image; it must already have the model's size ``(height, width)``.
        masks: one mask per concept (paths, PIL images, arrays, boxes), or ``None`` for masks from attention.
        tokens: the new token strings, one per concept; default ``<asset0>``, ``<asset1>``, ...
        tokenizers: the pipeline's tokenizers (SDXL has two); a token they already know is refused.
        num_concepts: how many concepts to find when there are neither masks nor tokens.
    """
    pixels = _load_image(image, size)
    loaded = None
    if masks:
        names = [str(mask) if isinstance(mask, (str, Path)) else f"mask {i}" for i, mask in enumerate(masks)]
        planes = []
        for name, mask in zip(names, masks, strict=True):
            if isinstance(mask, (str, Path)):
                if not Path(mask).exists():
                    raise ConceptError(f"`masks` entry {name!r} does not exist")
                mask = Image.open(mask)
            planes.append(load_mask(mask, name=f"masks[{name}]", image_size=size, allow_empty=True))
        loaded = (torch.stack(planes) >= 0.5).float()
        check_masks(loaded, names)
    count = len(tokens) if tokens else (len(loaded) if loaded is not None else (num_concepts or 0))
    if count < 1:
        raise ConceptError("give `masks`, `tokens` or `num_concepts`: how many concepts does the image hold?")
    tokens = list(tokens) if tokens else default_tokens(count)
    if loaded is not None and len(tokens) != len(loaded):
        more = "tokens than masks" if len(tokens) > len(loaded) else "masks than tokens"
        raise ConceptError(f"{len(tokens)} `tokens` but {len(loaded)} `masks` ({more}): give one mask per token")
    check_token_strings(tokenizers, tokens)
    return ConceptInputs(pixels=pixels, masks=loaded, tokens=tokens)


# ------------------------------------------------------------------------------------------------ losses
def normalize_max(maps: torch.Tensor) -> torch.Tensor:
    """Scale each ``[..., H, W]`` map so its maximum is 1 (Break-A-Scene's normalization)."""
    peak = maps.flatten(-2).amax(-1).clamp_min(1e-12)
    return maps / peak[..., None, None]


def normalize_min_max(maps: torch.Tensor) -> torch.Tensor:
    """Stretch each ``[..., H, W]`` map to [0, 1] (AttenCraft's normalization)."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1), flat.amax(-1)
    return (maps - low[..., None, None]) / (high - low).clamp_min(1e-12)[..., None, None]


def cross_attention_loss(token_maps: torch.Tensor, masks: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """How far each token's cross-attention map is from its mask; zero when the (normalized) maps equal the masks.

    Args:
        token_maps: ``[N, h, w]`` attention of each concept token (summed over its positions, mean over layers
            and heads), on the grid of ``masks``.
        masks: ``[N, h, w]`` masks in [0, 1] on that grid.
        kind: ``"mse"``: Break-A-Scene, the sum over tokens of the mean squared error between the max-normalized
            map and the mask; ``"jsd"``: AttenCraft, the mean over tokens of the Jensen-Shannon divergence between
            the softmax over pixels of the min-max-normalized map and of the mask.
    """
    if token_maps.shape != masks.shape:
        raise ValueError(f"`token_maps` {tuple(token_maps.shape)} and `masks` {tuple(masks.shape)} differ in shape")
    masks = masks.to(token_maps.dtype)
    if kind == "mse":
        return ((normalize_max(token_maps) - masks) ** 2).flatten(1).mean(1).sum()
    if kind == "jsd":
        p = normalize_min_max(token_maps).flatten(1).softmax(-1)
        q = masks.flatten(1).softmax(-1)
        middle = 0.5 * (p + q)
        divergence = 0.5 * (p * (p / middle).log()).sum(-1) + 0.5 * (q * (q / middle).log()).sum(-1)
        return divergence.mean()
    raise ValueError(f"`kind` must be 'mse' or 'jsd', got {kind!r}")


def masked_diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    mean_over: str = "image",
    per_sample: bool = False,
) -> torch.Tensor:
    """The diffusion loss where ``mask`` (``[B, 1, h, w]`` at the latent's size) is set; outside it the model is
    free (the background and any object the prompt does not name are not learned).

    ``mean_over="image"``: Break-A-Scene's mean over the whole latent of ``(mask * (prediction - target))**2``, so a
    small object weighs little; ``"mask"``: AttenCraft's mean over the masked elements only, so every object's
    pixels weigh as much as an unmasked loss's. ``per_sample``: one value per batch row ``[B]`` instead of one for
    the batch (the concept trainer's word search weighs each draw itself).
    """
    squared = ((prediction.float() - target.float()) * mask) ** 2
    dims = tuple(range(1, squared.ndim)) if per_sample else tuple(range(squared.ndim))
    if mean_over == "image":
        return squared.mean(dims)
    if mean_over == "mask":
        covered = mask.expand_as(squared).sum(dims).clamp_min(1.0)
        return squared.sum(dims) / covered
    raise ValueError(f"`mean_over` must be 'image' or 'mask', got {mean_over!r}")


def masks_at(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[N, H, W]`` image masks as each token's coverage of a ``grid``."""
    return torch.stack([resize_to_grid(mask.float(), grid) for mask in masks])


# ------------------------------------------------------------------------------------------------ masks from attention
MASK_METHODS = ("cluster", "propagate")


def _kmeans(points: torch.Tensor, clusters: int, *, seed: int, iterations: int = 50) -> tuple[torch.Tensor, float]:
    """k-means++ labels of ``points`` ``[P, D]`` and their inertia; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    for _ in range(1, clusters):
        distance = torch.cdist(points, points[chosen]).amin(1) ** 2
        if float(distance.sum()) <= 0:
            break
        chosen.append(int(torch.multinomial(distance / distance.sum(), 1, generator=generator)))
    centres = points[chosen].clone()
    labels = torch.zeros(len(points), dtype=torch.long)
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(1)
        updated = torch.stack(
            [points[labels == j].mean(0) if bool((labels == j).any()) else centres[j] for j in range(len(centres))]
        )
        if torch.allclose(updated, centres):
            break
        centres = updated
    inertia = float(((points - centres[labels]) ** 2).sum())
    return labels, inertia


def _best_assignment(score: torch.Tensor) -> list[int]:
    """The distinct column for each row of ``score`` ``[N, M]`` that maximizes the total (exhaustive for small N)."""
    count, columns = score.shape
    if count <= 6:
        options = itertools.permutations(range(columns), count)
        return list(max(options, key=lambda cols: sum(float(score[k, c]) for k, c in enumerate(cols))))
    chosen: list[int] = []
    for row in range(count):  # greedy beyond that: rows in order, best free column
        free = [c for c in range(columns) if c not in chosen]
        chosen.append(max(free, key=lambda c: float(score[row, c])))
    return chosen


def attention_masks(
    token_maps: torch.Tensor,
    self_maps: torch.Tensor,
    *,
    method: str = "cluster",
    background: torch.Tensor | None = None,
    power: int = 4,
    threshold: float = 0.1,
    restarts: int = 3,
    groups: int = 0,
    min_piece: float = 0.25,
) -> torch.Tensor:
    """Masks of the concepts from the model's attention, ``[N, h, w]`` booleans on the self-attention grid.

    Args:
        token_maps: ``[N, h, w]`` cross-attention of each concept token on the self-attention grid.
        self_maps: ``[h * w, h * w]`` self-attention on that grid (rows: queries, each summing to 1).
        method: ``"cluster"``: the self-attention rows are clustered into ``groups`` groups (k-means), the group
            that covers most of the image border is the background, and each token takes one group, the assignment
            that maximizes the summed ratios of each token's mean map inside its group to its mean over the image
            (exact). ``"propagate"``: AttenCraft's rule, each token's squared, min-max-normalized map propagated by
            the min-max-normalized affinity to the ``power`` and assigned where it beats every other class by more
            than ``threshold``.
        background: ``[h, w]`` map of the background handle for ``"propagate"`` (AttenCraft: the start token),
            competing as a class of its own; ``None``: concepts only.
        groups: ``"cluster"`` only: how many groups to cluster into (0: N + 2). With more than N + 1, an object
            that k-means would have split in two (a large circle's rim and inside) no longer takes the group of a
            small second object; after the one-group-per-token assignment every further group that is not the
            background goes to the token with the highest ratio there, if that ratio is above 1, and stays
            background otherwise; but a piece of such a group that borders only one token's own group (not the
            one it went to) goes to that token: on the shapes model a square's edge can cluster apart from its inside
            and be attended to more by the other object's token.
        min_piece: drop each mask's 4-connected pieces smaller than this fraction of its largest piece (0: keep
            all): a group of the other object's rim, or a speck, that went to the wrong token.

    ``"cluster"`` is the default because on the shipped shapes model the start token is not a background map and
    token maps are too diffuse for the margin rule; N + 2 groups and pieces of at least 0.25 are the best measured
    there (mask IoU with the drawn objects in ``benchmarks/concept_masks.py``, tokens drawn in
    ``benchmarks/concepts.py``; docs/concepts.md). ``tests/training/test_concepts.py`` checks one scene.
    """
    count, height, width = token_maps.shape
    if self_maps.shape != (height * width, height * width):
        raise ValueError(f"`self_maps` must be [{height * width}, {height * width}], got {tuple(self_maps.shape)}")
    if method == "propagate":
        classes = token_maps if background is None else torch.cat([token_maps, background[None]])
        sharpened = normalize_min_max(normalize_min_max(classes.float()) ** 2)
        affinity = normalize_min_max(self_maps.float()[None])[0]
        affinity = normalize_min_max(torch.linalg.matrix_power(affinity, power)[None])[0]
        scores = normalize_min_max((affinity @ sharpened.flatten(1).T).T.reshape(-1, height, width))
        if len(scores) == 1:
            return drop_small_pieces((scores > threshold)[:count], min_piece)
        ranked = scores.sort(dim=0, descending=True).values
        best = scores.argmax(0)
        confident = ranked[0] - ranked[1] > threshold
        return drop_small_pieces(torch.stack([(best == k) & confident for k in range(count)]), min_piece)
    if method != "cluster":
        raise ValueError(f"`method` must be one of {MASK_METHODS}, got {method!r}")
    if groups and groups < count + 1:
        raise ValueError(f"`groups` must be 0 or at least the number of tokens + 1 ({count + 1}), got {groups}")
    rows = self_maps.float() / self_maps.float().sum(-1, keepdim=True).clamp_min(1e-12)
    clusters = groups or count + 2
    labels, _ = min((_kmeans(rows, clusters, seed=seed) for seed in range(restarts)), key=lambda item: item[1])
    border = torch.zeros(height, width, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    border = border.flatten()  # labels are flat, one per self-attention row
    group_ids = range(int(labels.max()) + 1)
    background_group = max(group_ids, key=lambda j: int(((labels == j) & border).sum()))
    flat = token_maps.float().flatten(1)
    # How much more each token attends to a group than to the image on average: a ratio to the token's own mean,
    # so that a token whose attention is weak everywhere can still win the group it attends to most.
    score = torch.full((count, len(group_ids)), -float("inf"))
    for j in group_ids:
        inside = labels == j
        if j != background_group and bool(inside.any()):
            score[:, j] = flat[:, inside].mean(1) / flat.mean(1).clamp_min(1e-12)
    if int(torch.isfinite(score[0]).sum()) < count:
        return torch.zeros(count, height, width, dtype=torch.bool)
    owner = torch.full_like(labels, -1)
    chosen = _best_assignment(score)
    for token, group in enumerate(chosen):
        owner[labels == group] = token
    grid = labels.reshape(height, width)
    bodies = [dilate((grid == group).float(), 1).bool().flatten() for group in chosen]  # each token's group + 1 cell
    for j in group_ids:  # the further groups of an over-segmentation (``groups`` > N + 1)
        if j in chosen or not torch.isfinite(score[0, j]):
            continue
        token = int(score[:, j].argmax())
        if score[token, j] <= 1:
            continue
        for piece in connected_components((grid == j).numpy()):
            cells = torch.from_numpy(piece[:, 0] * width + piece[:, 1])
            touched = [k for k, body in enumerate(bodies) if bool(body[cells].any())]
            # a piece that borders only another token's object is that object's edge (a square's rim), however
            # little either token attends to it
            owner[cells] = touched[0] if len(touched) == 1 else token
    masks = torch.stack([owner == token for token in range(count)]).reshape(count, height, width)
    return drop_small_pieces(masks, min_piece)


def mask_ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Structural similarity of two ``[H, W]`` masks in [0, 1] (uniform window, sample covariance, data range 1):
    AttenCraft accepts a refreshed mask only when it stays this similar to the previous one."""
    a, b = a.float()[None, None], b.float()[None, None]
    window = min(window, a.shape[-1], a.shape[-2]) | 1
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731 - a local shorthand
    n = window * window
    correction = n / (n - 1)
    mu_a, mu_b = pool(a), pool(b)
    var_a = (pool(a * a) - mu_a**2) * correction
    var_b = (pool(b * b) - mu_b**2) * correction
    cov = (pool(a * b) - mu_a * mu_b) * correction
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())


def save_mask_images(masks: torch.Tensor, tokens: Sequence[str], folder: Path, size: tuple[int, int], tag: str) -> None:
    """One black/white PNG per concept, upscaled to the image size, so a person can check what was found."""
    folder.mkdir(parents=True, exist_ok=True)
    for token, mask in zip(tokens, masks, strict=True):
        plane = F.interpolate(mask.float()[None, None], size=size, mode="nearest")[0, 0]
        name = f"{tag}-{safe_name(token)}.png"
        Image.fromarray((plane.numpy() * 255).astype(np.uint8)).save(folder / name)


def latest_mask_images(folder: str | Path) -> list[Path]:
    """The newest set of masks :func:`save_mask_images` wrote under ``folder`` with ``step-NNNNN`` tags (what the
    training used last; one PNG per concept), or ``[]`` when none was saved."""
    found = sorted(Path(folder).glob("step-*-*.png"))
    if not found:
        return []
    latest = found[-1].name.split("-")[1]
    return [path for path in found if path.name.split("-")[1] == latest]


def safe_name(token: str) -> str:
    """A file-name-safe form of a token string (``<asset0>`` -> ``asset0``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "token"


# ------------------------------------------------------------------------------------------------ loading
def load_concepts(pipe: Any, folder: str | Path, *, adapter_name: str | None = None) -> list[str]:
    """Load a trained concept folder into ``pipe`` with diffusers' own loaders and return the tokens.

    The same as calling, for every token, ``pipe.load_textual_inversion(<folder>/learned_embeds/<token>.safetensors)``
    (SDXL: once per text encoder) and then ``pipe.load_lora_weights(<folder>)``; a fully fine-tuned run instead saved
    a whole pipeline under ``<folder>/pipeline`` (load that with ``from_pretrained``).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: is it the --out folder of a concept training run?")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("full_finetune"):
        raise ConceptError(
            f"{folder} holds a fully fine-tuned pipeline: load it with "
            f"DiffusionPipeline.from_pretrained('{folder / 'pipeline'}')"
        )
    tokens = manifest["tokens"]
    for token, file in zip(tokens, manifest["embeddings"], strict=True):
        path = folder / file
        if hasattr(pipe, "text_encoder_2"):
            state = load_file(str(path))
            pipe.load_textual_inversion(
                state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
        else:
            pipe.load_textual_inversion(str(path), token=token)
    if manifest.get("lora"):
        pipe.load_lora_weights(str(folder), weight_name=manifest["lora"], adapter_name=adapter_name)
    logger.info("loaded concepts %s from %s", tokens, folder)
    return tokens


def unload_concepts(pipe: Any, tokens: Sequence[str]) -> None:
    """Take the LoRA weights and the learned tokens out of ``pipe`` again."""
    if getattr(pipe, "unload_lora_weights", None) is not None:
        pipe.unload_lora_weights()
    pipe.unload_textual_inversion(list(tokens))
    if hasattr(pipe, "text_encoder_2"):
        pipe.unload_textual_inversion(list(tokens), tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)


__all__ = [
    "MASK_METHODS",
    "ConceptInputs",
    "attention_masks",
    "check_masks",
    "check_token_strings",
    "concept_prompt",
    "cross_attention_loss",
    "default_tokens",
    "latest_mask_images",
    "load_concepts",
    "mask_ssim",
    "masked_diffusion_loss",
    "masks_at",
    "normalize_max",
    "normalize_min_max",
    "prepare_concepts",
    "save_mask_images",
    "unload_concepts",
]
