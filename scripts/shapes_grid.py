"""Draw a grid of shapes-world scenes with their captions (docs/shapes-scenes.png).

python scripts/shapes_grid.py --seed 0 --count 8 --out docs/shapes-scenes.png
"""

from __future__ import annotations

import argparse
import textwrap

from PIL import Image, ImageDraw

from attncontrol.shapes import SceneGenerator

CELL = 192
TEXT = 44


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--out", default="docs/shapes-scenes.png")
    args = parser.parse_args()

    rows = -(-args.count // args.columns)
    sheet = Image.new("RGB", (args.columns * CELL, rows * (CELL + TEXT)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, scene in enumerate(SceneGenerator(args.seed).batch(0, args.count)):
        x, y = (index % args.columns) * CELL, (index // args.columns) * (CELL + TEXT)
        sheet.paste(Image.fromarray(scene.image).resize((CELL, CELL), Image.NEAREST), (x, y))
        for line_no, line in enumerate(textwrap.wrap(scene.caption, 30)[:3]):
            draw.text((x + 4, y + CELL + 2 + 13 * line_no), line, fill="black")
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
