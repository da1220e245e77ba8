"""Editing bench on the shapes world: real-image path (render a scene, invert it, edit it), scored by the detector.

Cases are two-object scenes whose objects differ in colour or shape, so every check is unambiguous:

- ``remove``: one object is erased. *Gone*: no detected object of its colour and shape anywhere, and no object of
  any colour centred inside its old box (a new object painted into the hole is not a removal). *Kept*: the other
  object is detected with the same colour and shape, its centroid within ``tolerance`` px of where it was. Success
  needs both.
- ``move``: one object is moved by an offset that keeps it on the canvas and clear of the other object. Success: an
  object of its colour and shape has its centroid within ``tolerance`` px of the target. *Kept* is reported as above.
- ``drag``: the move cases, run through the attention-sharing drag pipeline and its baselines. Success as for
  ``move``; *old place clear*: at least 90% of the pixels the object left (its old mask minus its new one, less a
  1 px rim) are within 60 (of 255, every channel) of the background colour.
- ``compose``: a one-object background and a one-object reference scene whose objects differ; the reference object
  goes into a box of its own size, 2 px inside the canvas and 3 px clear of the background's object. Success: an
  object of the reference's colour and shape is centred inside the box. *Kept*: the background's object is still
  there (colour, shape, within ``tolerance`` px).

Every method edits the same cases with the same model; they differ in two switches, so the table says what each
one contributes:

- ``designedit``: key-masking self-attention, the hole started from the image inverted with the hole filled in
  the surrounding colours (the pipelines' default);
- ``designedit-inverted``: key masking with the hole started from the object's own inverted latent (the paper);
- ``inpaint-fill``: the same filled start, no attention control;
- ``inpaint``: plain latent-blending inpainting: the hole starts from fresh noise and is denoised with the source
  copied back outside it, no attention control.

Drag and compose methods get the result's caption as prompt (no spatial words; compose also names the pasted
object as ``object_phrase``), as the SDEdit baseline does, and all of them put the input's pixels back outside the
edited region (the pipelines' ``overlay_original``), so differences come from the edited region alone.

- drag: ``drag`` (the pipeline's defaults: DiffUHaul-style anchored sharing, the object held on the inverted
  cut-and-paste image), ``drag-unshared`` (the same, no sharing); ``drag-free-late`` (the object runs free after
  half the steps), ``drag-free-late-masked`` (and plain masked sharing at every step instead of anchoring),
  ``drag-free-late-unshared`` (free after half, no sharing);
- compose: ``compose`` (the defaults: the paste released after 84% of the steps, no steering), ``compose-steered``
  (and PrimeComposer steering); ``compose-early-release`` (released at the paper's 20%, steered), ``-unsteered``
  (no steering), ``-shared`` (steered, and background/reference sharing);
- the naive baselines of both: ``cut-paste-sdedit`` (the cut-and-paste image, hole filled, through SDEdit at
  strength 0.5 with the result's caption) and ``regenerate`` (text-to-image with the result's caption, spatial words
  included when unambiguous, guidance 5; nothing is overlaid, it is a new image).

On request, ``inverted-key-zero``, ``inverted-query`` and ``inverted-value`` run the paper's ablation (what is
masked: keys zeroed as in its code, queries, values) from the paper's inverted start.

The mean absolute pixel error (0..255) outside the dilated edit region says how well the rest of the image is kept;
``vae floor`` is the same error for a plain VAE round trip, the best any latent edit can do, and the last column
counts the scenes whose plain VAE round trip still shows both objects where they were: a ceiling for *kept*.
"""

from __future__ import annotations

import dataclasses
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
from attncontrol.pipelines.editing import REMOVAL_DILATION
from attncontrol.pipelines.inversion import decode, encode, image_tensor
from attncontrol.shapes.bench import BenchReport, BenchRow
from attncontrol.shapes.detector import DetectedObject, detect
from attncontrol.shapes.scenes import BACKGROUNDS, ObjectSpec, Scene, SceneGenerator, caption_for

logger = logging.getLogger(__name__)

