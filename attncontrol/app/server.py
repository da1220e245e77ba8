"""The Gradio page: one tab per capability, a model picker, advanced options folded away, a queue.

Start it with ``attncontrol app`` (or :func:`launch`). Requests wait in one queue; ``concurrency`` of them run at a time
(default 1: the controls install processors on the shared pipeline for the length of a call).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from attncontrol.app import handlers
from attncontrol.app.handlers import CANVAS_SIZE, MAX_CONCEPTS, MAX_REGIONS, AppState, UserInputError
from attncontrol.jobs import PipelineCache
from attncontrol.models import available_models, default_model
from attncontrol.pictures import strip

logger = logging.getLogger(__name__)

# Gradio would otherwise phone home on start; this machine's users (and CI) have no internet.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

#: one brush colour per region / concept layer
REGION_RGB = [(230, 60, 60), (60, 110, 230), (60, 180, 90), (230, 170, 40)]
REGION_COLORS = [f"rgb{color}" for color in REGION_RGB]  # "rgb(230, 60, 60)", as Gradio's brush takes them


def _friendly(function: Callable) -> Callable:
    """Show what went wrong as a message box: input errors as they are, anything else briefly (details in the log)."""
    import gradio as gr

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserInputError as error:
            raise gr.Error(str(error), title="Please check the input") from None
        except Exception as error:
            logger.exception("request failed")
            raise gr.Error(f"{type(error).__name__}: {error}", title="Something went wrong") from None

    return wrapper


def _object_editor(label: str, elem_id: str) -> Any:
    """An uploaded image with one layer to brush an object's mask on (half-transparent magenta)."""
    import gradio as gr

    return gr.ImageEditor(
        sources=("upload", "clipboard"),
        transforms=(),
        layers=gr.LayerOptions(allow_additional_layers=False, layers=["object"]),
        brush=gr.Brush(default_size=12, colors=[("rgb(255, 0, 255)", 0.6)], color_mode="fixed"),
        type="numpy",
        label=label,
        elem_id=elem_id,
    )


def shown(image: Image.Image) -> Image.Image:
    """A result as displayed: small model outputs scaled up with crisp pixels (the saved file keeps its size)."""
    return strip([image], min_height=256)


