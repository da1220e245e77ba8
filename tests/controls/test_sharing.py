"""Attention sharing and steering: identity when source == target, independence without sharing, masks that
restrict what is shared (read from the attention store), PrimeComposer's logits and DiffUHaul's feature passing."""

from __future__ import annotations

import pytest
import torch

from attncontrol import AttentionController, AttentionStore, BatchLayout, RowRole
from attncontrol.controls.sharing import AnchoredSharing, CorrelationSteering, SharedAttention, ShareRegion
from attncontrol.core.control import AttentionCall
from attncontrol.core.layers import LayerInfo
from attncontrol.core.masks import SpatialMask, box_mask, resize_to_grid
from attncontrol.core.state import StepState
from tests.conftest import tiny_pipeline

SIZE = (32, 48)
OBJECT = (0.0, 0.0, 0.5, 0.5)
MOVED = (0.5, 0.5, 1.0, 1.0)
LAYOUT = BatchLayout([RowRole("cond", "source"), RowRole("cond", "target")])


def denoiser_and_inputs(name: str, rows: torch.Tensor | None = None):
    """The tiny model's denoiser and a two-row input (the rows differ unless ``rows`` is given)."""
    pipe = tiny_pipeline(name)
    generator = torch.Generator().manual_seed(0)
    if name == "flux":
        model = pipe.transformer
        tokens, channels = (SIZE[0] // 16) * (SIZE[1] // 16), model.config.in_channels
        latents = torch.randn(2, tokens, channels, generator=generator) if rows is None else rows
        ids = torch.zeros(tokens, 3)
        ids[:, 1] = torch.arange(SIZE[0] // 16).repeat_interleave(SIZE[1] // 16).float()
        ids[:, 2] = torch.arange(SIZE[1] // 16).repeat(SIZE[0] // 16).float()
        text = torch.randn(2, 4, model.config.joint_attention_dim, generator=generator)
        text[1] = text[0]
        kwargs = {
            "hidden_states": latents,
            "encoder_hidden_states": text,
            "pooled_projections": torch.randn(1, model.config.pooled_projection_dim, generator=generator).repeat(2, 1),
            "timestep": torch.tensor([0.5, 0.5]),
            "img_ids": ids,
            "txt_ids": torch.zeros(4, 3),
            "return_dict": False,
        }
        if model.config.guidance_embeds:
            kwargs["guidance"] = torch.tensor([1.0, 1.0])
        return pipe, model, kwargs
    model = pipe.unet
    latents = torch.randn(2, model.config.in_channels, SIZE[0] // 4, SIZE[1] // 4, generator=generator)
    latents = latents if rows is None else rows
    text = torch.randn(1, 77, model.config.cross_attention_dim, generator=generator).repeat(2, 1, 1)
    kwargs = {"sample": latents, "timestep": torch.tensor(500), "encoder_hidden_states": text, "return_dict": False}
    if name == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 32, generator=generator).repeat(2, 1),
            "time_ids": torch.tensor([[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]]).repeat(2, 1),
        }
    return pipe, model, kwargs


def run(model, kwargs, controls, layout=LAYOUT):
    with AttentionController(model, controls) as controller:
        controller.set_batch_layout(layout)
        return model(**kwargs)[0]


def identical_rows(name):
    _, model, kwargs = denoiser_and_inputs(name)
    key = "sample" if "sample" in kwargs else "hidden_states"
    kwargs[key] = kwargs[key][:1].repeat(2, *[1] * (kwargs[key].ndim - 1))
    return model, kwargs


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_sharing_from_an_identical_source_changes_nothing(name, mode):
    model, kwargs = identical_rows(name)
    plain = run(model, kwargs, [])
    shared = run(model, kwargs, [SharedAttention(mode=mode, layers=None, steps=None)])
    assert torch.allclose(shared, plain, atol=1e-5), float((shared - plain).abs().max())


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_rows_are_independent_without_sharing_and_coupled_with_it(name):
    _, model, kwargs = denoiser_and_inputs(name)
    key = "sample" if "sample" in kwargs else "hidden_states"
    other = dict(kwargs)
    other[key] = kwargs[key].clone()
    other[key][0] = torch.randn(kwargs[key][0].shape, generator=torch.Generator().manual_seed(7))
    # Sharing configured but outside its steps: the target row must not see the source row at all.
    idle = [SharedAttention(layers=None, steps=lambda step: False)]
    assert torch.allclose(run(model, kwargs, idle)[1], run(model, other, idle)[1], atol=1e-5)
    active = [SharedAttention(layers=None, steps=None)]
    assert not torch.allclose(run(model, kwargs, active)[1], run(model, other, active)[1], atol=1e-3)


def test_masks_restrict_sharing_to_their_regions():
    _, model, kwargs = denoiser_and_inputs("sd")
    control = SharedAttention(target_mask=MOVED, source_mask=OBJECT, image_size=SIZE, layers=None, steps=None)
    store = AttentionStore(kinds="self", branch="target")
    run(model, kwargs, [control, store])
    records = store.records("self")
    assert records
    for record in records:
        tokens = record.grid[0] * record.grid[1]
        probs = record.probs[0]  # [Q, own keys + source keys]
        assert probs.shape == (tokens, 2 * tokens)
        target_inside = resize_to_grid(box_mask(MOVED, SIZE), record.grid).flatten() >= 0.5
        source_inside = resize_to_grid(box_mask(OBJECT, SIZE), record.grid).flatten() >= 0.5
        own, source = probs[:, :tokens], probs[:, tokens:]
        assert float(own.max()) == 0.0  # replace: the target reads only the source
        assert float(source[target_inside][:, ~source_inside].max()) == 0.0  # object reads object
        assert float(source[~target_inside][:, source_inside].max()) == 0.0  # background reads background
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_regions_from_two_sources_and_the_rows_they_read():
    _, model, kwargs = denoiser_and_inputs("sd")
    kwargs["sample"] = torch.cat([kwargs["sample"], kwargs["sample"][:1]])
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:1].repeat(3, 1, 1)
    layout = BatchLayout([RowRole("cond", "background"), RowRole("cond", "reference"), RowRole("cond", "target")])
    obj = SpatialMask(MOVED, SIZE)
    rest = SpatialMask(1 - box_mask(MOVED, SIZE), SIZE)
    regions = [ShareRegion("reference", obj, obj), ShareRegion("background", rest, None)]
    store = AttentionStore(kinds="self", branch="target")
    run(model, kwargs, [SharedAttention(regions=regions, layers=None, steps=None), store], layout)
    for record in store.records("self"):
        tokens = record.grid[0] * record.grid[1]
        inside = resize_to_grid(box_mask(MOVED, SIZE), record.grid).flatten() >= 0.5
        probs = record.probs[0]
        # Source keys are appended in the order the regions name their sources.
        reference, background = probs[:, tokens : 2 * tokens], probs[:, 2 * tokens :]
        assert float(background[inside].max()) == 0.0 and float(reference[~inside].max()) == 0.0
        assert float(reference[inside][:, ~inside].max()) == 0.0
        assert float(background[~inside].sum(-1).min()) > 0.999


def test_bad_sharing_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        SharedAttention(mode="swap")
    with pytest.raises(ValueError, match="go together"):
        SharedAttention(target_mask=OBJECT, image_size=SIZE)
    with pytest.raises(ValueError, match="own branch"):
        SharedAttention("target")
    with pytest.raises(ValueError, match="interpolate_until"):
        AnchoredSharing(target_mask=OBJECT, source_mask=OBJECT, image_size=SIZE, interpolate_until=0.8, pass_from=0.5)


def fake_call(grid: tuple[int, int], fraction: float = 0.0, layout: BatchLayout = LAYOUT) -> AttentionCall:
    layer = LayerInfo("attn1", "unet", "self", "up", 0, 0)
    tokens = grid[0] * grid[1]
    return AttentionCall(
        layer=layer,
        step=StepState(index=round(fraction * 100), num_steps=100),
        batch=layout,
        grid=grid,
        query_segments={"image": slice(0, tokens)},
        key_segments={"image": slice(0, tokens)},
        heads=2,
        scale=0.5,
    )


def test_correlation_steering_writes_the_reference_logits_into_object_rows_and_columns():
    grid = (4, 4)
    size = (16, 16)
    control = CorrelationSteering((0.0, 0.0, 0.5, 0.5), image_size=size)
    call = fake_call(grid, layout=BatchLayout([RowRole("cond", b) for b in ("reference", "target")]))
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 2, 16, 8, generator=generator)
    key = torch.randn(2, 2, 16, 8, generator=generator)
    bias = control.logit_bias(call, query, key)
    logits = query @ key.transpose(-1, -2) * call.scale + bias
    obj = resize_to_grid(box_mask((0.0, 0.0, 0.5, 0.5), size), grid).flatten() >= 0.5
    steered = query[1] @ key[0][:, obj].transpose(-1, -2) * call.scale  # target queries x reference object keys
    assert torch.allclose(logits[1][:, ~obj][:, :, obj], steered[:, ~obj], atol=1e-5)  # columns
    assert torch.allclose(logits[1][:, obj], steered.transpose(-1, -2), atol=1e-5)  # rows (override the block)
    untouched = ~obj[:, None] & ~obj[None, :]
    plain = query[1] @ key[1].transpose(-1, -2) * call.scale
    assert torch.allclose(logits[1][:, untouched], plain[:, untouched], atol=1e-5)
    assert float(bias[0].abs().max()) == 0.0  # the reference row is never steered


