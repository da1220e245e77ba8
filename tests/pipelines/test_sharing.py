"""Drag, composition and consistent-edit pipelines: real edits on the shipped model, every family runs and is
restored, identity when source == target, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attncontrol import EditError, MaskError
from attncontrol.pipelines.sharing import (
    ComposeFluxPipeline,
    ComposeMixin,
    ComposeStableDiffusionPipeline,
    ComposeStableDiffusionXLPipeline,
    ConsistentEditMixin,
    DragFluxPipeline,
    DragMixin,
    DragStableDiffusionPipeline,
    DragStableDiffusionXLPipeline,
    to_sharing,
)
from attncontrol.shapes.detector import detect
from attncontrol.shapes.scenes import ObjectSpec, render
from tests.conftest import tiny_pipeline


@pytest.fixture(scope="module")
def shapes_sd():
    from attncontrol.models import load_pipeline

    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def processors(pipe):
    return dict((pipe.transformer if hasattr(pipe, "transformer") else pipe.unet).attn_processors)


def uint8(image) -> np.ndarray:
    return (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)


def test_drag_moves_the_object_and_clears_its_old_place(shapes_sd):
    scene = render(
        [ObjectSpec("red", "square", 18.0, 20.0, 8.0), ObjectSpec("blue", "circle", 46.0, 46.0, 7.0)], "white"
    )
    image = scene.image.copy()
    before = processors(shapes_sd)
    out = uint8(to_sharing(shapes_sd, DragMixin)(image, scene.objects[0].mask, (0, 16), output_type="np").images[0])
    assert processors(shapes_sd) == before and (image == scene.image).all()
    found = {(obj.color, obj.shape): obj.centroid for obj in detect(out)}
    target = (scene.objects[0].centroid[0], scene.objects[0].centroid[1] + 16)
    assert np.hypot(*np.subtract(found[("red", "square")], target)) <= 4.0
    assert np.hypot(*np.subtract(found[("blue", "circle")], scene.objects[1].centroid)) <= 4.0
    vacated = out[13:26, 11:25].astype(float)  # where the square was, clear of its new top edge
    assert np.abs(vacated - 245).max(-1).mean() < 40


def test_compose_puts_the_reference_object_into_the_box(shapes_sd):
    background = render([ObjectSpec("green", "triangle", 16.0, 16.0, 8.0)], "white")
    reference = render([ObjectSpec("blue", "circle", 20.0, 44.0, 8.0)], "white")
    box = (36.0, 34.0, 54.0, 52.0)
    composer = to_sharing(shapes_sd, ComposeMixin)
    out = composer(
        background.image, reference.image, reference.objects[0].mask, box, prompt="a green triangle and a blue circle"
    )
    found = detect(np.asarray(out.images[0]))
    pasted = [obj for obj in found if obj.matches("blue", "circle")]
    assert pasted and box[0] <= pasted[0].centroid[0] < box[2] and box[1] <= pasted[0].centroid[1] < box[3]
    assert any(
        obj.matches("green", "triangle") and np.hypot(*np.subtract(obj.centroid, background.objects[0].centroid)) <= 4
        for obj in found
    )


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_sharing_pipelines_run_on_every_family_and_restore_the_pipeline(name):
    pipe = tiny_pipeline(name)
    extra = {"max_sequence_length": 16} if name == "flux" else {}
    scheduler, before = pipe.scheduler, processors(pipe)
    image, reference = torch.rand(3, 32, 48), torch.rand(3, 32, 48)
    originals = image.clone(), reference.clone()
    drag = to_sharing(pipe, DragMixin)
    expected = {"sd": DragStableDiffusionPipeline, "sdxl": DragStableDiffusionXLPipeline, "flux": DragFluxPipeline}
    assert isinstance(drag, expected[name])
    outputs = [
        drag(image, (8, 8, 20, 20), (12, 4), num_inference_steps=4, output_type="np", **extra).images,
        drag(
            image,
            (8, 8, 20, 20),
            target_box=(24, 12, 44, 28),
            sharing="masked",
            num_inference_steps=4,
            output_type="np",
            **extra,
        ).images,
    ]
    composer = to_sharing(pipe, ComposeMixin)
    compose_classes = {
        "sd": ComposeStableDiffusionPipeline,
        "sdxl": ComposeStableDiffusionXLPipeline,
        "flux": ComposeFluxPipeline,
    }
    assert isinstance(composer, compose_classes[name])
    outputs.append(
        composer(
            image,
            reference,
            (4, 4, 16, 16),
            (28, 12, 44, 28),
            prompt="a red circle",
            object_phrase="red circle",
            share_background=True,
            num_inference_steps=4,
            output_type="np",
            **extra,
        ).images
    )
    consistent = to_sharing(pipe, ConsistentEditMixin)
    outputs.append(
        consistent("a red circle", "a red square", image=image, num_inference_steps=3, output_type="np", **extra).images
    )
    for out in outputs:
        assert out.shape == (1, 32, 48, 3) and np.isfinite(out).all()
    assert torch.equal(image, originals[0]) and torch.equal(reference, originals[1])
    assert pipe.scheduler is scheduler and processors(pipe) == before


def test_consistent_edit_with_the_same_prompt_reproduces_the_source():
    pipe = tiny_pipeline("sd")
    consistent = to_sharing(pipe, ConsistentEditMixin)
    kwargs = {"height": 32, "width": 48, "num_inference_steps": 3, "output_type": "np", "return_source": True}
    same = consistent("a red circle", "a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert same.shape == (2, 32, 48, 3)
    assert np.abs(same[0] - same[1]).max() < 1e-4
    edited = consistent("a red circle", "a blue square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(edited[0] - same[0]).max() < 1e-4  # the source row is the source
    assert np.abs(edited[1] - edited[0]).max() > 1e-3  # the target follows its own prompt


def test_sharing_pipeline_is_restored_after_an_exception():
    pipe = tiny_pipeline("sd")
    drag = to_sharing(pipe, DragMixin)
    scheduler, before = pipe.scheduler, processors(pipe)

    def fail(*_args):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        drag(torch.rand(3, 32, 48), (8, 8, 20, 20), (4, 0), num_inference_steps=3, callback_on_step_end=fail)
    assert drag.scheduler is scheduler and processors(pipe) == before


def test_bad_drags_and_compositions_are_named():
    pipe = tiny_pipeline("sd")
    drag, composer = to_sharing(pipe, DragMixin), to_sharing(pipe, ComposeMixin)
    image = torch.rand(3, 32, 48)
    box = (8, 8, 20, 20)
    with pytest.raises(EditError, match="exactly one of `offset`"):
        drag(image, box)
    with pytest.raises(EditError, match="exactly one of `offset`"):
        drag(image, box, (4, 0), target_box=(0, 0, 8, 8))
    with pytest.raises(EditError, match=r"`target_box`.*outside"):
        drag(image, box, target_box=(40, 20, 60, 30))
    with pytest.raises(EditError, match="entirely off the canvas"):
        drag(image, box, (100, 0))
    with pytest.raises(EditError, match="`sharing`"):
        drag(image, box, (4, 0), sharing="mutual")
    with pytest.raises(MaskError, match="aspect"):
        drag(image, torch.ones(40, 40), (4, 0))
    with pytest.raises(EditError, match="`reference_image` is 32x32"):
        composer(image, torch.rand(3, 32, 32), box, (24, 8, 40, 24))
    with pytest.raises(MaskError, match="reference_mask"):
        composer(image, image, torch.ones(16, 16), (24, 8, 40, 24))
    with pytest.raises(EditError, match=r"`box`.*outside"):
        composer(image, image, box, (24, 8, 60, 24))
    with pytest.raises(EditError, match=r"`box`.*empty"):
        composer(image, image, box, (24, 8, 20, 24))
    with pytest.raises(EditError, match="fit='contain'"):
        composer(image, image, box, (24, 8, 30, 14), fit="none")
    with pytest.raises(EditError, match="`paste_until`"):
        composer(image, image, box, (24, 8, 40, 24), paste_until=1.5)
    with pytest.raises(EditError, match="`mode`"):
        to_sharing(pipe, ConsistentEditMixin)("a", "b", mode="swap")


def test_fit_contain_scales_the_object_into_the_box():
    from attncontrol.pipelines.sharing import paste_reference

    background, reference = torch.full((1, 3, 32, 48), -1.0), torch.full((1, 3, 32, 48), -1.0)
    mask = torch.zeros(32, 48)
    mask[4:12, 4:12] = 1.0
    reference[..., 4:12, 4:12] = 1.0
    composite, _, placed = paste_reference(background, reference, mask, (24, 8, 40, 24))
    rows, cols = torch.nonzero(placed, as_tuple=True)
    assert (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1) == (24, 8, 40, 24)
    assert torch.equal(composite[0, 0] > 0, placed > 0.5)


def test_sharing_pipeline_loads_with_from_pretrained(tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path)
    drag = DragStableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(drag, DragMixin)
    loaded, saved = drag.unet.state_dict(), pipe.unet.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
