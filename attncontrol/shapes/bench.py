"""Quality bench on the shapes world: fixed prompts x fixed seeds, every image scored by the detector.

Each task turns a pipeline into scored records (one per generated image); the report is a markdown table with
Wilson 95% confidence intervals, plus the images and a JSON file of every record so a person can look at what was
scored. Later capabilities register their own tasks in :data:`TASKS`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from attncontrol.models import family_call_kwargs
from attncontrol.shapes.detector import DetectedObject, detect
from attncontrol.shapes.scenes import COLORS, IMAGE_SIZE, SHAPES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchCase:
    """One prompt to generate with one seed, and the objects that must appear in the image."""

    task: str
    prompt: str
    seed: int
    expected: tuple[tuple[str, str], ...]
    # Layout tasks: one (x0, y0, x1, y1) pixel box per expected object, where its centroid must land.
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    # Whether the boxes are given to the pipeline as regions (False: the uncontrolled baseline, scored the same way).
    use_regions: bool = False


@dataclass
class BenchRecord:
    case: BenchCase
    success: bool
    detected: list[dict]
    image_path: str | None = None


@dataclass
class BenchRow:
    """Success rate of one task with its Wilson 95% interval."""

    task: str
    successes: int
    total: int

    @property
    def rate(self) -> float:
        return self.successes / self.total if self.total else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.total)


@dataclass
class BenchReport:
    model: str
    settings: dict[str, Any]
    rows: list[BenchRow]
    records: list[BenchRecord] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        lines = [
            f"shapes-world bench of `{self.model}` ({self.settings.get('num_inference_steps')} steps, "
            f"guidance {self.settings.get('guidance_scale')}"
            + (f", seeds from {self.settings['seed_offset']}" if self.settings.get("seed_offset") else "")
            + f", {self.seconds:.0f} s)",
            "",
            "| task | success | n | rate | 95% CI |",
            "|---|---:|---:|---:|---|",
        ]
        for row in self.rows:
            low, high = row.interval
            lines.append(f"| {row.task} | {row.successes} | {row.total} | {row.rate:.1%} | {low:.1%} - {high:.1%} |")
        by_task = {row.task: row for row in self.rows}
        for task, baseline in BASELINES.items():
            if task in by_task and baseline in by_task:
                a, b = by_task[task], by_task[baseline]
                low, high = difference_interval(a.successes, a.total, b.successes, b.total)
                lines.append(
                    f"| {task} - {baseline} | | | {a.rate - b.rate:+.1%} | {low:+.1%} - {high:+.1%} (Newcombe) |"
                )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "settings": self.settings,
            "seconds": self.seconds,
            "rows": [{**asdict(row), "rate": row.rate, "interval": row.interval} for row in self.rows],
            "records": [{**asdict(record), "case": asdict(record.case)} for record in self.records],
        }

    def save(self, out: Path) -> None:
        """Write ``report.json`` (every record) and ``report.md`` (the table) into ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_json(), indent=1, default=float))
        (out / "report.md").write_text(self.markdown() + "\n")


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good at rates near 0 or 1 and small n)."""
    if total == 0:
        return float("nan"), float("nan")
    rate = successes / total
    denominator = 1 + z**2 / total
    centre = (rate + z**2 / (2 * total)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / total + z**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(
    successes_a: int, total_a: int, successes_b: int, total_b: int, z: float = 1.959964
) -> tuple[float, float]:
    """Newcombe's hybrid score interval for the difference of two proportions (built from Wilson intervals)."""
    rate_a, rate_b = successes_a / total_a, successes_b / total_b
    low_a, high_a = wilson_interval(successes_a, total_a, z)
    low_b, high_b = wilson_interval(successes_b, total_b, z)
    difference = rate_a - rate_b
    low = difference - math.sqrt((rate_a - low_a) ** 2 + (high_b - rate_b) ** 2)
    high = difference + math.sqrt((high_a - rate_a) ** 2 + (rate_b - low_b) ** 2)
    return max(-1.0, low), min(1.0, high)


def objects_present(detected: Sequence[DetectedObject], expected: Sequence[tuple[str, str]]) -> bool:
    """Whether each expected (colour, shape) is matched by a *distinct* detected object."""
    remaining = list(detected)
    for color, shape in expected:
        match = next((obj for obj in remaining if obj.matches(color, shape)), None)
        if match is None:
            return False
        remaining.remove(match)
    return True


def objects_in_boxes(
    detected: Sequence[DetectedObject], expected: Sequence[tuple[str, str]], boxes: Sequence[Sequence[float]]
) -> bool:
    """Whether each expected (colour, shape) is a distinct detected object whose centroid lies in its box."""
    remaining = list(detected)
    for (color, shape), (x0, y0, x1, y1) in zip(expected, boxes, strict=True):
        match = next(
            (
                obj
                for obj in remaining
                if obj.matches(color, shape) and x0 <= obj.centroid[0] <= x1 and y0 <= obj.centroid[1] <= y1
            ),
            None,
        )
        if match is None:
            return False
        remaining.remove(match)
    return True