def test_anchored_sharing_blends_early_and_passes_nearest_features_late():
    grid, size = (4, 4), (16, 16)
    control = AnchoredSharing(
        target_mask=(0.5, 0.5, 1.0, 1.0), source_mask=(0.0, 0.0, 0.5, 0.5), image_size=size, pass_from=0.6
    )
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=generator) for _ in range(3))
    late = fake_call(grid, fraction=0.8)
    control.reset()
    assert control.applies_at(late) and not control.applies_at(fake_call(grid, fraction=0.55))
    q2, k2, v2 = control.edit_qkv(late, q, k, v)
    assert q2 is q and k2 is k and v2 is v  # late: the target attends to itself
    output = torch.randn(2, 2, 16, 8, generator=generator)
    passed = control.edit_output(late, output)
    target = resize_to_grid(box_mask((0.5, 0.5, 1.0, 1.0), size), grid).flatten() >= 0.5
    source = resize_to_grid(box_mask((0.0, 0.0, 0.5, 0.5), size), grid).flatten() >= 0.5
    for head in range(2):
        for token in torch.nonzero(target).flatten():
            matches = (passed[1, head, token] == output[0, head, source]).all(-1)
            assert bool(matches.any())  # a copy of one source object token
    assert torch.equal(passed[1][:, ~target], output[1][:, ~target])
    assert torch.equal(passed[0], output[0])


def test_sharing_composes_with_key_masking_in_one_pass():
    from attncontrol.controls.key_mask import KeyMaskedSelfAttention

    _, model, kwargs = denoiser_and_inputs("sd")
    hole = (0.5, 0.0, 1.0, 0.5)
    sharing = SharedAttention(mode="concat", layers=None, steps=None)
    masking = KeyMaskedSelfAttention(hole, image_size=SIZE, branch="target", steps=None)
    store = AttentionStore(kinds="self", branch="target")
    run(model, kwargs, [sharing, masking, store])
    for record in store.records("self"):
        tokens = record.grid[0] * record.grid[1]
        hidden = resize_to_grid(box_mask(hole, SIZE), record.grid).flatten() >= 1.0
        own, source = record.probs[0][:, :tokens], record.probs[0][:, tokens:]
        assert float(own[:, hidden].max()) == 0.0  # the target's own hole stays hidden
        assert float(source[:, hidden].sum()) > 0.0  # the source's keys there are shared, not masked
        assert float(own[:, ~hidden].sum()) > 0.0
