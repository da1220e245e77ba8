"""Distill CLEAR (local-window attention) for a Flux model: teacher = the model with full attention, student = the
same transformer with every image query restricted to a circle of radius r; only the image-branch projections train.

    python -m attncontrol.training.distill_clear --model path/or/hub-id --radius 16 --out runs/clear-16
    python -m attncontrol.training.distill_clear ... --resume                     # after a stop
    accelerate launch --mixed-precision bf16 -m attncontrol.training.distill_clear --images-dir self-generated/ ...

Loss, as in the paper: the flow-matching loss ||v - (noise - x0)||², plus 0.5 x the MSE to the teacher's prediction,
plus 0.5 x the mean MSE of the attention outputs of every fourth single-stream block. Trainable: ``to_q``, ``to_k``,
``to_v``, ``to_out`` of every attention layer (the text branch's ``add_*`` projections stay). Data: a folder of
images with ``.txt`` captions (CLEAR distills on the model's own samples), or rendered shapes scenes by default.

Writes ``<out>/clear_local_{r}.safetensors`` in the published layout (load it with
``attncontrol.controls.load_clear``), resumable checkpoints and ``metrics.json``.
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

logger = logging.getLogger("attncontrol.training.distill_clear")


@dataclass
class Config:
    out: str = "runs/clear"  # output folder: checkpoints, metrics.json and clear_local_{r}.safetensors
    model: str = ""  # a Flux pipeline: a local folder or a hub id (required)
    radius: int = 16  # the window's radius in latent tokens (CLEAR publishes 8, 16 and 32)
    seed: int = 0  # seeds the data, the timesteps and the noise
    steps: int = 2000  # at most this many steps (--minutes may end it first)
    minutes: float = 60.0  # wall-clock budget in minutes
    batch: int = 4  # rows per step
    lr: float = 1e-4  # learning rate of the trained weights (AdamW)
    teacher_weight: float = 0.5  # weight of the MSE between the student's and the teacher's predictions
    feature_weight: float = 0.5  # weight of the mean MSE of the attention outputs of every fourth single-stream block
    guidance: float = 3.5  # for guidance-distilled models (FLUX.1-dev); ignored by models without the embedding
    pool_size: int = 2000  # rendered scenes (or folder images, at most) encoded once as the training set
    images_dir: str = ""  # a folder of images with .txt captions; empty: rendered shapes scenes
    image_size: int = 0  # images are resized to this square size; 0: the model's own
    checkpoint_every: int = 250  # steps between checkpoints (--resume continues from the last one)
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate's mixed precision)


def trainable_names(transformer: torch.nn.Module) -> list[str]:
    """The parameters CLEAR trains and its checkpoints hold."""
    from attncontrol.controls.local import CLEAR_PARAMETERS

    return [name for name, _ in transformer.named_parameters() if any(p in f".{name}" for p in CLEAR_PARAMETERS)]


def distill(config: Config, resume: bool = False) -> dict:
    from safetensors.torch import save_file

    from attncontrol.controls.local import LocalWindowAttention
    from attncontrol.core.controller import AttentionController
    from attncontrol.models import is_flux_pipeline, load_pipeline
    from attncontrol.training.shapes_flux import encode_text, image_ids, pack

    if not config.model:
        raise ValueError("--model is required: a Flux pipeline (local folder or hub id)")
    accelerator, out = start_run(config)
    pipe = load_pipeline(config.model)
    if not hasattr(pipe, "transformer") or not is_flux_pipeline(pipe):
        raise ValueError(f"--model {config.model!r} is a {type(pipe).__name__}, not a Flux pipeline")
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    if config.images_dir:
        from attncontrol.training.distill_linfusion import _folder_pool

        latents, captions = _folder_pool(pipe, Path(config.images_dir), config.image_size or None)
    else:
        from attncontrol.training.shapes_vae import encode_pool

        with torch.no_grad():
            latents, captions, _ = encode_pool(pipe.vae, config.pool_size, config.seed + 7)
    shift = getattr(pipe.vae.config, "shift_factor", 0.0) or 0.0
    latents = (latents - shift) * pipe.vae.config.scaling_factor
    height, width = latents.shape[-2] // 2, latents.shape[-1] // 2
    packed, ids = pack(latents), image_ids(height, width)
    teacher = pipe.transformer.eval()
    student = copy.deepcopy(teacher)
    names = trainable_names(student)
    parameters = dict(student.named_parameters())
    for name in names:
        parameters[name].requires_grad_(True)
    optimizer = torch.optim.AdamW([parameters[name] for name in names], lr=config.lr, weight_decay=1e-4)
    step, history = 0, []
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        student.load_state_dict(state["student"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        set_rng_state(state["rng"])
        logger.info("resumed at step %d", step)
    student, optimizer = accelerator.prepare(student, optimizer)
    device = accelerator.device
    teacher.to(device)
    single = [
        n for n, _ in teacher.named_modules() if n.startswith("single_transformer_blocks.") and n.endswith(".attn")
    ]
    watched = [name for name in single if int(name.split(".")[1]) % 4 == 0]
    teacher_outputs, teacher_hooks = layer_outputs(teacher, watched)
    student_outputs, student_hooks = layer_outputs(accelerator.unwrap_model(student), watched)
    control = LocalWindowAttention(config.radius, backend="banded")
    text_ids = torch.zeros(pipe.tokenizer_2.model_max_length, 3, device=device)

    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="distill CLEAR", disable=not accelerator.is_main_process)
    recent: list[dict[str, float]] = []
    with AttentionController(accelerator.unwrap_model(student), [control]):
        while step < config.steps and (time.perf_counter() - started) / 60 < config.minutes:
            index = torch.randint(0, len(packed), (config.batch,))
            x0 = packed[index].to(device)
            with torch.no_grad():
                sequence, pooled = encode_text(
                    pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                    [captions[i] for i in index.tolist()], device,
                )  # fmt: skip
            noise = torch.randn_like(x0)
            t = torch.rand(len(x0), device=device)
            noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            inputs = {
                "hidden_states": noisy,
                "timestep": t,
                "pooled_projections": pooled,
                "encoder_hidden_states": sequence,
                "txt_ids": text_ids,
                "img_ids": ids.to(device),
            }
            if teacher.config.guidance_embeds:
                inputs["guidance"] = torch.full((len(x0),), config.guidance, device=device)
            with torch.no_grad():
                teacher_prediction = teacher(**inputs).sample
            with accelerator.autocast():
                prediction = student(**inputs).sample
            flow = F.mse_loss(prediction.float(), (noise - x0).float())
            match = F.mse_loss(prediction.float(), teacher_prediction.float())
            pairs = [(student_outputs[n], teacher_outputs[n]) for n in watched]
            feature = (
                torch.stack([F.mse_loss(_first(s).float(), _first(t).float()) for s, t in pairs]).mean()
                if pairs
                else torch.zeros((), device=device)
            )
            loss = flow + config.teacher_weight * match + config.feature_weight * feature
            accelerator.backward(loss)
            accelerator.clip_grad_norm_([parameters[name] for name in names], 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            recent = [
                *recent[-99:],
                {"loss": loss.item(), "flow": flow.item(), "match": match.item(), "feature": feature.item()},
            ]
            means = {key: float(np.mean([r[key] for r in recent])) for key in recent[0]}
            bar.update(1)
            bar.set_postfix({key: f"{value:.4f}" for key, value in means.items()})
            if step % config.checkpoint_every == 0 or step == config.steps:
                history.append({"step": step, "minutes": (time.perf_counter() - started) / 60, **means})
                unwrapped = accelerator.unwrap_model(student)
                save_checkpoint(
                    checkpoint,
                    {
                        "student": {n: p for n, p in unwrapped.state_dict().items() if n in set(names)},
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "history": history,
                        "rng": rng_state(),
                    },
                )
    bar.close()
    for handle in teacher_hooks + student_hooks:
        handle.remove()
    unwrapped = dict(accelerator.unwrap_model(student).named_parameters())
    export = out / f"clear_local_{config.radius}.safetensors"
    save_file({name: unwrapped[name].detach().contiguous().cpu() for name in names}, str(export))
    metrics = {"steps": step, "minutes": (time.perf_counter() - started) / 60, "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("exported %s after %d steps", export, step)
    return metrics


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    """Single-stream attention returns a tensor; joint blocks a tuple (image, text): compare the image part."""
    return output[0] if isinstance(output, tuple) else output


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config, args = parse_config(Config, __doc__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distill(config, resume=args.resume)
    finish_processes()


if __name__ == "__main__":
    main()
