"""The editing bench scores real pixels: the ideal edit passes, the unedited image and a repainted hole fail."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from attncontrol.cli import main
from attncontrol.shapes.detector import detect
from attncontrol.shapes.edit_bench import edit_cases, scene_of, score
from attncontrol.shapes.scenes import render


def test_cases_are_deterministic_unambiguous_and_moves_stay_clear():
    removes, moves = edit_cases("remove", 20), edit_cases("move", 20)
    assert removes == edit_cases("remove", 20) and moves == edit_cases("move", 20)
    assert {case.target for case in removes} == {0, 1}
    for case in removes + moves:
        first, second = scene_of(case).objects
        assert (first.color, first.shape) != (second.color, second.shape)
    for case in moves:
        scene = scene_of(case)
        spec = scene.specs[case.target]
        moved = replace(spec, x=spec.x + case.offset[0], y=spec.y + case.offset[1])
        others = [s for i, s in enumerate(scene.specs) if i != case.target]
        edited = render([*others, moved], scene.background)
        x0, y0, x1, y1 = edited.objects[-1].box
        assert min(x0, y0) >= 2 and max(x1, y1) <= 62
        assert not (edited.objects[-1].mask & edited.objects[0].mask).any()
        assert 8 <= np.hypot(*case.offset) <= 21


def test_ideal_edits_pass_and_failed_edits_fail():
    case = edit_cases("remove", 1)[0]
    scene = scene_of(case)
    kept_spec = scene.specs[1 - case.target]
    ideal = render([kept_spec], scene.background).image
    assert score(case, scene, detect(ideal)) == (True, True, True)
    assert score(case, scene, detect(scene.image))[:2] == (False, False)
    gone_spec = scene.specs[case.target]
    repainted = replace(gone_spec, color="yellow" if gone_spec.color != "yellow" else "red")
    assert score(case, scene, detect(render([kept_spec, repainted], scene.background).image))[0] is False

    move = edit_cases("move", 1)[0]
    scene = scene_of(move)
    spec = scene.specs[move.target]
    moved = replace(spec, x=spec.x + move.offset[0], y=spec.y + move.offset[1])
    others = [s for i, s in enumerate(scene.specs) if i != move.target]
    assert score(move, scene, detect(render([*others, moved], scene.background).image)) == (True, True, True)
    assert score(move, scene, detect(scene.image))[0] is False


def test_edit_bench_command_prints_and_saves_a_report(tmp_path, capsys):
    argv = ["edit-bench", "--task", "remove", "--method", "designedit", "--method", "inpaint"]
    code = main([*argv, "--num-cases", "1", "--steps", "2", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| remove | designedit |" in printed and "| remove | inpaint |" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["total"] for row in report["rows"]] == [1, 1]
    assert (tmp_path / report["records"][0]["image_path"]).exists()


def test_unknown_tasks_and_methods_are_named():
    from attncontrol.shapes.edit_bench import ALL_METHODS, run_edit_bench

    assert {"inverted-key-zero", "inverted-query", "inverted-value", "designedit", "inpaint"} <= set(ALL_METHODS)
    with pytest.raises(ValueError, match="inverted-qeury"):
        run_edit_bench(object(), methods=["inverted-qeury"])
    with pytest.raises(ValueError, match="'drag'"):
        run_edit_bench(object(), tasks=["drag"])
