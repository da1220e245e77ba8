"""Install/remove, state feeding (steps, grids, batch rows) and the controller's errors."""

from __future__ import annotations

import logging

import pytest
import torch

from attncontrol import (
    AttentionControl,
    AttentionController,
    BatchLayout,
    ControllerStateError,
    ProcessorsOverwrittenError,
    RowRole,
    UNetAttnProcessor,
    UnsupportedModelError,
    apply_attention_control_,
)
from tests.conftest import call_kwargs, tiny_pipeline


class Recorder(AttentionControl):
    """Records what every call saw."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def edit_output(self, call, output):
        self.calls.append((call.layer.name, call.step.index, call.grid, call.batch, output.shape))
        return output


class Boom(AttentionControl):
    def edit_output(self, call, output):
        if call.step.index == 1:
            raise RuntimeError("boom at step 1")
        return output


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def test_remove_restores_exact_processor_objects(family_pipe):
    _, pipe = family_pipe
    model = denoiser(pipe)
    before = model.attn_processors
    controller = AttentionController(pipe, [Recorder()]).install()
    assert all(processor is not before[key] for key, processor in model.attn_processors.items())
    controller.remove()
    after = model.attn_processors
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    assert not model._forward_pre_hooks


def test_exception_mid_generation_restores_processors(family_pipe):
    name, pipe = family_pipe
    model = denoiser(pipe)
    before = model.attn_processors
    with pytest.raises(RuntimeError, match="boom at step 1"), AttentionController(pipe, [Boom()]):
        pipe(**call_kwargs(name))
    assert all(model.attn_processors[key] is before[key] for key in before)
    assert not model._forward_pre_hooks


def test_steps_come_from_the_scheduler_not_layer_counting(family_pipe):
    name, pipe = family_pipe
    recorder = Recorder()
    with AttentionController(pipe, [recorder]) as controller:
        pipe(**call_kwargs(name, num_inference_steps=4))
    steps = [step for _, step, *_ in recorder.calls]
    per_step = len(steps) // 4
    assert steps == [0] * per_step + [1] * per_step + [2] * per_step + [3] * per_step
    assert controller.step.num_steps == 4


def test_step_range_restricts_a_control(sd_pipe):
    late = Recorder(steps=(2, 4))
    fraction = Recorder(steps=(0.0, 0.5))
    with AttentionController(sd_pipe, [late, fraction]):
        sd_pipe(**call_kwargs("sd", num_inference_steps=4))
    assert {step for _, step, *_ in late.calls} == {2, 3}
    assert {step for _, step, *_ in fraction.calls} == {0, 1}


def test_callback_feeds_steps_when_the_scheduler_cannot(sd_pipe):
    recorder = Recorder()
    controller = AttentionController(sd_pipe, [recorder], scheduler=object())
    with controller:
        controller.set_step(0)
        sd_pipe(**call_kwargs("sd", num_inference_steps=3), callback_on_step_end=controller.callback_on_step_end)
    assert sorted({step for _, step, *_ in recorder.calls}) == [0, 1, 2]


@pytest.mark.parametrize(("height", "width"), [(32, 48), (40, 24)])
def test_grids_follow_the_latent_size_for_non_square_images(height, width):
    pipe = tiny_pipeline("sd")
    recorder = Recorder()
    with AttentionController(pipe, [recorder]):
        pipe(**call_kwargs("sd", height=height, width=width, num_inference_steps=1))
    latent = (height // 2, width // 2)
    half = (-(-latent[0] // 2), -(-latent[1] // 2))
    for layer_name, _, grid, _, shape in recorder.calls:
        expected = half if layer_name.startswith(("down_blocks.1", "mid_block", "up_blocks.0")) else latent
        assert grid == expected, layer_name
        assert shape[2] == grid[0] * grid[1]


def test_flux_grid_comes_from_img_ids(flux_pipe):
    recorder = Recorder()
    with AttentionController(flux_pipe, [recorder]):
        flux_pipe(**call_kwargs("flux", height=32, width=48, num_inference_steps=1))
    # VAE factor 2 then 2x2 packing: 32x48 pixels -> 8x12 image tokens.
    assert {grid for _, _, grid, _, _ in recorder.calls} == {(8, 12)}


def test_flux_true_cfg_passes_are_laid_out_as_cond_then_uncond(flux_pipe):
    recorder = Recorder(layers="joint")
    with AttentionController(flux_pipe, [recorder], branches=("source", "target")):
        flux_pipe(
            **call_kwargs(
                "flux",
                prompt=["a red circle", "a blue square"],
                negative_prompt=["", ""],
                true_cfg_scale=3.0,
                num_inference_steps=2,
            )
        )
    per_step: dict[int, list[list[RowRole]]] = {}
    for _, step, _, layout, _ in recorder.calls:
        roles = layout.roles
        if not per_step.get(step) or per_step[step][-1] != roles:
            per_step.setdefault(step, []).append(roles)
    # Each step: the prompt pass, then the negative pass, each with both branches.
    assert per_step == {
        step: [
            [RowRole("cond", "source"), RowRole("cond", "target")],
            [RowRole("uncond", "source"), RowRole("uncond", "target")],
        ]
        for step in (0, 1)
    }
    registry = getattr(flux_pipe.transformer, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("attncontrol_pass_name") is None


def test_batch_layout_names_cfg_halves_and_branches(sd_pipe):
    recorder = Recorder(layers="cross")
    with AttentionController(sd_pipe, [recorder], branches=("source", "target")):
        sd_pipe(**call_kwargs("sd", prompt=["a red circle", "a blue square"], num_inference_steps=1))
    layout = recorder.calls[0][3]
    assert layout.roles == [
        RowRole("uncond", "source"),
        RowRole("uncond", "target"),
        RowRole("cond", "source"),
        RowRole("cond", "target"),
    ]
    assert layout.rows(guidance="cond", branch="target") == [3]


def test_explicit_batch_layout_must_match_the_batch(sd_pipe):
    controller = AttentionController(sd_pipe)
    controller.set_batch_layout(BatchLayout.standard(3, cfg=False))
    with pytest.raises(ValueError, match="set_batch_layout"), controller:
        sd_pipe(**call_kwargs("sd", num_inference_steps=1))


def test_layer_selection_keeps_other_processors(sd_pipe):
    model = sd_pipe.unet
    before = model.attn_processors
    with AttentionController(sd_pipe, layers="cross"):
        for key, processor in model.attn_processors.items():
            if key.endswith("attn2.processor"):
                assert isinstance(processor, UNetAttnProcessor)
            else:
                assert processor is before[key]


def test_controls_added_while_installed_take_effect(sd_pipe):
    recorder = Recorder(layers="self")
    with AttentionController(sd_pipe) as controller:
        controller.add(recorder)
        sd_pipe(**call_kwargs("sd", num_inference_steps=1))
        assert recorder.calls and all(name.endswith("attn1") for name, *_ in recorder.calls)
        count = len(recorder.calls)
        controller.discard(recorder)
        sd_pipe(**call_kwargs("sd", num_inference_steps=1))
    assert len(recorder.calls) == count


def test_apply_attention_control_returns_an_installed_controller(sd_pipe):
    controller = apply_attention_control_(sd_pipe, [Recorder()], filter_fn=lambda layer: layer.block == "mid")
    try:
        assert controller.installed
        assert sum(isinstance(p, UNetAttnProcessor) for p in sd_pipe.unet.attn_processors.values()) == 2
    finally:
        controller.remove()


@pytest.mark.parametrize("overwrite", ["slicing", "stock"])
def test_overwritten_processors_raise_instead_of_silently_ignoring_controls(sd_pipe, overwrite):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = sd_pipe.unet
    before = model.attn_processors
    controller = AttentionController(sd_pipe, [Recorder()]).install()
    try:
        # enable_xformers_memory_efficient_attention replaces every processor the same way (needs CUDA to run).
        if overwrite == "slicing":
            sd_pipe.enable_attention_slicing(1)
        else:
            model.set_attn_processor(AttnProcessor2_0())
        with pytest.raises(ProcessorsOverwrittenError, match="install\\(\\) again"):
            sd_pipe(**call_kwargs("sd", num_inference_steps=1))
    finally:
        controller.remove()
    assert all(model.attn_processors[key] is before[key] for key in before)


def test_unknown_model_family_is_refused():
    from diffusers import PixArtTransformer2DModel

    pixart = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=16,
        caption_channels=16,
        out_channels=8,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    with pytest.raises(UnsupportedModelError, match="model of type PixArtTransformer2DModel is not supported"):
        AttentionController(pixart)
    with pytest.raises(UnsupportedModelError, match="`target` of type Linear"):
        AttentionController(torch.nn.Linear(2, 2))


def test_unknown_processor_is_refused_with_the_layer_name(sd_pipe):
    model = sd_pipe.unet
    before = model.attn_processors
    model.set_attention_slice(1)  # installs SlicedAttnProcessor, which attncontrol cannot reproduce
    try:
        with pytest.raises(UnsupportedModelError, match=r"layer 'down_blocks\.0.*SlicedAttnProcessor"):
            AttentionController(sd_pipe)
    finally:
        model.set_attn_processor(before)


def test_install_and_remove_twice_are_errors(sd_pipe):
    controller = AttentionController(sd_pipe)
    with pytest.raises(ControllerStateError, match="not installed"):
        controller.remove()
    with controller, pytest.raises(ControllerStateError, match="already installed"):
        controller.install()


def test_a_second_controller_on_the_same_model_is_refused(sd_pipe):
    with AttentionController(sd_pipe), pytest.raises(ControllerStateError, match="another AttentionController"):
        AttentionController(sd_pipe).install()


def test_unknown_timestep_warns_once(sd_pipe, caplog):
    recorder = Recorder(steps=(0, 10))
    with caplog.at_level(logging.WARNING), AttentionController(sd_pipe, [recorder], scheduler=object()):
        sd_pipe(**call_kwargs("sd", num_inference_steps=2))
    assert sum("not in the scheduler's schedule" in r.message for r in caplog.records) == 1
    assert recorder.calls == []
