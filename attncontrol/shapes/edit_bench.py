"""Editing bench on the shapes world: real-image path (render a scene, invert it, edit it), scored by the detector.

Cases are two-object scenes whose objects differ in colour or shape, so every check is unambiguous:

- ``remove``: one object is erased. *Gone*: no detected object of its colour and shape anywhere, and no object of
  any colour centred inside its old box (a new object painted into the hole is not a removal). *Kept*: the other
  object is detected with the same colour and shape, its centroid within ``tolerance`` px of where it was. Success
  needs both.
- ``move``: one object is moved by an offset that keeps it on the canvas and clear of the other object. Success: an
  object of its colour and shape has its centroid within ``tolerance`` px of the target. *Kept* is reported as above.

Every method edits the same cases with the same model; they differ in two switches, so the table says what each
one contributes:

- ``designedit``: key-masking self-attention, the hole started from the image inverted with the hole filled in
  the surrounding colours (the pipelines' default);
- ``designedit-inverted``: key masking with the hole started from the object's own inverted latent (the paper);
- ``inpaint-fill``: the same filled start, no attention control;
- ``inpaint``: plain latent-blending inpainting: the hole starts from fresh noise and is denoised with the source
  copied back outside it, no attention control.

On request, ``inverted-key-zero``, ``inverted-query`` and ``inverted-value`` run the paper's ablation (what is
masked: keys zeroed as in its code, queries, values) from the paper's inverted start.

The mean absolute pixel error (0..255) outside the dilated edit region says how well the rest of the image is kept;
``vae floor`` is the same error for a plain VAE round trip, the best any latent edit can do, and the last column
counts the scenes whose plain VAE round trip still shows both objects where they were: a ceiling for *kept*.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from attncontrol.core.masks import dilate
from attncontrol.pipelines.inversion import decode, encode, image_tensor
from attncontrol.shapes.bench import BenchReport, BenchRow
from attncontrol.shapes.detector import DetectedObject, detect
from attncontrol.shapes.scenes import Scene, SceneGenerator

logger = logging.getLogger(__name__)

EDIT_TASKS = ("remove", "move")
#: method -> pipeline arguments (see the module docstring)
EDIT_METHODS: dict[str, dict[str, Any]] = {
    "designedit": {"key_mask_target": "key", "hole_init": "fill"},
    "designedit-inverted": {"key_mask_target": "key", "hole_init": "inverted"},
    "inpaint-fill": {"key_mask_target": None, "hole_init": "fill"},
    "inpaint": {"key_mask_target": None, "hole_init": "noise"},
}
#: the paper's ablation (what is masked), run on request: with the object's own inverted start, where masking matters
ABLATION_METHODS: dict[str, dict[str, Any]] = {
    f"inverted-{target}": {"key_mask_target": target, "hole_init": "inverted"}
    for target in ("key-zero", "query", "value")
}
ALL_METHODS = {**EDIT_METHODS, **ABLATION_METHODS}
EDIT_SEED = 20251124
CENTROID_TOLERANCE = 4.0
MIN_MOVE, MAX_MOVE = 8.0, 20.0
#: pixels around the edited objects excluded from the "outside" error
OUTSIDE_MARGIN = 3


@dataclass(frozen=True)
class EditCase:
    """Scene ``index`` of the bench generator; object ``target`` is edited (moved by ``offset`` for moves)."""

    task: str
    index: int
    target: int
    offset: tuple[float, float] = (0.0, 0.0)


@dataclass
class EditRecord:
    case: EditCase
    method: str
    success: bool
    gone: bool
    kept: bool
    outside_error: float
    vae_floor: float
    vae_keeps_scene: bool
    detected: list[dict]
    image_path: str | None = None


@dataclass
class EditRow(BenchRow):
    """A task x method row: success rate (with its interval) plus the parts of success and the pixel errors."""

    method: str = ""
    gone: int = 0
    kept: int = 0
    outside_error: float = float("nan")
    vae_floor: float = float("nan")
    vae_keeps_scene: int = 0


class EditReport(BenchReport):
    """The editing bench's table; records and JSON as in :class:`attncontrol.shapes.bench.BenchReport`."""

    def markdown(self) -> str:
        lines = [
            f"shapes-world editing bench of `{self.model}` ({self.settings.get('num_inference_steps')} DDIM steps, "
            f"real-image path: render, invert, edit; {self.seconds:.0f} s)",
            "",
            "| task | method | success | n | rate | 95% CI | edited object gone / at target | other kept "
            "| outside MAE (0-255) | VAE floor | VAE round trip keeps both |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            low, high = row.interval
            lines.append(
                f"| {row.task} | {row.method} | {row.successes} | {row.total} | {row.rate:.1%} | "
                f"{low:.1%} - {high:.1%} | {row.gone / row.total:.1%} | {row.kept / row.total:.1%} | "
                f"{row.outside_error:.2f} | {row.vae_floor:.2f} | {row.vae_keeps_scene / row.total:.1%} |"
            )
        return "\n".join(lines)


def _generator(seed: int) -> SceneGenerator:
    return SceneGenerator(seed, max_objects=2, count_weights=(0.0, 1.0))


def _distinct(scene: Scene) -> bool:
    first, second = scene.objects
    return (first.color, first.shape) != (second.color, second.shape)


def _move_offset(scene: Scene, target: int, rng: np.random.Generator) -> tuple[float, float] | None:
    """An offset that keeps the object 2 px inside the canvas and 3 px clear of the other object, or None."""
    size = scene.image.shape[0]
    mover, other = scene.objects[target], scene.objects[1 - target]
    x0, y0, x1, y1 = mover.box
    ox0, oy0, ox1, oy1 = other.box
    for _ in range(200):
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(MIN_MOVE, MAX_MOVE)
        dx, dy = round(length * np.cos(angle)), round(length * np.sin(angle))
        nx0, ny0, nx1, ny1 = x0 + dx, y0 + dy, x1 + dx, y1 + dy
        if nx0 < 2 or ny0 < 2 or nx1 > size - 2 or ny1 > size - 2:
            continue
        if nx0 < ox1 + 3 and ox0 - 3 < nx1 and ny0 < oy1 + 3 and oy0 - 3 < ny1:
            continue
        return float(dx), float(dy)
    return None


def edit_cases(task: str, num_cases: int, *, seed: int = EDIT_SEED) -> list[EditCase]:
    """The first ``num_cases`` usable scenes of the bench generator, the edited object alternating."""
    if task not in EDIT_TASKS:
        raise ValueError(f"unknown edit task {task!r}; available: {list(EDIT_TASKS)}")
    generator = _generator(seed)
    cases: list[EditCase] = []
    index = 0
    while len(cases) < num_cases:
        scene = generator.scene(index)
        target = len(cases) % 2
        if _distinct(scene):
            if task == "remove":
                cases.append(EditCase(task, index, target))
            else:
                offset = _move_offset(scene, target, np.random.default_rng([seed, index, 1]))
                if offset is not None:
                    cases.append(EditCase(task, index, target, offset))
        index += 1
    return cases


def scene_of(case: EditCase, *, seed: int = EDIT_SEED) -> Scene:
    return _generator(seed).scene(case.index)


def _near(obj: DetectedObject, point: tuple[float, float], tolerance: float) -> bool:
    return float(np.hypot(obj.centroid[0] - point[0], obj.centroid[1] - point[1])) <= tolerance


def score(
    case: EditCase, scene: Scene, detected: Sequence[DetectedObject], tolerance: float = CENTROID_TOLERANCE
) -> tuple[bool, bool, bool]:
    """(success, gone-or-at-target, other kept) of one edited image."""
    edited, other = scene.objects[case.target], scene.objects[1 - case.target]
    kept = any(obj.matches(other.color, other.shape) and _near(obj, other.centroid, tolerance) for obj in detected)
    if case.task == "remove":
        x0, y0, x1, y1 = edited.box
        margin = 2

        def in_hole(obj: DetectedObject) -> bool:
            x, y = obj.centroid
            return x0 - margin <= x < x1 + margin and y0 - margin <= y < y1 + margin

        # Gone means gone: no copy anywhere, and nothing new (of any colour) where it was.
        gone = not any(obj.matches(edited.color, edited.shape) or in_hole(obj) for obj in detected)
        return gone and kept, gone, kept
    target = (edited.centroid[0] + case.offset[0], edited.centroid[1] + case.offset[1])
    at_target = any(obj.matches(edited.color, edited.shape) and _near(obj, target, tolerance) for obj in detected)
    return at_target, at_target, kept


def _edit_region(case: EditCase, scene: Scene) -> np.ndarray:
    mask = torch.from_numpy(scene.objects[case.target].mask.astype(np.float32))
    if case.task == "move":
        dx, dy = (int(v) for v in case.offset)
        moved = torch.roll(mask, shifts=(dy, dx), dims=(0, 1))  # moves stay 2 px inside, so nothing wraps
        mask = torch.maximum(mask, moved)
    return dilate(mask, OUTSIDE_MARGIN).numpy() > 0.5


def run_edit_bench(
    pipe: Any,
    *,
    model_name: str = "pipeline",
    tasks: Sequence[str] = EDIT_TASKS,
    methods: Sequence[str] = tuple(EDIT_METHODS),
    num_cases: int = 100,
    num_inference_steps: int = 50,
    seed: int = EDIT_SEED,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> EditReport:
    """Run every case of ``tasks`` with every method in ``methods`` on an SD-family ``pipe`` and score them.

    Each scene is inverted once and every method edits from that inversion (removal), so methods differ only in
    what they do, not in their starting point. With ``out_dir`` the edited images, ``report.json`` and
    ``report.md`` are written there.
    """
    from attncontrol.pipelines.editing import Layer, LayeredEditMixin, RemoveMixin, to_editing

    bad = [name for name in tasks if name not in EDIT_TASKS] + [name for name in methods if name not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown task/method {bad}; tasks: {list(EDIT_TASKS)}, methods: {list(ALL_METHODS)}")
    remover, mover = to_editing(pipe, RemoveMixin), to_editing(pipe, LayeredEditMixin)
    out = Path(out_dir) if out_dir is not None else None
    started = time.perf_counter()
    rows, records = [], []
    for task in tasks:
        cases = edit_cases(task, num_cases, seed=seed)
        per_method: dict[str, list[EditRecord]] = {method: [] for method in methods}
        for case in tqdm(cases, desc=task, disable=not progress):
            scene = scene_of(case, seed=seed)
            pixels = image_tensor(pipe, scene.image)
            floor_image = decode(pipe, encode(pipe, pixels))[0].permute(1, 2, 0).numpy() * 255
            floor_found = detect(floor_image.round().astype(np.uint8))
            vae_keeps_scene = all(
                any(obj.matches(o.color, o.shape) and _near(obj, o.centroid, CENTROID_TOLERANCE) for obj in floor_found)
                for o in scene.objects
            )
            outside = ~_edit_region(case, scene)
            original = scene.image.astype(np.float32)
            vae_floor = float(np.abs(floor_image - original)[outside].mean())
            mask = scene.objects[case.target].mask
            for method in methods:
                options: dict[str, Any] = {
                    "num_inference_steps": num_inference_steps,
                    "output_type": "np",
                    "generator": torch.Generator().manual_seed(case.index),
                    **ALL_METHODS[method],
                }
                if task == "remove":
                    image = remover(scene.image, mask, **options).images[0]
                else:
                    image = mover(scene.image, [Layer(mask, offset=case.offset)], **options).images[0]
                image = (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)
                detected = detect(image)
                success, gone, kept = score(case, scene, detected)
                error = float(np.abs(image.astype(np.float32) - original)[outside].mean())
                path = None
                if out is not None:
                    image_path = out / "images" / task / method / f"{len(per_method[method]):04d}.png"
                    image_path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(image_path)
                    path = str(image_path.relative_to(out))
                per_method[method].append(
                    EditRecord(
                        case,
                        method,
                        success,
                        gone,
                        kept,
                        error,
                        vae_floor,
                        vae_keeps_scene,
                        [asdict(o) for o in detected],
                        path,
                    )
                )
        for method, done in per_method.items():
            row = EditRow(
                task=task,
                successes=sum(r.success for r in done),
                total=len(done),
                method=method,
                gone=sum(r.gone for r in done),
                kept=sum(r.kept for r in done),
                outside_error=float(np.mean([r.outside_error for r in done])),
                vae_floor=float(np.mean([r.vae_floor for r in done])),
                vae_keeps_scene=sum(r.vae_keeps_scene for r in done),
            )
            rows.append(row)
            records.extend(done)
            logger.info("%s/%s: %d/%d", task, method, row.successes, row.total)
    settings = {"num_inference_steps": num_inference_steps, "num_cases": num_cases, "seed": seed}
    report = EditReport(model_name, settings, rows, records, time.perf_counter() - started)
    if out is not None:
        report.save(out)
    return report
