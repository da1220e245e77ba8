"""Mask inputs become validated [H, W] planes; bad ones raise errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attncontrol import MaskError, SpatialMask, box_mask, circle_mask, dilate, feather, load_mask, resize_to_grid


def left_half(height=8, width=12):
    array = np.zeros((height, width), dtype=np.uint8)
    array[:, : width // 2] = 255
    return array


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(left_half()),
        lambda: Image.fromarray(np.dstack([np.zeros((8, 12, 3), np.uint8), left_half()]), "RGBA"),
        lambda: Image.fromarray(np.dstack([left_half()] * 3), "RGB"),
        lambda: left_half(),
        lambda: left_half() > 0,
        lambda: torch.from_numpy(left_half()).float()[None] / 255,
        lambda: (0, 0, 6, 8),
        lambda: (0.0, 0.0, 0.5, 1.0),
    ],
    ids=["pil-L", "pil-RGBA-alpha", "pil-RGB", "uint8", "bool", "tensor-1HW", "box-pixels", "box-relative"],
)
def test_every_input_type_gives_the_same_plane(make):
    plane = load_mask(make(), image_size=(8, 12))
    expected = torch.from_numpy(left_half()).float() / 255
    assert plane.dtype == torch.float32
    assert torch.equal(plane, expected)


def test_same_aspect_ratio_is_resized():
    plane = load_mask(left_half(16, 24), image_size=(8, 12))
    assert plane.shape == (8, 12)
    assert torch.allclose(plane, torch.from_numpy(left_half()).float() / 255)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (left_half(8, 8), r"`region` is 8x8 \(HxW\) but the image is 8x12: the aspect ratios differ"),
        (np.zeros((2, 1, 8, 12)), r"`region` must be 2-D"),
        (np.zeros((8, 12)), r"`region` is empty"),
        (np.full((8, 12), np.nan, dtype=np.float32), r"`region` contains NaN"),
        (np.full((8, 12), 2.0, dtype=np.float32), r"`region` has float values outside \[0, 1\]"),
        (np.full((8, 12), 300, dtype=np.int32), r"`region` has integer values outside 0..255"),
        ("mask.png", r"`region` must be a PIL image"),
        ((5, 0, 2, 8), r"`region` \(5, 0, 2, 8\) must satisfy x0 < x1"),
        ((20, 20, 30, 30), r"lies entirely outside"),
    ],
)
def test_bad_masks_raise_with_the_argument_name(value, message):
    with pytest.raises(MaskError, match=message):
        load_mask(value, name="region", image_size=(8, 12))


def test_empty_mask_allowed_when_asked():
    assert float(load_mask(np.zeros((4, 4)), allow_empty=True).max()) == 0.0


def test_resize_to_grid_gives_coverage():
    mask = box_mask((0, 0, 3, 4), (4, 4))  # left 3 of 4 columns
    grid = resize_to_grid(mask, (2, 2))
    assert torch.allclose(grid, torch.tensor([[1.0, 0.5], [1.0, 0.5]]))


def test_dilate_erode_feather_and_circle():
    mask = torch.zeros(9, 9)
    mask[4, 4] = 1
    assert int(dilate(mask, 1).sum()) == 9
    assert int(dilate(dilate(mask, 2), -2).sum()) == 1
    soft = feather(box_mask((3, 3, 6, 6), (9, 9)), 1.0)
    assert 0 < float(soft[2, 4]) < 1 and float(soft[0, 0]) < 0.01
    disc = circle_mask((0.5, 0.5), 0.25, (8, 8))
    assert disc[4, 4] == 1 and disc[0, 0] == 0


def test_spatial_mask_caches_each_grid_once():
    mask = SpatialMask((0.0, 0.0, 0.5, 1.0), (16, 24), name="region", dilation=1)
    first = mask.at((8, 12))
    assert first is mask.at((8, 12))
    assert first.shape == (96,)
    assert mask.at((4, 6)) is not first


def test_drop_small_pieces_keeps_pieces_near_the_largest():
    from attncontrol.core.masks import connected_components, drop_small_pieces

    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :2, :5] = True  # 10 cells
    masks[0, 5, 5:8] = True  # 3 cells: 0.3 of the largest
    masks[0, 7, 0] = True  # 1 cell, touching nothing (4-connectivity)
    masks[1, 6:8, 6:8] = True
    assert len(connected_components(masks[0].numpy())) == 3
    kept = drop_small_pieces(masks, 0.25)
    expected = masks.clone()
    expected[0, 7, 0] = False
    assert torch.equal(kept, expected)
    assert torch.equal(drop_small_pieces(masks, 0.5)[0], masks[0] & (torch.arange(8) < 2)[:, None])
    assert torch.equal(drop_small_pieces(masks, 0.0), masks)
