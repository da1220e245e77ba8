"""The SD teacher of the Flux-architecture shapes model: schedule mapping, velocity conversion, text encoder cut."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attncontrol.models import SHIPPED_MODELS
from attncontrol.training.flow_teacher import FlowTeacher, student_text_encoder


@pytest.fixture(scope="module")
def teacher():
    return FlowTeacher.from_pretrained("shapes-sd")


def flow_time(teacher: FlowTeacher, timestep: int) -> torch.Tensor:
    """The flow time whose signal-to-noise ratio is the teacher's at ``timestep``."""
    alphas = torch.cumprod(1.0 - teacher_betas(teacher), dim=0)
    ratio = (alphas[timestep] / (1 - alphas[timestep])).sqrt()
    return (1 / (1 + ratio)).float()[None]


def teacher_betas(teacher: FlowTeacher) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(SHIPPED_MODELS["shapes-sd"], subfolder="scheduler").betas.double()


def test_flow_times_map_onto_the_teachers_timesteps(teacher):
    for timestep in (0, 1, 37, 250, 500, 998):
        mapped, inside = teacher.timesteps(flow_time(teacher, timestep))
        assert mapped.item() == pytest.approx(timestep, abs=1e-3) and inside.item()
    # Noisier than the teacher's last step: clamped there and flagged (velocity() then reads its x0 estimate).
    mapped, inside = teacher.timesteps(torch.tensor([0.99, 0.5]))
    assert mapped[0].item() == pytest.approx(999) and inside.tolist() == [False, True]


class Oracle(torch.nn.Module):
    """A UNet that knows the clean latent and the noise: solves sample = alpha x0 + sigma eps for (alpha, sigma)
    and returns the exact v (or epsilon) prediction, so the teacher's conversion must give exactly eps - x0."""

    def __init__(self, x0, eps, prediction_type):
        super().__init__()
        self.x0, self.eps, self.prediction_type = x0, eps, prediction_type

    def forward(self, sample, timesteps, states):
        from types import SimpleNamespace

        outputs = []
        for row in range(len(sample)):
            known = row % len(self.x0)  # a guided call stacks the prompted and the empty rows: the same latents
            x0, eps = self.x0[known], self.eps[known]
            basis = torch.stack([x0.flatten(), eps.flatten()], dim=1).double()
            alpha, sigma = torch.linalg.lstsq(basis, sample[row].flatten().double()[:, None]).solution.flatten()
            if self.prediction_type == "v_prediction":
                outputs.append(alpha * eps - sigma * x0)
            else:
                outputs.append(eps)
        return SimpleNamespace(sample=torch.stack(outputs).float())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_teacher_velocity_is_the_flow_velocity_for_an_exact_unet(teacher, prediction_type, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0.1, 0.5, 0.9])
    noisy = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    monkeypatch.setattr(teacher, "unet", Oracle(x0, eps, prediction_type))
    monkeypatch.setattr(teacher, "prediction_type", prediction_type)
    velocity, inside = teacher.velocity(noisy, t, ["a red circle"] * 3)
    assert inside.all()
    torch.testing.assert_close(velocity, eps - x0, atol=1e-4, rtol=1e-4)


def test_times_beyond_the_teachers_noisiest_step_take_its_clean_latent_estimate(teacher, monkeypatch):
    """t = 0.95 and 0.99 lie past SD's last step (t = 0.936): a v-prediction teacher still gives a target there,
    ``(x_t - x0_hat) / t``, close to ``eps - x0`` (its coefficients are the clamped step's, not the exact ones)."""
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([0.95, 0.99])
    noisy = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    monkeypatch.setattr(teacher, "unet", Oracle(x0, eps, "v_prediction"))
    velocity, usable = teacher.velocity(noisy, t, ["a red circle"] * 2)
    assert usable.all()
    # The clamped step's coefficients leave (alpha_T sigma - sigma_T alpha) / t of eps in the estimate: 0.017 at
    # t = 0.95, 0.059 at 0.99 (mean |eps| 0.8: mean errors ~0.013 and ~0.047).
    error = (velocity - (eps - x0)).abs()
    assert error.mean() < 0.04 and error.max() < 0.3, (error.mean(), error.max())
    # An epsilon teacher would divide by alpha ~ 0.07 there: those rows are left to the data.
    monkeypatch.setattr(teacher, "unet", Oracle(x0, eps, "epsilon"))
    monkeypatch.setattr(teacher, "prediction_type", "epsilon")
    _, usable = teacher.velocity(noisy, t, ["a red circle"] * 2)
    assert not usable.any()