def case_success(case: BenchCase, detected: Sequence[DetectedObject]) -> bool:
    if case.boxes is not None:
        return objects_in_boxes(detected, case.expected, case.boxes)
    return objects_present(detected, case.expected)


def single_object_cases(num_seeds: int, seed_offset: int = 0) -> list[BenchCase]:
    """Every colour x shape ("a red circle", ...) with ``num_seeds`` seeds: 12 prompts."""
    return [
        BenchCase("single object", f"a {color} {shape}", seed_offset + seed, ((color, shape),))
        for color, shape in itertools.product(COLORS, SHAPES)
        for seed in range(num_seeds)
    ]


def two_object_cases(num_seeds: int, seed_offset: int = 0, num_prompts: int = 24) -> list[BenchCase]:
    """Pairs of objects of different colours ("a red circle and a blue square"), a fixed subset of prompts."""
    pairs = [
        (a, b) for a, b in itertools.permutations(itertools.product(COLORS, SHAPES), 2) if a[0] != b[0] and a[1] != b[1]
    ]
    rng = np.random.default_rng(1234)
    chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), size=min(num_prompts, len(pairs)), replace=False))]
    return [
        BenchCase("two objects", f"a {a[0]} {a[1]} and a {b[0]} {b[1]}", seed_offset + seed, (a, b))
        for a, b in chosen
        for seed in range(num_seeds)
    ]


HALF = IMAGE_SIZE // 2
# Region layouts: halves for two objects, two top quarters and the bottom half for three.
LAYOUTS: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "left-right": ((0, 0, HALF, IMAGE_SIZE), (HALF, 0, IMAGE_SIZE, IMAGE_SIZE)),
    "top-bottom": ((0, 0, IMAGE_SIZE, HALF), (0, HALF, IMAGE_SIZE, IMAGE_SIZE)),
    "three": ((0, 0, HALF, HALF), (HALF, 0, IMAGE_SIZE, HALF), (0, HALF, IMAGE_SIZE, IMAGE_SIZE)),
}


def layout_cases(num_seeds: int, *, use_regions: bool = True, seed_offset: int = 0) -> list[BenchCase]:
    """Two- and three-object prompts without spatial words, each object assigned a region of a fixed layout.

    12 pairs x 2 two-object layouts + 6 triples = 30 layouts; with ``use_regions=False`` the same cases are the
    uncontrolled baseline (scored against the same boxes).
    """
    objects = list(itertools.product(COLORS, SHAPES))
    rng = np.random.default_rng(4321)
    cases: list[BenchCase] = []
    task = "layout" if use_regions else "layout baseline"

    def distinct(count: int) -> tuple[tuple[str, str], ...]:
        while True:
            picked = [objects[i] for i in rng.choice(len(objects), size=count, replace=False)]
            if len({c for c, _ in picked}) == count and len({s for _, s in picked}) == min(count, len(SHAPES)):
                return tuple(picked)

    groups = [("left-right", distinct(2)) for _ in range(6)] + [("top-bottom", distinct(2)) for _ in range(6)]
    groups += [("left-right", distinct(2)) for _ in range(6)] + [("top-bottom", distinct(2)) for _ in range(6)]
    groups += [("three", distinct(3)) for _ in range(6)]
    for layout, chosen in groups:
        names = [f"a {color} {shape}" for color, shape in chosen]
        prompt = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        for seed in range(num_seeds):
            cases.append(BenchCase(task, prompt, seed_offset + seed, chosen, LAYOUTS[layout], use_regions))
    return cases


QUADRANTS = (
    (0, 0, HALF, HALF),
    (HALF, 0, IMAGE_SIZE, HALF),
    (0, HALF, HALF, IMAGE_SIZE),
    (HALF, HALF, IMAGE_SIZE, IMAGE_SIZE),
)


def placement_cases(num_seeds: int, *, use_regions: bool = True, seed_offset: int = 0) -> list[BenchCase]:
    """Every single-object prompt with one region in each image quadrant: does a region move its object there?

    12 prompts x 4 quadrants; the baseline (``use_regions=False``) is scored against the same quadrants, so it is
    near 25% when the seed alone decides where the object lands.
    """
    task = "placement" if use_regions else "placement baseline"
    return [
        BenchCase(task, f"a {color} {shape}", seed_offset + seed, ((color, shape),), (box,), use_regions)
        for color, shape in itertools.product(COLORS, SHAPES)
        for box in QUADRANTS
        for seed in range(num_seeds)
    ]


# Each task's cases: called as TASKS[task](num_seeds, seed_offset=...).
TASKS: dict[str, Callable[..., list[BenchCase]]] = {
    "single": single_object_cases,
    "two": two_object_cases,
    "layout": layout_cases,
    "layout-baseline": lambda num_seeds, *, seed_offset=0: layout_cases(
        num_seeds, use_regions=False, seed_offset=seed_offset
    ),
    "placement": placement_cases,
    "placement-baseline": lambda num_seeds, *, seed_offset=0: placement_cases(
        num_seeds, use_regions=False, seed_offset=seed_offset
    ),
}
# Tasks whose report row is compared with a baseline row of the same cases (difference with a 95% interval).
BASELINES = {"layout": "layout baseline", "placement": "placement baseline"}


