from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from attncontrol.shapes import ObjectSpec, render
from attncontrol.shapes.concept_bench import (
    FAILURE_KINDS,
    WORDS,
    case_failures,
    concept_scenes,
    failure_kind,
    run_concept_case,
    score_concepts,
)

WANTED, OTHER = ("red", "triangle"), ("yellow", "square")


class TokenRenderer:
    """Stands in for a pipeline with trained tokens: renders a fixed list of objects for each prompt."""

    def __init__(self, drawings: dict[str, list[tuple[str, str]]]):
        self.drawings = drawings

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator, **kwargs):
        images = []
        for text in prompt:
            objects = self.drawings[text]
            specs = [ObjectSpec(color, shape, 16 + 32 * i, 32, 9) for i, (color, shape) in enumerate(objects)]
            images.append(Image.fromarray(render(specs).image))
        return SimpleNamespace(images=images)


@pytest.mark.parametrize(
    ("found", "kind"),
    [
        ([WANTED], None),
        ([WANTED, ("blue", "circle")], None),
        ([WANTED, OTHER], "both objects"),
        ([OTHER], "the other object"),
        ([("green", "triangle")], "its shape, wrong colour"),
        ([("red", "unknown")], "its colour, wrong shape"),
        ([("blue", "circle")], "neither"),
        ([], "neither"),
    ],
)
def test_failure_kind(found, kind):
    assert failure_kind(found, WANTED, OTHER) == kind


def test_failures_are_read_back_from_the_scored_images():
    # <asset0> draws its own object; <asset1> its shape in the other object's colour, a typical failure.
    pipe = TokenRenderer(
        {
            "a photo of <asset0>": [WANTED],
            "a photo of <asset1>": [("red", "square")],
            "a photo of <asset0> and <asset1>": [WANTED, OTHER],
        }
    )
    successes, joint, details = score_concepts(
        pipe, ["<asset0>", "<asset1>"], [WANTED, OTHER], template="a photo of {}", samples=3, steps=1
    )
    assert successes == [3, 0] and joint == 3
    case = {"objects": [list(WANTED), list(OTHER)], "details": details}
    assert case_failures(case) == ["its shape, wrong colour"] * 3
    assert set(case_failures(case)) <= set(FAILURE_KINDS)


def test_concept_scenes_have_two_objects_that_differ_in_colour_and_shape():
    for scene in concept_scenes(6):
        first, second = scene.objects
        assert first.color != second.color and first.shape != second.shape


def test_the_words_method_names_each_object_and_trains_nothing(tmp_path, monkeypatch):
    from attncontrol.training.concepts import Config

    scene = render([ObjectSpec(*WANTED, 16, 32, 9), ObjectSpec(*OTHER, 48, 32, 9)])
    pipe = TokenRenderer(
        {
            "a photo of a red triangle": [WANTED],
            "a photo of a yellow square": [OTHER, OTHER],
            "a photo of a red triangle and a yellow square": [WANTED, OTHER],
        }
    )
    monkeypatch.setattr("attncontrol.models.load_pipeline", lambda model: pipe)
    result = run_concept_case(WORDS, 0, scene, tmp_path, base=Config(model="m"), samples=2, steps=1)
    assert result.token_successes == [2, 2] and result.joint_successes == 2
    assert result.steps == 0 and not (tmp_path / "run").exists()
    assert sorted(path.name for path in (tmp_path / "samples").iterdir())[0] == "joint-000.png"
