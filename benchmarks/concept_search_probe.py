"""Which score lets the concept trainer's starting-word search (``--init-search``) find an object's colour? For each
object of the concept bench's scenes, the masked loss of ``"a photo of <w1> <w2>"`` for every ordered pair of
candidate words (a two-vector token set to two words) is taken on each of the same (noise, timestep) draws, with
the empty prompt's loss on them. Two scores rank the pairs, on the draws below ``--max-timestep``:

- plain: the mean of the draws' losses (what the search used until it was changed);
- relative: the mean of each draw's loss divided by the empty prompt's on that draw (what it uses now).

For each score: how often the best pair names the object's colour (and no other), and how often the trainer's
greedy search over the two words (from the shape word twice, two passes) ends on it; then the same greedy search
on ``--bootstrap`` resamplings of the draws, the share that finds the colour, per object: how stable the pick is.
Also whether the detector still finds the object in the VAE's reconstruction of the scene (the training target).

Run: python benchmarks/concept_search_probe.py [--scenes 6] [--draws 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import platform

import numpy as np
import torch
import torch.nn.functional as F
from _results import save_results
from tqdm.auto import tqdm

from attncontrol.concepts import masked_diffusion_loss
from attncontrol.models import load_pipeline
from attncontrol.shapes.concept_bench import concept_scenes
from attncontrol.shapes.detector import detect
from attncontrol.shapes.scenes import BACKGROUNDS, COLORS, SHAPES, to_tensor
from attncontrol.training.concepts import _encode_image, _target

SCORES = ("plain", "relative")


@torch.no_grad()
def pair_losses(pipe, scene, clean: torch.Tensor, words: list[str], template: str, draws: int, seed: int) -> dict:
    """Per-draw masked losses ``[pairs + 1, draws]`` per object (row 0: the empty prompt) and the draws' timesteps;
    ``clean`` is the scene's encoded latent."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((draws, *clean.shape[1:]), generator=generator)
    steps = pipe.scheduler.config.num_train_timesteps
    timesteps = ((torch.arange(draws) + torch.rand(draws, generator=generator)) * steps / draws).long()
    noisy = pipe.scheduler.add_noise(clean.expand_as(noise), noise, timesteps)
    target = _target(pipe.scheduler, clean, noise, timesteps)
    masks = [
        F.interpolate(torch.tensor(obj.mask)[None, None].float(), size=clean.shape[-2:], mode="nearest")
        for obj in scene.objects
    ]
    prompts = [""] + [template.format(f"{a} {b}") for a, b in itertools.product(words, words)]
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    losses = [torch.zeros(len(prompts), draws) for _ in masks]
    for row in tqdm(range(len(prompts)), desc="word pairs", leave=False):
        prediction = pipe.unet(noisy, timesteps, embeds[row : row + 1].expand(draws, -1, -1)).sample
        for which, mask in enumerate(masks):
            masked = mask.expand(draws, -1, -1, -1)
            losses[which][row] = masked_diffusion_loss(prediction, target, masked, mean_over="mask", per_sample=True)
    return {"losses": [table.numpy() for table in losses], "timesteps": timesteps.numpy()}


