"""What the app's buttons do, without Gradio in the signature's types: editor values in, jobs run, images out.

Every request becomes a :class:`attncontrol.jobs.Job` whose inputs (drawn masks, uploaded images) are saved under the
app's output folder, and every result is saved there with its sidecar, so anything made in the app reruns from the
command line (``attncontrol batch outputs/app/<day>/<stem>.json``). Bad input raises :class:`UserInputError`, which the
app shows as a message.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from attncontrol.batch import save_result
from attncontrol.core.errors import AttnControlError
from attncontrol.jobs import Job, JobResult, PipelineCache, run_job
from attncontrol.models import default_image_size

logger = logging.getLogger(__name__)

#: regions the regional tab offers (one editor layer each)
MAX_REGIONS = 4
#: the drawing canvas of the regional tab, in pixels; masks are scaled to the image size
CANVAS_SIZE = 512


class UserInputError(ValueError):
    """Input the user can fix (an empty region, a missing image); shown as a message, never as a traceback."""


@dataclass
class AppState:
    """What the handlers share: loaded pipelines, where results go, a counter for file names."""

    pipelines: PipelineCache
    output_dir: Path
    _counter: itertools.count = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_stem(self, kind: str) -> str:
        with self._lock:
            return f"{dt.datetime.now():%H%M%S}-{next(self._counter):04d}-{kind}"

    def save_input(self, stem: str, name: str, image: Image.Image) -> str:
        folder = self.output_dir / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}-{name}.png"
        image.save(path)
        return str(path)

    def run(self, job: Job, stem: str, **call_extra: Any) -> JobResult:
        """Run and save with a sidecar; library errors about the input become :class:`UserInputError`."""
        start = time.perf_counter()
        try:
            result = run_job(job, self.pipelines, **call_extra)
        except (AttnControlError, FileNotFoundError) as error:
            raise UserInputError(str(error)) from error
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_result(self.output_dir, stem, job, result, time.perf_counter() - start, self.pipelines.device)
        return result


def _common(model: str | None, seed: float, steps: float, guidance: float, negative: str) -> dict[str, Any]:
    return {
        "model": model or None,
        "seed": int(seed),
        "steps": int(steps),
        "guidance_scale": float(guidance),
        **({"negative_prompt": negative} if negative and negative.strip() else {}),
    }


def _check_steps(steps: float) -> None:
    if not 1 <= int(steps) <= 200:
        raise UserInputError(f"Steps must be between 1 and 200, got {steps}")


def layer_masks(editor: dict | None) -> list[np.ndarray]:
    """One boolean mask per editor layer: where that layer has paint."""
    if not editor or not editor.get("layers"):
        return []
    masks = []
    for layer in editor["layers"]:
        array = np.asarray(layer)
        masks.append(array[..., 3] > 0 if array.ndim == 3 and array.shape[-1] == 4 else array.max(-1) > 0)
    return masks


def _background(editor: dict | None, name: str) -> Image.Image:
    if not editor or editor.get("background") is None:
        raise UserInputError(f"{name}: upload an image first (or press 'Sample scene')")
    array = np.asarray(editor["background"])
    if array.ndim == 3 and array.shape[-1] == 4:  # transparent pixels over white, as the user sees them
        alpha = array[..., 3:4].astype(np.float32) / 255
        array = (array[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return Image.fromarray(array[..., :3].astype(np.uint8))


def working_size(pipe: Any, size: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` for an uploaded image of ``size``: the model's own resolution on the long side, aspect kept,
    multiples of 16 (what every supported VAE + denoiser takes)."""
    side = max(default_image_size(pipe))
    width, height = size
    scale = side / max(width, height)
    return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)


