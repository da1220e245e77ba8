"""Controls on the fused kernels: the Triton kernels (run by the interpreter here) give the images of the torch
paths, and the regional grouped bias is exactly the dense bias it replaced."""

from __future__ import annotations

import numpy as np
import torch

from attncontrol import AttentionController
from attncontrol.controls import KeyMaskedSelfAttention, LocalWindowAttention, Region, load_linfusion, unload_linfusion
from attncontrol.controls.regions import RegionalAttention, ResolvedRegion, region_mask, weight_schedule
from attncontrol.core.bias import GroupedBias
from attncontrol.core.control import AttentionCall
from attncontrol.core.state import BatchLayout, StepState
from attncontrol.pipelines import RegionalFluxPipeline, RegionalStableDiffusionPipeline
from tests.conftest import call_kwargs, tiny_pipeline

LEFT, MIDDLE = (0.0, 0.0, 0.5, 1.0), (0.25, 0.2, 0.75, 0.8)


def _images(pipe, name: str, controls: list, **overrides) -> np.ndarray:
    """One denoising step (the interpreter runs every kernel program in Python: keep the calls few and small)."""
    with AttentionController(pipe, controls):
        return pipe(**call_kwargs(name, num_inference_steps=1, **overrides)).images


def test_linfusion_through_the_triton_kernels():
    sd = tiny_pipeline("sd")
    linear = load_linfusion(sd)
    try:
        reference = _images(sd, "sd", [linear])
        linear.kernel_backend = "triton"
        fused = _images(sd, "sd", [linear])
    finally:
        unload_linfusion(sd)
    np.testing.assert_allclose(fused, reference, atol=1e-5)


def test_banded_local_window_through_the_triton_kernel():
    flux = tiny_pipeline("flux")
    reference = _images(flux, "flux", [LocalWindowAttention(radius=1.5)])  # the window as a dense bias
    fused = _images(flux, "flux", [LocalWindowAttention(radius=1.5, backend="banded", kernel_backend="triton")])
    np.testing.assert_allclose(fused, reference, atol=1e-5)


def test_key_masking_through_the_masked_kernel():
    sd = tiny_pipeline("sd")
    options = {"image_size": (32, 48), "steps": None, "layers": "mid"}  # the 8x12 layer: a short interpreter run
    reference = _images(sd, "sd", [KeyMaskedSelfAttention(LEFT, **options)])
    fused = _images(sd, "sd", [KeyMaskedSelfAttention(LEFT, kernel_backend="triton", **options)])
    np.testing.assert_allclose(fused, reference, atol=1e-5)


def test_regional_prompts_through_the_masked_kernel():
    """Per-region prompts with CFG on SD (groups hidden in the unconditional rows); phrases in Flux joint attention."""
    for name, pipeline, regions in [
        ("sd", RegionalStableDiffusionPipeline, [Region.box(LEFT, prompt="a red circle"),
                                                  Region.box(MIDDLE, prompt="a blue square")]),
        ("flux", RegionalFluxPipeline, [Region.box(LEFT, phrase="red circle", weight=0.5),
                                        Region.box(MIDDLE, phrase="blue square")]),
    ]:  # fmt: skip
        pipe = pipeline.from_pipe(tiny_pipeline(name))
        pipe.set_progress_bar_config(disable=True)
        kwargs = call_kwargs(name, prompt="a red circle and a blue square", num_inference_steps=1, regions=regions)
        kwargs["guidance_scale"] = 1.0 if name == "flux" else 5.0
        options = {"layers": "mid"} if name == "sd" else {}  # the interpreter is slow: SD's 8x12 layer only
        reference = pipe(**kwargs, region_options=options).images
        kwargs.update(generator=torch.Generator().manual_seed(0))
        fused = pipe(**kwargs, region_options={**options, "kernel_backend": "triton"}).images
        np.testing.assert_allclose(fused, reference, atol=1e-5, err_msg=name)


def _dense_hard_bias(control: RegionalAttention, call: AttentionCall, batch: int, queries: int, keys: int):
    """The dense construction the grouped bias replaced: every row spelled out, rule by rule."""
    cond, uncond = control._rows(call, batch)
    text, image_q = call.key_segments["text"], call.query_segments["image"]
    text_q, image_k = call.query_segments.get("text"), call.key_segments.get("image")
    block, ownership = control._text_block(call, control._membership(call, torch.device("cpu")), "cpu")
    bias = torch.zeros(batch, 1, queries, keys)
    bias[cond, :, image_q, text] = block
    groups = control._region_groups()
    if text_q is not None and image_k is not None:
        bias[cond, :, text_q, image_k] = ownership.T
        if groups:
            labels = control._group_labels(text.stop - text.start, groups, "cpu")
            bias[cond, :, text_q, text] = torch.where(labels[:, None] == labels[None, :], 0.0, float("-inf"))
    for group in groups if uncond else []:
        columns = slice(text.start + group.start, text.start + group.stop)
        bias[uncond, :, :, columns] = float("-inf")
        if text_q is not None:
            bias[uncond, :, text_q.start + group.start : text_q.start + group.stop, columns] = 0.0
    return bias


def test_grouped_regional_bias_spells_out_to_the_dense_rules():
    grid, text = (4, 6), 12
    image = grid[0] * grid[1]
    masks = [region_mask(Region.box(box, phrase="x"), (32, 48), f"regions[{i}]") for i, box in enumerate(
        [LEFT, MIDDLE, (0.6, 0.0, 1.0, 0.4)])]  # fmt: skip
    regions = [
        ResolvedRegion(mask=masks[0], tokens=[1, 2], weight=weight_schedule(0.5)),
        ResolvedRegion(mask=masks[1], tokens=[2, 7], weight=weight_schedule(2.0), group=slice(6, 9)),
        ResolvedRegion(mask=masks[2], tokens=[9, 10], weight=weight_schedule(1.0), group=slice(9, 12)),
    ]
    control = RegionalAttention(regions, base_tokens=slice(0, 6), base_weight=0.3, hide_leaks=True)
    for segments in (
        {"query": {"text": slice(0, text), "image": slice(text, text + image)}},  # Flux: joint, text first
        {"query": {"image": slice(0, image)}, "key": {"text": slice(0, text)}},  # UNet cross-attention
    ):
        query_segments = segments["query"]
        key_segments = segments.get("key", query_segments)
        queries = max(s.stop for s in query_segments.values())
        keys = max(s.stop for s in key_segments.values())
        call = AttentionCall(
            layer=None, step=StepState(index=0, num_steps=4), batch=BatchLayout.standard(4, cfg=True), grid=grid,
            query_segments=query_segments, key_segments=key_segments, heads=2, scale=0.25,
        )  # fmt: skip
        q, k = torch.randn(4, 2, queries, 8), torch.randn(4, 2, keys, 8)
        bias = control.logit_bias(call, q, k)
        assert isinstance(bias, GroupedBias)
        assert bias.num_groups < queries  # grouped: fewer rows than queries
        assert torch.equal(bias.dense(), _dense_hard_bias(control, call, 4, queries, keys))
