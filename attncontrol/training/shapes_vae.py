"""The shapes-world autoencoder: factor-2 AutoencoderKL, trained on scenes rendered per step, probed by the detector.

The first calibration runs showed the autoencoder decides everything: if encode -> decode turns a red square into
a yellow blob, no denoiser can learn colours. So it is trained first and its round trip is scored by the detector.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attncontrol.core.masks import resize_to_grid
from attncontrol.shapes.bench import objects_present
from attncontrol.shapes.detector import detect
from attncontrol.shapes.scenes import BACKGROUNDS, COLORS, IMAGE_SIZE, Scene, SceneGenerator, to_pixels, to_tensor
from attncontrol.training.common import (
    StageClock,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_learning_rate,
    set_rng_state,
)

logger = logging.getLogger(__name__)


@dataclass
class ShapesTrainingConfig:
    """Settings every shapes-world training script shares: output, seed, autoencoder stage, data pool, bookkeeping."""

    out: str = "runs/shapes"  # output folder: checkpoints, logs, metrics and the exported pipeline
    seed: int = 0  # seeds the scenes, the initial weights and the noise: the same command gives the same run
    vae_steps: int = 2500  # autoencoder stage: at most this many steps (--vae-minutes may end it first)
    vae_minutes: float = 12.0  # autoencoder stage: wall-clock budget in minutes, summed over resumes like --vae-steps
    vae_batch: int = 8  # scenes per autoencoder step, rendered fresh each step
    vae_lr: float = 2e-3  # autoencoder learning rate (AdamW)
    vae_probe_scenes: int = 200  # scenes the detector reads after an encode/decode round trip (colours must survive)
    # Autoencoder channels per block; each block after the first halves the latent's side.
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4  # channels of the latent the denoiser works on
    # Weight of a loss that pins the encoder's mean to a fixed code per palette colour (equidistant corners of a
    # cross-polytope, see `palette_codes`), so every colour sits equally far from every background in the latent
    # space. Without it yellow on white lies 5x closer than blue, and a latent MSE learns yellow last. 0: off.
    vae_colour_codes: float = 0.0
    pool_size: int = 30000  # scenes rendered and encoded once: the denoiser's training set
    # Relative chances of 1, 2 and 3 objects in the denoiser's training pool (equal: the generator's uniform draw).
    pool_count_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Text side: the first this-many tokens of CLIP's BPE vocabulary (see attncontrol.training.shapes_text).
    vocab_size: int = 49408
    max_length: int = 77  # prompt length in tokens
    warmup: int = 200  # steps of linear learning-rate warm-up
    # Weight of the token grounding loss (attncontrol.training.grounding); 0 turns it off.
    grounding_weight: float = 0.0
    # Step from which the grounding loss is on: TokenCompose grounds a model that already draws (a fine-tune), so
    # the first part of the schedule can learn to draw without it.
    grounding_start: int = 0
    # Share of the captioned rows trained through hard region masks around their objects (attncontrol.training.
    # layouts): the regional control's mask at sampling time, so regions learn to say where objects go. From step
    # ``region_start`` on, regions grown by up to ``region_margin`` pixels around each object; 0 turns it off.
    region_fraction: float = 0.0
    region_start: int = 0  # see --region-fraction
    region_margin: float = 24.0  # see --region-fraction
    # "bf16": the denoiser's forward pass under bf16 autocast (attention core in fp32), "no": fp32, "auto": bf16
    # only where this machine computes it natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16).
    mixed_precision: str = "no"
    ema_decay: float = 0.999  # decay of the EMA weights that are probed and exported
    caption_dropout: float = 0.1  # share of rows trained on the empty caption, which classifier-free guidance needs
    checkpoint_every: int = 250  # steps between checkpoints (--resume continues from the last one)
    # Steps between probes: single-object prompts sampled with the EMA weights and scored by the detector.
    probe_every: int = 1000
    probe_steps: int = 20  # sampling steps per probe image

    def __post_init__(self) -> None:
        if not 0.0 <= self.region_fraction <= 1.0:
            raise ValueError(f"`--region-fraction` must be in [0, 1] (0: off), got {self.region_fraction}")


def latent_grid(vae) -> int:
    """Side of the autoencoder's latent for a shapes-world scene (each block after the first halves it)."""
    return IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)


