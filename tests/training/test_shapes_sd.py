"""The shapes training script runs both stages, resumes from its checkpoints, and exports a loadable pipeline."""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial

import numpy as np
import pytest
import torch

from attncontrol.training import shapes_sd

TINY = [
    "--vae-probe-scenes",
    "20",
    "--vae-steps",
    "3",
    "--pool-size",
    "48",
    "--unet-batch",
    "4",
    "--checkpoint-every",
    "2",
    "--probe-every",
    "1000",
    "--probe-steps",
    "2",
    "--unet-channels",
    "16",
    "32",
    "32",
]


def test_train_resume_and_export(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    shapes_sd.main(["--out", str(out), "--unet-steps", "4", *TINY])
    assert json.loads((out / "vae_metrics.json").read_text())["steps"] == 3
    # The autoencoder's checkpoint carries its minutes, so --vae-minutes is a total over resumes.
    assert torch.load(out / "checkpoint-vae.pt", weights_only=False)["minutes"] > 0
    first = torch.load(out / "checkpoint-unet.pt", weights_only=False)
    assert first["step"] == 4

    # Resume continues from step 4 instead of starting over, and reuses the trained autoencoder.
    shapes_sd.main(["--out", str(out), "--unet-steps", "6", "--resume", *TINY])
    metrics = json.loads((out / "unet_metrics.json").read_text())
    assert metrics["steps"] == 6
    assert torch.load(out / "checkpoint-unet.pt", weights_only=False)["step"] == 6

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.float32)
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == shapes_sd.Config().vocab_size
    assert pipe.unet.dtype == torch.float32
    assert next(pipe.unet.parameters()).dtype == torch.float32
    from safetensors import safe_open

    (weights,) = (out / "pipeline" / "unet").glob("*.safetensors")
    with safe_open(weights, "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118 - safe_open is not a dict == {torch.float16}
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_flux_training_exports_a_pipeline_the_bench_can_sample(tmp_path):
    from diffusers import FluxPipeline

    from attncontrol.shapes.bench import run_bench
    from attncontrol.training import shapes_flux

    sd_out = tmp_path / "sd"
    shapes_sd.main(["--out", str(sd_out), "--stage", "vae", *TINY])
    out = tmp_path / "flux"
    shapes_flux.main([
        "--out", str(out), "--vae", str(sd_out / "vae"), "--steps", "3", "--pool-size", "32", "--batch", "4",
        "--probe-every", "1000", "--checkpoint-every", "2", "--layers", "1", "--single-layers", "1",
        "--object-weight", "2", "--grounding-weight", "0.1", "--grounding-start", "1", "--region-fraction", "0.5",
    ])  # fmt: skip
    # The grounding loss reads the image-query x T5-key block of the joint attention from the 2nd step on (with half
    # the rows seen through region masks, attncontrol.training.layouts).
    assert 0.0 < json.loads((out / "flux_metrics.json").read_text())["final_grounding_loss"] <= 1.0
    with pytest.raises(ValueError, match="timestep_sampling"):
        shapes_flux.main(
            ["--out", str(tmp_path / "bad"), "--vae", str(sd_out / "vae"), "--timestep-sampling", "cosine"]
        )
    saved = torch.load(out / "checkpoint-flux.pt", weights_only=False)
    assert saved["step"] == 2 and saved["minutes"] > 0
    # --minutes is the stage's total over resumes, like --steps: a budget the checkpoint has already spent adds no
    # step, however many --steps allow.
    spent = ["--minutes", str(saved["minutes"]), "--steps", "50", "--resume"]
    shapes_flux.main([*spent, "--out", str(out), "--vae", str(sd_out / "vae"), "--pool-size", "32", "--batch", "4",
                      "--layers", "1", "--single-layers", "1"])  # fmt: skip
    assert json.loads((out / "flux_metrics.json").read_text())["steps"] == 2
    # --total-minutes caps the whole command: with the stages before it already past the cap, the transformer adds no
    # step even where --minutes and --steps leave plenty.
    shapes_flux.main([*spent[2:], "--minutes", "50", "--total-minutes", "1e-6", "--out", str(out),
                      "--vae", str(sd_out / "vae"), "--pool-size", "32", "--batch", "4", "--layers", "1",
                      "--single-layers", "1"])  # fmt: skip
    assert json.loads((out / "flux_metrics.json").read_text())["steps"] == 2
    with pytest.raises(ValueError, match="--region-fraction"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--vae", str(sd_out / "vae"), "--region-fraction", "-0.1"])
    with pytest.raises(ValueError, match="total-minutes"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--vae", str(sd_out / "vae"), "--total-minutes", "-1"])
    pipe = FluxPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.float32)
    config = shapes_flux.Config()
    assert pipe.tokenizer_2.model_max_length == pipe.tokenizer.model_max_length == config.max_length
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == config.vocab_size
    report = run_bench(pipe, tasks=["single"], num_seeds=1, num_inference_steps=2, batch_size=12, progress=False)
    assert report.rows[0].total == 12


def test_flux_rope_gives_rows_and_columns_enough_frequencies():
    from attncontrol.training.shapes_flux import rope_axes

    for head_dim in (16, 32, 64, 128):
        axes = rope_axes(head_dim)
        assert sum(axes) == head_dim and all(dim % 2 == 0 for dim in axes)
        assert axes[0] == 4 and axes[1] == axes[2]

    def places_a_16_token_row(dim: int) -> bool:
        # Some frequency must turn by more than 1 rad but less than pi from the first token to the last.
        return any(1.0 < 10000 ** (-i / dim) * 15 < math.pi for i in range(0, dim, 2))

    assert all(places_a_16_token_row(rope_axes(head_dim)[1]) for head_dim in (32, 64, 128))
    assert not places_a_16_token_row(6)  # the old 16-dim head's split: its samples were scattered blobs


def test_flux_adaln_zero_starts_as_a_zero_velocity_and_still_learns():
    from attncontrol.training import shapes_flux

    config = shapes_flux.Config(layers=1, single_layers=1, heads=2, head_dim=16)
    transformer = shapes_flux.build_transformer(config)
    inputs = {
        "hidden_states": torch.randn(2, 16, 16),
        "timestep": torch.tensor([0.3, 0.7]),
        "encoder_hidden_states": torch.randn(2, 5, shapes_flux.TEXT_HIDDEN),
        "pooled_projections": torch.randn(2, shapes_flux.TEXT_HIDDEN),
        "txt_ids": torch.zeros(5, 3),
        "img_ids": shapes_flux.image_ids(4, 4),
        "return_dict": False,
    }
    output = transformer(**inputs)[0]
    assert torch.count_nonzero(output) == 0
    output.sum().backward()
    assert transformer.proj_out.weight.grad.abs().sum() > 0
    plain = shapes_flux.build_transformer(dataclasses.replace(config, adaln_zero=False))
    assert torch.count_nonzero(plain(**inputs)[0]) > 0


def test_pool_object_coverage_matches_the_pool_scenes():
    from attncontrol.shapes import SceneGenerator
    from attncontrol.training.shapes_vae import ShapesTrainingConfig, build_vae, encode_pool, object_coverage

    weights = (0.3, 0.45, 0.25)
    vae = build_vae(ShapesTrainingConfig())
    per_scene = {"coverage": partial(object_coverage, grid=16)}
    latents, captions, extras = encode_pool(vae, 5, 7, weights, per_scene=per_scene)
    coverage = torch.stack(extras["coverage"])
    assert encode_pool(vae, 2, 7, weights)[2] == {}
    scenes = SceneGenerator(7, count_weights=weights).batch(0, 5)
    assert captions == [scene.caption for scene in scenes] and len(latents) == 5
    assert coverage.shape == (5, 256) and float(coverage.min()) >= 0 and float(coverage.max()) <= 1
    for row, scene in zip(coverage, scenes, strict=True):
        union = np.any([obj.mask for obj in scene.objects], axis=0)
        assert float(row.sum()) * 16 == pytest.approx(float(union.sum()))  # 4x4 pixels per cell
        assert float(row[0]) == pytest.approx(float(union[:4, :4].mean()))


def test_flux_flow_loss_weightings():
    import torch.nn.functional as F

    from attncontrol.training.shapes_flux import flow_loss

    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 9, 16, generator=generator), torch.randn(4, 9, 16, generator=generator)
    noisy, t = torch.randn(4, 9, 16, generator=generator), torch.tensor([0.1, 0.4, 0.7, 0.95])
    torch.testing.assert_close(flow_loss(prediction, target, t), F.mse_loss(prediction, target))
    # "x0": the error of x0 = x_t - t v, over the mean t^2.
    x0_error = F.mse_loss(noisy - t[:, None, None] * prediction, noisy - t[:, None, None] * target)
    torch.testing.assert_close(flow_loss(prediction, target, t, "x0") * (t**2).mean(), x0_error)
    # Per-token weights: a token with weight 0 does not count.
    weight = torch.ones(4, 9)
    weight[:, 0] = 0
    expected = F.mse_loss(prediction[:, 1:], target[:, 1:])
    torch.testing.assert_close(flow_loss(prediction, target, t, token_weight=weight), expected)


def test_flux_unpack_inverts_pack():
    from attncontrol.training.shapes_flux import pack, unpack

    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(unpack(pack(latents), grid=4), latents)


def test_warmup_cosine_reaches_its_floor_when_the_time_budget_runs_out_first():
    from attncontrol.training.common import warmup_cosine

    schedule = partial(warmup_cosine, base_lr=1.0, warmup=10, total=1000, floor=0.1)
    assert schedule(5) == pytest.approx(0.6, rel=1e-3)  # warming up
    assert schedule(500) == pytest.approx(schedule(500, progress=0.5)) == pytest.approx(0.55)
    # A stage whose minutes end at step 300 passes progress 1 there: the rate is at its floor, not mid-decay.
    assert schedule(300, progress=1.0) == pytest.approx(0.1)
    assert schedule(300) > 0.7