EDIT_TASKS = ("remove", "move", "drag", "compose")
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
#: the naive baselines of drag and composition
NAIVE_METHODS: dict[str, dict[str, Any]] = {
    "cut-paste-sdedit": {"strength": 0.5},
    "regenerate": {"guidance_scale": 5.0},
}
DRAG_METHODS: dict[str, dict[str, Any]] = {
    "drag": {},
    "drag-unshared": {"sharing": None},
    "drag-free-late": {"hold_object_until": 0.5},
    "drag-free-late-masked": {"hold_object_until": 0.5, "sharing": "masked"},
    "drag-free-late-unshared": {"hold_object_until": 0.5, "sharing": None},
    **NAIVE_METHODS,
}
COMPOSE_METHODS: dict[str, dict[str, Any]] = {
    "compose": {},
    "compose-steered": {"steering": True},
    "compose-early-release": {"paste_until": 0.2, "steering": True},
    "compose-early-release-unsteered": {"paste_until": 0.2},
    "compose-early-release-shared": {"paste_until": 0.2, "steering": True, "share_background": True},
    **NAIVE_METHODS,
}
#: task -> the methods it runs by default
TASK_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "remove": EDIT_METHODS,
    "move": EDIT_METHODS,
    "drag": DRAG_METHODS,
    "compose": COMPOSE_METHODS,
}
ALL_METHODS = {**EDIT_METHODS, **ABLATION_METHODS, **DRAG_METHODS, **COMPOSE_METHODS}
EDIT_SEED = 20251124
CENTROID_TOLERANCE = 4.0
MIN_MOVE, MAX_MOVE = 8.0, 20.0
#: pixels around the edited objects excluded from the "outside" error
OUTSIDE_MARGIN = 3


@dataclass(frozen=True)
class EditCase:
    """Scene ``index`` of the bench generator; object ``target`` is edited (moved by ``offset`` for moves).

    Composition cases: ``index`` is the background scene, ``reference`` the reference scene (one object each, from
    their own generators) and ``box`` where the reference object goes.
    """

    task: str
    index: int
    target: int
    offset: tuple[float, float] = (0.0, 0.0)
    reference: int | None = None
    box: tuple[float, float, float, float] | None = None


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
    cleared: bool | None = None


@dataclass
class EditRow(BenchRow):
    """A task x method row: success rate (with its interval) plus the parts of success and the pixel errors."""

    method: str = ""
    gone: int = 0
    kept: int = 0
    outside_error: float = float("nan")
    vae_floor: float = float("nan")
    vae_keeps_scene: int = 0
    cleared: int | None = None


