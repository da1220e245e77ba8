"""Per-step training time of a shapes denoiser + text encoders in fp32 and under bf16 autocast, on this machine.

``--model sd`` (default): the shapes-sd UNet and CLIP, the recipe's shapes (32x32x4 latents, batch 32, 77 tokens);
``--model flux``: the shapes-flux transformer, CLIP and T5 (64 packed tokens of 32 channels, batch 32, 32 tokens).
Three ways, same model, batch and inputs:
- fp32: stock processors, no autocast (the shipped model's recipe);
- bf16, stock processors: autocast everywhere, the attention core too (PyTorch's bf16 SDPA);
- bf16, training controller: autocast, with the attention core in fp32 (``attncontrol.training.common
  .training_controller``, what ``--mixed-precision bf16`` runs).
Prints the median seconds per step of interleaved rounds and each one's ratio to fp32. On CPUs without native bf16
(no AMX / AVX512-BF16) autocast is slower, not faster.

Run: python benchmarks/training_precision.py [--model flux] [--rounds 5] [--threads 2]
     [--json benchmarks/results/training-precision-cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from _results import save_results

from attncontrol.training.common import autocast, cpu_label, training_controller
from attncontrol.training.shapes_sd import build_unet
from attncontrol.training.shapes_text import shapes_clip_text_encoder

MODES = ("fp32", "bf16, stock processors", "bf16, training controller")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd", "flux"), default="sd")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    denoiser, step = (_flux_step if args.model == "flux" else _sd_step)(args.batch)

    def timed(mode: str) -> float:
        with ExitStack() as stack:
            if mode == MODES[2]:
                training_controller(stack, denoiser)
            precision = "no" if mode == "fp32" else "bf16"
            step(precision)  # warm-up: oneDNN picks its kernels on the first call
            started = time.perf_counter()
            for _ in range(args.steps_per_round):
                step(precision)
            return (time.perf_counter() - started) / args.steps_per_round

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(timed(mode))
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    lines = ["| mode | s / step | ratio to fp32 |", "|---|---:|---:|"]
    lines += [f"| {mode} | {medians[mode]:.3f} | {medians[mode] / medians['fp32']:.2f} |" for mode in MODES]
    table = "\n".join(lines)
    print(table)
    if args.json:
        device = f"{cpu_label(torch.get_num_threads())}, torch {torch.__version__}"
        record = {
            "device": device,
            "model": args.model,
            "batch": args.batch,
            "rounds": args.rounds,
            "seconds": times,
            "median": medians,
        }
        save_results(args.json, record, table)


def _sd_step(batch: int) -> tuple[torch.nn.Module, Callable[[str], None]]:
    """The shapes-sd UNet and its text encoder, and one training step of them at a precision."""
    unet = build_unet((32, 64, 96), 4, 32)
    text_encoder = shapes_clip_text_encoder(2, 49408, 77)
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=1e-5)
    latents = torch.randn(batch, 4, 32, 32)
    ids = torch.randint(0, 49407, (batch, 77))
    timesteps = torch.randint(0, 1000, (batch,))

    def step(precision: str) -> None:
        states = text_encoder(ids)[0]
        with autocast(precision, latents.device):
            prediction = unet(latents, timesteps, states).sample
        F.mse_loss(prediction.float(), latents).backward()
        optimizer.step()
        optimizer.zero_grad()

    return unet, step


def _flux_step(batch: int) -> tuple[torch.nn.Module, Callable[[str], None]]:
    """The shapes-flux transformer and its two text encoders at the recipe's defaults, and one training step."""
    from attncontrol.training import shapes_flux

    config = shapes_flux.Config()
    clip, t5, clip_tok, t5_tok = shapes_flux.build_text_encoders(config)
    transformer = shapes_flux.build_transformer(config, config.latent_channels)
    params = [*transformer.parameters(), *clip.parameters(), *t5.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    grid = 8  # 64 px, factor-4 autoencoder, 2x2 packing
    packed = torch.randn(batch, grid * grid, 4 * config.latent_channels)
    times = torch.rand(batch)
    texts = ["a red circle and a blue square"] * batch
    ids, text_ids = shapes_flux.image_ids(grid, grid), torch.zeros(config.max_length, 3)

    def step(precision: str) -> None:
        text = shapes_flux.encode_text(clip, t5, clip_tok, t5_tok, texts, packed.device)
        with autocast(precision, packed.device):
            prediction = shapes_flux.predict_velocity(transformer, packed, times, text, text_ids, ids)
        F.mse_loss(prediction.float(), packed).backward()
        optimizer.step()
        optimizer.zero_grad()

    return transformer, step


if __name__ == "__main__":
    main()
