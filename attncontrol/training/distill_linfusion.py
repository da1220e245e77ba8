"""Distill LinFusion (linear self-attention) from an SD-architecture model: teacher = the model, student = the same
UNet with every self-attention linearized; only LinFusion's weights train.

    python -m attncontrol.training.distill_linfusion --out runs/linfusion-shapes-sd              # shapes-sd, CPU
    python -m attncontrol.training.distill_linfusion --out runs/linfusion-shapes-sd --resume     # after a stop
    accelerate launch -m attncontrol.training.distill_linfusion --model path/or/hub-id --out runs/x --images-dir D

Loss, as in the paper: the denoising loss on the model's own target (epsilon or v), plus 0.5 x the MSE between the
student's and the teacher's predictions, plus 0.5 x the mean over self-attention layers of the MSE between their
outputs (after ``to_out``). Timesteps uniform over training steps, AdamW, no schedule. The student starts from the
teacher's projections with the MLPs' last layer at zero. Data: on the shapes world, rendered scenes and their
captions, encoded once; elsewhere a folder of images with ``.txt`` captions beside them.

Writes ``<out>/linfusion`` (the published layout; load it with ``attncontrol.controls.load_linfusion``), a
checkpoint every ``--checkpoint-every`` steps (resumable: weights, optimizer, step, RNG) and ``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attncontrol.training.common import (
    finish_processes,
    layer_outputs,
    load_checkpoint,
    parse_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
    start_run,
)

logger = logging.getLogger("attncontrol.training.distill_linfusion")


@dataclass
class Config:
    out: str = "runs/linfusion"  # output folder: checkpoints, metrics.json and the LinFusion weights in <out>/linfusion
    model: str = "shapes-sd"  # the teacher: an SD pipeline (shipped name, local folder or hub id)
    seed: int = 0  # seeds the data, the timesteps and the noise
    steps: int = 2000  # at most this many steps (--minutes may end it first)
    minutes: float = 40.0  # wall-clock budget in minutes
    batch: int = 16  # rows per step
    lr: float = 1e-3  # learning rate of the trained weights (AdamW)
    weight_decay: float = 0.0  # AdamW's weight decay
    teacher_weight: float = 0.5  # weight of the MSE between the student's and the teacher's predictions
    feature_weight: float = 0.5  # weight of the mean over self-attention layers of the MSE between their outputs
    projection_mid_dim: int = 0  # the MLPs' width; 0: the layer's own (LinFusion's default), -1: no MLPs
    pool_size: int = 8000  # rendered scenes (or folder images, at most) encoded once as the training set
    images_dir: str = ""  # a folder of images with .txt captions; empty: rendered shapes scenes
    image_size: int = 0  # images are resized to this square size; 0: the model's own
    checkpoint_every: int = 250  # steps between checkpoints (--resume continues from the last one)
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate's mixed precision)


def _encode_prompts(pipe, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids.to(device))[0]


def _folder_pool(pipe, folder: Path, size: int | None) -> tuple[torch.Tensor, list[str]]:
    """Latents and captions of ``folder/*.png|jpg`` with ``.txt`` captions (empty caption when missing)."""
    from PIL import Image

    from attncontrol.models import default_image_size

    side = size or max(default_image_size(pipe))
    latents, captions = [], []
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise FileNotFoundError(f"--images-dir {folder} holds no images")
    for path in tqdm(paths, desc="encode images"):
        image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            latents.append(pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mean)
        caption = path.with_suffix(".txt")
        captions.append(caption.read_text().strip() if caption.exists() else "")
    return torch.cat(latents), captions


def distill(config: Config, resume: bool = False) -> dict:

    from attncontrol.controls.linear import LinearAttention, LinFusion
    from attncontrol.core.controller import AttentionController
    from attncontrol.models import load_pipeline

    accelerator, out = start_run(config)
    pipe = load_pipeline(config.model)
    teacher = pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if config.images_dir:
        latents, captions = _folder_pool(pipe, Path(config.images_dir), config.image_size or None)
    else:
        from attncontrol.training.shapes_vae import encode_pool

        with torch.no_grad():
            latents, captions, _ = encode_pool(pipe.vae, config.pool_size, config.seed + 7)
    latents = latents * pipe.vae.config.scaling_factor
    scheduler = pipe.scheduler
    prediction_type = scheduler.config.prediction_type
    logger.info("pool of %d latents %s; target %s", len(latents), tuple(latents.shape[1:]), prediction_type)

    student = copy.deepcopy(teacher)
    linfusion = LinFusion.for_unet(student, projection_mid_dim=config.projection_mid_dim or None)
    names = list(linfusion.layers)
    optimizer = torch.optim.AdamW(linfusion.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, history = 0, []
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        linfusion.load_state_dict(state["linfusion"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        set_rng_state(state["rng"])
        logger.info("resumed at step %d", step)

    from attncontrol.controls.linear import load_linfusion

    control = load_linfusion(student, linfusion)
    assert isinstance(control, LinearAttention)
    linfusion, optimizer = accelerator.prepare(linfusion, optimizer)
    device = accelerator.device
    teacher.to(device)
    student.to(device)
    teacher_outputs, teacher_hooks = layer_outputs(teacher, names)
    student_outputs, student_hooks = layer_outputs(student, names)

    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="distill", disable=not accelerator.is_main_process)
    recent: list[dict[str, float]] = []
    with AttentionController(student, [control]):
        while step < config.steps and (time.perf_counter() - started) / 60 < config.minutes:
            index = torch.randint(0, len(latents), (config.batch,))
            clean = latents[index].to(device)
            states = _encode_prompts(pipe, [captions[i] for i in index.tolist()], device)
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            target = scheduler.get_velocity(clean, noise, timesteps) if prediction_type == "v_prediction" else noise
            with torch.no_grad():
                teacher_prediction = teacher(noisy, timesteps, states).sample
            with accelerator.autocast():
                prediction = student(noisy, timesteps, states).sample
            denoise = F.mse_loss(prediction.float(), target.float())
            match = F.mse_loss(prediction.float(), teacher_prediction.float())
            feature = torch.stack(
                [F.mse_loss(student_outputs[n].float(), teacher_outputs[n].float()) for n in names]
            ).mean()
            loss = denoise + config.teacher_weight * match + config.feature_weight * feature
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            recent.append(
                {"loss": loss.item(), "denoise": denoise.item(), "match": match.item(), "feature": feature.item()}
            )
            recent = recent[-100:]
            means = {key: float(np.mean([r[key] for r in recent])) for key in recent[0]}
            bar.update(1)
            bar.set_postfix({key: f"{value:.4f}" for key, value in means.items()})
            if step % config.checkpoint_every == 0 or step == config.steps:
                history.append({"step": step, "minutes": (time.perf_counter() - started) / 60, **means})
                save_checkpoint(
                    checkpoint,
                    {
                        "linfusion": accelerator.unwrap_model(linfusion).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "history": history,
                        "rng": rng_state(),
                    },
                )
    bar.close()
    for handle in teacher_hooks + student_hooks:
        handle.remove()
    export = out / "linfusion"
    accelerator.unwrap_model(linfusion).save_pretrained(export)
    metrics = {"steps": step, "minutes": (time.perf_counter() - started) / 60, "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("exported %s after %d steps", export, step)
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config, args = parse_config(Config, __doc__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distill(config, resume=args.resume)
    finish_processes()


if __name__ == "__main__":
    main()
