"""Concept extraction on the shapes world: each method learns one token per object of rendered two-object scenes,
then ``"a photo of <token_i>"`` is sampled and scored by the detector (object i drawn, the other one not).

Methods (``attncontrol.shapes.concept_bench.METHODS``): ``user-masks`` (Break-A-Scene), ``attention-masks``
(AttenCraft's masks), and the baselines ``textual-inversion`` / ``dreambooth-lora`` without masks or attention loss
(plus their ``-masked`` variants). Every method gets the same steps. ``words`` trains nothing: it names each object
in words ("a photo of a green square"), the ceiling a learned token can be expected to reach on the model. Prints a
markdown table with Wilson 95% intervals and the training minutes; writes a JSON of every sample and the sample
images under ``--out``.

Run: python benchmarks/concepts.py [--scenes 6] [--samples 16] [--methods user-masks attention-masks ...]
     [--phase1-steps 400 --phase2-steps 400] [--set lora_rank=8 ...] [--tag NAME] [--json report.json]
     python benchmarks/concepts.py --recipe guided-embeddings --caption-words   # the settings measured best
     python benchmarks/concepts.py --merge a.json b.json --json benchmarks/results/concepts-shapes-sd-cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import torch
from _results import save_results

from attncontrol.shapes.bench import wilson_interval
from attncontrol.shapes.concept_bench import (
    FAILURE_KINDS,
    METHODS,
    WORDS,
    caption_words,
    case_failures,
    concept_scenes,
    run_concept_case,
)
from attncontrol.training.concepts import RECIPES, Config, recipe_config


def _override(config: Config, items: list[str]) -> Config:
    types = {item.name: type(getattr(config, item.name)) for item in fields(Config)}
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set: {key!r} is not a training option ({sorted(types)})")
        kind = types[key]
        if kind is list:
            changes[key] = [part for part in value.split(",") if part]
        else:
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
        choices=[*sorted(METHODS), WORDS],
    )
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--phase1-steps", type=int, default=None)
    parser.add_argument("--phase2-steps", type=int, default=None)
    parser.add_argument(
        "--recipe", default="break-a-scene", choices=list(RECIPES), help="named training settings, under --set"
    )
    parser.add_argument("--set", nargs="*", default=[], help="other training options, key=value (lists: a,b,c)")
    parser.add_argument(
        "--caption-words",
        action="store_true",
        help="the initializer search (--set init_search=N) picks from the words of the shapes world's captions",
    )
    parser.add_argument("--out", default="outputs/concept-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="label the methods' rows, e.g. --tag 'paper defaults'")
    parser.add_argument("--merge", nargs="+", default=None, help="combine these JSON reports; train nothing")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json)
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    base = recipe_config(args.recipe, model=args.model, validation_seeds=0, checkpoint_every=10_000)
    if args.phase1_steps is not None:
        base = replace(base, phase1_steps=args.phase1_steps)
    if args.phase2_steps is not None:
        base = replace(base, phase2_steps=args.phase2_steps)
    base = _override(base, args.set)
    if args.caption_words:
        base = replace(base, init_words=caption_words())
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

    label = f"{{}} ({args.tag})" if args.tag else "{}"
    cases = [dict(r.to_json(), method=label.format(r.method)) for r in results]
    header = (
        f"Concept bench on {args.model}: {len(scenes)} two-object scenes x 2 tokens x {args.samples} samples "
        f"({args.steps} sampling steps); training {base.phase1_steps} + {base.phase2_steps} steps"
        + (f", recipe {args.recipe}" if args.recipe != "break-a-scene" else "")
        + (f", {' '.join(args.set)}" if args.set else "")
        + f"; {platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    report = {"header": [header], "rows": summarize(cases), "cases": cases, "config": base.__dict__}
    write_report(report, args.json)


def summarize(cases: list[dict]) -> list[dict]:
    """One row per method label: token successes over all scenes, the worst token, joint successes, minutes, and
    the failed token images by kind (``FAILURE_KINDS``)."""
    rows = []
    for method in dict.fromkeys(case["method"] for case in cases):
        mine = [case for case in cases if case["method"] == method]
        rows.append(
            {
                "method": method,
                "successes": sum(sum(case["token_successes"]) for case in mine),
                "total": sum(len(case["token_successes"]) * case["samples"] for case in mine),
                "worst_token": min(min(case["token_successes"]) / case["samples"] for case in mine),
                "joint": sum(case["joint_successes"] for case in mine),
                "joint_total": sum(case["samples"] for case in mine),
                "minutes": [case["train_minutes"] for case in mine],
                "failures": Counter(kind for case in mine for kind in case_failures(case)),
            }
        )
    return rows


def write_report(report: dict, json_path: str | None) -> None:
    """Print the markdown table (Wilson 95% intervals) and, with ``json_path``, save it and the JSON beside it."""
    lines = [*report["header"], ""]
    lines += [
        "| method | token i drawn, other not | 95% CI | worst token | both tokens drawn | train min (mean / max) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in report["rows"]:
        hits, total, minutes = row["successes"], row["total"], row["minutes"]
        low, high = wilson_interval(hits, total)
        lines.append(
            f"| {row['method']} | {hits}/{total} ({hits / total:.1%}) | {low:.1%} - {high:.1%} | "
            f"{row['worst_token']:.0%} | {row['joint']}/{row['joint_total']} ({row['joint'] / row['joint_total']:.1%}) "
            f"| {sum(minutes) / len(minutes):.1f} / {max(minutes):.1f} |"
        )
    lines += ["", "Failed token images, by what was drawn instead:", ""]
    lines += [f"| method | failed | {' | '.join(FAILURE_KINDS)} |", "|---|" + "---:|" * (len(FAILURE_KINDS) + 1)]
    for row in report["rows"]:
        failures = row["failures"]
        counts = " | ".join(str(failures.get(kind, 0)) for kind in FAILURE_KINDS)
        lines.append(f"| {row['method']} | {sum(failures.values())} | {counts} |")
    text = "\n".join(lines)
    print(text)
    if json_path:
        save_results(json_path, report, text)


def merge(paths: list[str], json_path: str | None) -> None:
    """Combine reports of runs made in parallel (e.g. one process per method) into one table."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    cases = [case for report in reports for case in report["cases"]]
    header = list(dict.fromkeys(line for report in reports for line in report.get("header", [])))
    scenes = len({case["scene"] for case in cases})
    header.append(f"Merged from {len(paths)} runs (each header above is one run's): {scenes} scenes in all")
    write_report({"header": header, "rows": summarize(cases), "cases": cases, "sources": paths}, json_path)


if __name__ == "__main__":
    main()
