"""Train the SD-architecture shapes-world model on the CPU: autoencoder, then text encoder + UNet.

    python -m attncontrol.training.shapes_sd --out runs/shapes-sd            # both stages, then export
    python -m attncontrol.training.shapes_sd --out runs/shapes-sd --resume   # continue after a crash or stop

Stages (each resumable from its own checkpoint, each with a wall-clock budget):

1. ``vae``: AutoencoderKL with a factor-2 latent (32x32x4 for 64x64 scenes), MSE + tiny KL on scenes rendered per
   step. Probed by the detector after an encode/decode round trip: colours and shapes must survive it, or no UNet
   can learn them (the lesson of the first calibration runs).
2. ``unet``: a pool of scenes is rendered and encoded once; a small CLIP text encoder and the UNet are trained jointly
   with v-prediction, min-SNR weighting, warm-up, gradient clipping and EMA weights, 10% empty captions for CFG.
   Probed every ``--probe-every`` steps on single-object prompts with the EMA weights.
3. export: ``StableDiffusionPipeline`` with the EMA UNet, fp16 weights, to ``<out>/pipeline``.

Runs through ``accelerate`` (``accelerate launch -m attncontrol.training.shapes_sd ...`` works too); the CPU is the
default device here.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attncontrol.shapes.bench import objects_present, single_object_cases
from attncontrol.shapes.detector import detect
from attncontrol.shapes.scenes import SceneGenerator, to_tensor

logger = logging.getLogger("attncontrol.training.shapes_sd")

TEXT_HIDDEN = 64


@dataclass
class Config:
    out: str = "runs/shapes-sd"
    seed: int = 0
    # autoencoder
    vae_steps: int = 2500
    vae_minutes: float = 12.0
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_probe_scenes: int = 200
    # unet + text encoder
    unet_steps: int = 6000
    unet_minutes: float = 70.0
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 200
    pool_size: int = 30000
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    unet_channels: tuple[int, int, int] = (32, 64, 96)
    # bookkeeping
    checkpoint_every: int = 250
    probe_every: int = 1000
    probe_steps: int = 20


# ---------------------------------------------------------------------------------------------------- models
def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_act="gelu",
        )
    )


def build_unet(channels: tuple[int, int, int]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
    )


def inference_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        train_scheduler().config,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=False,
        steps_offset=1,
    )


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write never destroys the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------------- probes
@torch.no_grad()
def vae_round_trip_accuracy(vae, num_scenes: int = 200, seed: int = 10_000) -> tuple[float, float]:
    """Share of objects the detector still reads right after encode -> decode, and mean abs pixel error /255."""
    vae.eval()
    scenes = SceneGenerator(seed).batch(0, num_scenes)
    right = total = 0
    errors = []
    for start in range(0, num_scenes, 50):
        chunk = scenes[start : start + 50]
        images = to_tensor(chunk)
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
        pixels = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        errors.append(np.abs(pixels.astype(np.float32) - np.stack([s.image for s in chunk])).mean())
        for scene, image in zip(chunk, pixels, strict=True):
            detected = detect(image)
            for obj in scene.objects:
                total += 1
                right += objects_present(detected, [(obj.color, obj.shape)])
    vae.train()
    return right / total, float(np.mean(errors))


@torch.no_grad()
def probe_single_objects(pipeline, steps: int, num_seeds: int = 2) -> float:
    """Share of single-object prompts drawn with the right colour and shape (a quick slice of the bench)."""
    cases = single_object_cases(num_seeds, seed_offset=500)
    generators = [torch.Generator("cpu").manual_seed(case.seed) for case in cases]
    images = pipeline(
        [case.prompt for case in cases],
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=generators,
    ).images
    hits = sum(objects_present(detect(image), case.expected) for case, image in zip(cases, images, strict=True))
    return hits / len(cases)


# ---------------------------------------------------------------------------------------------------- stage 1
def train_vae(config: Config, accelerator, out: Path, resume: bool) -> Path:
    final = out / "vae"
    if (final / "config.json").exists() and resume:
        logger.info("vae: already trained at %s", final)
        return final
    torch.manual_seed(config.seed)
    vae = build_vae()
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    step = 0
    checkpoint = out / "checkpoint-vae.pt"
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        set_rng_state(state["rng"])
        logger.info("vae: resumed at step %d", step)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    generator = SceneGenerator(config.seed)
    started = time.perf_counter()
    bar = tqdm(total=config.vae_steps, initial=step, desc="vae", disable=not accelerator.is_main_process)
    while step < config.vae_steps and (time.perf_counter() - started) / 60 < config.vae_minutes:
        images = to_tensor(generator.batch(step * config.vae_batch, config.vae_batch)).to(accelerator.device)
        posterior = accelerator.unwrap_model(vae).encode(images).latent_dist
        decoded = accelerator.unwrap_model(vae).decode(posterior.sample()).sample
        loss = F.mse_loss(decoded, images) + 1e-7 * posterior.kl().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint,
                {
                    "model": accelerator.unwrap_model(vae).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "rng": rng_state(),
                },
            )
    bar.close()
    vae = accelerator.unwrap_model(vae)
    accuracy, pixel_error = vae_round_trip_accuracy(vae, config.vae_probe_scenes)
    logger.info(
        "vae: %d steps, round-trip detector accuracy %.1f%%, pixel error %.2f/255", step, accuracy * 100, pixel_error
    )
    vae.save_pretrained(final)
    (out / "vae_metrics.json").write_text(
        json.dumps(
            {
                "steps": step,
                "minutes": (time.perf_counter() - started) / 60,
                "round_trip_accuracy": accuracy,
                "pixel_error": pixel_error,
            },
            indent=2,
        )
    )
    return final


# ---------------------------------------------------------------------------------------------------- stage 2
@torch.no_grad()
def encode_pool(vae, config: Config) -> tuple[torch.Tensor, list[str]]:
    """Render and encode ``pool_size`` scenes once; returns scaled latents and captions."""
    generator = SceneGenerator(config.seed + 1)
    latents, captions = [], []
    vae.eval()
    for start in tqdm(range(0, config.pool_size, 256), desc="encode pool"):
        scenes = generator.batch(start, min(256, config.pool_size - start))
        latents.append(vae.encode(to_tensor(scenes)).latent_dist.mean)
        captions.extend(scene.caption for scene in scenes)
    return torch.cat(latents), captions


def build_pipeline(vae, text_encoder, unet):
    from diffusers import StableDiffusionPipeline

    from attncontrol.testing import clip_tokenizer

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def train_unet(config: Config, accelerator, out: Path, vae_path: Path, resume: bool) -> dict:
    from diffusers import AutoencoderKL
    from diffusers.training_utils import compute_snr

    from attncontrol.testing import clip_tokenizer

    vae = AutoencoderKL.from_pretrained(vae_path)
    latents, captions = encode_pool(vae, config)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    logger.info("unet: pool of %d latents %s, scaling factor %.4f", len(latents), tuple(latents.shape[1:]), scaling)

    torch.manual_seed(config.seed)
    text_encoder = build_text_encoder()
    unet = build_unet(tuple(config.unet_channels))
    tokenizer = clip_tokenizer()
    scheduler = train_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    step = 0
    history: list[dict] = []
    checkpoint = out / "checkpoint-unet.pt"
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        set_rng_state(state["rng"])
        logger.info("unet: resumed at step %d", step)
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)

    def lr_at(index: int) -> float:
        warm = min(1.0, (index + 1) / config.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, index / config.unet_steps)))
        return config.unet_lr * warm * (0.1 + 0.9 * decay)

    started = time.perf_counter()
    bar = tqdm(total=config.unet_steps, initial=step, desc="unet", disable=not accelerator.is_main_process)
    losses: list[float] = []
    while step < config.unet_steps and (time.perf_counter() - started) / 60 < config.unet_minutes:
        index = torch.randint(0, len(latents), (config.unet_batch,))
        batch = latents[index].to(accelerator.device)
        texts = [captions[i] if random.random() >= config.caption_dropout else "" for i in index.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        encoder_states = text_encoder(ids.to(accelerator.device))[0]
        noise = torch.randn_like(batch)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), device=batch.device)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        target = scheduler.get_velocity(batch, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_states).sample
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=config.min_snr_gamma) / (snr + 1)
        loss = (weight * F.mse_loss(prediction.float(), target.float(), reduction="none").mean((1, 2, 3))).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema.parameters(), accelerator.unwrap_model(live).parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % config.probe_every == 0 or step == config.unet_steps:
            accuracy = probe_single_objects(build_pipeline(vae, ema_text, ema_unet), config.probe_steps)
            history.append(
                {
                    "step": step,
                    "minutes": (time.perf_counter() - started) / 60,
                    "loss": float(np.mean(losses[-200:])),
                    "single_object_probe": accuracy,
                }
            )
            logger.info("unet: step %d loss %.4f probe %.1f%%", step, history[-1]["loss"], accuracy * 100)
        if step % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint,
                {
                    "unet": accelerator.unwrap_model(unet).state_dict(),
                    "text_encoder": accelerator.unwrap_model(text_encoder).state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "history": history,
                    "rng": rng_state(),
                },
            )
    bar.close()
    pipeline = build_pipeline(vae, ema_text, ema_unet)
    export = out / "pipeline"
    pipeline.to(torch.float16).save_pretrained(export)
    metrics = {
        "steps": step,
        "minutes": (time.perf_counter() - started) / 60,
        "final_loss": float(np.mean(losses[-200:])) if losses else None,
        "history": history,
        "unet_params_m": sum(p.numel() for p in ema_unet.parameters()) / 1e6,
    }
    (out / "unet_metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("exported %s", export)
    return metrics


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs=len(value), default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--stage", choices=["all", "vae", "unet"], default="all")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    config = Config(**{name: getattr(args, name) for name in asdict(defaults)})
    return config, args


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    config, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    random.seed(config.seed)
    np.random.seed(config.seed)
    accelerator = Accelerator()
    started = time.perf_counter()
    vae_path = out / "vae"
    if args.stage in ("all", "vae"):
        vae_path = train_vae(config, accelerator, out, args.resume)
    if args.stage in ("all", "unet"):
        if not (vae_path / "config.json").exists():
            raise FileNotFoundError(f"no trained autoencoder at {vae_path}; run --stage vae first")
        train_unet(config, accelerator, out, vae_path, args.resume)
    logger.info("done in %.1f minutes", (time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
