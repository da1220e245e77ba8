"""Drag an object of a real image, put an object from another image into it, and edit by prompt keeping appearance.

    python examples/drag_and_compose.py                       # rendered shapes scenes, the shipped shapes model
    python examples/drag_and_compose.py --model path/or/hub-id --image photo.png --mask object.png \\
        --reference other.png --reference-mask other_object.png --box 300 200 460 360 --offset 80 0

Writes every result and ``strip.png``: input, dragged, reference, composed. The inputs are real images (the shapes
scenes are rendered, not generated): each edit inverts them and edits from the inversions.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from attncontrol.models import load_pipeline
from attncontrol.pictures import strip
from attncontrol.pipelines import ComposeMixin, DragMixin, to_sharing
from attncontrol.shapes.scenes import ObjectSpec, render


def demo_scenes() -> tuple[Image.Image, np.ndarray, Image.Image, np.ndarray]:
    scene = render([ObjectSpec("red", "square", 18, 20, 8), ObjectSpec("blue", "circle", 46, 46, 7)], "white")
    reference = render([ObjectSpec("yellow", "triangle", 20, 44, 9)], "gray")
    drag = (Image.fromarray(scene.image), scene.objects[0].mask)
    return (*drag, Image.fromarray(reference.image), reference.objects[0].mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd", help="an SD, SDXL or Flux model (name, folder or hub id)")
    parser.add_argument("--image", default=None, help="the image to edit (default: a rendered shapes scene)")
    parser.add_argument("--mask", default=None, help="the object to drag (white = object); needed with --image")
    parser.add_argument("--reference", default=None, help="an image holding the object to compose in")
    parser.add_argument("--reference-mask", default=None, help="that object's mask; needed with --reference")
    parser.add_argument("--offset", type=float, nargs=2, default=(0.0, 16.0), metavar=("DX", "DY"))
    parser.add_argument("--box", type=float, nargs=4, default=(36.0, 6.0, 56.0, 26.0), metavar=("X0", "Y0", "X1", "Y1"))
    parser.add_argument("--prompt", default="a red square, a blue circle and a yellow triangle")
    parser.add_argument("--object-phrase", default="yellow triangle", help="the composed object's words in --prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="outputs/drag_and_compose")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    image, mask, reference, reference_mask = demo_scenes()
    if args.image:
        if not args.mask:
            parser.error("--mask is required with --image")
        image, mask = Image.open(args.image).convert("RGB"), Image.open(args.mask)
    if args.reference:
        if not args.reference_mask:
            parser.error("--reference-mask is required with --reference")
        reference, reference_mask = Image.open(args.reference).convert("RGB"), Image.open(args.reference_mask)
    pipe = load_pipeline(args.model)
    drag, compose = to_sharing(pipe, DragMixin), to_sharing(pipe, ComposeMixin)
    dragged = drag(image, mask, tuple(args.offset), prompt=args.prompt, num_inference_steps=args.steps).images[0]
    composed = compose(
        dragged,
        reference,
        reference_mask,
        tuple(args.box),
        prompt=args.prompt,
        object_phrase=args.object_phrase,
        num_inference_steps=args.steps,
    ).images[0]
    results = {"input": image, "dragged": dragged, "reference": reference, "composed": composed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, picture in results.items():
        picture.save(out / f"{name}.png")
    strip(list(results.values())).save(out / "strip.png")
    logging.info("wrote %s", ", ".join(f"{name}.png" for name in results) + ", strip.png to " + str(out))


if __name__ == "__main__":
    main()
