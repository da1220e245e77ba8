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
            f"guidance {self.settings.get('guidance_scale')}, {self.seconds:.0f} s)",
            "",
            "| task | success | n | rate | 95% CI |",
            "|---|---:|---:|---:|---|",
        ]
        for row in self.rows:
            low, high = row.interval
            lines.append(f"| {row.task} | {row.successes} | {row.total} | {row.rate:.1%} | {low:.1%} - {high:.1%} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "settings": self.settings,
            "seconds": self.seconds,
            "rows": [{**asdict(row), "rate": row.rate, "interval": row.interval} for row in self.rows],
            "records": [{**asdict(record), "case": asdict(record.case)} for record in self.records],
        }


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good at rates near 0 or 1 and small n)."""
    if total == 0:
        return float("nan"), float("nan")
    rate = successes / total
    denominator = 1 + z**2 / total
    centre = (rate + z**2 / (2 * total)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / total + z**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def objects_present(detected: Sequence[DetectedObject], expected: Sequence[tuple[str, str]]) -> bool:
    """Whether each expected (colour, shape) is matched by a *distinct* detected object."""
    remaining = list(detected)
    for color, shape in expected:
        match = next((obj for obj in remaining if obj.matches(color, shape)), None)
        if match is None:
            return False
        remaining.remove(match)
    return True


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


TASKS: dict[str, Callable[[int], list[BenchCase]]] = {
    "single": single_object_cases,
    "two": two_object_cases,
}


def generate_images(
    pipe: Any, cases: Sequence[BenchCase], *, batch_size: int, call_kwargs: dict, progress: bool = True
) -> list[Image.Image]:
    """Images for ``cases``, batched; each image has its own generator seeded by its case's seed."""
    images: list[Image.Image] = []
    batches = range(0, len(cases), batch_size)
    for start in tqdm(batches, desc="bench", disable=not progress, unit="batch"):
        chunk = cases[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(case.seed) for case in chunk]
        kwargs = family_call_kwargs(pipe, call_kwargs, len(chunk))
        output = pipe(prompt=[case.prompt for case in chunk], generator=generators, **kwargs)
        images.extend(output.images)
    return images


def run_bench(
    pipe: Any,
    *,
    model_name: str = "pipeline",
    tasks: Sequence[str] = ("single", "two"),
    num_seeds: int = 17,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    extra_call_kwargs: dict | None = None,
    progress: bool = True,
) -> BenchReport:
    """Generate every case of ``tasks`` with ``pipe`` and score the images.

    With ``out_dir``, images go to ``out_dir/images/<task>/<index>.png`` and the full report to
    ``out_dir/report.json`` and ``out_dir/report.md``.
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
        cases = TASKS[task](num_seeds)
        images = generate_images(pipe, cases, batch_size=batch_size, call_kwargs=call_kwargs, progress=progress)
        successes = 0
        for index, (case, image) in enumerate(zip(cases, images, strict=True)):
            detected = detect(image)
            success = objects_present(detected, case.expected)
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
    report = BenchReport(model_name, settings, rows, records, time.perf_counter() - started)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report.to_json(), indent=1, default=float))
        (out / "report.md").write_text(report.markdown() + "\n")
    return report
