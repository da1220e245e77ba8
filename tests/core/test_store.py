"""Attention store: maps are real softmax rows, match a direct computation, and respect the memory cap."""

from __future__ import annotations

import logging

import pytest
import torch

from attncontrol import AttentionControl, AttentionController, AttentionStore, TokenIndexError
from tests.conftest import call_kwargs

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def test_per_query_probabilities_sum_to_one(sd_pipe):
    store = AttentionStore(kinds=("cross", "self"), per_step=True)
    with AttentionController(sd_pipe, [store]):
        sd_pipe(**call_kwargs("sd"))
    for kind in ("cross", "self"):
        records = store.records(kind)
        assert len(records) == 3 * 7  # 7 layers of each kind, 3 steps
        for record in records:
            sums = record.probs.sum(-1)
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5), record.layer.name


def test_token_maps_match_a_direct_softmax(sd_pipe):
    """Recompute softmax(QK^T * scale) for one cross-attention layer from its captured inputs."""
    attn = sd_pipe.unet.get_submodule(LAYER)
    inputs = []
    handle = attn.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append((args[0], kwargs["encoder_hidden_states"])), with_kwargs=True
    )
    store = AttentionStore(layers=LAYER, per_step=True, guidance="cond")
    try:
        with AttentionController(sd_pipe, [store]):
            sd_pipe(**call_kwargs("sd", prompt="a red circle on a blue square"))
    finally:
        handle.remove()

    for step, (hidden, text) in enumerate(inputs):
        with torch.no_grad():
            q = attn.to_q(hidden[1:])  # the conditional row
            k = attn.to_k(text[1:])
        heads = attn.heads
        q = q.view(1, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(1, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        expected = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)  # [1, 16*24, 77]
        (record,) = store.records("cross", steps=[step])
        assert record.grid == (16, 24)
        assert torch.allclose(record.probs, expected, atol=1e-5)
        token_map = store.maps(layers=LAYER, steps=[step])[..., 2]  # "red"
        assert torch.allclose(token_map, expected[..., 2].reshape(1, 16, 24), atol=1e-5)


def test_maps_over_resolutions_and_token_heatmap(sd_pipe):
    store = AttentionStore(guidance="cond")
    with AttentionController(sd_pipe, [store]) as controller:
        images = sd_pipe(**call_kwargs("sd", output_type="pil")).images
        red = controller.token_indices("a red circle", "red")
    assert red == [2]
    maps = store.maps()
    assert maps.shape == (1, 16, 24, 77)
    assert all(record.count == 3 for record in store.records())  # mean over the 3 steps
    heat = store.token_map(red)
    assert heat.shape == (1, 16, 24) and float(heat.max()) == pytest.approx(1.0)
    picture = store.heatmap(red, image=images[0])
    assert picture.size == images[0].size and picture.mode == "RGB"
    with pytest.raises(TokenIndexError, match="index 77 is outside the 77 text tokens"):
        store.token_map(77)


def test_joint_attention_maps_for_flux(flux_pipe):
    store = AttentionStore(kinds=("cross", "self"))
    with AttentionController(flux_pipe, [store]):
        flux_pipe(**call_kwargs("flux"))
    cross = store.maps("cross")
    assert cross.shape == (1, 8, 12, 16)  # image grid x T5 tokens
    assert store.maps("self").shape == (1, 8, 12, 96)
    # The cross block is part of a joint softmax over text + image keys, so its rows sum to less than one.
    assert float(cross.sum(-1).max()) < 1.0


def test_memory_cap_stops_recording_with_one_warning(sd_pipe, caplog):
    store = AttentionStore(kinds="self", per_step=True, max_bytes=300_000)
    with caplog.at_level(logging.WARNING), AttentionController(sd_pipe, [store]):
        sd_pipe(**call_kwargs("sd"))
    assert store.dropped > 0
    assert 0 < store.bytes_used <= 300_000
    assert sum("max_bytes" in record.message for record in caplog.records) == 1


def test_max_image_tokens_skips_large_layers(sd_pipe):
    store = AttentionStore(max_image_tokens=8 * 12)
    with AttentionController(sd_pipe, [store]):
        sd_pipe(**call_kwargs("sd"))
    assert {record.grid for record in store.records()} == {(8, 12)}


class MaskToken(AttentionControl):
    """Hard-masks one text token everywhere (what regional controls do outside a region)."""

    def __init__(self, token):
        super().__init__(layers="cross")
        self.token = token

    def logit_bias(self, call, query, key):
        bias = torch.zeros(key.shape[2])
        bias[self.token] = float("-inf")
        return bias


def test_a_masked_token_gets_zero_attention_in_the_store(sd_pipe):
    store = AttentionStore()
    with AttentionController(sd_pipe, [MaskToken(2), store]):
        images = sd_pipe(**call_kwargs("sd")).images
    assert not torch.isnan(torch.as_tensor(images)).any()
    maps = store.maps()
    assert float(maps[..., 2].abs().max()) == 0.0
    assert torch.allclose(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5)


def test_store_validates_kinds():
    with pytest.raises(ValueError, match="`kinds`"):
        AttentionStore(kinds="crosss")