def test_guided_velocity_mixes_conditional_and_unconditional_per_row(teacher):
    generator = torch.Generator().manual_seed(2)
    noisy = torch.randn(3, 4, 16, 16, generator=generator)
    t = torch.tensor([0.3, 0.7, 0.97])
    texts = ["a red circle", "a blue square", "a yellow triangle"]
    conditional, _ = teacher.velocity(noisy, t, texts)
    unconditional, _ = teacher.velocity(noisy, t, [""] * 3)
    assert (conditional - unconditional).abs().mean() > 1e-3  # the prompt matters, so the mix is a real check
    scales = torch.tensor([1.0, 5.0, 3.0])
    guided, usable = teacher.velocity(noisy, t, texts, guidance_scale=scales)
    assert usable.all()
    expected = unconditional + scales[:, None, None, None] * (conditional - unconditional)
    torch.testing.assert_close(guided, expected, atol=1e-4, rtol=1e-4)


def test_trained_teacher_recovers_the_clean_latent_at_low_noise(teacher):
    from attncontrol.training.shapes_vae import encode_pool

    latents, captions, _ = encode_pool(teacher.vae, 8, seed=3, count_weights=(1, 0, 0))
    x0 = latents * teacher.scaling_factor
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 0.3)
    velocity, _ = teacher.velocity(0.7 * x0 + 0.3 * eps, t, captions)
    estimate = 0.7 * x0 + 0.3 * eps - 0.3 * velocity
    # A real model, not an oracle: its x0 error is a small share of the latent's variance (0.1% to 0.3% measured
    # at t = 0.2 to 0.5).
    assert (estimate - x0).pow(2).mean() < 0.02 * x0.var()


def test_student_text_encoder_keeps_the_teachers_outputs(teacher):
    from attncontrol.training.shapes_text import shapes_clip_tokenizer

    student = student_text_encoder(teacher.text_encoder, vocab_size=16384, max_length=32)
    assert student.config.vocab_size == 16384 and student.config.max_position_embeddings == 32
    texts = ["a red circle", "a blue square on the left and a green triangle on the right", ""]
    full = teacher.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    cut = shapes_clip_tokenizer(16384, 32)(texts, padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, actual = teacher.text_encoder(full), student(cut)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state[:, :32])


