"""Does a shapes model's text encoder bind colours to shapes? A linear probe on its shape tokens.

For every two-object prompt of the bench's kind ("a red circle and a blue square": 72 prompts), the text encoder's
last hidden state at each shape word is fed to a logistic-regression probe asked for that object's colour (6-fold
cross-validation; chance is 25%). A UNet can only draw "the square is blue" if the square's token says so: the token
of the first shape has just read its colour, the second one has read both.

Run: python benchmarks/text_binding.py [--model shapes-sd] [--model runs/x/pipeline ...]
     [--json benchmarks/results/text-binding-cpu.json]
"""

from __future__ import annotations

import argparse
import platform

import torch
from _results import save_results

from attncontrol.models import load_pipeline
from attncontrol.training.binding import linear_probe_accuracy, shape_token_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help="a model name or folder (repeatable)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows = []
    for model in args.model or ["shapes-sd"]:
        pipe = load_pipeline(model)
        states = shape_token_states(pipe.tokenizer, pipe.text_encoder)
        row = {"model": model}
        for word, (features, labels) in states.items():
            row[f"{word}_shape_token"] = linear_probe_accuracy(features, labels)
        rows.append(row)
    lines = [
        "| model | first shape token -> its colour | second shape token -> its colour |",
        "|---|---:|---:|",
        *(f"| {r['model']} | {r['first_shape_token']:.1%} | {r['second_shape_token']:.1%} |" for r in rows),
    ]
    table = "\n".join(lines)
    print(table)
    if args.json:
        device = f"CPU ({platform.machine()}), torch {torch.__version__}"
        save_results(args.json, {"device": device, "prompts": 72, "folds": 6, "rows": rows}, table)


if __name__ == "__main__":
    main()
