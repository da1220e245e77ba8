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

import copy
import json
import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attncontrol.training.binding import BindingHead, binding_targets, scene_colors
from attncontrol.training.common import (
    LossLog,
    autocast,
    ema_update,
    finish_processes,
    load_checkpoint,
    probe_single_objects,
    rng_state,
    save_checkpoint,
    set_learning_rate,
    set_rng_state,
    start_shapes_run,
    training_controller,
    warmup_cosine,
)
from attncontrol.training.grounding import GroundingTerm, grounding_targets, scene_objects
from attncontrol.training.layouts import region_training, scene_boxes
from attncontrol.training.shapes_text import TEXT_HIDDEN, shapes_clip_text_encoder, shapes_clip_tokenizer
from attncontrol.training.shapes_vae import ShapesTrainingConfig, encode_pool, latent_grid, train_vae

logger = logging.getLogger("attncontrol.training.shapes_sd")


@dataclass
class Config(ShapesTrainingConfig):
    out: str = "runs/shapes-sd"
    unet_steps: int = 6000  # denoiser stage: at most this many steps (--unet-minutes may end it first)
    # Wall-clock budget of the whole stage, pool encoding included (with the autoencoder's 12: under 90 in all).
    unet_minutes: float = 75.0
    unet_batch: int = 32  # pool scenes per step
    unet_lr: float = 1e-3  # learning rate of the text encoder and UNet (AdamW, after the warm-up)
    min_snr_gamma: float = 5.0  # gamma of the min-SNR loss weighting
    unet_channels: tuple[int, int, int] = (32, 64, 96)  # UNet channels at its three levels
    text_layers: int = 2  # transformer layers of the CLIP text encoder, trained from scratch with the UNet
    # Weight of the text encoder's colour-binding loss (attncontrol.training.binding); 0 turns it off.
    binding_weight: float = 0.0
    # A saved pipeline whose text encoder and UNet to start from (fine-tuning); empty: fresh weights.
    init_from: str = ""
    # The shipped model was trained with bf16 autocast on a CPU with AMX (0.73x the fp32 step time there, so 6,000
    # steps fit the budget); on a CPU without native bf16 autocast takes ~9x the fp32 time, so "auto" picks.
    mixed_precision: str = "auto"
    # Share of the captioned rows trained through the regional control's hard masks (attncontrol.training.layouts),
    # from step ``region_start`` on; 0 turns it off. The shipped recipe's 0.35 from step 3000 makes regions place
    # objects (86.7% of layouts against 50.8% without it) at a cost to plain two-object binding (16.2% against 26.0%):
    # benchmarks/results/shapes-sd-training-cpu.md.
    region_fraction: float = 0.35
    region_start: int = 3000  # see --region-fraction


# ---------------------------------------------------------------------------------------------------- models
def build_unet(channels: tuple[int, int, int], latent_channels: int = 4, sample_size: int = 32):
    """Three levels: plain convolutions at the latent's size, self- and cross-attention at the two below it."""
    from diffusers import UNet2DConditionModel

    if len(channels) != 3:
        raise ValueError(f"`unet_channels` needs 3 values (one per UNet level), got {channels}")
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
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


