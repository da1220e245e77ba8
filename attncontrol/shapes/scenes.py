"""The shapes world: 64x64 scenes of flat-coloured shapes with captions and exact ground truth.

Every scene is a pure function of ``(seed, index)``, rendered on the fly with numpy: no dataset files. Objects never
overlap and keep a gap between them, so each one is a separate connected region of its colour, which is what lets
the detector score generated images automatically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 35),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
DEFAULT_BACKGROUND = "white"
# Half-extent of a shape in pixels (radius for circles, half side for squares and triangles).
MIN_HALF, MAX_HALF = 6, 13
GAP = 4  # minimum free pixels between two objects


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw: a shape of a colour centred at (x, y) with half-extent ``half`` (pixels, 64x64 scale)."""

    color: str
    shape: str
    x: float
    y: float
    half: float

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"`color` must be one of {list(COLORS)}, got {self.color!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {self.shape!r}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.x - self.half, self.y - self.half, self.x + self.half, self.y + self.half


@dataclass
class SceneObject:
    """Ground truth of one drawn object: its spec, pixel mask, tight box (x0, y0, x1, y1 exclusive) and centroid."""

    color: str
    shape: str
    mask: np.ndarray
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    objects: list[SceneObject]
    background: str
    specs: list[ObjectSpec] = field(default_factory=list)

    def phrase_masks(self) -> dict[str, np.ndarray]:
        """Pixel mask per distinct "colour shape" phrase, in caption order: identical objects share one union
        mask, because a caption's words cannot tell them apart."""
        unions: dict[str, np.ndarray] = {}
        for obj in self.objects:
            phrase = f"{obj.color} {obj.shape}"
            unions[phrase] = unions.get(phrase, np.zeros_like(obj.mask)) | obj.mask
        return unions


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box ``(x0, y0, x1, y1)`` (exclusive ends) of a non-empty pixel mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def shape_mask(shape: str, x: float, y: float, half: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask of one shape, sampled at pixel centres (crisp edges, no anti-aliasing).

    Triangles point up with a base as wide as they are tall, so circle, square and triangle fill roughly 79%, 100% and
    50% of their box: the property the detector keys on.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xs - x) ** 2 + (ys - y) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - x) <= half) & (np.abs(ys - y) <= half)
    if shape == "triangle":
        top, bottom = y - half, y + half
        inside_rows = (ys >= top) & (ys <= bottom)
        # Half width grows linearly from 0 at the apex to ``half`` at the base.
        half_width = (ys - top) / (2 * half) * half
        return inside_rows & (np.abs(xs - x) <= half_width)
    raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {shape!r}")


def render(specs: Sequence[ObjectSpec], background: str = DEFAULT_BACKGROUND, size: int = IMAGE_SIZE) -> Scene:
    """Draw ``specs`` on a flat background; ground truth is computed from the drawn pixels."""
    if background not in BACKGROUNDS:
        raise ValueError(f"`background` must be one of {list(BACKGROUNDS)}, got {background!r}")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    objects = []
    for spec in specs:
        mask = shape_mask(spec.shape, spec.x, spec.y, spec.half, size)
        if not mask.any():
            raise ValueError(f"object {spec} falls outside the {size}x{size} image")
        image[mask] = COLORS[spec.color]
        ys, xs = np.nonzero(mask)
        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
        objects.append(SceneObject(spec.color, spec.shape, mask, mask_box(mask), centroid))
    return Scene(image, caption_for(specs, background, spatial=False), objects, background, list(specs))


def _article(word: str) -> str:
    return f"a {word}"


def position_word(spec: ObjectSpec, size: int = IMAGE_SIZE) -> str | None:
    """Where a single object clearly is: "on the left", "on the right", "at the top", "at the bottom" or None."""
    third = size / 3
    horizontal = "on the left" if spec.x < third else "on the right" if spec.x > 2 * third else None
    vertical = "at the top" if spec.y < third else "at the bottom" if spec.y > 2 * third else None
    if horizontal and not vertical:
        return horizontal
    if vertical and not horizontal:
        return vertical
    return None


