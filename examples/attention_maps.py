"""Attention heat maps of chosen words, for any supported pipeline (DAAM-style).

    python examples/attention_maps.py --prompt "a red circle and a blue square" --words red "blue square"
    python examples/attention_maps.py --model tiny-flux --words red
    python examples/attention_maps.py --model /path/to/a/diffusers/folder --words cat --steps 30

Writes the image, one heat map per word, and a side-by-side strip to --out.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from attncontrol import AttentionController, AttentionStore
from attncontrol.models import load_pipeline
from attncontrol.pictures import strip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="built-in name, local folder or hub id (default: tiny-sd)")
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--words", nargs="+", default=["red", "blue square"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 96), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/attention_maps"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    pipe = load_pipeline(args.model)
    # Only the conditional rows: the unconditional half of CFG attends to an empty prompt.
    store = AttentionStore(guidance="cond")
    with AttentionController(pipe, [store]) as controller:
        tokens = {word: controller.token_indices(args.prompt, word, name="--words") for word in args.words}
        image = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            height=args.size[0],
            width=args.size[1],
            generator=torch.Generator("cpu").manual_seed(args.seed),
        ).images[0]

    args.out.mkdir(parents=True, exist_ok=True)
    image.save(args.out / "image.png")
    panels = [image]
    for word, indices in tokens.items():
        heat = store.heatmap(indices, image=image)
        heat.save(args.out / f"{word.replace(' ', '_')}.png")
        panels.append(heat)
    strip(panels, min_height=image.height).save(args.out / "strip.png")
    print(f"wrote {len(panels) + 1} images to {args.out}")


if __name__ == "__main__":
    main()