@torch.no_grad()
def reconstruction(pipe, clean: torch.Tensor) -> set[tuple[str, str]]:
    """The (colour, shape) pairs the detector finds in the VAE's reconstruction of the scene (``clean``, its
    encoded latent): what the training target still shows; an object lost there cannot be learned back from it."""
    decoded = pipe.vae.decode(clean / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)[0]
    image = ((decoded.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    return {(found.color, found.shape) for found in detect(image)}


def score(losses: np.ndarray, kind: str) -> np.ndarray:
    """One score per pair (lower is better) from ``[pairs + 1, draws]`` losses."""
    if kind == "plain":
        return losses[1:].mean(1)
    return (losses[1:] / losses[:1]).mean(1)


def greedy_pick(scores: np.ndarray, words: list[str], start: str, rounds: int = 2) -> tuple[str, str]:
    """The trainer's coordinate search on a pair table: from (start, start), swap in the best word per vector."""
    index = {pair: i for i, pair in enumerate(itertools.product(words, words))}
    pair = (start, start)
    best = scores[index[pair]]
    for _ in range(rounds):
        for position in range(2):
            for word in words:
                candidate = (word, pair[1]) if position == 0 else (pair[0], word)
                if scores[index[candidate]] < best:
                    best, pair = scores[index[candidate]], candidate
    return pair


def names_color(pair: tuple[str, str], color: str) -> bool:
    """The pair names the object's colour and no other object colour (a background word may come along)."""
    return {word for word in pair if word in COLORS} == {color}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--draws", type=int, default=48, help="(noise, timestep) draws over the whole range")
    parser.add_argument("--max-timestep", type=int, default=750, help="score on the draws below it (the search's)")
    parser.add_argument("--template", default="a photo of {}")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    words = [*COLORS, *BACKGROUNDS, *SHAPES]
    rng = np.random.default_rng(0)
    cases = []
    for index, scene in enumerate(tqdm(concept_scenes(args.scenes), desc="scenes")):
        clean = _encode_image(pipe, to_tensor([scene]))
        probed = pair_losses(pipe, scene, clean, words, args.template, args.draws, seed=index)
        below = probed["timesteps"] < args.max_timestep
        rebuilt = reconstruction(pipe, clean)
        for which, obj in enumerate(scene.objects):
            losses = probed["losses"][which][:, below]
            case = {"scene": index, "object": which, "color": obj.color, "shape": obj.shape}
            case["background"] = scene.background
            case["in_reconstruction"] = (obj.color, obj.shape) in rebuilt
            for kind in SCORES:
                scores = score(losses, kind)
                best = list(itertools.product(words, words))[int(np.argmin(scores))]
                pick = greedy_pick(scores, words, obj.shape)
                resampled = [
                    names_color(greedy_pick(score(losses[:, draw], kind), words, obj.shape), obj.color)
                    for draw in (rng.integers(0, losses.shape[1], losses.shape[1]) for _ in range(args.bootstrap))
                ]
                case[kind] = {"best": " ".join(best), "greedy": " ".join(pick), "stable": float(np.mean(resampled))}
            cases.append(case)
    lines = [
        f"Starting-word search probe on {args.model}: every ordered pair of {len(words)} words "
        f"({', '.join(words)}) in {args.template!r}, {int(below.sum())} of {args.draws} draws below t = "
        f"{args.max_timestep}; greedy = the trainer's search from the shape word; stable = share of "
        f"{args.bootstrap} resamplings of the draws whose greedy pick names the colour; {platform.machine()} CPU",
        "",
        "| scene | object | background | in the VAE's reconstruction | plain: best | greedy | stable | relative: best "
        "| greedy | stable |",
        "|---:|---|---|---|---|---|---:|---|---|---:|",
    ]
    for case in cases:
        cells = [f"{case[k]['best']} | {case[k]['greedy']} | {case[k]['stable']:.0%}" for k in SCORES]
        name = f"{case['color']} {case['shape']}"
        kept = "yes" if case["in_reconstruction"] else "no"
        lines.append(f"| {case['scene']} | {name} | {case['background']} | {kept} | {' | '.join(cells)} |")
    lines.append("")
    for kind in SCORES:
        best = sum(names_color(tuple(c[kind]["best"].split()), c["color"]) for c in cases)
        greedy = sum(names_color(tuple(c[kind]["greedy"].split()), c["color"]) for c in cases)
        stable = np.mean([c[kind]["stable"] for c in cases])
        lines.append(
            f"- {kind}: the best pair names the colour for {best} of {len(cases)} objects, the greedy search's for "
            f"{greedy}; over resampled draws {stable:.0%}"
        )
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        save_results(args.json, {"header": lines[0], "words": words, "cases": cases}, markdown)


if __name__ == "__main__":
    main()
