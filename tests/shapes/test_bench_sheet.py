"""scripts/bench_sheet.py: the failure summary counts what the detector read, and the sheet lays prompts x seeds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_sheet.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_sheet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(prompt, seed, expected, detected, success, path):
    found = [{"color": color, "shape": shape} for color, shape in detected]
    case = {"task": "single object", "prompt": prompt, "seed": seed, "expected": expected}
    return {"case": case, "success": success, "detected": found, "image_path": path}


def test_summary_and_sheet(tmp_path, capsys):
    script = load_script()
    (tmp_path / "images").mkdir()
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    records = []
    for row, colour in enumerate(colours):
        for seed in range(3):
            path = f"images/{row}-{seed}.png"
            Image.fromarray(np.full((64, 64, 3), colours[colour], np.uint8)).save(tmp_path / path)
            detected = [] if seed == 2 else [(colour, "circle" if seed == 0 else "unknown")]
            if row == 1 and seed == 1:
                detected.append(("red", "square"))
            records.append(record(f"a {colour} circle", seed, [[colour, "circle"]], detected, seed == 0, path))
    (tmp_path / "report.json").write_text(json.dumps({"records": records}))
    summary = script.failure_summary(records)["single object"]
    assert summary == {
        "images": 6, "success": 2, "every named colour": 4, "only named colours": 3, "empty": 2, "objects": 5,
        "shape read": 3,
    }  # fmt: skip
    # Red is named in 3 images and drawn in 2 of them (seed 2 is empty); in row 1 it is drawn without being named.
    assert script.colour_presence(records) == {"single object": {"blue": (2, 3), "red": (2, 3)}}
    sheet = script.prompt_sheet(tmp_path, records, "single object", seeds=2)
    assert sheet.size == (script.LABEL + 2 * 64, 2 * 64)
    # Row 1 is the blue prompt, its seeds across: the pixel comes from that image, not another.
    assert sheet.getpixel((script.LABEL + 64 + 10, 64 + 10)) == (0, 0, 255)
    assert sheet.getpixel((script.LABEL + 10, 10)) == (255, 0, 0)
    script.main([str(tmp_path), "--out", str(tmp_path / "sheet.png")])
    printed = capsys.readouterr().out
    assert "2/6 right" in printed and "blue 2/3, red 2/3" in printed and (tmp_path / "sheet.png").exists()