def _fit(image: Image.Image, size: tuple[int, int], mask: bool = False) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------ handlers
def regional(
    state: AppState,
    model: str,
    editor: dict | None,
    base_prompt: str,
    region_prompts: list[str],
    mode: str,
    base_weight: float,
    seed: float,
    steps: float,
    guidance: float,
    negative: str,
) -> Image.Image:
    """Layer i of the canvas is region i, its prompt region_prompts[i]; empty layers without a prompt are unused."""
    _check_steps(steps)
    masks = layer_masks(editor)
    regions = []
    stem = state.next_stem("regional")
    for index, prompt in enumerate(region_prompts[:MAX_REGIONS]):
        drawn = index < len(masks) and bool(masks[index].any())
        prompt = (prompt or "").strip()
        if drawn and not prompt:
            raise UserInputError(f"Region {index + 1} is drawn but has no prompt: type one, or erase the region")
        if prompt and not drawn:
            raise UserInputError(f"Region {index + 1} has a prompt but nothing drawn on its layer 'region {index + 1}'")
        if drawn:
            mask = Image.fromarray(masks[index].astype(np.uint8) * 255)
            regions.append({"prompt": prompt, "mask": state.save_input(stem, f"region{index + 1}", mask)})
    if not regions:
        raise UserInputError("Draw at least one region: pick a layer ('region 1', ...) and paint where it goes")
    prompt = (base_prompt or "").strip() or " and ".join(region["prompt"] for region in regions)
    job = Job.from_dict(
        {
            "kind": "regional",
            "prompt": prompt,
            "regions": regions,
            "region_mode": mode,
            "base_weight": float(base_weight),
            **_common(model, seed, steps, guidance, negative),
        },
        where="regional prompts",
    )
    return state.run(job, stem).image


def attention_maps(
    state: AppState,
    model: str,
    prompt: str,
    word: str,
    seed: float,
    steps: float,
    guidance: float,
    negative: str,
) -> tuple[Image.Image, list[tuple[Image.Image, str]]]:
    """The image, then the word's heat map after each step (the mean over all steps first)."""
    _check_steps(steps)
    if not (prompt or "").strip():
        raise UserInputError("Type a prompt")
    word = (word or "").strip()
    if not word:
        raise UserInputError("Type a word of the prompt to map")
    stem = state.next_stem("maps")
    job = Job.from_dict(
        {"prompt": prompt, "heatmaps": [word], **_common(model, seed, steps, guidance, negative)},
        where="attention maps",
    )
    result = state.run(job, stem, per_step_maps=True)
    store, image = result.store, result.image
    tokens = _word_tokens(state, job, word)
    gallery = [(result.heatmaps[word], f"{word}: all steps")]
    for step in sorted({record.step for record in store.records("cross")}):
        gallery.append((store.heatmap(tokens, image=image, steps=[step]), f"step {step + 1}"))
    return image, gallery


def _word_tokens(state: AppState, job: Job, word: str) -> list[int]:
    from attncontrol.core.controller import AttentionController

    return AttentionController(state.pipelines.get(job.model), []).token_indices(job.prompt, word, name="word")


def edit(
    state: AppState,
    model: str,
    editor: dict | None,
    operation: str,
    dx: float,
    dy: float,
    prompt: str,
    seed: float,
    steps: float,
) -> Image.Image:
    """Remove or move the object painted on the image (the editor's background)."""
    _check_steps(steps)
    image = _background(editor, "Image")
    masks = layer_masks(editor)
    if not masks or not masks[0].any():
        raise UserInputError("Brush over the object to edit: nothing is painted on the image")
    if operation not in ("remove", "move"):
        raise UserInputError(f"Operation must be 'remove' or 'move', got {operation!r}")
    pipe = state.pipelines.get(model or None)
    size = working_size(pipe, image.size)
    scale = size[0] / image.width
    stem = state.next_stem(operation)
    mask = Image.fromarray(masks[0].astype(np.uint8) * 255)
    raw: dict[str, Any] = {
        "kind": operation,
        "prompt": prompt or "",
        "image": state.save_input(stem, "image", _fit(image, size)),
        "mask": state.save_input(stem, "mask", _fit(mask, size, mask=True)),
        "model": model or None,
        "seed": int(seed),
        "steps": int(steps),
    }
    if operation == "move":
        if dx == 0 and dy == 0:
            raise UserInputError("Set an offset (dx, dy) to move the object")
        raw["offset"] = [float(dx) * scale, float(dy) * scale]
    return state.run(Job.from_dict(raw, where=operation), stem).image


