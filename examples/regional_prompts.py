"""Regional prompts: say what goes where, with boxes tied to phrases of the prompt (or to their own prompts).

    python examples/regional_prompts.py                                   # shipped shapes model, left/right boxes
    python examples/regional_prompts.py --model path/or/hub-id --size 512 512
    python examples/regional_prompts.py --region-prompts                  # each box gets its own prompt instead

Writes the uncontrolled image, the regional one, a picture of the layout and the regional cross-attention heat maps
of both phrases side by side (``strip.png``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from attncontrol import token_indices
from attncontrol.controls import Region
from attncontrol.models import family_call_kwargs, load_pipeline
from attncontrol.pictures import strip
from attncontrol.pipelines import to_regional

COLORS = [(220, 40, 40), (40, 70, 220), (40, 170, 60), (235, 205, 35)]


def layout_picture(regions: list[Region], phrases: list[str], size: tuple[int, int]) -> Image.Image:
    """The boxes in their colours on white, one per region (relative boxes scaled to the image)."""
    height, width = size
    picture = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(picture)
    for index, (region, phrase) in enumerate(zip(regions, phrases, strict=True)):
        x0, y0, x1, y1 = region.mask
        draw.rectangle((x0 * width, y0 * height, x1 * width - 1, y1 * height - 1), outline=COLORS[index % 4], width=2)
        if (x1 - x0) * width >= 8 * len(phrase):  # label only where it fits
            draw.text((x0 * width + 3, y0 * height + 2), phrase, fill=COLORS[index % 4])
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a name, a local diffusers folder or a hub id")
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--phrases", nargs="+", default=["red circle", "blue square"])
    parser.add_argument("--region-prompts", action="store_true", help="give each box its own prompt 'a <phrase>'")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/regional_prompts"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    pipe = to_regional(load_pipeline(args.model))  # the Regional* twin, sharing the loaded components
    count = len(args.phrases)
    boxes = [(index / count, 0.0, (index + 1) / count, 1.0) for index in range(count)]  # side-by-side columns
    if args.region_prompts:
        regions = [Region.box(box, prompt=f"a {phrase}") for box, phrase in zip(boxes, args.phrases, strict=True)]
    else:
        regions = [Region.box(box, phrase=phrase) for box, phrase in zip(boxes, args.phrases, strict=True)]

    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    if args.size:
        call.update(height=args.size[0], width=args.size[1])
    call = family_call_kwargs(pipe, call, batch=1)  # Flux shapes model: true CFG with an empty negative prompt
    plain = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **call).images[0]
    seeded = torch.Generator().manual_seed(args.seed)
    output = pipe(args.prompt, regions=regions, return_attention_maps=True, generator=seeded, **call)
    image, store = output.images[0], output.attention_maps

    args.out.mkdir(parents=True, exist_ok=True)
    plain.save(args.out / "uncontrolled.png")
    image.save(args.out / "regional.png")
    layout = layout_picture(regions, args.phrases, (image.height, image.width))
    layout.save(args.out / "layout.png")
    panels = [layout, plain, image]
    if not args.region_prompts:
        tokenizer = pipe.tokenizer_2 if hasattr(pipe, "transformer") else pipe.tokenizer
        for phrase in args.phrases:
            panels.append(store.heatmap(token_indices(tokenizer, args.prompt, phrase), image=image))
    strip(panels).save(args.out / "strip.png")
    print(f"wrote {args.out}/uncontrolled.png, regional.png, layout.png, strip.png")


if __name__ == "__main__":
    main()
