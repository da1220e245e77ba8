"""Read shapes-world images back: which coloured shapes are where.

Pixels are classified by hue (with saturation and brightness floors, so the neutral backgrounds and washed-out
pixels are "none"), cleaned of isolated pixels and pinholes, and split into connected regions per colour. A region's
shape is the ideal circle/square/triangle that best matches it inside its own box (IoU); when no template fits well,
or two fit about equally, or the region's edges are too soft (blur), the shape is reported as "unknown" rather than
guessed, which is how blurry or noisy generations degrade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from attncontrol.core.masks import connected_components
from attncontrol.shapes.scenes import COLORS, IMAGE_SIZE, SHAPES, shape_mask

UNKNOWN = "unknown"
# Hue centres in degrees of the four object colours (HSV). Pixels further than HUE_TOLERANCE from all are "none".
_HUE_CENTRES = {"red": 0.0, "yellow": 52.0, "green": 130.0, "blue": 228.0}
HUE_TOLERANCE = 30.0
MIN_SATURATION = 0.4
MIN_VALUE = 0.3
MIN_AREA = 12  # pixels at 64x64: smaller regions are noise (the smallest drawn triangle has ~70)
MIN_IOU = 0.75
MIN_IOU_MARGIN = 0.06
# Width (pixels) of the object-to-background transition above which edges are too soft to tell shapes apart:
# crisp renders measure ~0, a Gaussian blur of sigma 1.5 px ~2.1 (shapes still read right), sigma 2.5 px ~3.3.
MAX_EDGE_WIDTH = 2.6


@dataclass
class DetectedObject:
    """One region: colour, shape (or "unknown"), centroid (x, y), box (x0, y0, x1, y1 exclusive), area, fit IoU."""

    color: str
    shape: str
    centroid: tuple[float, float]
    box: tuple[int, int, int, int]
    area: int
    iou: float
    edge_width: float = 0.0

    def matches(self, color: str, shape: str) -> bool:
        return self.color == color and self.shape == shape


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"`image` must be [H, W, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` must be a PIL image or a numpy array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(image)


def color_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel colour index (1..len(COLORS), in COLORS order) or 0 for background / unclassifiable."""
    rgb = image.astype(np.float32) / 255.0
    high = rgb.max(-1)
    low = rgb.min(-1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = (
        np.where(
            high == r,
            ((g - b) / safe) % 6,
            np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4),
        )
        * 60.0
    )
    labels = np.zeros(image.shape[:2], dtype=np.int64)
    best = np.full(image.shape[:2], HUE_TOLERANCE, dtype=np.float32)
    for index, name in enumerate(COLORS, start=1):
        distance = np.abs((hue - _HUE_CENTRES[name] + 180.0) % 360.0 - 180.0)
        closer = distance < best
        labels[closer] = index
        best[closer] = distance[closer]
    labels[(saturation < MIN_SATURATION) | (high < MIN_VALUE)] = 0
    return labels


def _clean_labels(labels: np.ndarray, classes: int) -> np.ndarray:
    """Drop isolated pixels and fill pinholes, leaving edges and corners (triangle tips) where they are.

    A coloured pixel survives when at least one of its 8 neighbours shares its colour (a triangle's apex has one); an
    unlabelled pixel takes the colour that holds at least 6 of its 8 neighbours.
    """
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    height, width = labels.shape
    votes = np.zeros((classes + 1, height, width), dtype=np.int16)
    for dy in range(3):
        for dx in range(3):
            window = padded[dy : dy + height, dx : dx + width]
            for value in range(1, classes + 1):
                votes[value] += window == value
    same = np.take_along_axis(votes, labels[None], axis=0)[0]
    cleaned = np.where((labels > 0) & (same < 2), 0, labels)
    majority = votes.argmax(0)
    fill = (labels == 0) & (votes.max(0) >= 6)
    return np.where(fill, majority, cleaned)


def classify_shape(region: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape of a boolean region mask and its IoU, or ("unknown", best IoU)."""
    ys, xs = np.nonzero(region)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    width, height = x1 - x0, y1 - y0
    if max(width, height) > 1.6 * min(width, height):
        return UNKNOWN, 0.0
    crop = region[y0:y1, x0:x1]
    half = max(width, height) / 2
    size = max(width, height)
    scores = {}
    for shape in SHAPES:
        template = shape_mask(shape, width / 2, height / 2, half, size)[:height, :width]
        union = np.logical_or(template, crop).sum()
        scores[shape] = float(np.logical_and(template, crop).sum() / union) if union else 0.0
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    (best, best_iou), (_, second_iou) = ranked[0], ranked[1]
    if best_iou < MIN_IOU or best_iou - second_iou < MIN_IOU_MARGIN:
        return UNKNOWN, best_iou
    return best, best_iou


def edge_width(image: np.ndarray, region: np.ndarray) -> float:
    """Mean width of the soft transition around ``region``: transition pixels over an estimated perimeter.

    Each pixel near the region is projected onto the line from the background colour (median of the image border)
    to the object colour (median of the region); pixels 20-80% of the way are in transition.
    """
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    direction = np.median(pixels[region], axis=0) - background
    norm = float((direction**2).sum())
    if norm < 1e-6:
        return float("inf")
    ys, xs = np.nonzero(region)
    y0, y1 = max(ys.min() - 4, 0), ys.max() + 5
    x0, x1 = max(xs.min() - 4, 0), xs.max() + 5
    alpha = ((pixels[y0:y1, x0:x1] - background) @ direction) / norm
    transition = int(((alpha > 0.2) & (alpha < 0.8)).sum())
    core = int((alpha >= 0.5).sum())
    return transition / (4.0 * np.sqrt(max(core, 1)))


def detect(image: Image.Image | np.ndarray, *, min_area: int = MIN_AREA) -> list[DetectedObject]:
    """Objects in a shapes-world image (any size; larger images are box-downscaled to 64x64), largest first."""
    array = _as_array(image)
    labels = _clean_labels(color_labels(array), len(COLORS))
    names = list(COLORS)
    objects = []
    for index, color in enumerate(names, start=1):
        for pixels in connected_components(labels == index):
            if len(pixels) < min_area:
                continue
            region = np.zeros(labels.shape, dtype=bool)
            region[pixels[:, 0], pixels[:, 1]] = True
            shape, iou = classify_shape(region)
            softness = edge_width(array, region)
            if softness > MAX_EDGE_WIDTH:
                shape = UNKNOWN
            ys, xs = pixels[:, 0], pixels[:, 1]
            objects.append(
                DetectedObject(
                    color=color,
                    shape=shape,
                    centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                    box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                    area=len(pixels),
                    iou=iou,
                    edge_width=softness,
                )
            )
    return sorted(objects, key=lambda obj: obj.area, reverse=True)
