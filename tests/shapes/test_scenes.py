from __future__ import annotations

import numpy as np
import pytest

from attncontrol.shapes import COLORS, SHAPES, ObjectSpec, SceneGenerator, caption_for, render
from attncontrol.shapes.scenes import BACKGROUNDS, GAP


def test_scenes_are_deterministic_per_seed_and_index():
    first, again, other = SceneGenerator(3).scene(5), SceneGenerator(3).scene(5), SceneGenerator(4).scene(5)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    assert not np.array_equal(first.image, other.image)


def test_scenes_cover_the_world_and_keep_objects_apart():
    scenes = SceneGenerator(0).batch(0, 300)
    counts = {len(scene.objects) for scene in scenes}
    assert counts == {1, 2, 3}
    assert {obj.color for scene in scenes for obj in scene.objects} == set(COLORS)
    assert {obj.shape for scene in scenes for obj in scene.objects} == set(SHAPES)
    assert {scene.background for scene in scenes} == set(BACKGROUNDS)
    assert any(" on the left and " in scene.caption for scene in scenes)
    assert any(" background" in scene.caption for scene in scenes)
    for scene in scenes:
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        for i, a in enumerate(scene.objects):
            # The ground-truth mask is exactly the pixels drawn in the object's colour.
            assert np.all(scene.image[a.mask] == COLORS[a.color])
            for b in scene.objects[i + 1 :]:
                apart_x = a.box[2] + GAP - 1 <= b.box[0] or b.box[2] + GAP - 1 <= a.box[0]
                apart_y = a.box[3] + GAP - 1 <= b.box[1] or b.box[3] + GAP - 1 <= a.box[1]
                assert apart_x or apart_y


def test_count_weights_shift_the_number_of_objects():
    scenes = SceneGenerator(0, count_weights=(0, 1, 0)).batch(0, 50)
    assert {len(scene.objects) for scene in scenes} == {2}
    leaning = SceneGenerator(0, count_weights=(1, 3, 1)).batch(0, 400)
    twos = sum(len(scene.objects) == 2 for scene in leaning) / 400
    assert 0.5 < twos < 0.7
    # Equal weights are the default uniform draw: the very same scenes.
    same = SceneGenerator(0, count_weights=(2, 2, 2)).batch(0, 20)
    assert [s.caption for s in same] == [s.caption for s in SceneGenerator(0).batch(0, 20)]
    for bad in [(1, 1), (1, -1, 1), (0, 0, 0), (1, float("nan"), 1)]:
        with pytest.raises(ValueError, match="`count_weights` must be 3 non-negative numbers"):
            SceneGenerator(0, count_weights=bad)


def test_captions_name_every_object_and_only_true_positions():
    scenes = SceneGenerator(1).batch(0, 200)
    for scene in scenes:
        for obj in scene.objects:
            assert f"{obj.color} {obj.shape}" in scene.caption
        if " on the left and " in scene.caption:
            first, second = scene.objects
            left_name = scene.caption.split(" on the left and ")[0].removeprefix("a ")
            if f"{first.color} {first.shape}" != f"{second.color} {second.shape}":
                left, right = (first, second) if left_name == f"{first.color} {first.shape}" else (second, first)
                assert left.centroid[0] < right.centroid[0]


def test_render_explicit_specs_and_errors():
    scene = render([ObjectSpec("red", "circle", 16, 32, 8), ObjectSpec("blue", "square", 48, 32, 8)])
    assert [(o.color, o.shape) for o in scene.objects] == [("red", "circle"), ("blue", "square")]
    assert scene.objects[0].centroid == pytest.approx((16, 32), abs=0.5)
    spatial = caption_for(scene.specs, "white", spatial=True)
    assert spatial == "a red circle on the left and a blue square on the right"
    with pytest.raises(ValueError, match="`color` must be one of"):
        ObjectSpec("purple", "circle", 1, 1, 1)
    with pytest.raises(ValueError, match="outside"):
        render([ObjectSpec("red", "circle", 200, 200, 5)])
