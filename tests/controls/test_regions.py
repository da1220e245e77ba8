"""Regional prompts: masks that must zero attention, modes that must reduce to the stock model, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attncontrol import AttentionStore, MaskError, RegionError, TokenIndexError
from attncontrol.controls import Region
from attncontrol.controls.regions import weight_schedule
from attncontrol.core.masks import box_mask, resize_to_grid
from attncontrol.core.state import StepState
from attncontrol.pipelines import (
    RegionalFluxPipeline,
    RegionalStableDiffusionPipeline,
    RegionalStableDiffusionXLPipeline,
)
from tests.conftest import call_kwargs, tiny_pipeline

REGIONAL = {
    "sd": RegionalStableDiffusionPipeline,
    "sdxl": RegionalStableDiffusionXLPipeline,
    "flux": RegionalFluxPipeline,
}
PROMPT = "a red circle and a blue square"
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def regional(name: str):
    pipe = REGIONAL[name].from_pipe(tiny_pipeline(name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, name: str, **overrides):
    kwargs = call_kwargs(name, prompt=PROMPT, num_inference_steps=2, **overrides)
    if name == "flux":
        kwargs.setdefault("guidance_scale", 1.0)
    else:
        kwargs.setdefault("guidance_scale", 5.0)
    return pipe(**kwargs)


def processors(pipe):
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return dict(model.attn_processors)


def inside(box, image_size, grid):
    return resize_to_grid(box_mask(box, image_size), grid).flatten() >= 0.5


@pytest.mark.parametrize("name", list(REGIONAL))
def test_hard_masked_phrase_gets_zero_attention_outside_its_region(name):
    pipe = regional(name)
    before = processors(pipe)
    tokenizer = pipe.tokenizer_2 if name == "flux" else pipe.tokenizer
    red = [i for i, t in enumerate(tokenizer(PROMPT).input_ids) if tokenizer.decode([t]).strip() in ("red", "circle")]
    out = run(
        pipe,
        name,
        regions=[Region.box(LEFT, phrase="red circle"), Region.box(RIGHT, phrase="blue square")],
        return_attention_maps=True,
    )
    assert processors(pipe) == before
    store: AttentionStore = out.attention_maps
    records = store.records("cross")
    assert records
    for record in records:
        outside = ~inside(LEFT, (32, 48), record.grid)
        probs = record.probs[:, :, red]  # cond rows, queries, the phrase's tokens
        assert float(probs[:, outside].abs().max()) == 0.0, record.layer.name
        assert float(probs[:, ~outside].sum()) > 0.0
    assert np.isfinite(out.images).all()


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_soft_mode_with_weight_zero_is_the_uncontrolled_model(name):
    pipe = regional(name)
    plain = run(pipe, name, generator=torch.Generator().manual_seed(3)).images
    regions = [Region.box(LEFT, phrase="red circle", weight=0.0), Region.box(RIGHT, phrase="blue square", weight=0.0)]
    soft = run(pipe, name, generator=torch.Generator().manual_seed(3), regions=regions, region_mode="soft").images
    assert np.array_equal(plain, soft)
    full = [Region.box(LEFT, phrase="red circle"), Region.box(RIGHT, phrase="blue square")]
    modulated = run(pipe, name, generator=torch.Generator().manual_seed(3), regions=full, region_mode="soft").images
    assert not np.array_equal(plain, modulated)


@pytest.mark.parametrize("name", list(REGIONAL))
@pytest.mark.parametrize(
    "mode",
    [
        {"region_mode": "hard"},
        {"region_mode": "soft"},
        {"region_mode": "hard", "prompts": True, "base_weight": 0.3},
        {"region_mode": "hard", "region_options": {"self_strength": 1.0}},
    ],
    ids=["hard", "soft", "prompts", "hard+self"],
)
def test_every_mode_runs_on_every_family(name, mode):
    mode = dict(mode)
    pipe = regional(name)
    before = processors(pipe)
    if mode.pop("prompts", False):
        regions = [Region.box(LEFT, prompt="a red circle"), Region.circle((0.75, 0.5), 0.2, prompt="a blue square")]
    else:
        regions = [Region.box(LEFT, phrase="red circle", weight=[1.0, 2.0]), Region.box(RIGHT, phrase="blue square")]
    out = run(pipe, name, regions=regions, **mode)
    assert out.images.shape[1:3] == (32, 48)
    assert np.isfinite(out.images).all()
    assert processors(pipe) == before


def test_region_prompts_are_hidden_from_unconditional_rows():
    pipe = regional("sd")
    regions = [Region.box(LEFT, prompt="a red circle"), Region.box(RIGHT, prompt="a blue square")]
    conditional = run(pipe, "sd", regions=regions, return_attention_maps=True).attention_maps
    unconditional = AttentionStore(guidance="uncond")
    steps = []

    def keep(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        return callback_kwargs

    out = run(pipe, "sd", regions=regions, return_attention_maps=unconditional, callback_on_step_end=keep)
    assert out.attention_maps is unconditional and steps == [0, 1]
    for cond, uncond in zip(conditional.records("cross"), unconditional.records("cross"), strict=True):
        assert cond.probs.shape[-1] == uncond.probs.shape[-1] == 3 * 77  # base + two region prompts
        assert float(cond.probs[..., 77:].sum()) > 0
        assert float(uncond.probs[..., 77:].abs().max()) == 0.0  # the negative prompt's branch is the stock one


def test_true_cfg_negative_pass_is_not_masked_on_flux():
    pipe = regional("flux")
    regions = [Region.box(LEFT, phrase="red circle"), Region.box(RIGHT, phrase="blue square")]
    negative = AttentionStore(guidance="uncond")
    out = run(
        pipe,
        "flux",
        regions=regions,
        negative_prompt="a red circle",
        true_cfg_scale=2.0,
        return_attention_maps=negative,
    )
    assert np.isfinite(out.images).all()
    records = negative.records("cross")
    assert records
    for record in records:
        # Tokens 1-2 of the negative prompt are "red circle" too, but the negative pass is the stock one: unmasked.
        outside = ~inside(LEFT, (32, 48), record.grid)
        assert float(record.probs[:, outside][:, :, [1, 2]].min()) > 0.0


def test_weight_schedules():
    assert weight_schedule(2.0)(StepState(index=3, num_steps=10)) == 2.0
    per_step = weight_schedule([0.0, 1.0, 2.0, 3.0])
    assert per_step(StepState(index=2, num_steps=4)) == 2.0
    assert per_step(StepState(index=5, num_steps=8)) == 2.0  # read at the same progress for another step count
    assert weight_schedule(lambda t: 1 - t)(StepState(index=1, num_steps=4)) == 0.75
    for bad in (-1.0, math.nan, math.inf, [1.0, -2.0], "1", []):
        with pytest.raises(RegionError, match="weight"):
            weight_schedule(bad)(StepState(index=1, num_steps=2))


def test_bad_regions_fail_before_generating():
    pipe = regional("sd")
    left = Region.box(LEFT, phrase="red circle")
    cases = [
        ([Region.box(LEFT, phrase="green triangle")], TokenIndexError, "green triangle"),
        ([Region(np.ones((10, 30)), phrase="red circle")], MaskError, "aspect ratios differ"),
        ([Region(np.zeros((32, 48)), phrase="red circle")], MaskError, "empty"),
        ([Region.box(LEFT)], RegionError, "exactly one of `phrase`"),
        ([Region.box(LEFT, phrase="red", prompt="a red circle")], RegionError, "exactly one of `phrase`"),
        ([left, Region.box(RIGHT, phrase="red circle")], RegionError, "shares token"),
        ([Region.box(LEFT, phrase="red circle", weight=float("nan"))], RegionError, r"regions\[0\]\.weight"),
        ([Region.box(LEFT, phrase="red circle", weight=lambda t: -t)], RegionError, r"regions\[0\]\.weight"),
        ([Region.box((2.0, 2.0, 1.0, 1.0), phrase="red circle")], MaskError, "x0 < x1"),
        ([], RegionError, "empty"),
        ([left] * 3, RegionError, "max_regions"),
    ]
    for regions, error, message in cases:
        with pytest.raises(error, match=message):
            run(pipe, "sd", regions=regions, max_regions=2)
    with pytest.raises(RegionError, match="`region_mode`"):
        run(pipe, "sd", regions=[left], region_mode="medium")


def test_causal_leaks_are_hidden_inside_other_regions():
    # "<bos> a red circle and a blue square <eos> <pad>...": "and a" (4, 5) and the end/padding (8...) were written
    # after "red circle", so CLIP's causal encoder put it in them; the end/padding also carry "blue square".
    pipe = regional("sd")
    regions = [Region.box(LEFT, phrase="red circle"), Region.box(RIGHT, phrase="blue square")]
    store = run(pipe, "sd", regions=regions, return_attention_maps=True).attention_maps
    for record in store.records("cross"):
        left = inside(LEFT, (32, 48), record.grid)
        right = inside(RIGHT, (32, 48), record.grid) & ~left
        probs = record.probs
        assert float(probs[:, right][:, :, [4, 5, 8, 20]].abs().max()) == 0.0
        assert float(probs[:, left][:, :, [8, 20]].abs().max()) == 0.0
        assert float(probs[:, left][:, :, [4, 5]].min()) > 0.0
        assert float(probs[:, right][:, :, [0, 1, 6, 7]].min()) > 0.0
    # Flux's T5 reads the prompt both ways, so there is nothing causal to hide: off by default.
    assert not RegionalFluxPipeline._causal_text


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_tensor_weights_match_numbers_and_carry_gradients(name):
    pipe = regional(name)
    numbers = [Region.box(LEFT, phrase="red circle", weight=[0.5, 2.0]), Region.box(RIGHT, phrase="blue square")]
    expected = run(pipe, name, regions=numbers).images
    tensors = [
        Region.box(LEFT, phrase="red circle", weight=torch.tensor([0.5, 2.0])),
        Region.box(RIGHT, phrase="blue square", weight=torch.tensor(1.0)),
    ]
    np.testing.assert_allclose(run(pipe, name, regions=tensors).images, expected, atol=1e-5)
    with pytest.raises(RegionError, match=r"regions\[0\]\.weight"):
        run(pipe, name, regions=[Region.box(LEFT, phrase="red circle", weight=torch.tensor([1.0, -1.0]))])


def test_optimized_region_weights_follow_the_loss_and_leave_the_pipeline_as_it_was():
    pipe = regional("sd")
    flags = {name: param.requires_grad for name, param in pipe.unet.named_parameters()}
    regions = [Region.box(LEFT, phrase="red circle", weight=[1.0, 2.0, 1.0]), Region.box(RIGHT, phrase="blue square")]
    before = processors(pipe)

    def left_brightness(images, given):
        assert given[0].phrase == "red circle" and images.requires_grad
        return images[..., : images.shape[-1] // 2].mean()

    result = pipe.optimize_region_weights(
        PROMPT,
        regions=regions,
        loss_fn=left_brightness,
        epochs=3,
        lr=0.5,
        num_inference_steps=3,
        height=32,
        width=48,
        progress=False,
    )
    assert len(result.images) == 1 and result.images[0].size == (48, 32)
    assert result.weights.shape == result.initial_weights.shape == (2, 3)
    torch.testing.assert_close(result.initial_weights, torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))
    assert len(result.losses) == 3
    # Two Adam steps of 0.5 on log w: each weight moves by a factor of about e^{+-1} unless its gradient is 0.
    moved = (result.weights.log() - result.initial_weights.log()).abs()
    assert float(moved.max()) > 0.5
    assert processors(pipe) == before
    assert {name: param.requires_grad for name, param in pipe.unet.named_parameters()} == flags
    assert all(param.grad is None for param in pipe.unet.parameters())

    # The first loss is the plain regional call's (same seed, same weights).
    plain = pipe(
        PROMPT, regions=regions, num_inference_steps=3, height=32, width=48, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert result.losses[0] == pytest.approx(left_brightness(plain.requires_grad_(), regions).item(), abs=1e-5)
    with pytest.raises(RegionError, match="`epochs`"):
        pipe.optimize_region_weights(PROMPT, regions=regions, loss_fn=left_brightness, epochs=0)
    with pytest.raises(RegionError, match="`generator`"):
        pipe.optimize_region_weights(PROMPT, regions=regions, loss_fn=left_brightness, generator=None)


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_optimized_region_weights_run_on_sdxl_and_flux(name):
    pipe = regional(name)
    denoiser = pipe.transformer if name == "flux" else pipe.unet
    regions = [Region.box(LEFT, phrase="red circle"), Region.box(RIGHT, phrase="blue square")]
    extra = {"max_sequence_length": 16} if name == "flux" else {}
    result = pipe.optimize_region_weights(
        PROMPT,
        regions=regions,
        loss_fn=lambda images, given: images[..., : images.shape[-1] // 2].mean(),
        epochs=2,
        lr=0.5,
        num_inference_steps=2,
        height=32,
        width=48,
        progress=False,
        **extra,
    )
    assert result.weights.shape == (2, 2) and len(result.losses) == 2
    assert float((result.weights.log() - result.initial_weights.log()).abs().max()) == pytest.approx(0.5, abs=0.01)
    assert all(param.grad is None and param.requires_grad for param in denoiser.parameters())
