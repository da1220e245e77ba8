"""Inversion and the DesignEdit pipelines: reconstruction bounds, real edits on the shipped model, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attncontrol import EditError, MaskError
from attncontrol.pipelines.editing import (
    Layer,
    LayeredEditMixin,
    LayeredEditStableDiffusionPipeline,
    RemoveFluxPipeline,
    RemoveMixin,
    RemoveStableDiffusionPipeline,
    RemoveStableDiffusionXLPipeline,
    fill_from_surroundings,
    to_editing,
)
from attncontrol.pipelines.inversion import invert, matched_sampling, matched_scheduler
from attncontrol.shapes.detector import detect
from attncontrol.shapes.scenes import ObjectSpec, render
from tests.conftest import tiny_pipeline

# Mean absolute error in [0, 1] units of a 50-step null-prompt DDIM inversion + reconstruction on shapes-sd, for the
# scene below; a plain VAE round trip of the same scene is the floor (about 0.01).
RECONSTRUCTION_BOUND = 0.03


@pytest.fixture(scope="module")
def shapes_sd():
    from attncontrol.models import load_pipeline

    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def scene():
    return render(
        [ObjectSpec("red", "square", 18.0, 20.0, 8.0), ObjectSpec("blue", "circle", 44.0, 42.0, 8.0)], "white"
    )


def processors(pipe):
    return dict((pipe.transformer if hasattr(pipe, "transformer") else pipe.unet).attn_processors)


def test_inversion_reconstructs_on_the_shipped_model_and_is_deterministic(shapes_sd, scene):
    image = scene.image.copy()
    inversion = invert(shapes_sd, image, num_inference_steps=50)
    again = invert(shapes_sd, image, num_inference_steps=50)
    assert torch.equal(inversion.latents, again.latents)
    assert inversion.latents.shape == (51, 4, 32, 32)
    assert (image == scene.image).all()
    scheduler = shapes_sd.scheduler
    with matched_sampling(shapes_sd):
        out = shapes_sd("", latents=inversion.noise, num_inference_steps=50, guidance_scale=1.0, output_type="np")
    assert shapes_sd.scheduler is scheduler
    error = float(np.abs(out.images[0] - scene.image / 255.0).mean())
    assert error < RECONSTRUCTION_BOUND, error
    found = {(obj.color, obj.shape) for obj in detect((out.images[0] * 255).round().astype(np.uint8))}
    assert found == {("red", "square"), ("blue", "circle")}


def test_removal_erases_the_object_and_keeps_the_other(shapes_sd, scene):
    remover = to_editing(shapes_sd, RemoveMixin)
    before = processors(shapes_sd)
    image = scene.image.copy()
    out = remover(image, scene.objects[0].mask, output_type="np").images[0]
    assert processors(shapes_sd) == before
    assert (image == scene.image).all()
    found = detect((out * 255).round().astype(np.uint8))
    assert [(obj.color, obj.shape) for obj in found] == [("blue", "circle")]
    assert np.hypot(*np.subtract(found[0].centroid, scene.objects[1].centroid)) <= 2.0


def test_move_puts_the_object_at_the_target(shapes_sd, scene):
    editor = to_editing(shapes_sd, LayeredEditMixin)
    out = editor(scene.image, [Layer(scene.objects[0].mask, offset=(2, 24))], output_type="np").images[0]
    found = detect((out * 255).round().astype(np.uint8))
    squares = [obj for obj in found if obj.matches("red", "square")]
    assert len(squares) == 1
    target = np.add(scene.objects[0].centroid, (2, 24))
    assert np.hypot(*np.subtract(squares[0].centroid, target)) <= 4.0


def test_fill_paints_the_hole_in_the_surrounding_colour():
    image = torch.zeros(1, 3, 16, 16)
    image[:, 0] = 0.5  # a flat background
    image[:, :, 4:9, 5:10] = torch.tensor([1.0, -1.0, 0.3])[:, None, None]  # an object
    hole = torch.zeros(16, 16)
    hole[3:10, 4:11] = 1.0
    filled = fill_from_surroundings(image, hole)
    assert torch.allclose(filled, torch.zeros_like(filled).index_fill_(1, torch.tensor([0]), 0.5), atol=1e-6)
    assert torch.equal(filled[..., hole < 0.5], image[..., hole < 0.5])


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_edits_run_on_every_family_and_restore_the_pipeline(name):
    pipe = tiny_pipeline(name)
    extra = {"max_sequence_length": 16} if name == "flux" else {}
    scheduler, before = pipe.scheduler, processors(pipe)
    image = torch.rand(3, 32, 48)
    original = image.clone()
    hole = (8, 8, 24, 20)
    remover = to_editing(pipe, RemoveMixin)
    expected = {
        "sd": RemoveStableDiffusionPipeline,
        "sdxl": RemoveStableDiffusionXLPipeline,
        "flux": RemoveFluxPipeline,
    }
    assert isinstance(remover, expected[name])
    removed = remover(image, hole, num_inference_steps=4, output_type="np", **extra).images
    editor = to_editing(pipe, LayeredEditMixin)
    layered = editor(
        image,
        [Layer(hole, offset=(10, 4), scale=1.2, flip="horizontal"), Layer((30, 20, 40, 30), remove=True)],
        num_inference_steps=4,
        output_type="np",
        **extra,
    ).images
    zoomed = editor(image, zoom=0.75, pan=(3, 0), num_inference_steps=4, output_type="np", **extra).images
    for out in (removed, layered, zoomed):
        assert out.shape == (1, 32, 48, 3) and np.isfinite(out).all()
    assert torch.equal(image, original)
    assert pipe.scheduler is scheduler and processors(pipe) == before


def test_pipeline_is_restored_after_an_exception():
    pipe = tiny_pipeline("sd")
    remover = RemoveStableDiffusionPipeline.from_pipe(pipe)
    remover.set_progress_bar_config(disable=True)
    scheduler, before = pipe.scheduler, processors(pipe)

    def fail(*_args):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        remover(torch.rand(3, 32, 48), (8, 8, 24, 20), num_inference_steps=3, callback_on_step_end=fail)
    assert remover.scheduler is scheduler and processors(pipe) == before


def test_bad_edits_fail_before_sampling():
    pipe = tiny_pipeline("sd")
    remover, editor = to_editing(pipe, RemoveMixin), to_editing(pipe, LayeredEditMixin)
    image = torch.rand(3, 32, 48)
    everything = torch.ones(32, 48)
    with pytest.raises(EditError, match="covers the whole image"):
        remover(image, everything)
    with pytest.raises(MaskError, match="empty"):
        remover(image, torch.zeros(32, 48))
    with pytest.raises(MaskError, match="aspect"):
        remover(image, torch.ones(40, 40))
    with pytest.raises(EditError, match="multiples of 4"):
        remover(torch.rand(3, 30, 48), (0, 0, 8, 8))
    with pytest.raises(EditError, match=r"\[0, 1\]"):
        remover(image * 3, (0, 0, 8, 8))
    with pytest.raises(EditError, match="key_mask_target"):
        remover(image, (0, 0, 8, 8), key_mask_target="keys")
    with pytest.raises(ValueError, match="`steps` fractions"):
        remover(image, (0, 0, 8, 8), key_mask_steps=(0.8, 0.2))
    with pytest.raises(EditError, match="entirely off the canvas"):
        editor(image, [Layer((0, 0, 8, 8), offset=(60, 0))], num_inference_steps=2)
    with pytest.raises(EditError, match="same paste order"):
        editor(image, [Layer((0, 0, 8, 8), offset=(4, 0), order=1), Layer((20, 0, 28, 8), offset=(4, 0), order=1)])
    with pytest.raises(EditError, match=r"layers\[0\]` both removes"):
        editor(image, [Layer((0, 0, 8, 8), offset=(4, 0), remove=True)])
    with pytest.raises(EditError, match=r"layers\[0\]\.scale"):
        editor(image, [Layer((0, 0, 8, 8), scale=0)])
    with pytest.raises(EditError, match="separate call"):
        editor(image, [Layer((0, 0, 8, 8), offset=(4, 0))], zoom=0.5)
    with pytest.raises(EditError, match="`zoom`"):
        editor(image, zoom=1.5)
    with pytest.raises(EditError, match="nothing to edit"):
        editor(image, [Layer((0, 0, 8, 8))])
    with pytest.raises(EditError, match="`inversion` cannot be reused"):
        remover(image, (0, 0, 8, 8), inversion=invert(pipe, image, num_inference_steps=2), num_inference_steps=2)


def test_layered_pipeline_loads_with_from_pretrained(tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path)
    editor = LayeredEditStableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(editor, LayeredEditMixin)
    loaded, saved = editor.unet.state_dict(), pipe.unet.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_flow_matching_inversion_retraces_the_forward_schedule():
    pipe = tiny_pipeline("flux")
    forward, inverse = matched_scheduler(pipe), matched_scheduler(pipe, inverse=True)
    sigmas = np.linspace(1.0, 1 / 6, 6)
    forward.set_timesteps(sigmas=sigmas, mu=0.7)
    inverse.set_timesteps(sigmas=sigmas, mu=0.7)
    assert torch.equal(inverse.sigmas, forward.sigmas.flip(0))
    assert float(inverse.timesteps[0]) == 0.0 and bool((inverse.timesteps.diff() > 0).all())
    torch.manual_seed(0)
    start, velocity = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    sample = start
    for timestep in inverse.timesteps:  # a velocity that ignores the sample is inverted exactly by Euler
        sample = inverse.step(velocity, timestep, sample).prev_sample
    assert not torch.allclose(sample, start)
    for timestep in forward.timesteps:
        sample = forward.step(velocity, timestep, sample).prev_sample
    assert torch.allclose(sample, start, atol=1e-5)
