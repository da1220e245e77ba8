"""With no control (or only an observer), controlled processors reproduce the stock ones on every layer."""

from __future__ import annotations

import pytest
import torch

from attncontrol import AttentionControl, AttentionController, AttentionStore
from tests.conftest import FACTORIES, call_kwargs, tiny_pipeline

TOLERANCE = 1e-5


def capture_denoiser_inputs(name: str) -> tuple[tuple, dict]:
    """The exact args/kwargs the pipeline gives its denoiser at the first step (realistic inputs per family)."""
    pipe = tiny_pipeline(name)
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, dict(kwargs)))

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(**call_kwargs(name, num_inference_steps=1))
    finally:
        handle.remove()
    return captured["call"]


def run_with_layer_outputs(model, args, kwargs, layer_names) -> tuple[torch.Tensor, dict[str, tuple]]:
    outputs: dict[str, tuple] = {}
    handles = []
    for layer_name in layer_names:

        def keep(module, inputs, output, layer_name=layer_name):
            outputs[layer_name] = output if isinstance(output, tuple) else (output,)

        handles.append(model.get_submodule(layer_name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            result = model(*args, **{**kwargs, "return_dict": False})[0]
    finally:
        for handle in handles:
            handle.remove()
    return result, outputs


class ExplicitObserver(AttentionControl):
    """Forces the explicit softmax path on every call without changing anything."""

    def wants_probs(self, call):
        return True


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("controls", ["empty", "explicit", "store"])
def test_every_layer_matches_stock(name, controls):
    pipe = tiny_pipeline(name)
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    args, kwargs = capture_denoiser_inputs(name)
    layer_names = [key.removesuffix(".processor") for key in model.attn_processors]

    stock, stock_layers = run_with_layer_outputs(model, args, kwargs, layer_names)
    chain = {"empty": [], "explicit": [ExplicitObserver()], "store": [AttentionStore(kinds=("cross", "self"))]}
    with AttentionController(pipe, chain[controls]):
        controlled, controlled_layers = run_with_layer_outputs(model, args, kwargs, layer_names)

    assert set(controlled_layers) == set(layer_names)
    for layer_name in layer_names:
        for expected, actual in zip(stock_layers[layer_name], controlled_layers[layer_name], strict=True):
            error = (expected - actual).abs().max().item()
            assert error <= TOLERANCE, f"{name} layer {layer_name}: max abs error {error:.2e}"
    assert (stock - controlled).abs().max().item() <= TOLERANCE


def test_attention_backend_dispatch_is_honoured(flux_pipe):
    """diffusers' set_attention_backend reaches our processors (they carry `_attention_backend`)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    model = flux_pipe.transformer
    args, kwargs = capture_denoiser_inputs("flux")
    stock, _ = run_with_layer_outputs(model, args, kwargs, [])
    with AttentionController(flux_pipe) as controller:
        model.set_attention_backend("native")
        try:
            backends = {processor._attention_backend for _, processor in controller._installed}
            controlled, _ = run_with_layer_outputs(model, args, kwargs, [])
        finally:
            model.reset_attention_backend()
    assert backends == {AttentionBackendName.NATIVE}
    assert (stock - controlled).abs().max().item() <= TOLERANCE


def test_full_generation_matches_stock(family_pipe):
    name, pipe = family_pipe
    stock = pipe(**call_kwargs(name)).images
    with AttentionController(pipe, [AttentionStore()]):
        controlled = pipe(**call_kwargs(name)).images
    assert abs(stock - controlled).max() <= 1e-4
