"""Consistent edits (MasaCtrl) on the shapes world: change an object's shape by prompt, keep its colour and place.

For each colour x (source shape -> target shape) pair and seed, the source prompt "a <colour> <shape>" and the target
prompt "a <colour> <new shape>" start from the same noise. With sharing, the target's decoder self-attention reads
the source's keys and values from step 4 of 50 (the pipeline's defaults); without, the target prompt is generated
alone from that noise. A case succeeds when the target shows the new shape in the source's colour within 4 px of
where the source object is; cases whose source image shows no single object of the asked kind are skipped.

Run: python benchmarks/consistent_edit.py [--seeds 4] [--json benchmarks/results/consistent-edit-cpu.json]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import platform

import numpy as np
import torch
from _results import save_results

from attncontrol.models import load_pipeline
from attncontrol.pipelines import ConsistentEditMixin, to_sharing
from attncontrol.pipelines.inversion import matched_sampling
from attncontrol.shapes.bench import wilson_interval
from attncontrol.shapes.detector import detect
from attncontrol.shapes.scenes import COLORS, SHAPES

GUIDANCE = 5.0
STEPS = 50


def uint8(image: np.ndarray) -> np.ndarray:
    return (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per colour x shape change (default: 4)")
    parser.add_argument("--json", default=None, help="write the counts here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    consistent = to_sharing(pipe, ConsistentEditMixin)
    counts = {"shared": 0, "unshared": 0, "cases": 0, "skipped": 0}
    changes = itertools.permutations(SHAPES, 2)
    for color, (shape, new_shape), seed in itertools.product(COLORS, changes, range(args.seeds)):
        source_prompt, target_prompt = f"a {color} {shape}", f"a {color} {new_shape}"
        latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed))
        common = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "output_type": "np"}
        source, shared = consistent(
            source_prompt, target_prompt, latents=latents, height=64, width=64, return_source=True, **common
        ).images
        found = [obj for obj in detect(uint8(source)) if obj.matches(color, shape)]
        if len(found) != 1:
            counts["skipped"] += 1
            continue
        place = found[0].centroid
        with matched_sampling(pipe):  # the same DDIM schedule the consistent-edit pipeline samples with
            alone = pipe(target_prompt, latents=latents.clone(), height=64, width=64, **common).images[0]
        counts["cases"] += 1
        for name, image in (("shared", shared), ("unshared", alone)):
            counts[name] += any(
                obj.matches(color, new_shape) and np.hypot(*np.subtract(obj.centroid, place)) <= 4.0
                for obj in detect(uint8(image))
            )
    lines = [f"consistent edits on shapes-sd ({platform.machine()}, {STEPS} DDIM steps, guidance {GUIDANCE}):"]
    for name in ("shared", "unshared"):
        low, high = wilson_interval(counts[name], counts["cases"])
        lines.append(f"  {name:9s} {counts[name]}/{counts['cases']} ({low:.0%} - {high:.0%})")
    lines.append(f"  skipped (source not one object of the asked kind): {counts['skipped']}")
    print("\n".join(lines))
    if args.json:
        save_results(args.json, {"machine": platform.machine(), "steps": STEPS, "guidance": GUIDANCE, **counts})


if __name__ == "__main__":
    main()