def build_vae(config: ShapesTrainingConfig):
    from attncontrol.testing.tiny import small_autoencoder

    return small_autoencoder(
        sample_size=IMAGE_SIZE, block_out_channels=config.vae_channels, latent_channels=config.latent_channels
    )


def palette_codes(latent_channels: int) -> torch.Tensor:
    """``[7, latent_channels]``: one latent code per palette colour (white, gray, black, red, green, blue, yellow).

    The codes are corners ``±e_i`` of a cross-polytope in the first 4 channels: every object colour is sqrt(2) from
    every background, so none is easier or harder to tell from its background than another. The opposite corners go
    to white/black, red/green and blue/yellow (2 apart); gray's opposite stays unused. Channels past 4 get 0.
    """
    corners = [(0, 1.0), (0, -1.0), (1, 1.0), (2, 1.0), (2, -1.0), (3, 1.0), (3, -1.0)]
    if latent_channels < 4:
        raise ValueError(f"`--vae-colour-codes` needs `--latent-channels` >= 4, got {latent_channels}")
    if (*BACKGROUNDS, *COLORS) != ("white", "gray", "black", "red", "green", "blue", "yellow"):
        raise RuntimeError("the palette changed: update palette_codes' corners")
    codes = torch.zeros(len(corners), latent_channels)
    for row, (channel, sign) in enumerate(corners):
        codes[row, channel] = sign
    return codes


def colour_code_image(images: torch.Tensor, codes: torch.Tensor, factor: int) -> torch.Tensor:
    """The latent an encoder with ``codes`` should give ``images`` ([-1, 1], ``[N, 3, H, W]``): each pixel's nearest
    palette colour's code, averaged over the ``factor`` x ``factor`` pixels of each latent cell."""
    palette = torch.tensor([*BACKGROUNDS.values(), *COLORS.values()], dtype=images.dtype, device=images.device)
    palette = palette / 127.5 - 1.0
    distances = (images.permute(0, 2, 3, 1)[..., None, :] - palette).square().sum(-1)  # [N, H, W, 7]
    per_pixel = codes.to(images)[distances.argmin(-1)].permute(0, 3, 1, 2)  # [N, C, H, W]
    return F.avg_pool2d(per_pixel, factor) if factor > 1 else per_pixel


@torch.no_grad()
def vae_round_trip_accuracy(vae, num_scenes: int = 200, seed: int = 10_000) -> tuple[float, float]:
    """Share of objects the detector still reads right after encode -> decode, and mean abs pixel error /255."""
    vae.eval()
    scenes = SceneGenerator(seed).batch(0, num_scenes)
    right = total = 0
    errors = []
    for start in range(0, num_scenes, 50):
        chunk = scenes[start : start + 50]
        pixels = to_pixels(vae.decode(vae.encode(to_tensor(chunk)).latent_dist.mean).sample)
        errors.append(np.abs(pixels.astype(np.float32) - np.stack([s.image for s in chunk])).mean())
        for scene, image in zip(chunk, pixels, strict=True):
            detected = detect(image)
            for obj in scene.objects:
                total += 1
                right += objects_present(detected, [(obj.color, obj.shape)])
    vae.train()
    return right / total, float(np.mean(errors))