def caption_for(
    specs: Sequence[ObjectSpec],
    background: str,
    *,
    spatial: bool,
    mention_background: bool = False,
    size: int = IMAGE_SIZE,
) -> str:
    """A caption of the scene. Spatial words are used only when they are unambiguous for the drawn layout."""
    names = [f"{spec.color} {spec.shape}" for spec in specs]
    text = None
    if spatial and len(specs) == 1:
        where = position_word(specs[0], size)
        if where:
            text = f"{_article(names[0])} {where}"
    elif spatial and len(specs) == 2:
        first, second = specs
        if abs(first.x - second.x) >= size / 4:
            left, right = (0, 1) if first.x < second.x else (1, 0)
            text = f"{_article(names[left])} on the left and {_article(names[right])} on the right"
        elif abs(first.y - second.y) >= size / 4:
            top, bottom = (0, 1) if first.y < second.y else (1, 0)
            text = f"{_article(names[top])} at the top and {_article(names[bottom])} at the bottom"
    if text is None:
        articles = [_article(name) for name in names]
        text = articles[0] if len(articles) == 1 else ", ".join(articles[:-1]) + " and " + articles[-1]
    if mention_background:
        text += f" on a {background} background"
    return text


def _place(rng: np.random.Generator, count: int, size: int) -> list[tuple[float, float, float]] | None:
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(50):
            half = float(rng.integers(MIN_HALF, MAX_HALF + 1))
            x = float(rng.uniform(half + 1, size - half - 1))
            y = float(rng.uniform(half + 1, size - half - 1))
            # Boxes (not just centres) keep GAP pixels apart, whatever the shapes.
            if all(abs(x - px) >= half + ph + GAP or abs(y - py) >= half + ph + GAP for px, py, ph in placed):
                placed.append((x, y, half))
                break
        else:
            return None
    return placed


class SceneGenerator:
    """Deterministic scenes: ``SceneGenerator(seed).scene(i)`` is the same on every machine.

    Args:
        seed: base seed; scene ``i`` uses its own generator seeded by ``(seed, i)``.
        max_objects: 1 to 3 objects per scene, uniformly unless ``count_weights`` says otherwise.
        count_weights: relative chances of 1, 2, ... ``max_objects`` objects (training pools lean on two-object
            scenes, where colour-shape binding is learned).
        spatial_probability: chance that a caption uses spatial words (when unambiguous).
        background_probability: chance that the background is not white, and then that the caption names it.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        max_objects: int = 3,
        spatial_probability: float = 0.4,
        background_probability: float = 0.3,
        size: int = IMAGE_SIZE,
        count_weights: Sequence[float] | None = None,
    ) -> None:
        if not 1 <= max_objects <= 3:
            raise ValueError(f"`max_objects` must be 1, 2 or 3, got {max_objects}")
        if count_weights is not None:
            weights = np.asarray(count_weights, dtype=np.float64)
            valid = len(weights) == max_objects and np.all(np.isfinite(weights)) and (weights >= 0).all()
            if not valid or weights.sum() <= 0:
                raise ValueError(
                    f"`count_weights` must be {max_objects} non-negative numbers with a positive sum, "
                    f"got {count_weights}"
                )
            # Equal weights keep the uniform draw, so such a generator makes exactly the default scenes.
            count_weights = None if np.all(weights == weights[0]) else tuple(float(w) for w in weights / weights.sum())
        self.count_weights = count_weights
        self.seed = seed
        self.max_objects = max_objects
        self.spatial_probability = spatial_probability
        self.background_probability = background_probability
        self.size = size

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, index])
        if self.count_weights is None:
            count = int(rng.integers(1, self.max_objects + 1))
        else:
            count = int(rng.choice(np.arange(1, self.max_objects + 1), p=self.count_weights))
        layout = None
        while layout is None:
            layout = _place(rng, count, self.size)
        specs = [
            ObjectSpec(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), x, y, half) for x, y, half in layout
        ]
        named_background = rng.random() < self.background_probability
        background = str(rng.choice(["gray", "black"])) if named_background else DEFAULT_BACKGROUND
        scene = render(specs, background, self.size)
        scene.caption = caption_for(
            specs,
            background,
            spatial=rng.random() < self.spatial_probability,
            mention_background=named_background,
            size=self.size,
        )
        return scene

    def batch(self, start: int, count: int) -> list[Scene]:
        return [self.scene(start + offset) for offset in range(count)]


def to_tensor(scenes: Sequence[Scene]):
    """Images as a float tensor in [-1, 1], ``[N, 3, H, W]`` (the VAE's input range)."""
    import torch

    array = np.stack([scene.image for scene in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_pixels(images) -> np.ndarray:
    """The inverse of :func:`to_tensor`: a ``[N, 3, H, W]`` tensor in [-1, 1] (a decoder's output) as ``uint8``
    ``[N, H, W, 3]`` images, what the detector reads."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def fill_ratio(shape: str) -> float:
    """Area of a shape over the area of its box, in the continuum."""
    return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[shape]
