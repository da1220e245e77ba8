"""Compare regional-prompt settings on the shapes world's layout cases (same layouts and seeds for every variant).

    python benchmarks/regional_variants.py --num-seeds 3
    python benchmarks/regional_variants.py --variants default self3 prompts
    python benchmarks/regional_variants.py --variants default optimized --model shapes-flux
    python benchmarks/regional_variants.py --model shapes-flux --seed-offset 1000 --guidance-scale 4

Prints, per variant, how many cases put every object in its box with the right colour and shape. The bench's
``layout`` task is the ``default`` variant; this script is for finding better settings before changing defaults.
"""

from __future__ import annotations

import argparse
import time

import torch

from attncontrol.controls import Region
from attncontrol.models import load_pipeline
from attncontrol.pipelines import to_regional
from attncontrol.shapes import detect
from attncontrol.shapes.bench import case_success, layout_cases, regional_call_kwargs, regions_for
from attncontrol.shapes.losses import region_color_loss

VARIANTS: dict[str, dict] = {
    "default": {},
    "self1": {"region_options": {"self_strength": 1.0}},
    "self3": {"region_options": {"self_strength": 3.0, "modulation_until": 0.6}},
    "self3-until0.4": {"region_options": {"self_strength": 3.0, "modulation_until": 0.4}},
    "self3-always": {"region_options": {"self_strength": 3.0, "modulation_until": 1.0}},
    "self5": {"region_options": {"self_strength": 5.0, "modulation_until": 0.6}},
    "self10": {"region_options": {"self_strength": 10.0, "modulation_until": 0.6}},
    "self30": {"region_options": {"self_strength": 30.0, "modulation_until": 0.6}},
    # CLIP's end and padding tokens written after another region's phrase stay visible inside each region.
    "keep-leaks": {"region_options": {"hide_leaks": False}},
    "keep-leaks-self3": {"region_options": {"hide_leaks": False, "self_strength": 3.0, "modulation_until": 0.6}},
    "weight3": {"weight": 3.0},
    "soft": {"region_mode": "soft"},
    "prompts": {"prompts": True},
    "prompts-base0.3": {"prompts": True, "base_weight": 0.3},
    "prompts-base0": {"prompts": True, "base_weight": 0.0},
    "prompts-base0-self3": {
        "prompts": True,
        "base_weight": 0.0,
        "region_options": {"self_strength": 3.0, "modulation_until": 0.6},
    },
    # Spatial-Temporal control: per-step weights optimized per image against the shapes-world colour loss.
    "optimized": {"optimize": {}},
    "optimized-lr0.3": {"optimize": {"lr": 0.3}},
    "optimized-self3": {"optimize": {}, "region_options": {"self_strength": 3.0, "modulation_until": 0.4}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--num-seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--seed-offset", type=int, default=0, help="move every seed by N: choose settings on held-out seeds"
    )
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()

    pipe = to_regional(load_pipeline(args.model))
    groups: dict[tuple, list] = {}
    for case in layout_cases(args.num_seeds, seed_offset=args.seed_offset):
        groups.setdefault((case.prompt, case.boxes), []).append(case)
    for name in args.variants:
        options = dict(VARIANTS[name])
        use_prompts = options.pop("prompts", False)
        weight = options.pop("weight", None)
        optimize = options.pop("optimize", None)
        started, placed, total = time.perf_counter(), 0, 0
        for (prompt, boxes), cases in groups.items():
            if use_prompts:
                pairs = zip(cases[0].expected, boxes, strict=True)
                regions = [Region.box(box, prompt=f"a {color} {shape}") for (color, shape), box in pairs]
            else:
                regions = regions_for(cases[0])
            if weight is not None:
                for region in regions:
                    region.weight = weight
            if optimize is not None:
                for case in cases:
                    result = pipe.optimize_region_weights(
                        prompt,
                        regions=regions,
                        loss_fn=region_color_loss,
                        seed=case.seed,
                        progress=False,
                        num_inference_steps=args.steps,
                        height=64,
                        width=64,
                        **regional_call_kwargs(pipe, {"guidance_scale": args.guidance_scale}, 1),
                        **optimize,
                        **options,
                    )
                    placed += case_success(case, detect(result.images[0]))
                    total += 1
                continue
            output = pipe(
                prompt,
                regions=regions,
                num_inference_steps=args.steps,
                height=64,
                width=64,
                num_images_per_prompt=len(cases),
                generator=[torch.Generator().manual_seed(case.seed) for case in cases],
                **regional_call_kwargs(pipe, {"guidance_scale": args.guidance_scale}, len(cases)),
                **options,
            )
            placed += sum(case_success(case, detect(image)) for case, image in zip(cases, output.images, strict=True))
            total += len(cases)
        print(f"{name}: {placed}/{total} placed ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