def train_vae(config: ShapesTrainingConfig, accelerator, *, resume: bool) -> Path:
    """Train (with ``resume``: reuse or continue) the autoencoder; writes ``out/vae`` and ``out/vae_metrics.json``."""
    out = Path(config.out)
    steps, minutes, batch, seed = config.vae_steps, config.vae_minutes, config.vae_batch, config.seed
    final = out / "vae"
    if resume and (final / "config.json").exists():
        logger.info("vae: already trained at %s", final)
        return final
    if config.vae_colour_codes < 0:
        raise ValueError(f"`--vae-colour-codes` is a loss weight >= 0, got {config.vae_colour_codes}")
    torch.manual_seed(seed)
    vae = build_vae(config)
    codes = palette_codes(config.latent_channels) if config.vae_colour_codes > 0 else None
    factor = IMAGE_SIZE // latent_grid(vae)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    step, spent = 0, 0.0
    checkpoint = out / "checkpoint-vae.pt"
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, spent = state["step"], state.get("minutes", 0.0)
        set_rng_state(state["rng"])
        logger.info("vae: resumed at step %d", step)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    model = accelerator.unwrap_model(vae)
    generator = SceneGenerator(seed)
    clock = StageClock(steps, minutes, spent)
    bar = tqdm(total=steps, initial=step, desc="vae", disable=not accelerator.is_main_process)
    while clock.running(step):
        images = to_tensor(generator.batch(step * batch, batch)).to(accelerator.device)
        posterior = model.encode(images).latent_dist
        decoded = model.decode(posterior.sample()).sample
        loss = F.mse_loss(decoded, images) + 1e-7 * posterior.kl().mean()
        if codes is not None:
            loss = loss + config.vae_colour_codes * F.mse_loss(posterior.mean, colour_code_image(images, codes, factor))
        # The rate decays over whichever budget (steps or minutes) ends first, and the gradient is clipped. Why: at a
        # constant 2e-3, a run that reached all 2,500 steps on a faster CPU blew up at step ~2,400 (loss 0.003 ->
        # 0.34, round trip 1%); the slower machines had always stopped on the clock first, mid-plateau.
        set_learning_rate(optimizer, clock.learning_rate(step, base_lr=config.vae_lr, warmup=1))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "minutes": clock.minutes(),
                    "rng": rng_state(),
                },
            )
    bar.close()
    accuracy, pixel_error = vae_round_trip_accuracy(model, config.vae_probe_scenes)
    logger.info(
        "vae: %d steps, round-trip detector accuracy %.1f%%, pixel error %.2f/255", step, accuracy * 100, pixel_error
    )
    model.save_pretrained(final)
    metrics = {
        "steps": step,
        "minutes": clock.minutes(),
        "round_trip_accuracy": accuracy,
        "pixel_error": pixel_error,
    }
    (out / "vae_metrics.json").write_text(json.dumps(metrics, indent=2))
    return final


@torch.no_grad()
def encode_pool(
    vae,
    num_scenes: int,
    seed: int,
    count_weights: tuple[float, ...] | None = None,
    per_scene: Mapping[str, Callable[[Scene], Any]] | None = None,
) -> tuple[torch.Tensor, list[str], dict[str, list]]:
    """Render and encode ``num_scenes`` scenes once (posterior means).

    Returns latents, captions and, per entry of ``per_scene``, that function's result for every scene (what a loss
    needs from the ground truth, e.g. :func:`object_coverage`): the scenes themselves are not kept.
    """
    per_scene = dict(per_scene or {})
    generator = SceneGenerator(seed, count_weights=count_weights)
    latents, captions = [], []
    extras: dict[str, list] = {name: [] for name in per_scene}
    vae.eval()
    for start in tqdm(range(0, num_scenes, 256), desc="encode pool"):
        scenes = generator.batch(start, min(256, num_scenes - start))
        pixels = to_tensor(scenes).to(vae.device, vae.dtype)
        latents.append(vae.encode(pixels).latent_dist.mean.float().cpu())  # the pool stays in CPU memory
        captions.extend(scene.caption for scene in scenes)
        for name, function in per_scene.items():
            extras[name].extend(function(scene) for scene in scenes)
    return torch.cat(latents), captions, extras


def object_coverage(scene: Scene, grid: int) -> torch.Tensor:
    """``[grid * grid]``: the share of each cell of a ``grid`` x ``grid`` division of the scene covered by objects."""
    covered = np.zeros(scene.image.shape[:2], dtype=np.float32)
    for obj in scene.objects:
        covered[obj.mask] = 1.0
    return resize_to_grid(torch.from_numpy(covered), (grid, grid)).reshape(-1)
