"""Cost of regional prompts: per-step time with 1, 4 and 8 regions relative to the plain pipeline, and mask memory.

One denoiser pass per step either way (regions are logit biases, not extra passes). The model is the shipped
SD-architecture shapes model at a larger canvas (default 256x256: 128x128 latents, cross-attention at 64x64 and
32x32), with classifier-free guidance, ``output_type="latent"`` so the VAE is not timed. Plain and regional calls
are interleaved in rounds and the median of each is taken.

Memory: the masks' persistent caches (per-grid coverage and inside sets) and the largest logit bias built for one
attention call, in bytes.

Run: python benchmarks/regional.py [--size 256] [--steps 5] [--rounds 3] [--json benchmarks/results/regional-cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import save_results

from attncontrol.controls import Region
from attncontrol.models import SHIPPED_MODELS
from attncontrol.pipelines import RegionalStableDiffusionPipeline
from attncontrol.training.common import cpu_label

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def regions_and_prompt(count: int) -> tuple[str, list[Region]]:
    """``count`` phrases in a grid of boxes (relative units), each tied to its own "colour shape" phrase."""
    phrases = [f"{COLORS[i % 4]} {SHAPES[(i // 4) % 3]}" for i in range(count)]
    # Distinct phrases need distinct words: number the repeats ("red circle 2") so each phrase owns its tokens.
    seen: dict[str, int] = {}
    unique = []
    for phrase in phrases:
        seen[phrase] = seen.get(phrase, 0) + 1
        unique.append(phrase if seen[phrase] == 1 else f"{phrase} number {seen[phrase]}")
    prompt = " and ".join(f"a {phrase}" for phrase in unique)
    columns = min(count, 4)
    rows = (count + columns - 1) // columns
    regions = []
    for index, phrase in enumerate(unique):
        row, column = divmod(index, columns)
        box = (column / columns, row / rows, (column + 1) / columns, (row + 1) / rows)
        regions.append(Region.box(box, phrase=phrase))
    return prompt, regions


def largest_bias_bytes(pipe, size: int, batch: int = 2) -> int:
    """The hard bias is one fp32 ``[batch, 1, image tokens, text tokens]`` tensor at the finest cross-attention grid."""
    from attncontrol.core.layers import discover_layers

    latent = size // pipe.vae_scale_factor
    grids = [layer.grid((latent, latent)) for layer in discover_layers(pipe.unet) if layer.kind == "cross"]
    tokens = max(h * w for h, w in grids)
    return batch * tokens * pipe.tokenizer.model_max_length * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = RegionalStableDiffusionPipeline.from_pretrained(SHIPPED_MODELS["shapes-sd"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    common = {
        "num_inference_steps": args.steps,
        "guidance_scale": 5.0,
        "height": args.size,
        "width": args.size,
        "output_type": "latent",
    }
    results = []
    for count in (1, 4, 8):
        prompt, regions = regions_and_prompt(count)
        plain_times, regional_times = [], []
        for round_index in range(args.rounds + 1):
            start = time.perf_counter()
            pipe(prompt, generator=torch.Generator().manual_seed(0), **common)
            plain = (time.perf_counter() - start) / args.steps
            start = time.perf_counter()
            pipe(prompt, regions=regions, generator=torch.Generator().manual_seed(0), **common)
            regional = (time.perf_counter() - start) / args.steps
            if round_index:  # round 0 is warm-up
                plain_times.append(plain)
                regional_times.append(regional)
        plain, regional = statistics.median(plain_times), statistics.median(regional_times)
        mask_bytes = 0
        for region in regions:
            mask_bytes += region_cache_bytes(pipe, region, args.size)
        row = {
            "regions": count,
            "plain_s_per_step": plain,
            "regional_s_per_step": regional,
            "ratio": regional / plain,
            "largest_bias_bytes": largest_bias_bytes(pipe, args.size),
            "mask_cache_bytes": mask_bytes,
        }
        results.append(row)
        print(
            f"{count} region(s): plain {plain * 1000:.1f} ms/step, regional {regional * 1000:.1f} ms/step, "
            f"ratio {row['ratio']:.3f}; largest bias {row['largest_bias_bytes'] / 1e6:.2f} MB, "
            f"mask caches {mask_bytes / 1e3:.1f} kB",
            flush=True,
        )
    if args.json:
        record = {
            "device": f"{cpu_label(args.threads)}, torch {torch.__version__}",
            "settings": {**common, "rounds": args.rounds, "model": "shapes-sd"},
            "results": results,
        }
        save_results(args.json, record)


def region_cache_bytes(pipe, region: Region, size: int) -> int:
    """Bytes of one region's mask at image size plus its grids at every attention resolution of the UNet."""
    from attncontrol.controls.regions import region_mask

    mask = region_mask(region, (size, size), "region")
    latent = size // pipe.vae_scale_factor
    total = mask.image.nbytes
    for level in range(len(pipe.unet.config.block_out_channels)):
        grid = (latent >> level, latent >> level)
        total += mask.at(grid).nbytes + grid[0] * grid[1]  # coverage floats + the boolean inside set
    return total


if __name__ == "__main__":
    main()