def build_app(
    *,
    model: str | None = None,
    device: str = "cpu",
    output_dir: str | Path | None = None,
    concurrency: int = 1,
    max_queue: int = 64,
) -> Any:
    """The ``gr.Blocks`` app, queued; ``model`` preselects the picker (default: the shipped shapes model)."""
    import gradio as gr

    folder = Path(output_dir) if output_dir else Path("outputs/app") / f"{dt.date.today():%Y-%m-%d}"
    state = AppState(pipelines=PipelineCache(device=device), output_dir=folder)
    models = available_models()
    chosen = model or default_model()
    if chosen not in models:
        models = [chosen, *models]

    def run_regional(model_name, editor, base, *rest, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        prompts, (mode, weight, seed, steps, guidance, negative) = list(rest[:MAX_REGIONS]), rest[MAX_REGIONS:]
        return shown(
            handlers.regional(state, model_name, editor, base, prompts, mode, weight, seed, steps, guidance, negative)
        )

    def run_maps(model_name, prompt, word, seed, steps, guidance, negative, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        image, gallery = handlers.attention_maps(state, model_name, prompt, word, seed, steps, guidance, negative)
        return shown(image), [(shown(picture), caption) for picture, caption in gallery]

    def run_edit(model_name, editor, operation, dx, dy, prompt, seed, steps, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return shown(handlers.edit(state, model_name, editor, operation, dx, dy, prompt, seed, steps))

    def run_compose(
        model_name,
        background,
        reference,
        x0,
        y0,
        x1,
        y1,
        prompt,
        seed,
        steps,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        return shown(handlers.compose(state, model_name, background, reference, (x0, y0, x1, y1), prompt, seed, steps))

    def run_train_concepts(
        model_name,
        editor,
        initializers,
        mask_choice,
        phase1,
        phase2,
        seed,
        recipe,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        folder, validation, masks = handlers.train_concepts(
            state, model_name, editor, initializers, mask_choice, phase1, phase2, seed, recipe
        )
        tokens = [caption.split(" ")[0] for _, caption in masks]
        hint = f"a photo of {tokens[0]}" if tokens else ""
        return folder, validation, [(shown(image), caption) for image, caption in masks], hint

    def run_concept_image(
        model_name,
        folder,
        prompt,
        seed,
        steps,
        guidance,
        negative,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        return shown(handlers.generate_concepts(state, model_name, folder, prompt, seed, steps, guidance, negative))

    def sample_concepts() -> dict:
        image, masks = handlers.sample_scene_masks(0)
        layers = [handlers.mask_layer(mask, color) for mask, color in zip(masks, REGION_RGB, strict=False)]
        return {"background": image, "layers": layers, "composite": None}

    def pick_target(editor: dict | None, event: gr.SelectData) -> tuple[int, int]:
        """Clicking the preview puts the object's centre there."""
        return handlers.offset_to(editor, tuple(event.index))

    pick_target.__annotations__["event"] = gr.SelectData  # a real class: gradio injects event data by annotation

    def background_of(editor: dict | None) -> Any:
        return None if not editor else editor.get("background")

    def sample_edit() -> tuple[dict, Any]:
        image, mask = handlers.sample_scene(0)
        return {"background": image, "layers": [handlers.mask_layer(mask)], "composite": None}, image

    def sample_compose() -> tuple[Any, dict]:
        background, _ = handlers.sample_scene(1)
        reference, mask = handlers.sample_scene(0)
        clean = np.asarray(background).copy()
        _, other = handlers.sample_scene(1)
        clean[other] = 255  # a background with one object left, so the pasted one has room
        return clean, {"background": reference, "layers": [handlers.mask_layer(mask)], "composite": None}

    blank = np.full((CANVAS_SIZE, CANVAS_SIZE, 3), 255, np.uint8)
    with gr.Blocks(title="attncontrol") as app:
        gr.Markdown(
            "# attncontrol\nSteer where a diffusion model attends: regional prompts, object removal and moves, "
            "composition, attention maps. Every result is saved with a sidecar under "
            f"`{folder}` that reruns it: `attncontrol batch <sidecar>.json`."
        )
        with gr.Row():
            model_box = gr.Dropdown(
                models,
                value=chosen,
                allow_custom_value=True,
                label="Model",
                info="a shipped model, a local diffusers folder or a hub id",
                elem_id="model",
            )
            seed_box = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")

        with gr.Tab("Regional prompts", id="regional"):
            gr.Markdown(
                "Pick a layer (**region 1** ... **region 4**, bottom right of the canvas), paint where that region "
                "goes, and give it a prompt. Empty layers without a prompt are ignored."
            )
            with gr.Row():
                with gr.Column():
                    canvas = gr.ImageEditor(
                        value={"background": blank, "layers": [], "composite": None},
                        canvas_size=(CANVAS_SIZE, CANVAS_SIZE),
                        sources=(),
                        transforms=(),
                        layers=gr.LayerOptions(
                            allow_additional_layers=False, layers=[f"region {i + 1}" for i in range(MAX_REGIONS)]
                        ),
                        brush=gr.Brush(default_size=40, colors=REGION_COLORS, color_mode="defaults"),
                        type="numpy",
                        label="Regions",
                        elem_id="regional-canvas",
                    )
                    base_prompt = gr.Textbox(label="Base prompt (whole image; empty: the region prompts joined)")
                    region_prompts = [
                        gr.Textbox(label=f"Region {i + 1} prompt", elem_id=f"region-prompt-{i + 1}")
                        for i in range(MAX_REGIONS)
                    ]
                with gr.Column():
                    regional_out = gr.Image(
                        label="Result", type="pil", elem_id="regional-result", format="png", height=320
                    )
                    regional_button = gr.Button("Generate", variant="primary", elem_id="regional-generate")
                    with gr.Accordion("Advanced", open=False):
                        mode = gr.Radio(["hard", "soft"], value="hard", label="Region mode")
                        base_weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Base prompt weight inside regions")
                        regional_steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        regional_guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="Guidance scale")
                        regional_negative = gr.Textbox(label="Negative prompt")
            regional_button.click(
                _friendly(run_regional),
                [
                    model_box,
                    canvas,
                    base_prompt,
                    *region_prompts,
                    mode,
                    base_weight,
                    seed_box,
                    regional_steps,
                    regional_guidance,
                    regional_negative,
                ],
                regional_out,
                api_name="regional",
            )

        with gr.Tab("Remove / move", id="edit"):
            gr.Markdown(
                "Upload an image (or a sample scene), brush over one object, then remove it or move it: type the "
                "offset, or click the preview where the object should go."
            )
            with gr.Row():
                with gr.Column():
                    editor = _object_editor("Image (paint the object)", "edit-canvas")
                    sample_edit_button = gr.Button("Sample scene", size="sm", elem_id="edit-sample")
                    operation = gr.Radio(["remove", "move"], value="remove", label="Operation", elem_id="operation")
                    with gr.Row():
                        dx = gr.Number(value=0, label="dx (pixels, right)", elem_id="dx")
                        dy = gr.Number(value=0, label="dy (pixels, down)", elem_id="dy")
                    preview = gr.Image(label="Click: move the object here", interactive=False, elem_id="edit-preview")
                with gr.Column():
                    edit_out = gr.Image(label="Result", type="pil", elem_id="edit-result", format="png", height=320)
                    edit_button = gr.Button("Apply", variant="primary", elem_id="edit-apply")
                    with gr.Accordion("Advanced", open=False):
                        edit_prompt = gr.Textbox(label="Prompt (describes the scene; usually empty)")
                        edit_steps = gr.Slider(1, 100, value=50, step=1, label="Steps (DDIM inversion + sampling)")
            # UI helpers skip the queue (no model runs): they answer at once even while a generation is running.
            sample_edit_button.click(sample_edit, None, [editor, preview], concurrency_limit=None)
            editor.upload(background_of, editor, preview, show_progress="hidden", concurrency_limit=None)
            preview.select(_friendly(pick_target), editor, [dx, dy], concurrency_limit=None).then(
                lambda: "move", None, operation, concurrency_limit=None
            )
            edit_button.click(
                _friendly(run_edit),
                [model_box, editor, operation, dx, dy, edit_prompt, seed_box, edit_steps],
                edit_out,
                api_name="edit",
            )

        with gr.Tab("Compose", id="compose"):
            gr.Markdown("Paint an object on the reference image and place it into a box of the background.")
            with gr.Row():
                with gr.Column():
                    background = gr.Image(label="Background", type="numpy", elem_id="compose-background")
                    reference = _object_editor("Reference (paint the object)", "compose-reference")
                    sample_compose_button = gr.Button("Sample scenes", size="sm", elem_id="compose-sample")
                    with gr.Row():
                        x0 = gr.Slider(0, 1, value=0.1, step=0.01, label="box x0")
                        y0 = gr.Slider(0, 1, value=0.1, step=0.01, label="box y0")
                        x1 = gr.Slider(0, 1, value=0.5, step=0.01, label="box x1")
                        y1 = gr.Slider(0, 1, value=0.5, step=0.01, label="box y1")
                with gr.Column():
                    compose_out = gr.Image(
                        label="Result", type="pil", elem_id="compose-result", format="png", height=320
                    )
                    compose_button = gr.Button("Compose", variant="primary", elem_id="compose-apply")
                    with gr.Accordion("Advanced", open=False):
                        compose_prompt = gr.Textbox(label="Prompt")
                        compose_steps = gr.Slider(1, 100, value=50, step=1, label="Steps")
            sample_compose_button.click(sample_compose, None, [background, reference], concurrency_limit=None)
            compose_button.click(
                _friendly(run_compose),
                [model_box, background, reference, x0, y0, x1, y1, compose_prompt, seed_box, compose_steps],
                compose_out,
                api_name="compose",
            )

        with gr.Tab("Concepts", id="concepts"):
            gr.Markdown(
                "Learn one new token per object of **one image** (Break-A-Scene), then use the tokens in prompts. "
                "Paint each object on its own layer (**concept 1**, **concept 2**, ...), or let the model find them "
                "from its attention (AttenCraft) given one class word per object. Training takes minutes on a CPU."
            )
            with gr.Row():
                with gr.Column():
                    concept_editor = gr.ImageEditor(
                        sources=("upload", "clipboard"),
                        transforms=(),
                        layers=gr.LayerOptions(
                            allow_additional_layers=False, layers=[f"concept {i + 1}" for i in range(MAX_CONCEPTS)]
                        ),
                        brush=gr.Brush(default_size=12, colors=REGION_COLORS, color_mode="defaults"),
                        type="numpy",
                        label="Image (paint each object on its own layer)",
                        elem_id="concepts-canvas",
                    )
                    sample_concepts_button = gr.Button("Sample scene", size="sm", elem_id="concepts-sample")
                    initializers = gr.Textbox(
                        value="square, circle",
                        label="Class word per object, comma-separated (starts each token; e.g. 'cat, dog')",
                        elem_id="concepts-initializers",
                    )
                    mask_choice = gr.Radio(
                        list(handlers.MASK_CHOICES), value="painted", label="Masks", elem_id="concepts-masks"
                    )
                    recipe = gr.Radio(
                        list(handlers.RECIPE_CHOICES),
                        value=handlers.RECIPE_DEFAULT,
                        label="Recipe (docs/concepts.md: the guided one was measured best on the shapes model)",
                        elem_id="concepts-recipe",
                    )
                    with gr.Accordion("Advanced", open=False):
                        phase1_default, phase2_default = handlers.recipe_steps(handlers.RECIPE_DEFAULT)
                        phase1 = gr.Slider(
                            0, 2000, value=phase1_default, step=10, label="Phase 1 steps (token embeddings)"
                        )
                        phase2 = gr.Slider(
                            0, 2000, value=phase2_default, step=10, label="Phase 2 steps (LoRA + embeddings)"
                        )
                    train_button = gr.Button("Train", variant="primary", elem_id="concepts-train")
                with gr.Column():
                    run_folder = gr.Textbox(label="Training run (folder)", elem_id="concepts-run")
                    validation = gr.Image(label="Validation: input, each token, all together", type="pil")
                    concept_masks = gr.Gallery(label="Masks used", columns=4, format="png")
                    concept_prompt = gr.Textbox(label="Prompt with the tokens", elem_id="concepts-prompt")
                    concept_button = gr.Button("Generate", variant="primary", elem_id="concepts-generate")
                    concept_out = gr.Image(label="Result", type="pil", elem_id="concepts-result", format="png")
                    with gr.Accordion("Advanced", open=False):
                        concept_steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                        concept_guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance scale")
                        concept_negative = gr.Textbox(label="Negative prompt")
            sample_concepts_button.click(sample_concepts, None, concept_editor, concurrency_limit=None)
            recipe.change(handlers.recipe_steps, recipe, [phase1, phase2], concurrency_limit=None)
            train_button.click(
                _friendly(run_train_concepts),
                [model_box, concept_editor, initializers, mask_choice, phase1, phase2, seed_box, recipe],
                [run_folder, validation, concept_masks, concept_prompt],
                api_name="train_concepts",
            )
            concept_button.click(
                _friendly(run_concept_image),
                [model_box, run_folder, concept_prompt, seed_box, concept_steps, concept_guidance, concept_negative],
                concept_out,
                api_name="concept_image",
            )

        with gr.Tab("Attention maps", id="maps"):
            gr.Markdown("Generate, then see where one word of the prompt was attended, over all steps and per step.")
            with gr.Row():
                with gr.Column():
                    maps_prompt = gr.Textbox(value="a red circle", label="Prompt", elem_id="maps-prompt")
                    maps_word = gr.Textbox(value="red", label="Word to map", elem_id="maps-word")
                    maps_button = gr.Button("Generate", variant="primary", elem_id="maps-generate")
                    with gr.Accordion("Advanced", open=False):
                        maps_steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        maps_guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="Guidance scale")
                        maps_negative = gr.Textbox(label="Negative prompt")
                with gr.Column():
                    maps_image = gr.Image(label="Image", type="pil", elem_id="maps-image", format="png", height=320)
                    maps_gallery = gr.Gallery(label="Heat maps", columns=5, elem_id="maps-gallery", format="png")
            maps_button.click(
                _friendly(run_maps),
                [model_box, maps_prompt, maps_word, seed_box, maps_steps, maps_guidance, maps_negative],
                [maps_image, maps_gallery],
                api_name="attention_maps",
            )
    app.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    app.attncontrol_state = state  # for tests and callers that want the output folder
    return app


def launch(
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
    **build_kwargs: Any,
) -> Any:
    """Build and serve the app; ``block=False`` returns at once (tests, notebooks) and the caller closes it."""
    app = build_app(**build_kwargs)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block)
    return app
