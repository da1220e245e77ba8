"""Learn one token per object of a single image, then use them in a stock diffusers pipeline (Break-A-Scene).

    python examples/concept_extraction.py                         # a rendered shapes scene, the shipped model
    python examples/concept_extraction.py --auto-masks            # masks found from attention (AttenCraft)
    python examples/concept_extraction.py --image photo.png --masks a.png b.png --initializers cat dog \\
        --model stabilityai/stable-diffusion-2-1-base --out outputs/my-concepts

Trains (``attncontrol.training.concepts``), then loads the result into a *fresh* pipeline with diffusers' own
``load_textual_inversion`` / ``load_lora_weights`` (through ``attncontrol.concepts.load_concepts``) and writes
``strip.png``: the input, each token alone, and all of them together in one prompt.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attncontrol.concepts import concept_prompt, load_concepts
from attncontrol.models import load_pipeline
from attncontrol.pictures import strip
from attncontrol.shapes.scenes import ObjectSpec, render
from attncontrol.training.concepts import Config, train_concepts


def demo_inputs(folder: Path) -> tuple[Path, list[Path]]:
    """A red circle and a blue square on white, with their exact masks."""
    scene = render([ObjectSpec("red", "circle", 20, 22, 10), ObjectSpec("blue", "square", 44, 42, 9)], "white")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(folder / "scene.png")
    masks = []
    for index, obj in enumerate(scene.objects):
        Image.fromarray((obj.mask * 255).astype(np.uint8)).save(folder / f"mask{index}.png")
        masks.append(folder / f"mask{index}.png")
    return folder / "scene.png", masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd", help="an SD 1.x/2.x or SDXL model (name, folder or hub id)")
    parser.add_argument("--image", default=None, help="the image (default: a rendered shapes scene)")
    parser.add_argument("--masks", nargs="*", default=None, help="one mask per object (white = object)")
    parser.add_argument("--initializers", nargs="*", default=["circle", "square"], help="a class word per object")
    parser.add_argument("--auto-masks", action="store_true", help="find the masks from attention instead")
    parser.add_argument("--phase1-steps", type=int, default=400)
    parser.add_argument("--phase2-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps of the pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/concept_extraction")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    out = Path(args.out)
    if args.image:
        image, masks = Path(args.image), [Path(m) for m in args.masks or []]
    else:
        image, masks = demo_inputs(out / "inputs")
    config = Config(
        out=str(out / "run"),
        model=args.model,
        image=str(image),
        masks=[] if args.auto_masks else [str(m) for m in masks],
        mask_source="attention" if args.auto_masks else "user",
        num_concepts=len(args.initializers),
        initializers=args.initializers,
        phase1_steps=args.phase1_steps,
        phase2_steps=args.phase2_steps,
        validation_seeds=0,
    )
    trained = train_concepts(config)

    # A user's side: a fresh stock pipeline, the stock loaders, plain prompts with the new tokens.
    pipe = load_pipeline(args.model)
    tokens = load_concepts(pipe, trained.out)
    prompts = [config.template.format(token) for token in tokens] + [concept_prompt(tokens, config.template)]
    pictures = [Image.open(image).convert("RGB")]
    for prompt in prompts:
        generator = torch.Generator("cpu").manual_seed(args.seed)
        pictures.append(pipe(prompt, num_inference_steps=args.steps, generator=generator).images[0])
        logging.info("%s -> picture %d", prompt, len(pictures) - 1)
    strip(pictures).save(out / "strip.png")
    logging.info("wrote %s (input, %s)", out / "strip.png", ", ".join(prompts))


if __name__ == "__main__":
    main()
