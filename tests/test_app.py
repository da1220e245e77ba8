"""The Gradio app: its handlers on their own, then the real page in headless Chromium (draw two regions, brush a mask
and remove, an invalid input shows a message), then 8 simultaneous requests through the gradio client.

Screenshots go to ``$ATTNCONTROL_ARTIFACTS`` (default ``test-artifacts/`` in the repository). The browser tests need
Debian's ``chromium`` and the ``playwright`` package; ``.ci/run`` installs both and sets ``ATTNCONTROL_REQUIRE_BROWSER``
so that CI fails instead of skipping when they are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from attncontrol.app import handlers
from attncontrol.app.handlers import AppState, UserInputError
from attncontrol.jobs import PipelineCache
from attncontrol.shapes.detector import detect

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ATTNCONTROL_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> AppState:
    return AppState(pipelines=PipelineCache(), output_dir=tmp_path_factory.mktemp("app-outputs"))


def layer(mask: np.ndarray) -> np.ndarray:
    return handlers.mask_layer(mask)


def halves(size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((size, size), bool)
    left[:, : size // 2] = True
    return left, ~left


# ------------------------------------------------------------------------------------------------ handlers
def test_regional_handler_saves_a_job_that_reruns(state):
    left, right = halves()
    editor = {"background": np.full((512, 512, 3), 255, np.uint8), "layers": [layer(left), layer(right)]}
    image = handlers.regional(
        state, "shapes-sd", editor, "", ["a red circle", "a blue square", "", ""], "hard", 1.0, 3, 4, 7.5, ""
    )
    assert image.size == (64, 64)
    sidecar = json.loads(sorted(state.output_dir.glob("*-regional.json"))[-1].read_text())
    job = sidecar["job"]
    assert job["prompt"] == "a red circle and a blue square" and job["seed"] == 3 and job["steps"] == 4
    saved = np.asarray(Image.open(job["regions"][0]["mask"])) > 0
    assert np.array_equal(saved, left)  # the painted layer is the region, pixel for pixel


@pytest.mark.parametrize(
    ("prompts", "layers", "message"),
    [
        (["a red circle", "", "", ""], [], "Draw at least one region|has a prompt but nothing drawn"),
        (["", "", "", ""], ["left"], "Region 1 is drawn but has no prompt"),
        (["a red circle", "", "a cat", ""], ["left"], "Region 3 has a prompt but nothing drawn"),
        (["", "", "", ""], [], "Draw at least one region"),
    ],
)
def test_regional_handler_explains_bad_input(state, prompts, layers, message):
    left, _ = halves()
    editor = {"background": None, "layers": [layer(left) for _ in layers]}
    with pytest.raises(UserInputError, match=message):
        handlers.regional(state, "shapes-sd", editor, "", prompts, "hard", 1.0, 0, 2, 7.5, "")


def test_edit_handler_removes_the_painted_object(state):
    image, mask = handlers.sample_scene(0)
    editor = {"background": np.asarray(image), "layers": [layer(mask)]}
    result = handlers.edit(state, "shapes-sd", editor, "remove", 0, 0, "", 0, 50)
    colors = [obj.color for obj in detect(np.asarray(result))]
    assert "red" not in colors and "blue" in colors  # the red square went, the blue circle stayed
    with pytest.raises(UserInputError, match="nothing is painted"):
        handlers.edit(state, "shapes-sd", {"background": np.asarray(image), "layers": []}, "remove", 0, 0, "", 0, 5)
    with pytest.raises(UserInputError, match="Set an offset"):
        handlers.edit(state, "shapes-sd", editor, "move", 0, 0, "", 0, 5)
    with pytest.raises(UserInputError, match="upload an image"):
        handlers.edit(state, "shapes-sd", None, "remove", 0, 0, "", 0, 5)


def test_click_on_the_preview_gives_the_offset_to_the_object_centre():
    _, mask = handlers.sample_scene(0)  # the red square, centred at (80, 88) on the 256-pixel picture
    ys, xs = np.nonzero(mask)
    editor = {"background": None, "layers": [layer(mask)]}
    dx, dy = handlers.offset_to(editor, (200, 40))
    assert (dx, dy) == (round(200 - xs.mean()), round(40 - ys.mean()))
    with pytest.raises(UserInputError, match="Brush over the object first"):
        handlers.offset_to({"background": None, "layers": []}, (10, 10))


def test_compose_handler_checks_the_box(state):
    background, _ = handlers.sample_scene(1)
    reference, mask = handlers.sample_scene(0)
    editor = {"background": np.asarray(reference), "layers": [layer(mask)]}
    with pytest.raises(UserInputError, match="0 <= x0 < x1 <= 1"):
        handlers.compose(state, "shapes-sd", np.asarray(background), editor, (0.5, 0.1, 0.2, 0.4), "", 0, 5)
    result = handlers.compose(state, "shapes-sd", np.asarray(background), editor, (0.05, 0.55, 0.45, 0.95), "", 0, 5)
    assert result.size == (64, 64)


def test_attention_maps_handler_gives_one_map_per_step(state):
    image, gallery = handlers.attention_maps(state, "shapes-sd", "a red circle", "red", 0, 3, 7.5, "")
    assert [caption for _, caption in gallery] == ["red: all steps", "step 1", "step 2", "step 3"]
    assert all(picture.size == image.size for picture, _ in gallery)
    with pytest.raises(UserInputError, match="word"):
        handlers.attention_maps(state, "shapes-sd", "a red circle", " ", 0, 3, 7.5, "")


def test_concept_handlers_train_then_generate_with_the_tokens(state):
    image, masks = handlers.sample_scene_masks(0)
    editor = {"background": np.asarray(image), "layers": [layer(mask) for mask in masks]}
    with pytest.raises(UserInputError, match="2 objects are painted but 1 class words"):
        handlers.train_concepts(state, "shapes-sd", editor, "square", "painted", 2, 2, 0)
    with pytest.raises(UserInputError, match="Paint each object"):
        handlers.train_concepts(
            state, "shapes-sd", {"background": np.asarray(image), "layers": []}, "", "painted", 2, 2, 0
        )
    folder, validation, shown_masks = handlers.train_concepts(
        state, "shapes-sd", editor, "square, circle", "painted", 2, 2, 0, "Break-A-Scene"
    )
    assert validation is not None and [caption for _, caption in shown_masks] == [
        "<asset0> (painted)",
        "<asset1> (painted)",
    ]
    with pytest.raises(UserInputError, match="Train concepts first"):
        handlers.generate_concepts(state, "shapes-sd", "", "a photo of <asset0>", 0, 2, 5.0, "")
    first = handlers.generate_concepts(state, "shapes-sd", folder, "a photo of <asset0>", 0, 2, 5.0, "")
    # the tokens were loaded for that call only: the shared pipeline no longer knows them
    assert "<asset0>" not in state.pipelines.get("shapes-sd").tokenizer.get_vocab()
    sidecar = sorted(state.output_dir.glob("*concept-image*.json"))[-1]
    job = json.loads(sidecar.read_text())["job"]
    assert job["concepts"] == folder
    from attncontrol.jobs import Job, run_job

    again = run_job(Job.from_dict(job), state.pipelines).image
    assert np.array_equal(np.asarray(again), np.asarray(first))


def test_concept_recipe_choice_reaches_the_trainer(state, monkeypatch):
    from attncontrol.shapes.concept_bench import caption_words
    from attncontrol.training import concepts as trainer

    image, masks = handlers.sample_scene_masks(0)
    editor = {"background": np.asarray(image), "layers": [layer(mask) for mask in masks]}
    seen = []
    monkeypatch.setattr(trainer, "train_concepts", lambda config, resume=False: seen.append(config))
    with pytest.raises(UserInputError, match="Recipe must be one of"):
        handlers.train_concepts(state, "shapes-sd", editor, "square, circle", "painted", 2, 0, 0, "fast")
    handlers.train_concepts(state, "shapes-sd", editor, "square, circle", "painted", 300, 0, 0)  # the app's default
    handlers.train_concepts(state, "shapes-sd", editor, "square, circle", "painted", 300, 50, 0, "Break-A-Scene")
    guided, paper = seen
    assert (guided.loss_guidance, guided.num_vectors, guided.init_search, guided.sampling) == (5.0, 2, 32, "attencraft")
    assert guided.init_words == caption_words()  # on the shapes model the search picks from its captions' words
    assert (guided.phase1_steps, guided.phase2_steps) == (300, 0)  # the sliders win over the recipe's steps
    assert (paper.loss_guidance, paper.num_vectors, paper.init_search, paper.sampling) == (0.0, 1, 0, "union")
    assert (paper.phase2_steps, paper.init_words) == (50, [])
    assert [handlers.recipe_steps(label) for label in handlers.RECIPE_CHOICES] == [(400, 400), (400, 0)]


def test_working_size_keeps_aspect_on_the_models_side(state):
    pipe = state.pipelines.get("shapes-sd")
    assert handlers.working_size(pipe, (512, 512)) == (64, 64)
    assert handlers.working_size(pipe, (1024, 512)) == (64, 32)


# ------------------------------------------------------------------------------------------------ the served app
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``attncontrol app`` in its own process, as a user starts it; yields its URL and output folder."""
    port = _free_port()
    outputs = tmp_path_factory.mktemp("served-outputs")
    log = outputs.parent / "app.log"
    command = [sys.executable, "-m", "attncontrol", "app", "--port", str(port), "--outputs", str(outputs)]
    with open(log, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url, outputs
    finally:
        server.terminate()
        server.wait(timeout=30)


def _browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return shutil.which(CHROMIUM) is not None


needs_browser = pytest.mark.skipif(
    not _browser_available() and not os.environ.get("ATTNCONTROL_REQUIRE_BROWSER"),
    reason="needs playwright and Debian's chromium (installed by .ci/run)",
)


def _screenshot(page, name: str) -> None:
    """Save a screenshot artifact of the viewport, which holds the whole app (1400x1300). ``full_page`` added nothing
    but a re-render: right after a removal, Chromium on 2 busy cores can spend a minute on it."""
    page.screenshot(path=ARTIFACTS / name, timeout=120_000)


def _paint_rect(page, editor: str, image_size: tuple[int, int], x0, y0, x1, y1, step) -> None:
    """Brush straight strokes ``step`` apart over a rectangle given in image pixels.

    The editor shows the image centred in its canvas at the zoom it displays; each mouse event costs a software
    redraw, so the strokes are as few as paint the area.
    """
    box = page.locator(f"{editor} canvas").first.bounding_box()
    zoom = float(page.locator(f"{editor} .zoom-number span").inner_text().rstrip("%")) / 100
    centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for y in np.arange(y0, y1 + 1e-6, step):
        screen_y = centre_y + (y - image_size[1] / 2) * zoom
        page.mouse.move(centre_x + (x0 - image_size[0] / 2) * zoom, screen_y)
        page.mouse.down()
        page.mouse.move(centre_x + (x1 - image_size[0] / 2) * zoom, screen_y)
        page.mouse.up()


@needs_browser
def test_browser_regions_remove_and_error(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, outputs = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url)

        # 1. Two regions on two layers, two prompts, generate: an image appears.
        canvas = page.locator("#regional-canvas canvas").first
        canvas.wait_for(timeout=30000)
        page.locator("#regional-canvas button[aria-label='Brush']").first.click()
        _paint_rect(page, "#regional-canvas", (512, 512), 40, 60, 220, 450, 30)
        page.locator("#regional-canvas button[aria-label='Show Layers']").click()
        page.locator("#regional-canvas button[aria-label='layer-2']").click()
        page.locator("#regional-canvas button[aria-label='Color']").first.click()  # region 2 in blue
        page.locator("#regional-canvas button.color[style*='60, 110, 230']").click()
        page.locator("#regional-canvas button[aria-label='Brush']").first.click()
        _paint_rect(page, "#regional-canvas", (512, 512), 290, 60, 470, 450, 30)
        page.locator("#region-prompt-1 textarea").fill("a red circle")
        page.locator("#region-prompt-2 textarea").fill("a blue square")
        _screenshot(page, "app-regions-drawn.png")
        page.locator("#regional-generate").click()
        expect(page.locator("#regional-result img")).to_be_visible(timeout=120000)
        _screenshot(page, "app-regions-result.png")
        job = json.loads(next(outputs.glob("*-regional.json")).read_text())["job"]
        assert [region["prompt"] for region in job["regions"]] == ["a red circle", "a blue square"]
        left = np.asarray(Image.open(job["regions"][0]["mask"])) > 0
        right = np.asarray(Image.open(job["regions"][1]["mask"])) > 0
        assert left[:, :256].sum() > 0.9 * left.sum() and right[:, 256:].sum() > 0.9 * right.sum()

        # 2. An invalid input (a prompt for a region with nothing drawn) shows a message, not a traceback.
        page.locator("#region-prompt-3 textarea").fill("a green triangle")
        page.locator("#regional-generate").click()
        message = page.get_by_text("Region 3 has a prompt but nothing drawn")
        expect(message.first).to_be_visible(timeout=30000)
        _screenshot(page, "app-error.png")
        assert "Traceback" not in page.content()
        page.get_by_test_id("toast-close").first.click()  # dismissed, as a user would

        # 3. Upload a scene, brush over the red square, remove: an image appears and the square is gone.
        page.get_by_role("tab", name="Remove / move").click()
        scene, mask = handlers.sample_scene(0)
        scene.save(tmp_path / "scene.png")
        page.locator("#edit-canvas input[type=file]").set_input_files(tmp_path / "scene.png")
        expect(page.locator("#edit-preview img")).to_be_visible(timeout=30000)  # the upload reached the server
        page.locator("#edit-canvas button[aria-label='Brush']").first.click()
        ys, xs = np.nonzero(mask)
        _paint_rect(page, "#edit-canvas", scene.size, xs.min() - 4, ys.min() - 4, xs.max() + 4, ys.max() + 4, 8)
        _screenshot(page, "app-remove-brushed.png")
        page.locator("#edit-apply").click()
        expect(page.locator("#edit-result img")).to_be_visible(timeout=240000)
        _screenshot(page, "app-remove-result.png")
        browser.close()
    sidecar = next(outputs.glob("*-remove.json"))
    removed = np.asarray(Image.open(sidecar.with_suffix(".png")))
    painted = np.asarray(Image.open(json.loads(sidecar.read_text())["job"]["mask"])) > 0
    small_mask = np.asarray(Image.fromarray(mask).resize((64, 64), Image.Resampling.NEAREST))
    assert painted[small_mask].mean() > 0.95  # the brushed mask covers the square
    assert "red" not in [obj.color for obj in detect(removed)]


def test_eight_simultaneous_requests_queue_and_finish(served):
    from gradio_client import Client

    url, outputs = served
    client = Client(url, verbose=False)

    def request(seed: int):
        return client.predict("shapes-sd", "a red circle", "red", seed, 2, 7.5, "", api_name="/attention_maps")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(request, range(8)))
    assert len(results) == 8
    images = [np.asarray(Image.open(image)) for image, _ in results]
    assert all(len(gallery) == 3 for _, gallery in results)  # mean map + 2 steps
    assert len({image.tobytes() for image in images}) == 8  # 8 seeds, 8 different pictures
    seeds = sorted(json.loads(path.read_text())["job"]["seed"] for path in outputs.glob("*-maps.json"))
    assert seeds == list(range(8))  # each request ran once, with its own settings
