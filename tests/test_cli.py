from __future__ import annotations

import json

import pytest
from PIL import Image

from attncontrol.cli import main
from attncontrol.shapes.bench import TASKS


def test_generate_writes_image_heatmaps_and_settings(tmp_path):
    output = tmp_path / "run" / "image.png"
    code = main(
        [
            "generate",
            "a red circle",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "48",
            "--heatmap",
            "red",
            "-o",
            str(output),
        ]
    )
    assert code == 0
    image = Image.open(output)
    assert image.size == (48, 32)
    heat = Image.open(output.with_name("image_heatmap_red.png"))
    assert heat.size == image.size
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["job"]["heatmaps"] == ["red"] and sidecar["job"]["seed"] == 0
    assert sidecar["outputs"] == ["image.png", "image_heatmap_red.png"]


def test_unknown_heatmap_word_fails_before_generating(tmp_path, caplog):
    output = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--heatmap", "green", "-o", str(output)]) == 1
    assert "heatmaps" in caplog.text and "green" in caplog.text
    assert not output.exists()


def test_bench_command_prints_and_saves_a_report(tmp_path, capsys):
    code = main(["bench", "--task", "single", "--num-seeds", "1", "--steps", "1", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| single object |" in printed and "| 12 |" in printed
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["total"] == 12


def test_bench_help_names_every_task(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert all(task in printed for task in TASKS)
