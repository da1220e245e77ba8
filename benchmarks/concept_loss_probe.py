"""Does the concept training's diffusion loss tell an object's colour apart? For each object of the concept bench's
scenes, the masked loss (mean over the object's mask, v-prediction target) of ``"a photo of a <colour> <shape>"`` for
every colour word, averaged over the same noise draws in each quarter of the timestep range, once on the plain
conditional prediction and once on the classifier-free-guided one (``uncond + w * (cond - uncond)``, what
``--loss-guidance w`` trains). A token learns its colour only where the true colour's loss is clearly the lowest.

Run: python benchmarks/concept_loss_probe.py [--scenes 6] [--draws 12] [--guidance 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F
from _results import save_results

from attncontrol.models import load_pipeline
from attncontrol.shapes.concept_bench import concept_scenes
from attncontrol.shapes.scenes import COLORS
from attncontrol.training.concepts import _encode_image, _target

QUARTERS = 4


@torch.no_grad()
def probe_object(pipe, image, mask, shape: str, colors: list[str], draws: int, guidance: float, seed: int) -> dict:
    """Masked loss per colour word and timestep quarter, plain and guided, over shared (timestep, noise) draws."""
    unet, scheduler = pipe.unet, pipe.scheduler
    pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    clean = _encode_image(pipe, pixels)
    region = F.interpolate(torch.tensor(mask)[None, None].float(), size=clean.shape[-2:], mode="nearest")
    prompts = [f"a photo of a {color} {shape}" for color in colors] + [""]
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    rows = len(prompts)
    span = scheduler.config.num_train_timesteps // QUARTERS
    generator = torch.Generator().manual_seed(seed)
    result = {"plain": torch.zeros(QUARTERS, len(colors)), "guided": torch.zeros(QUARTERS, len(colors))}
    for quarter in range(QUARTERS):
        for _ in range(draws):
            timestep = torch.randint(quarter * span, (quarter + 1) * span, (1,), generator=generator)
            noise = torch.randn(clean.shape, generator=generator)
            noisy = scheduler.add_noise(clean, noise, timestep)
            target = _target(scheduler, clean, noise, timestep)
            prediction = unet(noisy.repeat(rows, 1, 1, 1), timestep.repeat(rows), embeds).sample
            cond, uncond = prediction[:-1], prediction[-1:]
            for name, value in (("plain", cond), ("guided", uncond + guidance * (cond - uncond))):
                squared = ((value - target) * region) ** 2
                result[name][quarter] += squared.sum((1, 2, 3)) / (region.sum() * clean.shape[1]) / draws
    return {name: table.tolist() for name, table in result.items()}


def margin(losses: list[float], colors: list[str], true_color: str) -> float:
    """How much lower the true colour's loss is than the best other colour's, relative to it (> 0: it wins)."""
    true = losses[colors.index(true_color)]
    best_other = min(value for color, value in zip(colors, losses, strict=True) if color != true_color)
    return (best_other - true) / best_other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--draws", type=int, default=12, help="(timestep, noise) draws per quarter")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    colors = list(COLORS)
    cases = []
    for index, scene in enumerate(concept_scenes(args.scenes)):
        for which, obj in enumerate(scene.objects):
            losses = probe_object(pipe, scene.image, obj.mask, obj.shape, colors, args.draws, args.guidance, index)
            cases.append(
                {
                    "scene": index,
                    "object": which,
                    "color": obj.color,
                    "shape": obj.shape,
                    "background": scene.background,
                }
                | losses
            )
    lines = [
        f"Colour probe on {args.model}: masked loss of the true colour word against the best other colour "
        f"({', '.join(colors)}), relative margin (> 0: the true colour has the lowest loss), per timestep quarter; "
        f"{args.draws} draws per quarter, guided = guidance {args.guidance:g}; {platform.machine()} CPU",
        "",
        "| scene | object | background | plain q1 | q2 | q3 | q4 | guided q1 | q2 | q3 | q4 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        cells = [
            f"{margin(case[name][quarter], colors, case['color']):+.0%}"
            for name in ("plain", "guided")
            for quarter in range(QUARTERS)
        ]
        lines.append(
            f"| {case['scene']} | {case['color']} {case['shape']} | {case['background']} | {' | '.join(cells)} |"
        )
    lines.append("")
    for name in ("plain", "guided"):
        margins = [margin(case[name][q], colors, case["color"]) for case in cases for q in range(QUARTERS - 1)]
        wins = sum(value > 0 for value in margins)
        lines.append(
            f"- {name}: below t = 750 the true colour has the lowest loss in {wins} of {len(margins)} (object, "
            f"quarter) pairs; median margin {statistics.median(margins):+.0%}"
        )
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        save_results(args.json, {"header": lines[0], "colors": colors, "cases": cases}, markdown)


if __name__ == "__main__":
    main()
