"""Edit a real image: remove an object, move it, resize and flip it, zoom out (DesignEdit's layered edits).

    python examples/layered_edits.py                          # a rendered shapes scene, the shipped shapes model
    python examples/layered_edits.py --image photo.png --mask object.png --model path/or/hub-id --offset 40 0

Writes every result and ``strip.png``: input, removed, moved, resized + flipped, zoomed out. The input is a real
image (the shapes scene is rendered, not generated): each edit inverts it and edits from the inversion.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from attncontrol.models import load_pipeline
from attncontrol.pictures import strip
from attncontrol.pipelines import Layer, to_editing
from attncontrol.pipelines.editing import LayeredEditMixin, RemoveMixin
from attncontrol.shapes.scenes import ObjectSpec, render


def demo_scene() -> tuple[Image.Image, np.ndarray]:
    scene = render([ObjectSpec("red", "triangle", 18, 22, 9), ObjectSpec("blue", "circle", 44, 40, 8)], "white")
    return Image.fromarray(scene.image), scene.objects[0].mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd", help="an SD, SDXL or Flux model (name, folder or hub id)")
    parser.add_argument("--image", default=None, help="the image to edit (default: a rendered shapes scene)")
    parser.add_argument("--mask", default=None, help="the object's mask (white = object); needed with --image")
    parser.add_argument("--offset", type=float, nargs=2, default=(4.0, 22.0), metavar=("DX", "DY"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="outputs/layered_edits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.image:
        if not args.mask:
            parser.error("--mask is required with --image")
        image, mask = Image.open(args.image).convert("RGB"), Image.open(args.mask)
    else:
        image, mask = demo_scene()
    pipe = load_pipeline(args.model)
    remover, editor = to_editing(pipe, RemoveMixin), to_editing(pipe, LayeredEditMixin)
    steps = {"num_inference_steps": args.steps}
    results = {
        "input": image,
        "removed": remover(image, mask, **steps).images[0],
        "moved": editor(image, [Layer(mask, offset=tuple(args.offset))], **steps).images[0],
        "resized_flipped": editor(
            image, [Layer(mask, offset=tuple(args.offset), scale=1.3, flip="vertical")], **steps
        ).images[0],
        "zoomed_out": editor(image, zoom=0.7, **steps).images[0],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, picture in results.items():
        picture.save(out / f"{name}.png")
    strip(list(results.values())).save(out / "strip.png")
    logging.info("wrote %s", ", ".join(f"{name}.png" for name in results) + ", strip.png to " + str(out))


if __name__ == "__main__":
    main()