# ---------------------------------------------------------------------------------------------------- stage 2
def build_pipeline(vae, text_encoder, unet, config: Config):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=shapes_clip_tokenizer(config.vocab_size, config.max_length),
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _pretrained(path: str, text_encoder, unet):
    """The text encoder and UNet of the pipeline at ``path`` in fp32, checked against the configured ones."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    loaded_text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.float32)
    loaded_unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    for name, fresh, loaded in (("text encoder", text_encoder, loaded_text), ("UNet", unet, loaded_unet)):
        shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in loaded.state_dict().items()}:
            raise ValueError(f"`init_from` {path!r}: its {name} differs from the configured one (check the flags)")
    logger.info("unet: starting from the text encoder and UNet of %s", path)
    return loaded_text, loaded_unet


def _losses(config: Config, unet, scheduler, batch, encoder_states, grounding, binding, index, texts):
    """One step's loss: min-SNR-weighted v-prediction, plus the weighted grounding loss once it is on and the
    weighted colour-binding loss of the text encoder (``binding``: head and targets, or ``None``).

    Returns the total and its terms as floats (for the progress bar and the history)."""
    from diffusers.training_utils import compute_snr

    noise = torch.randn_like(batch)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), device=batch.device)
    noisy = scheduler.add_noise(batch, noise, timesteps)
    target = scheduler.get_velocity(batch, noise, timesteps)
    with autocast(config.mixed_precision, batch.device):
        prediction = unet(noisy, timesteps, encoder_states).sample
    snr = compute_snr(scheduler, timesteps)
    weight = torch.clamp(snr, max=config.min_snr_gamma) / (snr + 1)
    loss = (weight * F.mse_loss(prediction.float(), target.float(), reduction="none").mean((1, 2, 3))).mean()
    terms = {"diffusion": loss.item()}
    if grounding is not None and grounding.active:
        term = grounding.loss(index, texts)
        loss = loss + grounding.weight * term
        terms["grounding"] = term.item()
    if binding is not None:
        head, targets = binding
        term, accuracy = head(encoder_states, targets)
        loss = loss + config.binding_weight * term
        terms["binding"], terms["binding_accuracy"] = term.item(), accuracy.item()
    return loss, terms


def train_unet(config: Config, accelerator, out: Path, vae_path: Path, resume: bool) -> dict:
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(vae_path)
    tokenizer = shapes_clip_tokenizer(config.vocab_size, config.max_length)
    # The finest cross-attention grid: the first down block has no attention and halves the latent.
    grounding_grid = latent_grid(vae) // 2
    per_scene = {}
    if config.grounding_weight > 0:
        per_scene["objects"] = partial(scene_objects, grid=grounding_grid)
    if config.binding_weight > 0:
        per_scene["colors"] = scene_colors
    if config.region_fraction > 0:
        per_scene["boxes"] = scene_boxes
    latents, captions, extras = encode_pool(
        vae, config.pool_size, config.seed + 1, config.pool_count_weights, per_scene=per_scene
    )
    grounding = None
    if "objects" in extras:
        targets = grounding_targets(captions, extras.pop("objects"), tokenizer, grounding_grid)
        grounding = GroundingTerm(targets, config.grounding_weight, config.grounding_start)
    bound = binding_targets(captions, extras.pop("colors"), tokenizer) if "colors" in extras else None
    regions = None
    if "boxes" in extras:
        regions = region_training(config, captions, extras.pop("boxes"), tokenizer)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    logger.info("unet: pool of %d latents %s, scaling factor %.4f", len(latents), tuple(latents.shape[1:]), scaling)

    torch.manual_seed(config.seed)
    text_encoder = shapes_clip_text_encoder(config.text_layers, config.vocab_size, config.max_length)
    unet = build_unet(tuple(config.unet_channels), vae.config.latent_channels, latent_grid(vae))
    if config.init_from:
        text_encoder, unet = _pretrained(config.init_from, text_encoder, unet)
    scheduler = train_scheduler()
    head = BindingHead(TEXT_HIDDEN).to(accelerator.device) if bound is not None else None
    params = list(unet.parameters()) + list(text_encoder.parameters())
    if head is not None:
        params += list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    step = 0
    history: list[dict] = []
    checkpoint = out / "checkpoint-unet.pt"
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        if head is not None:
            head.load_state_dict(state["binding_head"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        set_rng_state(state["rng"])
        logger.info("unet: resumed at step %d", step)
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    bar = tqdm(total=config.unet_steps, initial=step, desc="unet", disable=not accelerator.is_main_process)
    log = LossLog()
    with ExitStack() as observing:
        controller = None
        if grounding is not None or regions is not None or config.mixed_precision != "no":
            controller = training_controller(observing, accelerator.unwrap_model(unet))
        while step < config.unet_steps and (time.perf_counter() - started) / 60 < config.unet_minutes:
            index = torch.randint(0, len(latents), (config.unet_batch,))
            batch = latents[index].to(accelerator.device)
            texts = [captions[i] if random.random() >= config.caption_dropout else "" for i in index.tolist()]
            ids = tokenizer(
                texts, padding="max_length", max_length=config.max_length, truncation=True, return_tensors="pt"
            ).input_ids
            encoder_states = text_encoder(ids.to(accelerator.device))[0]
            if grounding is not None:
                grounding.begin_step(controller, step)
            if regions is not None:
                regions.begin_step(controller, step, index, texts)
            binding = None
            if head is not None:
                rows = bound[index]
                rows.labels[torch.tensor([not text for text in texts])] = -100  # dropped captions bind nothing
                binding = (head, rows)
            loss, terms = _losses(config, unet, scheduler, batch, encoder_states, grounding, binding, index, texts)
            set_learning_rate(
                optimizer, warmup_cosine(step, base_lr=config.unet_lr, warmup=config.warmup, total=config.unet_steps)
            )
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ema_update(
                [(ema_unet, accelerator.unwrap_model(unet)), (ema_text, accelerator.unwrap_model(text_encoder))],
                step,
                config.ema_decay,
            )
            step += 1
            log.add(terms)
            bar.update(1)
            bar.set_postfix(log.postfix())
            if step % config.probe_every == 0 or step == config.unet_steps:
                probe_pipeline = build_pipeline(vae, ema_text, ema_unet, config)
                accuracy = probe_single_objects(probe_pipeline, config.probe_steps, guidance_scale=5.0)
                history.append(log.probe_entry(step, (time.perf_counter() - started) / 60, accuracy))
                logger.info("unet: step %d loss %.4f probe %.1f%%", step, history[-1]["loss"], accuracy * 100)
            if step % config.checkpoint_every == 0:
                save_checkpoint(
                    checkpoint,
                    {
                        "unet": accelerator.unwrap_model(unet).state_dict(),
                        "text_encoder": accelerator.unwrap_model(text_encoder).state_dict(),
                        "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(),
                        **({"binding_head": head.state_dict()} if head is not None else {}),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "history": history,
                        "rng": rng_state(),
                    },
                )
    bar.close()
    pipeline = build_pipeline(vae, ema_text, ema_unet, config)
    export = out / "pipeline"
    pipeline.to(torch.float16).save_pretrained(export)
    metrics = {
        "steps": step,
        "minutes": (time.perf_counter() - started) / 60,
        **log.final(),
        "history": history,
        "unet_params_m": sum(p.numel() for p in ema_unet.parameters()) / 1e6,
    }
    (out / "unet_metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("exported %s", export)
    return metrics


def _add_stage(parser) -> None:
    parser.add_argument("--stage", choices=["all", "vae", "unet"], default="all")


def main(argv: list[str] | None = None) -> None:
    config, args, out, accelerator = start_shapes_run(Config, __doc__, argv, extra=_add_stage)
    started = time.perf_counter()
    vae_path = out / "vae"
    if args.stage in ("all", "vae"):
        vae_path = train_vae(config, accelerator, resume=args.resume)
    if args.stage in ("all", "unet"):
        if not (vae_path / "config.json").exists():
            raise FileNotFoundError(f"no trained autoencoder at {vae_path}; run --stage vae first")
        train_unet(config, accelerator, out, vae_path, args.resume)
    logger.info("done in %.1f minutes", (time.perf_counter() - started) / 60)
    finish_processes()


if __name__ == "__main__":
    main()
