"""The editing bench scores real pixels: the ideal edit passes, the unedited image and a repainted hole fail."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from attncontrol.cli import main
from attncontrol.shapes.detector import detect
from attncontrol.shapes.edit_bench import edit_cases, old_place_clear, reference_of, scene_of, score
from attncontrol.shapes.scenes import BACKGROUNDS, render


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
    with pytest.raises(ValueError, match="'swap'"):
        run_edit_bench(object(), tasks=["swap"])
    with pytest.raises(ValueError, match="none of the methods"):
        run_edit_bench(object(), tasks=["compose"], methods=["designedit"])


def test_drag_cases_are_the_move_cases_and_the_old_place_must_be_cleared():
    drags, moves = edit_cases("drag", 10), edit_cases("move", 10)
    assert [replace(case, task="move") for case in drags] == moves
    case = drags[0]
    scene = scene_of(case)
    spec = scene.specs[case.target]
    moved = replace(spec, x=spec.x + case.offset[0], y=spec.y + case.offset[1])
    others = [s for i, s in enumerate(scene.specs) if i != case.target]
    ideal = render([*others, moved], scene.background).image
    assert score(case, scene, detect(ideal)) == (True, True, True)
    assert old_place_clear(case, scene, ideal)
    copied = ideal.copy()
    copied[scene.objects[case.target].mask] = scene.image[scene.objects[case.target].mask]  # a copy, not a move
    assert not old_place_clear(case, scene, copied)


def test_compose_cases_and_their_scores():
    cases = edit_cases("compose", 20)
    assert cases == edit_cases("compose", 20)
    for case in cases:
        background, reference = scene_of(case), reference_of(case)
        own, pasted = background.objects[0], reference.objects[0]
        assert (own.color, own.shape) != (pasted.color, pasted.shape)
        x0, y0, x1, y1 = case.box
        assert min(x0, y0) >= 2 and max(x1, y1) <= 62
        assert (x1 - x0, y1 - y0) == (pasted.box[2] - pasted.box[0], pasted.box[3] - pasted.box[1])
        ox0, oy0, ox1, oy1 = own.box
        assert x1 + 3 <= ox0 or ox1 + 3 <= x0 or y1 + 3 <= oy0 or oy1 + 3 <= y0
    case = cases[0]
    background, reference = scene_of(case), reference_of(case)
    x0, y0, x1, y1 = case.box
    placed = replace(reference.specs[0], x=(x0 + x1) / 2, y=(y0 + y1) / 2)
    ideal = render([background.specs[0], placed], background.background).image
    assert score(case, background, detect(ideal), reference=reference) == (True, True, True)
    assert score(case, background, detect(background.image), reference=reference)[0] is False
    assert np.array_equal(background.image[0, 0], BACKGROUNDS[background.background])


def test_edit_bench_runs_drag_and_compose_with_their_baselines(tmp_path):
    from attncontrol.models import load_pipeline
    from attncontrol.shapes.edit_bench import run_edit_bench

    pipe = load_pipeline("shapes-sd")
    methods = ["drag", "compose", "cut-paste-sdedit", "regenerate"]
    report = run_edit_bench(
        pipe, tasks=["drag", "compose"], methods=methods, num_cases=1, num_inference_steps=2, out_dir=tmp_path
    )
    assert [(row.task, row.method) for row in report.rows] == [
        ("drag", "drag"),
        ("drag", "cut-paste-sdedit"),
        ("drag", "regenerate"),
        ("compose", "compose"),
        ("compose", "cut-paste-sdedit"),
        ("compose", "regenerate"),
    ]
    assert all(row.total == 1 for row in report.rows)
    assert "old place clear" in report.markdown()
    assert all((tmp_path / record.image_path).exists() for record in report.records)
