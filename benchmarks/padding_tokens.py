"""Does a shapes model read the colours of a two-object prompt from CLIP's padding tokens?

CLIP pads every prompt to 77 positions with copies of its end token, and in a causal encoder each of them has read
the whole prompt: a UNet that takes its colours from these summaries could only draw one mixture for both objects.
This samples the bench's two-object prompts (and single objects as a control) three ways: the full padded sequence
(what the pipeline does), the sequence cut after the end token, and cut before it (the words alone), and scores
each image with the detector. Per colour it counts how often a named colour was drawn at all.

Run: python benchmarks/padding_tokens.py [--model shapes-sd] [--num-seeds 4] [--threads 1]
     [--json benchmarks/results/padding-tokens-shapes-sd-cpu.json]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from _results import save_results

from attncontrol.models import load_pipeline
from attncontrol.shapes.bench import objects_present, single_object_cases, two_object_cases
from attncontrol.shapes.detector import detect
from attncontrol.training.common import cpu_label

KEEP = ("full", "through end token", "words only")


@torch.no_grad()
def embeddings(pipe, prompt: str, keep: str) -> torch.Tensor:
    """The text encoder's last hidden states of ``prompt``, cut as ``keep`` says."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    states = pipe.text_encoder(ids)[0]
    through_end = int((ids[0] == tokenizer.eos_token_id).nonzero()[0]) + 1
    return states[:, : {"full": ids.shape[1], "through end token": through_end, "words only": through_end - 1}[keep]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd", help="an SD-architecture model name or folder")
    parser.add_argument("--num-seeds", type=int, default=4, help="seeds per two-object prompt (single: half)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    cases = two_object_cases(args.num_seeds) + single_object_cases(max(1, args.num_seeds // 2))
    empty = embeddings(pipe, "", "full")  # the unconditional branch, cut to each prompt's length below
    rows = []
    for keep in KEEP:
        right, total, drawn, named = Counter(), Counter(), Counter(), Counter()
        for case in cases:
            prompt_embeds = embeddings(pipe, case.prompt, keep)
            image = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=empty[:, : prompt_embeds.shape[1]],
                num_inference_steps=25,
                guidance_scale=5.0,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(case.seed),
            ).images[0]
            found = detect(image)
            right[case.task] += objects_present(found, case.expected)
            total[case.task] += 1
            if case.task == "two objects":
                colours = {obj.color for obj in found}
                for colour, _shape in case.expected:
                    named[colour] += 1
                    drawn[colour] += colour in colours
        row = {"tokens": keep, **{task: [right[task], total[task]] for task in total}}
        row["named colour drawn (two objects)"] = {colour: [drawn[colour], named[colour]] for colour in sorted(named)}
        rows.append(row)
        print(row, flush=True)
    colours = sorted(rows[0]["named colour drawn (two objects)"])
    lines = [
        "| text tokens | two objects | single object | " + " | ".join(f"{c} drawn" for c in colours) + " |",
        "|---|---:|---:|" + "---:|" * len(colours),
    ]
    for row in rows:
        per_colour = row["named colour drawn (two objects)"]
        counts = [row["two objects"], row["single object"], *(per_colour[c] for c in colours)]
        cells = [f"{hit}/{of}" for hit, of in counts]
        lines.append(f"| {row['tokens']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        record = {"device": cpu_label(args.threads), "model": args.model, "num_seeds": args.num_seeds, "rows": rows}
        save_results(args.json, record, table)


if __name__ == "__main__":
    main()
