"""Pictures for people: results side by side, small model outputs scaled up with crisp pixels."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def strip(images: Sequence[Image.Image], *, min_height: int = 256) -> Image.Image:
    """``images`` left to right at the first one's size, scaled up by a whole factor (nearest neighbour) until the
    strip is at least ``min_height`` tall, so a 64-pixel result is readable and its pixels stay honest."""
    if not images:
        raise ValueError("`images` is empty: give at least one picture")
    width, height = images[0].size
    canvas = Image.new("RGB", (width * len(images), height), "white")
    for index, picture in enumerate(images):
        canvas.paste(picture.convert("RGB").resize((width, height)), (index * width, 0))
    scale = max(1, min_height // height)
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
