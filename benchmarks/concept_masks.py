"""How well the masks found from attention cover the objects: for rendered two-object scenes (the concept bench's
scenes), the trainer's first mask search (tokens at their initializers, as before any training) is compared with the
drawn object masks. Prints per rule the mean IoU, the objects found with IoU > 0.5, the searches that found both and
those that found both objects but gave them to the wrong tokens.

Run: python benchmarks/concept_masks.py [--scenes 16] [--methods cluster cluster:5 propagate] [--json report.json]
("cluster:5": the cluster rule with 5 self-attention groups, ``--mask-groups 5``; "cluster:5:0.3" drops mask pieces
under 30% of the largest, ``--mask-min-piece 0.3``; "cluster:3:0": the rule before either option. Left out, each takes
the trainer's default.)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from _results import save_results
from accelerate import Accelerator
from PIL import Image

from attncontrol.shapes.concept_bench import concept_scenes
from attncontrol.training.concepts import ConceptTrainer, Config


def scene_ious(scene, rule: str, model: str, folder: Path, samples: int, seed: int) -> list[float]:
    """IoU of each object's found mask with its drawn mask (0 when the search found nothing usable); ``rule`` is
    ``method[:groups[:min_piece]]``; ``seed`` draws the search's timesteps and noise."""
    method, groups_text, piece_text = [*rule.split(":"), "", ""][:3]
    image = folder / "scene.png"
    Image.fromarray(scene.image).save(image)
    config = Config(
        model=model,
        out=str(folder / rule.replace(":", "-")),
        image=str(image),
        mask_source="attention",
        mask_method=method,
        mask_samples=samples,
        mask_groups=int(groups_text or 0),
        mask_min_piece=float(piece_text or Config.mask_min_piece),
        num_concepts=len(scene.objects),
        initializers=[obj.shape for obj in scene.objects],
        phase2_steps=0,
        validation_seeds=0,
        seed=seed,
    )
    trainer = ConceptTrainer(config, Accelerator(cpu=True))
    found = trainer.find_masks().bool().numpy()
    ious = [iou(f, obj.mask) for f, obj in zip(found, scene.objects, strict=True)]
    # The same masks matched the other way round: high here means the objects were found but the tokens swapped.
    return ious + [iou(f, obj.mask) for f, obj in zip(found, scene.objects[::-1], strict=True)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["cluster", "propagate"])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--mask-samples", type=int, default=1, help="forward passes averaged per search")
    parser.add_argument(
        "--seeds", type=int, default=3, help="searches per scene, each with its own timesteps and noise"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    scenes = concept_scenes(args.scenes)
    report: dict = {"scenes": args.scenes, "model": args.model, "mask_samples": args.mask_samples, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            ious = [
                [scene_ious(s, method, args.model, Path(tmp), args.mask_samples, seed) for seed in range(args.seeds)]
                for s in scenes
            ]  # [scene][seed][object 0, object 1, then the swapped pairing's two]
            flat = np.array(ious)[..., :2].ravel()
            report["methods"][method] = {
                "mean_iou": float(flat.mean()),
                "found": int((flat > 0.5).sum()),
                "objects": int(flat.size),
                "per_scene": ious,
            }
    lines = [
        f"Masks from attention on {args.scenes} two-object scenes x {args.seeds} searches ({args.model}, "
        f"{args.mask_samples} forward pass(es) per search)",
        "",
        "| rule | mean IoU | objects with IoU > 0.5 | searches with both objects found | ... found but swapped |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, row in report["methods"].items():
        both = sum(min(search[:2]) > 0.5 for scene in row["per_scene"] for search in scene)
        swapped = sum(min(search[2:]) > 0.5 for scene in row["per_scene"] for search in scene)
        lines.append(
            f"| {method} | {row['mean_iou']:.2f} | {row['found']}/{row['objects']} | "
            f"{both}/{args.scenes * args.seeds} | {swapped}/{args.scenes * args.seeds} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.json:
        save_results(args.json, report, text)


if __name__ == "__main__":
    main()
