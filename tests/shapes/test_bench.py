"""The bench scores real pixels: a pipeline that draws its prompt scores 100%, one that draws wrong scores 0%."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from attncontrol.shapes import ObjectSpec, render
from attncontrol.shapes.bench import (
    BASELINES,
    QUADRANTS,
    TASKS,
    case_success,
    difference_interval,
    layout_cases,
    objects_in_boxes,
    objects_present,
    placement_cases,
    run_bench,
    single_object_cases,
    two_object_cases,
    wilson_interval,
)
from attncontrol.shapes.detector import detect
from tests.conftest import tiny_pipeline


class RenderingPipeline:
    """Stands in for a perfect (or colour-blind) text-to-image model: parses the prompt and renders it."""

    def __init__(self, swap_colors: bool = False):
        self.swap_colors = swap_colors
        self.calls = []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator, height, width, **kwargs):
        self.calls.append((list(prompt), kwargs))
        images = []
        for text, gen in zip(prompt, generator, strict=True):
            objects = re.findall(r"a (red|green|blue|yellow) (circle|square|triangle)", text)
            rng = np.random.default_rng(gen.initial_seed())
            specs = []
            for index, (color, shape) in enumerate(objects):
                if self.swap_colors:
                    color = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}[color]
                x = 16 + 32 * index if len(objects) == 2 else float(rng.uniform(20, 44))
                specs.append(ObjectSpec(color, shape, x, 32, 9))
            images.append(Image.fromarray(render(specs).image))
        return SimpleNamespace(images=images)


def test_suites_have_the_promised_sizes():
    single = single_object_cases(17)
    assert len(single) == 204 and len({case.prompt for case in single}) == 12
    two = two_object_cases(5)
    assert len({case.prompt for case in two}) == 24
    assert all(a[0] != b[0] for case in two for a, b in [case.expected])


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_shifts_its_seeds_by_the_offset(task):
    # Held-out seeds (`--seed-offset`) for choosing settings: the same cases, every seed moved, none left behind.
    plain, shifted = TASKS[task](2), TASKS[task](2, seed_offset=1000)
    assert [case.seed + 1000 for case in plain] == [case.seed for case in shifted]
    assert [case.prompt for case in plain] == [case.prompt for case in shifted]


def test_a_perfect_renderer_scores_everything_and_files_are_written(tmp_path):
    pipe = RenderingPipeline()
    report = run_bench(pipe, num_seeds=2, batch_size=5, out_dir=tmp_path, progress=False)
    assert [(row.task, row.successes, row.total) for row in report.rows] == [
        ("single object", 24, 24),
        ("two objects", 48, 48),
    ]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved["records"]) == 72
    first = saved["records"][0]
    # The stored detections are what the detector finds in the saved image: scores come from pixels.
    redetected = detect(Image.open(tmp_path / first["image_path"]))
    assert [(d.color, d.shape) for d in redetected] == [(d["color"], d["shape"]) for d in first["detected"]]
    assert "| single object | 24 | 24 | 100.0% |" in (tmp_path / "report.md").read_text()
    assert pipe.calls[0][1]["num_inference_steps"] == 25


def test_a_colour_blind_renderer_scores_nothing():
    report = run_bench(RenderingPipeline(swap_colors=True), tasks=["single"], num_seeds=1, progress=False)
    assert report.rows[0].successes == 0


def test_objects_must_be_distinct_to_count_twice():
    image = render([ObjectSpec("red", "circle", 20, 32, 8)]).image
    assert objects_present(detect(image), [("red", "circle")])
    assert not objects_present(detect(image), [("red", "circle"), ("red", "circle")])


def test_wilson_interval():
    low, high = wilson_interval(90, 100)
    assert low == pytest.approx(0.8256, abs=1e-3) and high == pytest.approx(0.9448, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_small_bench_on_a_real_pipeline(tmp_path):
    report = run_bench(
        tiny_pipeline("sd"),
        model_name="tiny-sd",
        tasks=["single"],
        num_seeds=1,
        num_inference_steps=2,
        batch_size=12,
        out_dir=tmp_path,
        progress=False,
    )
    (row,) = report.rows
    assert row.total == 12 and 0 <= row.successes <= 12
    assert len(list((tmp_path / "images" / "single").glob("*.png"))) == 12
    assert all(Image.open(tmp_path / r.image_path).size == (64, 64) for r in report.records)


def test_layout_cases_and_scoring_by_box():
    cases = layout_cases(4)
    assert len(cases) == 120 and len({(c.prompt, c.boxes) for c in cases}) == 30
    assert sum(len(c.expected) == 3 for c in cases) == 24
    assert all(" on the " not in c.prompt and " at the " not in c.prompt for c in cases)
    baseline = layout_cases(4, use_regions=False)
    assert [(c.prompt, c.seed, c.boxes) for c in baseline] == [(c.prompt, c.seed, c.boxes) for c in cases]
    scene = render([ObjectSpec("red", "circle", 16, 32, 8), ObjectSpec("blue", "square", 48, 32, 8)])
    found = detect(scene.image)
    left, right = (0, 0, 32, 64), (32, 0, 64, 64)
    assert objects_in_boxes(found, [("red", "circle"), ("blue", "square")], [left, right])
    assert not objects_in_boxes(found, [("red", "circle"), ("blue", "square")], [right, left])


def test_placement_cases_put_every_single_object_in_every_quadrant():
    cases = placement_cases(2)
    assert len(cases) == 12 * 4 * 2 and all(c.use_regions and len(c.boxes) == 1 for c in cases)
    assert {c.boxes[0] for c in cases} == set(QUADRANTS)
    baseline = placement_cases(2, use_regions=False)
    assert [(c.prompt, c.seed, c.boxes) for c in baseline] == [(c.prompt, c.seed, c.boxes) for c in cases]
    assert {c.task for c in baseline} == {"placement baseline"} and "placement" in BASELINES
    found = detect(render([ObjectSpec("red", "circle", 48, 16, 8)]).image)
    scored = [case_success(c, found) for c in cases if c.prompt == "a red circle" and c.seed == 0]
    assert scored == [False, True, False, False]  # the quadrants in order: top left, top right, ...


def test_difference_interval_matches_newcombe():
    # Newcombe (1998), method 10, example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339.
    low, high = difference_interval(56, 70, 48, 80)
    assert low == pytest.approx(0.0524, abs=5e-4) and high == pytest.approx(0.3339, abs=5e-4)


def test_layout_bench_on_a_real_pipeline_reports_the_difference(tmp_path):
    report = run_bench(
        tiny_pipeline("sd"),
        tasks=["layout", "layout-baseline"],
        num_seeds=1,
        num_inference_steps=1,
        batch_size=8,
        out_dir=tmp_path,
        progress=False,
    )
    assert [(row.task, row.total) for row in report.rows] == [("layout", 30), ("layout baseline", 30)]
    assert "| layout - layout baseline |" in report.markdown()
    assert len(list((tmp_path / "images" / "layout").glob("*.png"))) == 30


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown bench task"):
        run_bench(RenderingPipeline(), tasks=["three"])
