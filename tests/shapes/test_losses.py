"""The shapes-world region loss: low where each box holds its named colour, high where the colours are swapped."""

from __future__ import annotations

import pytest
import torch

from attncontrol import RegionError
from attncontrol.controls import Region
from attncontrol.shapes import ObjectSpec, render
from attncontrol.shapes.losses import region_color, region_color_loss
from attncontrol.shapes.scenes import to_tensor

LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def images_of(*specs: ObjectSpec) -> torch.Tensor:
    return (to_tensor([render(list(specs))]) + 1) / 2


def test_region_color_loss_prefers_the_right_layout_and_has_gradients():
    scene = images_of(ObjectSpec("red", "circle", 16, 32, 12), ObjectSpec("blue", "square", 48, 32, 12))
    right = [Region.box(LEFT, phrase="red circle"), Region.box(RIGHT, phrase="blue square")]
    swapped = [Region.box(LEFT, phrase="blue square"), Region.box(RIGHT, phrase="red circle")]
    good, bad = region_color_loss(scene, right), region_color_loss(scene, swapped)
    assert float(good) < 0.1 and float(bad) > 1.0
    blank = torch.full((1, 3, 64, 64), 245 / 255)  # the white background, nothing drawn
    assert float(region_color_loss(blank, right)) == pytest.approx(1.0, abs=0.01)  # nothing drawn: full shortfall
    pixels = scene.clone().requires_grad_()
    region_color_loss(pixels, swapped).backward()
    assert float(pixels.grad.abs().sum()) > 0


def test_region_colors_and_errors():
    assert region_color(Region.box(LEFT, prompt="a Yellow triangle.")) == "yellow"
    assert region_color(Region.box(LEFT, phrase="triangle")) is None
    with pytest.raises(RegionError, match="no region names a colour"):
        region_color_loss(torch.ones(1, 3, 64, 64), [Region.box(LEFT, phrase="triangle")])
    with pytest.raises(RegionError, match="images"):
        region_color_loss(torch.zeros(1, 64, 64), [Region.box(LEFT, phrase="red circle")])
