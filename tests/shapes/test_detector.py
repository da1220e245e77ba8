"""The detector is right on rendered scenes and says "unknown" instead of guessing on degraded ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from attncontrol.shapes import UNKNOWN, SceneGenerator, detect


def match(scene, detected, tolerance=2.0):
    """Per ground-truth object: 'correct', 'unknown' (right colour, shape withheld), 'wrong' or 'missed'."""
    outcomes = []
    for obj in scene.objects:
        near = [
            d
            for d in detected
            if abs(d.centroid[0] - obj.centroid[0]) <= tolerance and abs(d.centroid[1] - obj.centroid[1]) <= tolerance
        ]
        if not near:
            outcomes.append("missed")
        elif near[0].matches(obj.color, obj.shape):
            outcomes.append("correct")
        elif near[0].color == obj.color and near[0].shape == UNKNOWN:
            outcomes.append("unknown")
        else:
            outcomes.append("wrong")
    return outcomes


def test_at_least_99_percent_right_on_rendered_scenes():
    outcomes = []
    for scene in SceneGenerator(2024).batch(0, 400):
        detected = detect(scene.image)
        outcomes += match(scene, detected, tolerance=1.0)
        assert len(detected) == len(scene.objects)
    accuracy = outcomes.count("correct") / len(outcomes)
    assert len(outcomes) > 700
    assert accuracy >= 0.99, f"accuracy {accuracy:.4f}"


def test_boxes_and_areas_match_ground_truth():
    scene = SceneGenerator(5).scene(0)
    for obj in scene.objects:
        (found,) = [d for d in detect(scene.image) if d.matches(obj.color, obj.shape) and d.box == obj.box]
        assert found.area == obj.area


def test_larger_images_are_downscaled():
    scene = SceneGenerator(6).scene(1)
    big = Image.fromarray(scene.image).resize((256, 256), Image.NEAREST)
    assert match(scene, detect(big), tolerance=1.0) == ["correct"] * len(scene.objects)


@pytest.mark.parametrize(("kind", "amount"), [("blur", 1.0), ("blur", 2.5), ("noise", 40), ("noise", 70)])
def test_degraded_images_give_unknown_rather_than_wrong(kind, amount):
    rng = np.random.default_rng(0)
    outcomes = []
    for scene in SceneGenerator(7).batch(0, 80):
        image = scene.image
        if kind == "blur":
            image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(amount)))
        else:
            image = np.clip(image + rng.normal(0, amount, image.shape), 0, 255).astype(np.uint8)
        outcomes += match(scene, detect(image), tolerance=4.0)
    assert outcomes.count("wrong") / len(outcomes) <= 0.02
    if amount in (2.5, 70):
        assert outcomes.count("unknown") > outcomes.count("correct")  # it knows it cannot tell


def test_pure_noise_and_blank_images_have_no_known_shapes():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert all(d.shape == UNKNOWN for d in detect(noise))
    assert detect(np.full((64, 64, 3), 128, np.uint8)) == []


def test_float_arrays_and_bad_input():
    scene = SceneGenerator(8).scene(2)
    assert len(detect(scene.image.astype(np.float32) / 255.0)) == len(scene.objects)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        detect(np.zeros((64, 64)))
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        detect("image.png")
