"""LinFusion linear attention and CLEAR local windows: the formulas against direct O(N^2) computations, the controls
inside real pipelines, composition with regions, the checkpoint layouts, and unloading that restores the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from attncontrol import AttentionController, AttentionStore
from attncontrol.controls import (
    LinearAttention,
    LinFusion,
    LocalWindowAttention,
    Region,
    RegionalAttention,
    load_clear,
    load_linfusion,
    unload_clear,
    unload_linfusion,
)
from attncontrol.controls.linear import linear_attention, linear_attention_reference
from attncontrol.controls.local import radius_from_name, window_mask
from attncontrol.controls.regions import ResolvedRegion, region_mask, weight_schedule
from attncontrol.core.errors import ControllerStateError, UnsupportedModelError
from tests.conftest import call_kwargs, tiny_pipeline


# ------------------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize(("length", "dim"), [(1, 8), (7, 8), (64, 16), (257, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_attention_matches_the_quadratic_formula(length, dim, dtype):
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, dim, generator=generator, dtype=dtype) * 2 for _ in range(3))
    fast, slow = linear_attention(q, k, v), linear_attention_reference(q, k, v)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_linear_attention_is_a_weighted_mean_of_values():
    """With positive features every output is a convex-ish mix of values: constant values come back unchanged."""
    q, k = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    v = torch.full((1, 2, 50, 8), 3.0)
    out = linear_attention(q, k, v, eps=0.0)
    torch.testing.assert_close(out, v, rtol=1e-5, atol=1e-5)


def test_window_mask_is_a_circle_that_does_not_wrap_rows():
    mask = window_mask((4, 5), radius=2)
    token = lambda y, x: y * 5 + x  # noqa: E731
    assert mask[token(1, 1), token(1, 2)] and mask[token(1, 1), token(2, 2)]  # distance 1 and sqrt 2
    assert not mask[token(1, 1), token(1, 3)]  # distance 2 is outside (strict <)
    assert not mask[token(0, 4), token(1, 0)]  # neighbours in memory, 4 columns apart on the grid
    assert mask.equal(mask.T)


# ------------------------------------------------------------------------------------------------ LinFusion
@pytest.fixture
def sd():
    return tiny_pipeline("sd")


def test_fresh_linfusion_projects_like_its_teacher(sd):
    linfusion = LinFusion.for_unet(sd.unet)
    name, layer = next(iter(linfusion.layers.items()))
    attention = sd.unet.get_submodule(name)
    x = torch.randn(2, 12, attention.to_q.weight.shape[1])
    query, key = layer.query_key(x)
    heads = attention.heads
    torch.testing.assert_close(query, attention.to_q(x).view(2, 12, heads, -1).transpose(1, 2))
    torch.testing.assert_close(key, attention.to_k(x).view(2, 12, heads, -1).transpose(1, 2))


def test_linear_attention_control_computes_linfusion_in_every_self_attention_layer(sd):
    linear = load_linfusion(sd)
    try:
        with torch.no_grad():
            for layer in linear.linfusion.layers.values():  # non-zero MLPs, so the re-projection matters
                layer.to_q_[-1].weight.normal_(0, 0.1)
                layer.to_k_[-1].weight.normal_(0, 0.1)
        seen: dict[str, tuple] = {}

        def capture(name):
            def hook(module, args, kwargs, output):
                seen[name] = (args[0] if args else kwargs["hidden_states"], output)

            return hook

        handles = [
            sd.unet.get_submodule(name).register_forward_hook(capture(name), with_kwargs=True)
            for name in linear.linfusion.layers
        ]
        try:
            with AttentionController(sd, [linear]):
                sd(**call_kwargs("sd", num_inference_steps=1))
        finally:
            for handle in handles:
                handle.remove()
        assert set(seen) == set(linear.linfusion.layers)
        for name, (x, output) in seen.items():
            layer = linear.linfusion.layers[name]
            batch, length, _ = x.shape
            query, key = layer.query_key(x)
            value = layer.to_v(x).view(batch, length, layer.heads, -1).transpose(1, 2)
            expected = linear_attention_reference(query, key, value).transpose(1, 2).reshape(batch, length, -1)
            torch.testing.assert_close(output, layer.to_out[0](expected), rtol=1e-4, atol=1e-5)
    finally:
        unload_linfusion(sd)


def test_linfusion_checkpoint_layout_round_trip_and_unload_restores(sd, tmp_path):
    before = sd(**call_kwargs("sd")).images
    fresh = LinFusion.for_unet(sd.unet)
    with torch.no_grad():
        for layer in fresh.layers.values():
            layer.to_k_[-1].weight.normal_(0, 0.1)
    fresh.save_pretrained(tmp_path / "linfusion")

    # The published layout: config.modules_list + submodules "0", "1", ... with to_q/k/v/out and the MLPs.
    config = json.loads((tmp_path / "linfusion" / "config.json").read_text())
    assert config["_class_name"] == "LinFusion"
    assert set(config["modules_list"][0]) == {"module_name", "dim_n", "heads", "projection_mid_dim"}
    keys = set(load_file(tmp_path / "linfusion" / "diffusion_pytorch_model.safetensors"))
    assert {"0.to_q.weight", "0.to_out.0.bias", "0.to_q_.0.weight", "0.to_q_.1.weight", "0.to_k_.3.bias"} <= keys

    linear = load_linfusion(sd, str(tmp_path / "linfusion"))
    with AttentionController(sd, [linear]):
        loaded = sd(**call_kwargs("sd")).images
    unload_linfusion(sd)
    linear_fresh = load_linfusion(sd, fresh)
    with AttentionController(sd, [linear_fresh]):
        in_memory = sd(**call_kwargs("sd")).images
    unload_linfusion(sd)
    np.testing.assert_array_equal(loaded, in_memory)
    assert np.abs(loaded - before).max() > 1e-4  # linear attention is not softmax attention
    np.testing.assert_array_equal(sd(**call_kwargs("sd")).images, before)  # unloading restores the model exactly
    with pytest.raises(ControllerStateError, match="no LinFusion"):
        unload_linfusion(sd)


def test_a_linfusion_for_another_model_is_refused(sd):
    other = LinFusion.for_unet(tiny_pipeline("sdxl").unet)
    with pytest.raises(UnsupportedModelError, match="another model"):
        load_linfusion(sd, other)
    assert getattr(sd.unet, "_attncontrol_linfusion", None) is None


def test_linfusion_composes_with_regions_and_refuses_what_it_cannot_do(sd):
    box = region_mask(Region.box((0, 0, 0.5, 1), phrase="red circle"), (32, 48), "regions[0]")
    regions = RegionalAttention([ResolvedRegion(mask=box, tokens=[2, 3], weight=weight_schedule(1.0))])
    linear = load_linfusion(sd)
    try:
        with AttentionController(sd, [linear]):
            linear_only = sd(**call_kwargs("sd")).images
        with AttentionController(sd, [regions]):
            regions_only = sd(**call_kwargs("sd")).images
        with AttentionController(sd, [linear, regions]):
            both = sd(**call_kwargs("sd")).images
        assert np.abs(both - linear_only).max() > 1e-4 and np.abs(both - regions_only).max() > 1e-4
        with AttentionController(sd, [linear, AttentionStore(kinds="cross")]):
            sd(**call_kwargs("sd", num_inference_steps=1))  # maps of cross-attention beside linear self-attention
        with (
            pytest.raises(ControllerStateError, match="needs them"),
            AttentionController(sd, [linear, AttentionStore(kinds="self")]),
        ):
            sd(**call_kwargs("sd", num_inference_steps=1))
    finally:
        unload_linfusion(sd)


# ------------------------------------------------------------------------------------------------ CLEAR
@pytest.fixture
def flux():
    return tiny_pipeline("flux")


def test_window_covering_the_image_is_full_attention(flux):
    plain = flux(**call_kwargs("flux")).images
    with AttentionController(flux, [LocalWindowAttention(radius=100)]):
        covered = flux(**call_kwargs("flux")).images
    np.testing.assert_allclose(covered, plain, atol=1e-5)
    with AttentionController(flux, [LocalWindowAttention(radius=1.5)]):
        local = flux(**call_kwargs("flux")).images
    assert np.abs(local - plain).max() > 1e-4


def test_window_bias_gives_each_image_query_its_circle_and_all_text(flux):
    """One joint-attention call, checked query by query against softmax over exactly the allowed keys."""
    control = LocalWindowAttention(radius=1.5)
    grid, text = (3, 4), 5
    from attncontrol.core.control import AttentionCall
    from attncontrol.core.state import BatchLayout, StepState

    call = AttentionCall(
        layer=None,
        step=StepState(index=0),
        batch=BatchLayout.standard(1, cfg=False),
        grid=grid,
        query_segments={"text": slice(0, text), "image": slice(text, text + 12)},
        key_segments={"text": slice(0, text), "image": slice(text, text + 12)},
        heads=2,
        scale=8**-0.5,
    )
    q, k, v = (torch.randn(1, 2, text + 12, 8) for _ in range(3))
    bias = control.logit_bias(call, q, k)
    out = torch.softmax(q @ k.transpose(-1, -2) * call.scale + bias, -1) @ v
    window = window_mask(grid, 1.5)
    for row in range(text + 12):
        allowed = torch.ones(text + 12, dtype=torch.bool)
        if row >= text:
            allowed[text:] = window[row - text]
        logits = q[..., row : row + 1, :] @ k[..., allowed, :].transpose(-1, -2) * call.scale
        expected = torch.softmax(logits, -1) @ v[..., allowed, :]
        torch.testing.assert_close(out[..., row : row + 1, :], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("text", "text_first", "grid", "radius", "rows"),
    [(5, True, (5, 7), 1.5, None), (3, False, (4, 4), 2.0, 1), (0, True, (6, 3), 3.0, 2), (7, True, (3, 9), 8.0, None)],
)
def test_banded_window_equals_the_masked_softmax(text, text_first, grid, radius, rows):
    """Flux (text first), SD3 (image first) and UNet (image only) layouts, odd grids, several band heights."""
    from attncontrol.controls.local import local_window_attention

    image = grid[0] * grid[1]
    image_slice = slice(text, text + image) if text_first else slice(0, image)
    generator = torch.Generator().manual_seed(image + text)
    q, k, v = (torch.randn(2, 3, text + image, 16, generator=generator) for _ in range(3))
    bias = torch.zeros(text + image, text + image)
    bias[image_slice, image_slice] = torch.zeros(image, image).masked_fill(~window_mask(grid, radius), float("-inf"))
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, -1) @ v
    banded = local_window_attention(
        q, k, v, grid=grid, radius=radius, image_queries=image_slice, image_keys=image_slice, scale=0.25,
        rows_per_chunk=rows,
    )  # fmt: skip
    torch.testing.assert_close(banded, expected, rtol=1e-5, atol=1e-5)


def test_banded_backend_gives_the_bias_backends_images(flux):
    with AttentionController(flux, [LocalWindowAttention(radius=1.5)]):
        biased = flux(**call_kwargs("flux")).images
    with AttentionController(flux, [LocalWindowAttention(radius=1.5, backend="banded")]):
        banded = flux(**call_kwargs("flux")).images
    np.testing.assert_allclose(banded, biased, atol=1e-5)


def _clear_file(transformer, path, *, scale=0.05):
    state = {
        name: param.detach() + scale * torch.randn_like(param)
        for name, param in transformer.named_parameters()
        if any(part in f".{name}" for part in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out."))
    }
    save_file(state, str(path))
    return state


def test_clear_checkpoint_loads_non_strictly_and_unload_restores(flux, tmp_path):
    before = flux(**call_kwargs("flux")).images
    originals = {name: param.detach().clone() for name, param in flux.transformer.named_parameters()}
    state = _clear_file(flux.transformer, tmp_path / "clear_local_2.safetensors")
    assert any("single_transformer_blocks" in name for name in state)
    assert not any("add_q_proj" in name for name in state)  # the text branch is not in CLEAR files
    control = load_clear(flux, tmp_path / "clear_local_2.safetensors")
    assert control.radius == 2
    try:
        params = dict(flux.transformer.named_parameters())
        for name, tensor in state.items():
            torch.testing.assert_close(params[name].detach(), tensor)
        with AttentionController(flux, [control]):
            after = flux(**call_kwargs("flux")).images
        assert np.abs(after - before).max() > 1e-4
    finally:
        unload_clear(flux)
    for name, param in flux.transformer.named_parameters():
        assert torch.equal(param.detach(), originals[name]), name
    np.testing.assert_array_equal(flux(**call_kwargs("flux")).images, before)


def test_clear_checkpoints_that_do_not_fit_are_refused(flux, tmp_path):
    state = _clear_file(flux.transformer, tmp_path / "ok.safetensors")
    name = next(iter(state))
    save_file({name: torch.zeros(3, 3)}, str(tmp_path / "clear_local_8.safetensors"))
    with pytest.raises(UnsupportedModelError, match="another model"):
        load_clear(flux, tmp_path / "clear_local_8.safetensors")
    save_file({"transformer_blocks.0.attn.to_q.weight_x": torch.zeros(1)}, str(tmp_path / "clear_local_16.safetensors"))
    with pytest.raises(UnsupportedModelError, match="not a parameter"):
        load_clear(flux, tmp_path / "clear_local_16.safetensors")
    save_file({"norm_out.linear.weight": torch.zeros(1)}, str(tmp_path / "clear_local_4.safetensors"))
    with pytest.raises(UnsupportedModelError, match="does not train"):
        load_clear(flux, tmp_path / "clear_local_4.safetensors")
    with pytest.raises(ValueError, match="pass `radius`"):
        load_clear(flux, tmp_path / "ok.safetensors")
    assert getattr(flux.transformer, "_attncontrol_clear", None) is None
    assert radius_from_name("clear_local_32.safetensors") == 32 and radius_from_name("clear_local_8_down_4.st") is None


def test_linear_attention_is_not_for_flux(flux):
    with pytest.raises(UnsupportedModelError):
        LinFusion.for_unet(flux.transformer)
    assert LinearAttention  # exported