def generate_images(
    pipe: Any, cases: Sequence[BenchCase], *, batch_size: int, call_kwargs: dict, progress: bool = True
) -> list[Image.Image]:
    """Images for ``cases``, batched; each image has its own generator seeded by its case's seed."""
    images: list[Image.Image] = []
    chunks: list[list[BenchCase]] = []
    for case in cases:
        if chunks and len(chunks[-1]) < batch_size and _batch_key(chunks[-1][0]) == _batch_key(case):
            chunks[-1].append(case)
        else:
            chunks.append([case])
    regional = None
    for chunk in tqdm(chunks, desc="bench", disable=not progress, unit="batch"):
        generators = [torch.Generator("cpu").manual_seed(case.seed) for case in chunk]
        if chunk[0].use_regions:
            if regional is None:
                from attncontrol.pipelines.regional import to_regional  # diffusers pipelines: only when needed

                regional = to_regional(pipe)
            output = regional(
                prompt=chunk[0].prompt,
                regions=regions_for(chunk[0]),
                num_images_per_prompt=len(chunk),
                generator=generators,
                **regional_call_kwargs(pipe, call_kwargs, len(chunk)),
            )
        else:
            kwargs = family_call_kwargs(pipe, call_kwargs, len(chunk))
            output = pipe(prompt=[case.prompt for case in chunk], generator=generators, **kwargs)
        images.extend(output.images)
    return images


def regional_call_kwargs(pipe: Any, call_kwargs: dict, images: int) -> dict:
    """:func:`~attncontrol.models.family_call_kwargs` for one regional call of one prompt x ``images`` images: a true-
    CFG negative prompt is one string, which the pipeline repeats per image like the prompt (a list of one per image
    would be repeated again, and its rows would no longer pair with the prompt's)."""
    kwargs = family_call_kwargs(pipe, call_kwargs, images)
    kwargs.pop("negative_prompt", None)
    if "true_cfg_scale" in kwargs:
        kwargs["negative_prompt"] = ""
    return kwargs


def _batch_key(case: BenchCase) -> tuple:
    """Plain cases batch freely; a regional call takes one prompt and one layout, so those must match."""
    return (case.prompt, case.boxes) if case.use_regions else ("plain",)


def regions_for(case: BenchCase) -> list:
    """One hard region per expected object: its box, tied to the phrase "colour shape" of the prompt."""
    from attncontrol.controls import Region

    pairs = zip(case.expected, case.boxes, strict=True)
    return [Region.box(box, phrase=f"{color} {shape}") for (color, shape), box in pairs]


def run_bench(
    pipe: Any,
    *,
    model_name: str = "pipeline",
    tasks: Sequence[str] = ("single", "two"),
    num_seeds: int = 17,
    seed_offset: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    extra_call_kwargs: dict | None = None,
    progress: bool = True,
) -> BenchReport:
    """Generate every case of ``tasks`` with ``pipe`` and score the images.

    ``seed_offset`` shifts every case's seed: settings (a guidance scale, a step count) chosen on other seeds than
    the reported ones are not fitted to them. With ``out_dir``, images go to ``out_dir/images/<task>/<index>.png``
    and the full report to ``out_dir/report.json`` and ``out_dir/report.md``.
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown bench task(s) {unknown}; available: {list(TASKS)}")
    call_kwargs = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        **(extra_call_kwargs or {}),
    }
    pipe.set_progress_bar_config(disable=True)
    out = Path(out_dir) if out_dir is not None else None
    started = time.perf_counter()
    rows, records = [], []
    for task in tasks:
        cases = TASKS[task](num_seeds, seed_offset=seed_offset)
        images = generate_images(pipe, cases, batch_size=batch_size, call_kwargs=call_kwargs, progress=progress)
        successes = 0
        for index, (case, image) in enumerate(zip(cases, images, strict=True)):
            detected = detect(image)
            success = case_success(case, detected)
            successes += success
            path = None
            if out is not None:
                image_path = out / "images" / task / f"{index:04d}.png"
                image_path.parent.mkdir(parents=True, exist_ok=True)
                image.save(image_path)
                path = str(image_path.relative_to(out))
            records.append(BenchRecord(case, bool(success), [asdict(obj) for obj in detected], path))
        rows.append(BenchRow(cases[0].task, successes, len(cases)))
        logger.info("%s: %d/%d", cases[0].task, successes, len(cases))
    settings = {key: value for key, value in call_kwargs.items() if isinstance(value, (int, float, str, bool))}
    settings["num_seeds"] = num_seeds
    if seed_offset:
        settings["seed_offset"] = seed_offset
    report = BenchReport(model_name, settings, rows, records, time.perf_counter() - started)
    if out is not None:
        report.save(out)
    return report