class EditReport(BenchReport):
    """The editing bench's table; records and JSON as in :class:`attncontrol.shapes.bench.BenchReport`."""

    def markdown(self) -> str:
        lines = [
            f"shapes-world editing bench of `{self.model}` ({self.settings.get('num_inference_steps')} DDIM steps, "
            f"real-image path: render, invert, edit; {self.seconds:.0f} s)",
            "",
            "| task | method | success | n | rate | 95% CI | edited object gone / at target | old place clear "
            "| other kept | outside MAE (0-255) | VAE floor | VAE round trip keeps all |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            low, high = row.interval
            cleared = "-" if row.cleared is None else f"{row.cleared / row.total:.1%}"
            lines.append(
                f"| {row.task} | {row.method} | {row.successes} | {row.total} | {row.rate:.1%} | "
                f"{low:.1%} - {high:.1%} | {row.gone / row.total:.1%} | {cleared} | {row.kept / row.total:.1%} | "
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


def _reference_generators(seed: int) -> tuple[SceneGenerator, SceneGenerator]:
    """Backgrounds and references of composition cases: one object each, from their own generators."""
    return SceneGenerator(seed + 1, max_objects=1), SceneGenerator(seed + 2, max_objects=1)


def _compose_box(
    background: Scene, reference: Scene, rng: np.random.Generator
) -> tuple[float, float, float, float] | None:
    """A box of the reference object's size, 2 px inside the canvas and 3 px clear of the background's object."""
    size = background.image.shape[0]
    x0, y0, x1, y1 = reference.objects[0].box
    width, height = x1 - x0, y1 - y0
    ox0, oy0, ox1, oy1 = background.objects[0].box
    for _ in range(200):
        nx0, ny0 = int(rng.integers(2, size - 2 - width + 1)), int(rng.integers(2, size - 2 - height + 1))
        nx1, ny1 = nx0 + width, ny0 + height
        if nx0 < ox1 + 3 and ox0 - 3 < nx1 and ny0 < oy1 + 3 and oy0 - 3 < ny1:
            continue
        return float(nx0), float(ny0), float(nx1), float(ny1)
    return None


def edit_cases(task: str, num_cases: int, *, seed: int = EDIT_SEED) -> list[EditCase]:
    """The first ``num_cases`` usable scenes of the bench generator, the edited object alternating.

    ``drag`` uses exactly the ``move`` cases, so the two tables compare.
    """
    if task not in EDIT_TASKS:
        raise ValueError(f"unknown edit task {task!r}; available: {list(EDIT_TASKS)}")
    cases: list[EditCase] = []
    index = 0
    if task == "compose":
        backgrounds, references = _reference_generators(seed)
        while len(cases) < num_cases:
            background, reference = backgrounds.scene(index), references.scene(index)
            pasted, own = reference.objects[0], background.objects[0]
            if (pasted.color, pasted.shape) != (own.color, own.shape):
                box = _compose_box(background, reference, np.random.default_rng([seed, index, 2]))
                if box is not None:
                    cases.append(EditCase(task, index, 0, reference=index, box=box))
            index += 1
        return cases
    generator = _generator(seed)
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
    """The scene a case edits (the background, for compositions)."""
    if case.task == "compose":
        return _reference_generators(seed)[0].scene(case.index)
    return _generator(seed).scene(case.index)


def reference_of(case: EditCase, *, seed: int = EDIT_SEED) -> Scene:
    """The reference scene of a composition case."""
    if case.reference is None:
        raise ValueError(f"case {case} has no reference scene")
    return _reference_generators(seed)[1].scene(case.reference)


def _near(obj: DetectedObject, point: tuple[float, float], tolerance: float) -> bool:
    return float(np.hypot(obj.centroid[0] - point[0], obj.centroid[1] - point[1])) <= tolerance


def score(
    case: EditCase,
    scene: Scene,
    detected: Sequence[DetectedObject],
    tolerance: float = CENTROID_TOLERANCE,
    *,
    reference: Scene | None = None,
) -> tuple[bool, bool, bool]:
    """(success, gone-or-at-target, others kept) of one edited image."""
    if case.task == "compose":
        if reference is None or case.box is None:
            raise ValueError("composition cases are scored with their `reference` scene and box")
        pasted, own = reference.objects[0], scene.objects[0]
        x0, y0, x1, y1 = case.box
        in_box = any(
            obj.matches(pasted.color, pasted.shape) and x0 <= obj.centroid[0] < x1 and y0 <= obj.centroid[1] < y1
            for obj in detected
        )
        kept = any(obj.matches(own.color, own.shape) and _near(obj, own.centroid, tolerance) for obj in detected)
        return in_box, in_box, kept
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


def _moved_mask(case: EditCase, scene: Scene) -> torch.Tensor:
    mask = torch.from_numpy(scene.objects[case.target].mask.astype(np.float32))
    dx, dy = (int(v) for v in case.offset)
    return torch.roll(mask, shifts=(dy, dx), dims=(0, 1))  # moves stay 2 px inside, so nothing wraps


def old_place_clear(case: EditCase, scene: Scene, image: np.ndarray) -> bool:
    """Whether >= 90% of the pixels a moved object left show the background colour (within 60 per channel)."""
    old = torch.from_numpy(scene.objects[case.target].mask.astype(np.float32))
    vacated = old * (1 - dilate(_moved_mask(case, scene), 1))
    vacated = (vacated * (1 - dilate(1 - old, 1))).numpy() > 0.5  # less a 1 px rim: edges blur in any VAE
    if not vacated.any():
        return True
    background = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    close = (np.abs(image.astype(np.float32) - background).max(-1) <= 60)[vacated]
    return float(close.mean()) >= 0.9


def _edit_region(case: EditCase, scene: Scene) -> np.ndarray:
    if case.task == "compose":
        x0, y0, x1, y1 = (int(v) for v in case.box)
        mask = torch.zeros(scene.image.shape[:2])
        mask[y0:y1, x0:x1] = 1.0
    else:
        mask = torch.from_numpy(scene.objects[case.target].mask.astype(np.float32))
        if case.task in ("move", "drag"):
            mask = torch.maximum(mask, _moved_mask(case, scene))
    return dilate(mask, OUTSIDE_MARGIN).numpy() > 0.5


def _result_specs(case: EditCase, scene: Scene, reference: Scene | None) -> list[ObjectSpec]:
    """What the edited scene should hold, as drawable specs (for the naive baselines' captions)."""
    if case.task == "compose":
        x0, y0, x1, y1 = case.box
        pasted = reference.specs[0]
        placed = dataclasses.replace(pasted, x=(x0 + x1) / 2, y=(y0 + y1) / 2)
        return [scene.specs[0], placed]
    specs = list(scene.specs)
    moved = specs[case.target]
    specs[case.target] = dataclasses.replace(moved, x=moved.x + case.offset[0], y=moved.y + case.offset[1])
    return specs


class _Editors:
    """The pipelines one bench run needs, made from the user's pipeline once, on first use."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._made: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._made:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            from attncontrol.pipelines.editing import LayeredEditMixin, RemoveMixin, to_editing
            from attncontrol.pipelines.sharing import ComposeMixin, DragMixin, to_sharing

            makers = {
                "remover": lambda: to_editing(self.pipe, RemoveMixin),
                "mover": lambda: to_editing(self.pipe, LayeredEditMixin),
                "dragger": lambda: to_sharing(self.pipe, DragMixin),
                "composer": lambda: to_sharing(self.pipe, ComposeMixin),
                "img2img": lambda: AutoPipelineForImage2Image.from_pipe(self.pipe),
                "text2img": lambda: AutoPipelineForText2Image.from_pipe(self.pipe),
            }
            self._made[name] = makers[name]()
            self._made[name].set_progress_bar_config(disable=True)
        return self._made[name]


def _naive_image(
    editors: _Editors, method: str, case: EditCase, scene: Scene, reference: Scene | None, steps: int
) -> np.ndarray:
    """The naive baselines: SDEdit of the cut-and-paste image, or regenerating from the result's caption."""
    from attncontrol.pipelines.sharing import cut_and_paste, overlay_outside, paste_reference

    generator = torch.Generator().manual_seed(case.index)
    if method == "regenerate":
        caption = _result_caption(case, scene, reference, spatial=True)
        options = NAIVE_METHODS[method]
        return editors.text2img(
            caption, num_inference_steps=steps, generator=generator, output_type="np", **options
        ).images
    pixels = image_tensor(editors.pipe, scene.image)
    if case.task == "compose":
        mask = torch.from_numpy(reference.objects[0].mask.astype(np.float32))
        composite, _, region = paste_reference(pixels, image_tensor(editors.pipe, reference.image), mask, case.box)
    else:
        mask = torch.from_numpy(scene.objects[case.target].mask.astype(np.float32))
        hole = dilate(mask, round(REMOVAL_DILATION * scene.image.shape[0]))
        composite, moved = cut_and_paste(pixels, mask, case.offset, 1.0, hole)
        region = torch.maximum(hole, moved)
    images = editors.img2img(
        _result_caption(case, scene, reference),
        image=(composite + 1) / 2,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=generator,
        output_type="pt",
        **NAIVE_METHODS[method],
    ).images
    return overlay_outside(images, pixels, region).permute(0, 2, 3, 1).cpu().numpy()


def _result_caption(case: EditCase, scene: Scene, reference: Scene | None, *, spatial: bool = False) -> str:
    specs = _result_specs(case, scene, reference)
    return caption_for(specs, scene.background, spatial=spatial, mention_background=scene.background != "white")


def _edited_image(
    editors: _Editors, method: str, case: EditCase, scene: Scene, reference: Scene | None, steps: int
) -> np.ndarray:
    if method in NAIVE_METHODS:
        images = _naive_image(editors, method, case, scene, reference, steps)
    else:
        options: dict[str, Any] = {"num_inference_steps": steps, "output_type": "np", **ALL_METHODS[method]}
        if case.task == "compose":
            pasted = reference.objects[0]
            options["prompt"] = _result_caption(case, scene, reference)
            options["object_phrase"] = f"{pasted.color} {pasted.shape}"
            output = editors.composer(scene.image, reference.image, pasted.mask, case.box, **options)
        else:
            mask = scene.objects[case.target].mask
            options["generator"] = torch.Generator().manual_seed(case.index)
            if case.task == "remove":
                output = editors.remover(scene.image, mask, **options)
            elif case.task == "move":
                from attncontrol.pipelines.editing import Layer

                output = editors.mover(scene.image, [Layer(mask, offset=case.offset)], **options)
            else:
                options["prompt"] = _result_caption(case, scene, reference)
                output = editors.dragger(scene.image, mask, case.offset, **options)
        images = output.images
    return (np.asarray(images[0]) * 255).round().clip(0, 255).astype(np.uint8)


def run_edit_bench(
    pipe: Any,
    *,
    model_name: str = "pipeline",
    tasks: Sequence[str] = EDIT_TASKS,
    methods: Sequence[str] | None = None,
    num_cases: int = 100,
    num_inference_steps: int = 50,
    seed: int = EDIT_SEED,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> EditReport:
    """Run every case of ``tasks`` with its methods on an SD-family ``pipe`` and score them.

    ``methods`` picks among each task's methods (:data:`TASK_METHODS`, plus the ablation for remove/move); the
    default runs each task's own list. Every method edits the same cases from the same rendered scenes. With
    ``out_dir`` the edited images, ``report.json`` and ``report.md`` are written there.
    """
    bad = [name for name in tasks if name not in EDIT_TASKS]
    bad += [name for name in methods or () if name not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown task/method {bad}; tasks: {list(EDIT_TASKS)}, methods: {list(ALL_METHODS)}")
    plan = {}
    for task in tasks:
        available = {**TASK_METHODS[task], **(ABLATION_METHODS if task in ("remove", "move") else {})}
        plan[task] = list(TASK_METHODS[task]) if methods is None else [m for m in methods if m in available]
    if methods is not None and not any(plan.values()):
        raise ValueError(f"none of the methods {list(methods)} applies to the tasks {list(tasks)}")
    editors = _Editors(pipe)
    out = Path(out_dir) if out_dir is not None else None
    started = time.perf_counter()
    rows, records = [], []
    for task in tasks:
        cases = edit_cases(task, num_cases, seed=seed)
        per_method: dict[str, list[EditRecord]] = {method: [] for method in plan[task]}
        for case in tqdm(cases, desc=task, disable=not progress or not plan[task]):
            if not plan[task]:
                break
            scene = scene_of(case, seed=seed)
            reference = reference_of(case, seed=seed) if task == "compose" else None
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
            for method in plan[task]:
                image = _edited_image(editors, method, case, scene, reference, num_inference_steps)
                detected = detect(image)
                success, gone, kept = score(case, scene, detected, reference=reference)
                cleared = old_place_clear(case, scene, image) if task == "drag" else None
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
                        cleared,
                    )
                )
        for method, done in per_method.items():
            if not done:
                continue
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
                cleared=None if task != "drag" else sum(bool(r.cleared) for r in done),
            )
            rows.append(row)
            records.extend(done)
            logger.info("%s/%s: %d/%d", task, method, row.successes, row.total)
    settings = {"num_inference_steps": num_inference_steps, "num_cases": num_cases, "seed": seed}
    report = EditReport(model_name, settings, rows, records, time.perf_counter() - started)
    if out is not None:
        report.save(out)
    return report