def compose(
    state: AppState,
    model: str,
    background: Image.Image | np.ndarray | None,
    reference: dict | None,
    box: tuple[float, float, float, float],
    prompt: str,
    seed: float,
    steps: float,
) -> Image.Image:
    """Paste the object painted on the reference into ``box`` (relative x0, y0, x1, y1) of the background."""
    _check_steps(steps)
    if background is None:
        raise UserInputError("Background: upload an image first (or press 'Sample scenes')")
    back = background if isinstance(background, Image.Image) else Image.fromarray(np.asarray(background)[..., :3])
    ref = _background(reference, "Reference")
    masks = layer_masks(reference)
    if not masks or not masks[0].any():
        raise UserInputError("Brush over the object in the reference image: nothing is painted")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise UserInputError(f"The box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
    pipe = state.pipelines.get(model or None)
    size = working_size(pipe, back.convert("RGB").size)
    stem = state.next_stem("compose")
    mask = Image.fromarray(masks[0].astype(np.uint8) * 255)
    raw = {
        "kind": "compose",
        "prompt": prompt or "",
        "image": state.save_input(stem, "background", _fit(back.convert("RGB"), size)),
        "reference_image": state.save_input(stem, "reference", _fit(ref, size)),
        "reference_mask": state.save_input(stem, "reference-mask", _fit(mask, size, mask=True)),
        "box": [x0, y0, x1, y1],
        "model": model or None,
        "seed": int(seed),
        "steps": int(steps),
    }
    return state.run(Job.from_dict(raw, where="compose"), stem).image


def offset_to(editor: dict | None, point: tuple[float, float]) -> tuple[int, int]:
    """The (dx, dy) that moves the painted object's centre to ``point`` (a click on the preview, image pixels)."""
    masks = layer_masks(editor)
    if not masks or not masks[0].any():
        raise UserInputError("Brush over the object first, then click where it should go")
    ys, xs = np.nonzero(masks[0])
    return round(point[0] - float(xs.mean())), round(point[1] - float(ys.mean()))


# ------------------------------------------------------------------------------------------------ concepts
#: concepts the concept tab offers (one editor layer each)
MAX_CONCEPTS = 4
MASK_CHOICES = {"painted": "user", "from attention": "attention", "painted, refined by attention": "both"}
#: the app's names for :data:`attncontrol.training.concepts.RECIPES`
RECIPE_CHOICES = {"Break-A-Scene": "break-a-scene", "guided embeddings (best on the shapes model)": "guided-embeddings"}
RECIPE_DEFAULT = "guided embeddings (best on the shapes model)"  # the shapes model is the app's default


def recipe_steps(recipe: str) -> tuple[int, int]:
    """The phase-1 and phase-2 steps a :data:`RECIPE_CHOICES` label trains, for the sliders to show."""
    from attncontrol.training.concepts import recipe_config

    config = recipe_config(RECIPE_CHOICES[recipe])
    return config.phase1_steps, config.phase2_steps


def _square(image: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize to the model's side (concept training runs at the model's own size)."""
    shortest = min(image.size)
    left, top = (image.width - shortest) // 2, (image.height - shortest) // 2
    return image.crop((left, top, left + shortest, top + shortest)).resize((side, side), Image.Resampling.LANCZOS)


def train_concepts(
    state: AppState,
    model: str,
    editor: dict | None,
    initializers: str,
    mask_choice: str,
    phase1_steps: float,
    phase2_steps: float,
    seed: float,
    recipe: str = RECIPE_DEFAULT,
) -> tuple[str, Image.Image | None, list[tuple[Image.Image, str]]]:
    """Learn one token per painted layer (or per initializer word, with masks from attention) from the image.

    ``recipe`` is a :data:`RECIPE_CHOICES` label; the step sliders win over its step counts. Returns the run folder
    (what :func:`generate_concepts` takes), the last validation picture and the masks used.
    """
    from attncontrol.concepts import default_tokens, latest_mask_images
    from attncontrol.models import SHIPPED_MODELS, default_model
    from attncontrol.training.concepts import recipe_config
    from attncontrol.training.concepts import train_concepts as run_training

    image = _background(editor, "Image")
    words = [word.strip() for word in (initializers or "").split(",") if word.strip()]
    if mask_choice not in MASK_CHOICES:
        raise UserInputError(f"Masks must be one of {list(MASK_CHOICES)}, got {mask_choice!r}")
    if recipe not in RECIPE_CHOICES:
        raise UserInputError(f"Recipe must be one of {list(RECIPE_CHOICES)}, got {recipe!r}")
    source = MASK_CHOICES[mask_choice]
    painted = [mask for mask in layer_masks(editor)[:MAX_CONCEPTS] if mask.any()]
    if source != "attention" and not painted:
        raise UserInputError("Paint each object on its own layer ('concept 1', 'concept 2', ...) first")
    count = len(painted) if source != "attention" else len(words)
    if count == 0:
        raise UserInputError("Masks from attention need one class word per object (e.g. 'circle, square')")
    if words and len(words) != count:
        raise UserInputError(f"{count} objects are painted but {len(words)} class words are given: one per object")
    if not 1 <= int(phase1_steps) + int(phase2_steps) <= 5000:
        raise UserInputError("The training steps must add up to between 1 and 5000")
    side = max(default_image_size(state.pipelines.get(model or None)))
    stem = state.next_stem("concepts")
    image_path = state.save_input(stem, "image", _square(image, side))
    mask_paths = [
        state.save_input(stem, f"mask{i}", _square(Image.fromarray(mask.astype(np.uint8) * 255), side))
        for i, mask in enumerate(painted)
    ]
    out = state.output_dir / "concepts" / stem
    config = recipe_config(
        RECIPE_CHOICES[recipe],
        out=str(out),
        model=model or default_model(),
        image=image_path,
        masks=[] if source == "attention" else mask_paths,
        mask_source=source,
        num_concepts=count,
        tokens=default_tokens(count),
        initializers=words,
        phase1_steps=int(phase1_steps),
        phase2_steps=int(phase2_steps),
        seed=int(seed),
        validation_seeds=1,
    )
    if config.init_search and config.model in SHIPPED_MODELS:
        from attncontrol.shapes.concept_bench import caption_words

        # what the bench measured: the search picks from the words the shapes models were trained on
        config = replace(config, init_words=caption_words())
    with state.pipelines.lock:  # one heavy job at a time on this machine
        try:
            run_training(config)
        except (AttnControlError, FileNotFoundError) as error:
            raise UserInputError(str(error)) from error
    validation = out / "validation" / "final.png"
    found = latest_mask_images(out / "masks")
    if found:
        masks = [(Image.open(p), p.stem.split("-", 2)[-1]) for p in found]
    else:
        masks = [(Image.open(p), f"{token} (painted)") for p, token in zip(mask_paths, config.tokens, strict=True)]
    return str(out), Image.open(validation) if validation.exists() else None, masks


def generate_concepts(
    state: AppState,
    model: str,
    run_folder: str,
    prompt: str,
    seed: float,
    steps: float,
    guidance: float,
    negative: str,
) -> Image.Image:
    """Generate with the tokens of a training run (loaded for the one call with the stock diffusers loaders)."""
    _check_steps(steps)
    if not run_folder or not (Path(run_folder) / "concepts.json").is_file():
        raise UserInputError("Train concepts first (or give the folder of an earlier training run)")
    if not (prompt or "").strip():
        raise UserInputError("Type a prompt with the learned tokens, e.g. 'a photo of <asset0>'")
    job = Job.from_dict(
        {"prompt": prompt, "concepts": run_folder, **_common(model, seed, steps, guidance, negative)},
        where="concepts",
    )
    return state.run(job, state.next_stem("concept-image")).image


# ------------------------------------------------------------------------------------------------ samples
_SAMPLE_LAYOUTS = [
    [("red", "square", 20, 22, 9), ("blue", "circle", 44, 42, 8)],
    [("green", "triangle", 44, 24, 10), ("yellow", "circle", 20, 44, 8)],
]


def sample_scene_masks(index: int = 0, display: int = 256) -> tuple[Image.Image, list[np.ndarray]]:
    """A rendered two-object shapes scene (scaled up for drawing on) and every object's mask."""
    from attncontrol.shapes.scenes import ObjectSpec, render

    scene = render([ObjectSpec(*spec) for spec in _SAMPLE_LAYOUTS[index % len(_SAMPLE_LAYOUTS)]], "white")
    scale = display // scene.image.shape[0]
    image = Image.fromarray(scene.image).resize((display, display), Image.Resampling.NEAREST)
    return image, [np.kron(obj.mask, np.ones((scale, scale), dtype=bool)) for obj in scene.objects]


def sample_scene(index: int = 0, display: int = 256) -> tuple[Image.Image, np.ndarray]:
    """A rendered two-object shapes scene (scaled up for drawing on) and its first object's mask."""
    image, masks = sample_scene_masks(index, display)
    return image, masks[0]


def mask_layer(mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 255)) -> np.ndarray:
    """An RGBA editor layer painting ``mask`` (half transparent), as if brushed by hand."""
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask] = (*color, 160)
    return layer
