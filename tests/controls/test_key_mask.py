"""Key-masking self-attention: hidden keys get zero weight, only at active steps, only in the chosen rows."""

from __future__ import annotations

import pytest
import torch

from attncontrol import AttentionController, AttentionStore, BatchLayout, RowRole
from attncontrol.controls.key_mask import KEY_MASK_TARGETS, KeyMaskedSelfAttention
from attncontrol.core.masks import box_mask, resize_to_grid
from tests.conftest import call_kwargs, tiny_pipeline

SIZE = (32, 48)
HOLE = (0.25, 0.25, 0.75, 0.75)


def fully_hidden(grid: tuple[int, int], box=HOLE) -> torch.Tensor:
    return resize_to_grid(box_mask(box, SIZE), grid).flatten() >= 1.0


def guidance_for(name: str) -> float:
    return 1.0 if name == "flux" else 5.0


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_keys_inside_the_mask_get_zero_attention_at_active_steps(name):
    pipe = tiny_pipeline(name)
    before = dict((pipe.unet if name != "flux" else pipe.transformer).attn_processors)
    control = KeyMaskedSelfAttention(HOLE, image_size=SIZE, steps=(1, 3))
    store = AttentionStore(kinds=("self", "cross"), per_step=True, guidance="cond")
    with AttentionController(pipe, [control, store]):
        pipe(**call_kwargs(name, num_inference_steps=3, guidance_scale=guidance_for(name)))
    assert dict((pipe.unet if name != "flux" else pipe.transformer).attn_processors) == before
    records = store.records("self")
    assert {record.step for record in records} == {0, 1, 2}
    for record in records:
        hidden = fully_hidden(record.grid)
        if not hidden.any():
            continue
        weight_on_hidden = float(record.probs[:, :, hidden].abs().max())
        if record.step == 0:
            assert weight_on_hidden > 0.0, record.layer.name  # inactive step: the stock attention
        else:
            assert weight_on_hidden == 0.0, (record.layer.name, record.step)
            if record.layer.kind == "self":  # the visible keys carry all the weight
                assert torch.allclose(record.probs.sum(-1), torch.ones(()), atol=1e-5)
    if name == "flux":
        # Joint attention: only image keys are hidden, the text stays readable everywhere.
        assert all(float(r.probs.sum()) > 0 for r in store.records("cross"))


def test_refine_mask_is_hidden_only_early():
    pipe = tiny_pipeline("sd")
    refine = (0.0, 0.0, 0.2, 0.3)
    control = KeyMaskedSelfAttention(HOLE, image_size=SIZE, refine_mask=refine, refine_until=0.5, steps=(0, 4))
    store = AttentionStore(kinds="self", per_step=True, guidance="cond")
    with AttentionController(pipe, [control, store]):
        pipe(**call_kwargs("sd", num_inference_steps=4, guidance_scale=5.0))
    for record in store.records("self"):
        extra = fully_hidden(record.grid, refine)
        if not extra.any():
            continue
        weight = float(record.probs[:, :, extra].abs().max())
        assert (weight == 0.0) == (record.step < 2), (record.layer.name, record.step)


def test_inactive_steps_reproduce_the_unedited_run():
    pipe = tiny_pipeline("sd")

    def latents_per_step(controls):
        seen = []

        def keep(_pipe, _step, _timestep, kwargs):
            seen.append(kwargs["latents"].clone())
            return kwargs

        with AttentionController(pipe, controls):
            out = pipe(**call_kwargs("sd", num_inference_steps=4, guidance_scale=5.0, callback_on_step_end=keep))
        return seen, out.images

    plain, plain_images = latents_per_step([])
    late, _ = latents_per_step([KeyMaskedSelfAttention(HOLE, image_size=SIZE, steps=(2, 4))])
    _, never_images = latents_per_step([KeyMaskedSelfAttention(HOLE, image_size=SIZE, steps=(0.5, 0.5))])
    for step in (0, 1):
        assert torch.equal(late[step], plain[step])
    assert not torch.allclose(late[2], plain[2])
    assert (never_images == plain_images).all()


@pytest.mark.parametrize("target", KEY_MASK_TARGETS)
def test_every_variant_edits_only_the_chosen_rows(target):
    pipe = tiny_pipeline("sd")
    unet = pipe.unet
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 16, 24).repeat(2, 1, 1, 1)
    text = torch.randn(1, 77, 32).repeat(2, 1, 1)
    timestep = pipe.scheduler.timesteps[0] if len(pipe.scheduler.timesteps) else torch.tensor(999)
    with torch.no_grad():
        plain = unet(sample, timestep, text).sample
    control = KeyMaskedSelfAttention(
        HOLE, image_size=SIZE, target=target, guidance=None, branch="background", steps=None
    )
    with AttentionController(pipe, [control]) as controller, torch.no_grad():
        controller.set_batch_layout(BatchLayout([RowRole("cond", "background"), RowRole("cond", "source")]))
        edited = unet(sample, timestep, text).sample
    assert torch.equal(edited[1], plain[1])
    assert not torch.allclose(edited[0], plain[0], atol=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`target`"):
        KeyMaskedSelfAttention(HOLE, image_size=SIZE, target="keys")
    with pytest.raises(ValueError, match="`guidance`"):
        KeyMaskedSelfAttention(HOLE, image_size=SIZE, guidance="both")
    with pytest.raises(ValueError, match="`image_size`"):
        KeyMaskedSelfAttention(torch.ones(4, 4))
    with pytest.raises(ValueError, match="`refine_until`"):
        KeyMaskedSelfAttention(HOLE, image_size=SIZE, refine_until=2.0)
