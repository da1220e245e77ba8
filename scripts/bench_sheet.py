"""Look at a shapes bench run: a prompts x seeds sheet of its images and what the detector read in them.

python scripts/bench_sheet.py runs/bench --task "single object" --seeds 8 --out sheet.png

The success rate says how often a model got everything right; this says how it failed. Per task it prints how many
images hold every named colour, only named colours, nothing at all, and how many detected objects had a shape the
detector could read (a blob of the right colour with no readable shape counts as a miss in the bench). The sheet puts
one prompt per row and the first ``--seeds`` seeds across, so a layout that comes from the seed rather than the
prompt shows up as a column of the same blob in every colour. Per colour it prints how often a named colour was
drawn at all: a model that lets one colour win both objects of a pair shows it here (the shipped shapes-sd on two
objects, 4 seeds: blue 52/52, yellow 39/40, red 30/56, green 6/44).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

LABEL = 170  # pixels left of each row for its prompt (up to three lines of 27 characters)


def failure_summary(records: list[dict]) -> dict[str, dict[str, int]]:
    """Per task: images, successes, images with every named colour / only named colours / no object, detected objects
    and those with a readable shape."""
    summary: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in records:
        row = summary[record["case"]["task"]]
        named = {color for color, _shape in record["case"]["expected"]}
        colors = {found["color"] for found in record["detected"]}
        row["images"] += 1
        row["success"] += bool(record["success"])
        row["every named colour"] += named <= colors
        row["only named colours"] += bool(colors) and colors <= named
        row["empty"] += not record["detected"]
        row["objects"] += len(record["detected"])
        row["shape read"] += sum(found["shape"] != "unknown" for found in record["detected"])
    return {task: dict(row) for task, row in summary.items()}


def colour_presence(records: list[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per task and colour: (images where the colour was named and drawn, images where it was named)."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for record in records:
        drawn = {found["color"] for found in record["detected"]}
        for color in {color for color, _shape in record["case"]["expected"]}:
            count = counts[record["case"]["task"]][color]
            count[0] += color in drawn
            count[1] += 1
    return {task: {color: (hit, named) for color, (hit, named) in sorted(row.items())} for task, row in counts.items()}


def prompt_sheet(report_dir: Path, records: list[dict], task: str, seeds: int, scale: int = 1) -> Image.Image:
    """One row per prompt (in the report's order), its first ``seeds`` seeds across, the prompt on the left."""
    rows: dict[str, list[dict]] = {}
    for record in records:
        if record["case"]["task"] == task:
            rows.setdefault(record["case"]["prompt"], []).append(record)
    if not rows:
        raise ValueError(f"no records of task {task!r} in {report_dir}")
    size = Image.open(report_dir / next(iter(rows.values()))[0]["image_path"]).size[0] * scale
    sheet = Image.new("RGB", (LABEL + seeds * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (prompt, cases) in enumerate(rows.items()):
        lines = textwrap.wrap(prompt, 27)[:3]
        for number, line in enumerate(lines):
            draw.text((4, row * size + size // 2 - 6 * len(lines) + 12 * number), line, fill="black")
        for column, record in enumerate(sorted(cases, key=lambda r: r["case"]["seed"])[:seeds]):
            image = Image.open(report_dir / record["image_path"]).convert("RGB")
            sheet.paste(image.resize((size, size), Image.NEAREST), (LABEL + column * size, row * size))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report_dir", type=Path, help="an `attncontrol bench --out` folder (report.json, images/)")
    parser.add_argument("--task", default="single object", help="which task's images the sheet shows")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt on the sheet")
    parser.add_argument("--scale", type=int, default=1, help="pixel repeat of each image on the sheet")
    parser.add_argument("--out", type=Path, default=None, help="where to save the sheet (PNG); none: no sheet")
    args = parser.parse_args(argv)

    records = json.loads((args.report_dir / "report.json").read_text())["records"]
    for task, row in failure_summary(records).items():
        print(
            f"{task}: {row['success']}/{row['images']} right; every named colour in {row['every named colour']}, "
            f"only named colours in {row['only named colours']}, empty {row['empty']}; a readable shape in "
            f"{row['shape read']} of {row['objects']} detected objects"
        )
    for task, row in colour_presence(records).items():
        drawn = ", ".join(f"{color} {hit}/{named}" for color, (hit, named) in row.items())
        print(f"{task}: a named colour drawn: {drawn}")
    if args.out is not None:
        prompt_sheet(args.report_dir, records, args.task, args.seeds, args.scale).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