def test_flux_training_with_a_teacher_shares_its_latent_space(tmp_path, teacher):
    from diffusers import FluxPipeline

    from attncontrol.training import shapes_flux

    out = tmp_path / "flux"
    shapes_flux.main([
        "--out", str(out), "--teacher", "shapes-sd", "--steps", "2", "--pool-size", "16", "--batch", "4",
        "--probe-every", "1000", "--layers", "1", "--single-layers", "1", "--no-train-clip",
        "--lr", "0.05", "--warmup", "0", "--no-adaln-zero",  # gradients reach a trained encoder at once
        "--loss-weighting", "x0",
    ])  # fmt: skip
    pipe = FluxPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.float32)
    # The student's latents are the teacher's: same autoencoder, same scaling, no shift.
    assert pipe.vae.config.scaling_factor == pytest.approx(teacher.scaling_factor)
    assert pipe.vae.config.shift_factor == 0.0
    for name, weight in teacher.vae.state_dict().items():
        torch.testing.assert_close(pipe.vae.state_dict()[name].float(), weight, atol=1e-3, rtol=1e-3)
    # --no-train-clip: the exported CLIP encoder is still the teacher's, cut (fp16 weights: compared loosely).
    cut = student_text_encoder(teacher.text_encoder, vocab_size=16384, max_length=32)
    for name, weight in cut.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[name].float(), weight, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="--vae"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--vae", str(out / "pipeline/vae")])
    with pytest.raises(ValueError, match="--loss-weighting"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--loss-weighting", "snr"])
    with pytest.raises(ValueError, match="--teacher-weight"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--teacher-weight", "1.5"])
    with pytest.raises(ValueError, match="--teacher"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--guidance-min", "4", "--guidance-max", "6"])
    with pytest.raises(ValueError, match="--guidance-min"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--guidance-min", "6",
                          "--guidance-max", "4"])  # fmt: skip
    with pytest.raises(ValueError, match="--teacher"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--sequence-encoder", "teacher-clip"])
    with pytest.raises(ValueError, match="--feature-weight"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--feature-weight", "0.5"])
    with pytest.raises(ValueError, match="--sequence-encoder"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--sequence-encoder", "bert"])


def test_guidance_distilled_student_samples_in_one_pass_with_guidance_scale(tmp_path, teacher):
    """--guidance-min/max: the transformer gets FLUX.1-dev's guidance embedding, and the bench calls it with
    ``guidance_scale`` alone (no negative prompt, no true CFG), the scale reaching the transformer."""
    from diffusers import FluxPipeline

    from attncontrol.models import family_call_kwargs
    from attncontrol.training import shapes_flux

    out = tmp_path / "flux"
    shapes_flux.main([
        "--out", str(out), "--teacher", "shapes-sd", "--steps", "2", "--pool-size", "16", "--batch", "4",
        "--probe-every", "1000", "--layers", "1", "--single-layers", "1", "--no-train-clip", "--no-adaln-zero",
        "--guidance-min", "4", "--guidance-max", "6", "--sequence-encoder", "teacher-clip", "--feature-weight", "0.5",
        "--checkpoint-every", "1",
    ])  # fmt: skip
    assert "projector" in torch.load(out / "checkpoint-flux.pt", weights_only=False)  # kept for --resume
    pipe = FluxPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.float32)
    assert pipe.transformer.config.guidance_embeds
    # --sequence-encoder teacher-clip: the joint attention reads the teacher's CLIP tokens (frozen: --no-train-clip).
    texts = ["a red circle", "a blue square on the left and a green triangle on the right"]
    ids = pipe.tokenizer_2(texts, padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = teacher.encode(texts, "cpu")[:, :32]
        torch.testing.assert_close(pipe.text_encoder_2(ids)[0], expected, atol=2e-2, rtol=2e-2)
    kwargs = family_call_kwargs(pipe, {"guidance_scale": 5.0}, batch=2)
    assert kwargs == {"guidance_scale": 5.0, "max_sequence_length": 32}
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda _, args, kw: seen.append(kw["guidance"]), with_kwargs=True)
    images = [
        pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", **kw).images
        for kw in (kwargs, {**kwargs, "guidance_scale": 2.0})
    ]
    assert len(seen) == 4  # one transformer pass per step
    assert seen[0].flatten()[0].item() == 5.0 and seen[2].flatten()[0].item() == 2.0
    assert not np.allclose(images[0], images[1])  # the scale changes the sample


def test_teacher_features_are_the_prompted_rows_and_align_token_by_token(teacher):
    """watch_features keeps the decoder's 16x16 block for the prompted rows only (a guided call runs the empty
    prompts in the same batch), and FeatureAlignment compares token (row, col) with feature pixel (row, col)."""
    from attncontrol.training.shapes_flux import FeatureAlignment

    channels = teacher.watch_features()
    try:
        generator = torch.Generator().manual_seed(3)
        noisy, t = torch.randn(2, 4, 32, 32, generator=generator), torch.tensor([0.4, 0.8])
        texts = ["a red circle", "a blue square"]
        teacher.velocity(noisy, t, texts)
        plain = teacher.features.clone()
        teacher.velocity(noisy, t, texts, guidance_scale=5.0)
        assert plain.shape == (2, channels, 16, 16)
        torch.testing.assert_close(teacher.features, plain, atol=1e-5, rtol=1e-5)
    finally:
        teacher.unet.up_blocks[1].attentions[1]._forward_hooks.clear()
        teacher.features = None

    alignment = FeatureAlignment(width=channels, teacher_channels=channels)
    alignment.projector = torch.nn.Identity()
    alignment.tokens = plain.permute(0, 2, 3, 1).reshape(2, 256, channels).clone().requires_grad_(True)
    loss = alignment.loss(plain)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()  # differentiable through the student's tokens
    swapped = plain.transpose(2, 3)  # (col, row) order: not the same tokens
    assert alignment.loss(swapped).item() > 0.05


def test_teacher_sample_integrates_its_field_to_the_clean_latent(teacher, monkeypatch):
    """Euler on an exact teacher's field runs along the straight path from the noise to its clean latent; only the
    first step, past SD's noisiest step, carries the clamped estimate's small error."""
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    monkeypatch.setattr(teacher, "unet", Oracle(x0, eps, "v_prediction"))
    sample = teacher.sample(eps, ["a red circle", "a blue square"], guidance_scale=torch.tensor([4.0, 6.0]), steps=4)
    assert (sample - x0).abs().mean() < 0.03, (sample - x0).abs().mean()
    assert (eps - x0).abs().mean() > 0.5  # far apart to begin with


def test_reflow_pairs_resume_where_they_stopped(tmp_path, teacher, monkeypatch):
    from attncontrol.training import shapes_flux

    config = shapes_flux.Config(reflow_pairs=5, reflow_steps=2, guidance_min=4.0, guidance_max=6.0)
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square", "unused"]
    path = tmp_path / "pairs.pt"
    fresh = shapes_flux.reflow_pairs(teacher, captions, config, (4, 8, 8), path, chunk=2)
    assert fresh["done"] == 5 and fresh["captions"] == captions[:5]
    assert ((fresh["guidance"] >= 4) & (fresh["guidance"] <= 6)).all()
    torch.testing.assert_close(
        fresh["sample"][:2], teacher.sample(fresh["noise"][:2], captions[:2], fresh["guidance"][:2], 2)
    )
    # A crash after the first chunk: the rerun samples only the rows left and ends with the same pairs.
    partial = dict(fresh, done=2, sample=fresh["sample"].clone())
    partial["sample"][2:] = 0
    torch.save(partial, path)
    sampled = []
    original = teacher.sample
    monkeypatch.setattr(teacher, "sample", lambda noise, *a: sampled.append(len(noise)) or original(noise, *a))
    resumed = shapes_flux.reflow_pairs(teacher, captions, config, (4, 8, 8), path, chunk=2)
    assert sampled == [2, 1]
    torch.testing.assert_close(resumed["sample"], fresh["sample"])
    # Other captions (another pool) do not reuse the file.
    sampled.clear()
    shapes_flux.reflow_pairs(teacher, captions[1:], config, (4, 8, 8), path, chunk=2)
    assert sampled == [2, 2, 1]


def test_reflow_captions_per_noise_share_one_noise_between_captions(tmp_path, teacher):
    """--reflow-captions-per-noise 2: consecutive captions share a noise and the teacher draws each its own sample
    from it; with 1 the pairs are the ones an older file holds (every noise its own)."""
    from attncontrol.training import shapes_flux

    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square"]
    config = shapes_flux.Config(
        reflow_pairs=5, reflow_steps=2, guidance_min=4.0, guidance_max=6.0, reflow_captions_per_noise=2
    )
    shared = shapes_flux.reflow_pairs(teacher, captions, config, (4, 8, 8), tmp_path / "shared.pt")
    noise = shared["noise"]
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3])
    assert not torch.equal(noise[1], noise[2]) and not torch.equal(noise[3], noise[4])
    assert (shared["sample"][0] - shared["sample"][1]).abs().mean() > 0.05  # the caption changed the sample
    single = shapes_flux.reflow_pairs(
        teacher, captions, replace(config, reflow_captions_per_noise=1), (4, 8, 8), tmp_path / "single.pt"
    )
    generator = torch.Generator().manual_seed(config.seed + 2)
    torch.testing.assert_close(single["noise"], torch.randn((5, 4, 8, 8), generator=generator))
    assert torch.equal(single["noise"][0], noise[0]) and not torch.equal(single["noise"][1], noise[1])
    with pytest.raises(ValueError, match="--reflow-captions-per-noise"):
        shapes_flux.main([
            "--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--guidance-min", "4", "--guidance-max", "6",
            "--reflow-pairs", "4", "--reflow-captions-per-noise", "0", "--region-fraction", "0",
        ])  # fmt: skip


def test_reflow_training_rows_lie_between_a_pairs_noise_and_sample(tmp_path, teacher, monkeypatch):
    """--reflow-pairs: every training row is the straight path between one pair's noise and its teacher sample,
    read with that pair's guidance scale (fresh noise would break it)."""
    from attncontrol.training import shapes_flux

    seen = []
    original = shapes_flux.predict_velocity

    def spy(transformer, packed, t, text, text_ids, img_ids, guidance=None):
        seen.append((packed.detach().clone(), t.clone(), guidance.clone()))
        return original(transformer, packed, t, text, text_ids, img_ids, guidance)

    monkeypatch.setattr(shapes_flux, "predict_velocity", spy)
    out = tmp_path / "flux"
    shapes_flux.main([
        "--out", str(out), "--teacher", "shapes-sd", "--steps", "2", "--pool-size", "6", "--batch", "4",
        "--probe-every", "1000", "--layers", "1", "--single-layers", "1", "--no-train-clip", "--guidance-min", "4",
        "--guidance-max", "6", "--reflow-pairs", "6", "--reflow-steps", "2", "--region-fraction", "0",
    ])  # fmt: skip
    pairs = torch.load(out / "reflow-pairs.pt", weights_only=False)
    assert pairs["done"] == 6 and not torch.allclose(pairs["sample"], pairs["noise"])
    noise, sample = shapes_flux.pack(pairs["noise"]), shapes_flux.pack(pairs["sample"])
    assert len(seen) == 2
    for packed, t, guidance in seen:
        for row in range(len(packed)):
            straight = (1 - t[row]) * sample + t[row] * noise  # every pair at this row's time
            match = (straight - packed[row]).abs().flatten(1).amax(1) < 1e-5
            assert match.sum() == 1, f"row {row} is on no pair's path"
            assert guidance[row] == pairs["guidance"][match.nonzero()[0, 0]]
    # The agreement bench samples the exported student like the teacher's check and draws it beside its pairs.
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "flux_teacher_agreement.py"
    report, grid = tmp_path / "agreement.json", tmp_path / "grid.png"
    arguments = ["--student", str(out / "pipeline"), "--scenes", "2", "--student-samples", "1", "--grid", str(grid)]
    result = subprocess.run(
        [sys.executable, str(script), *arguments, "--json", str(report)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(report.read_text())["student_flow_samples"]["total"] == 12
    # 12 samples of its own, then 12 from its training pairs' noises above the teacher's samples of them.
    assert Image.open(grid).size == (12 * 64, 3 * 64)
    with pytest.raises(ValueError, match="--reflow-pairs"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--reflow-pairs", "4"])
    with pytest.raises(ValueError, match="--reflow-pairs"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--guidance-min", "4",
                          "--guidance-max", "6", "--reflow-pairs", "40", "--pool-size", "20",
                          "--region-fraction", "0"])  # fmt: skip
    with pytest.raises(ValueError, match="--grounding-weight"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--guidance-min", "4",
                          "--guidance-max", "6", "--reflow-pairs", "4", "--grounding-weight", "0.1"])  # fmt: skip
    with pytest.raises(ValueError, match="--region-fraction"):  # the Flux recipe's default masks read the scenes too
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--guidance-min", "4",
                          "--guidance-max", "6", "--reflow-pairs", "4"])  # fmt: skip


def test_reflow_data_below_takes_the_pools_scene_with_fresh_noise_at_clean_times(tmp_path, teacher, monkeypatch):
    """--reflow-data-below 0.5: rows at t >= 0.5 stay on their pair's straight path; rows below take the pool scene
    of the same caption with noise no pair has, and the data's target ``noise - scene``."""
    from attncontrol.training import shapes_flux

    pool, rows = {}, []
    encode_pool = shapes_flux.encode_pool
    monkeypatch.setattr(shapes_flux, "encode_pool", lambda *a, **k: pool.setdefault("out", encode_pool(*a, **k)))
    times = torch.tensor([0.2, 0.8, 0.3, 0.6])
    monkeypatch.setattr(shapes_flux, "sample_timesteps", lambda kind, count, device: times[:count].clone())
    texts = []
    encode_text = shapes_flux.encode_text
    monkeypatch.setattr(shapes_flux, "encode_text", lambda *a: texts.append(list(a[4])) or encode_text(*a))
    flow_loss = shapes_flux.flow_loss
    predict_velocity = shapes_flux.predict_velocity

    def spy_prediction(transformer, packed, t, *rest):
        rows.append({"noisy": packed.detach().clone(), "t": t.clone()})
        return predict_velocity(transformer, packed, t, *rest)

    def spy_loss(prediction, target, *rest):
        rows[-1]["target"] = target.detach().clone()
        return flow_loss(prediction, target, *rest)

    monkeypatch.setattr(shapes_flux, "predict_velocity", spy_prediction)
    monkeypatch.setattr(shapes_flux, "flow_loss", spy_loss)
    out = tmp_path / "flux"
    shapes_flux.main([
        "--out", str(out), "--teacher", "shapes-sd", "--steps", "2", "--pool-size", "6", "--batch", "4",
        "--probe-every", "1000", "--layers", "1", "--single-layers", "1", "--no-train-clip", "--guidance-min", "4",
        "--guidance-max", "6", "--reflow-pairs", "6", "--reflow-steps", "2", "--reflow-data-below", "0.5",
        "--region-fraction", "0",
    ])  # fmt: skip
    pairs = torch.load(out / "reflow-pairs.pt", weights_only=False)
    noises, samples = shapes_flux.pack(pairs["noise"]), shapes_flux.pack(pairs["sample"])
    latents, captions, _ = pool["out"]
    scenes = shapes_flux.pack(latents * teacher.scaling_factor)
    assert len(rows) == 2 and len(texts) == 2
    for step, seen in enumerate(rows):
        for row, t in enumerate(seen["t"].tolist()):
            # noisy = (1 - t) x0 + t noise and target = noise - x0 give back the row's clean latent and noise.
            x0 = seen["noisy"][row] - t * seen["target"][row]
            noise = seen["noisy"][row] + (1 - t) * seen["target"][row]
            on_pair = (samples - x0).abs().flatten(1).amax(1) < 1e-4
            on_scene = (scenes - x0).abs().flatten(1).amax(1) < 1e-4
            paired_noise = (noises - noise).abs().flatten(1).amax(1) < 1e-4
            if t >= 0.5:
                assert on_pair.sum() == 1 and torch.equal(paired_noise, on_pair), (step, row)
            else:
                assert on_scene.sum() == 1 and not paired_noise.any(), (step, row)
                assert texts[step][row] == captions[on_scene.nonzero()[0, 0]]
    with pytest.raises(ValueError, match="--reflow-data-below"):
        shapes_flux.main(["--out", str(tmp_path / "bad"), "--teacher", "shapes-sd", "--reflow-data-below", "0.5"])
