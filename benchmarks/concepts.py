"""Concept extraction on the shapes world: each method learns one token per object of rendered two-object scenes,
then ``"a photo of <token_i>"`` is sampled and scored by the detector (object i drawn, the other one not).

Methods (``attncontrol.shapes.concept_bench.METHODS``): ``user-masks`` (Break-A-Scene), ``attention-masks``
(AttenCraft's masks), and the baselines ``textual-inversion`` / ``dreambooth-lora`` without masks or attention loss
(plus their ``-masked`` variants). Every method gets the same steps. Prints a markdown table with Wilson 95%
intervals and the training minutes; writes a JSON of every sample and the sample images under ``--out``.

Run: python benchmarks/concepts.py [--scenes 6] [--samples 16] [--methods user-masks attention-masks ...]
     [--phase1-steps 400 --phase2-steps 400] [--set lora_rank=8 ...] [--json benchmarks/results/concepts-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from dataclasses import fields, replace
from pathlib import Path

import torch

from attncontrol.shapes.bench import wilson_interval
from attncontrol.shapes.concept_bench import METHODS, concept_scenes, run_concept_case
from attncontrol.training.concepts import Config


def _override(config: Config, items: list[str]) -> Config:
    types = {item.name: type(getattr(config, item.name)) for item in fields(Config)}
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set: {key!r} is not a training option ({sorted(types)})")
        kind = types[key]
        changes[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return replace(config, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--scene-offset", type=int, default=0, help="skip this many scenes of the fixed list")
    parser.add_argument("--samples", type=int, default=16, help="images per token prompt")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["user-masks", "attention-masks", "textual-inversion", "dreambooth-lora"],
        choices=sorted(METHODS),
    )
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--phase1-steps", type=int, default=None)
    parser.add_argument("--phase2-steps", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], help="other training options, key=value")
    parser.add_argument("--out", default="outputs/concept-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    base = Config(model=args.model, validation_seeds=0, checkpoint_every=10_000)
    if args.phase1_steps is not None:
        base = replace(base, phase1_steps=args.phase1_steps)
    if args.phase2_steps is not None:
        base = replace(base, phase2_steps=args.phase2_steps)
    base = _override(base, args.set)
    scenes = concept_scenes(args.scene_offset + args.scenes)[args.scene_offset :]
    results = []
    for method in args.methods:
        for index, scene in enumerate(scenes, start=args.scene_offset):
            folder = Path(args.out) / method / f"scene{index:02d}"
            result = run_concept_case(method, index, scene, folder, base=base, samples=args.samples, steps=args.steps)
            results.append(result)
            print(
                f"{method} scene {index} {result.objects}: tokens {result.token_successes}/{result.samples}, "
                f"joint {result.joint_successes}/{result.samples}, {result.train_minutes:.1f} min",
                flush=True,
            )

    lines = [
        f"Concept bench on {args.model}: {len(scenes)} two-object scenes x 2 tokens x {args.samples} samples "
        f"({args.steps} sampling steps); training {base.phase1_steps} + {base.phase2_steps} steps; "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "",
        "| method | token i drawn, other not | 95% CI | worst token | both tokens drawn | train min (mean / max) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    rows = []
    for method in args.methods:
        mine = [r for r in results if r.method == method]
        hits = sum(sum(r.token_successes) for r in mine)
        total = sum(len(r.token_successes) * r.samples for r in mine)
        worst = min(min(r.token_successes) / r.samples for r in mine)
        joint = sum(r.joint_successes for r in mine)
        joint_total = sum(r.samples for r in mine)
        minutes = [r.train_minutes for r in mine]
        low, high = wilson_interval(hits, total)
        lines.append(
            f"| {method} | {hits}/{total} ({hits / total:.1%}) | {low:.1%} - {high:.1%} | {worst:.0%} | "
            f"{joint}/{joint_total} ({joint / joint_total:.1%}) | {sum(minutes) / len(minutes):.1f} / "
            f"{max(minutes):.1f} |"
        )
        rows.append(
            {
                "method": method,
                "successes": hits,
                "total": total,
                "worst_token": worst,
                "joint": joint,
                "joint_total": joint_total,
                "minutes": minutes,
            }
        )
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "cases": [r.to_json() for r in results], "config": base.__dict__}, indent=2)
        )
        Path(args.json).with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
