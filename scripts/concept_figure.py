"""Draw the concept-extraction picture (docs/concepts.png) from a `benchmarks/concepts.py` output folder.

One row per method and scene: the training image, the two masks the method trained with (the user's, the last masks
found in the model's attention, or grey when it used none), then samples of "a photo of <asset0>" and of
"a photo of <asset1>".

python scripts/concept_figure.py outputs/concept-bench/final --scenes 0 5 --samples 3 --out docs/concepts.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from attncontrol.concepts import latest_mask_images
from attncontrol.pictures import strip


def masks_of(case: Path) -> list[Path]:
    """The masks a case trained with: the last refresh from attention if there is one, else the user's (none for the
    baselines that use no masks)."""
    config = json.loads((case / "run" / "config.json").read_text())
    if not config["masked_loss"] and config["attention_loss"] == "none":
        return []
    return latest_mask_images(case / "run" / "masks") or sorted((case / "inputs").glob("mask*.png"))


def row(case: Path, samples: int) -> Image.Image:
    pictures = [Image.open(case / "inputs" / "scene.png")]
    masks = [Image.open(path).convert("RGB").resize(pictures[0].size) for path in masks_of(case)]
    pictures += masks or [Image.new("RGB", pictures[0].size, "gray")] * 2  # grey: trained without masks
    for token in (0, 1):
        pictures += [Image.open(path) for path in sorted((case / "samples").glob(f"token{token}-*.png"))[:samples]]
    return strip(pictures, min_height=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the --out folder of benchmarks/concepts.py")
    parser.add_argument("--scenes", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, default=3, help="samples per token")
    parser.add_argument(
        "--methods", nargs="+", default=["user-masks", "attention-masks", "textual-inversion", "dreambooth-lora"]
    )
    parser.add_argument("--out", type=Path, default=Path("docs/concepts.png"))
    args = parser.parse_args()
    cases = [args.folder / method / f"scene{scene:02d}" for scene in args.scenes for method in args.methods]
    missing = [str(case) for case in cases if not (case / "samples").is_dir()]
    if missing:
        raise SystemExit(f"no samples under {', '.join(missing)}: run benchmarks/concepts.py with that --out first")
    rows = [row(case, args.samples) for case in cases]
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 4 * (len(rows) - 1)), "white")
    top = 0
    for picture in rows:
        canvas.paste(picture, (0, top))
        top += picture.height + 4
    canvas.save(args.out)


if __name__ == "__main__":
    main()
