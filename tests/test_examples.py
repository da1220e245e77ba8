"""The examples' own code keeps working: a user-written control composes with the store in one pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from attncontrol import AttentionController, AttentionStore
from tests.conftest import call_kwargs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_reweight_composes_with_the_store(sd_pipe):
    TokenReweight = load_example("custom_control").TokenReweight
    plain = sd_pipe(**call_kwargs("sd")).images
    results = {}
    for weight in (1.0, 3.0):
        store = AttentionStore(guidance="cond")
        with AttentionController(sd_pipe, [store, TokenReweight([2], weight)]):
            results[weight] = (sd_pipe(**call_kwargs("sd")).images, store.maps()[..., 2])
    assert np.abs(results[1.0][0] - plain).max() <= 1e-5  # weight 1 changes nothing
    assert np.abs(results[3.0][0] - plain).max() > 1e-4  # weight 3 changes the image
    ratio = float(results[3.0][1].mean() / results[1.0][1].mean())
    assert 2.0 < ratio < 3.0  # ~3x before renormalization, a little less after
    with pytest.raises(ValueError, match="`weight` must be >= 0"):
        TokenReweight([2], -1.0)


def test_attention_maps_example_runs(tmp_path, monkeypatch):
    module = load_example("attention_maps")
    monkeypatch.setattr("sys.argv", ["attention_maps.py", "--steps", "2", "--size", "32", "48", "--out", str(tmp_path)])
    module.main()
    assert {p.name for p in tmp_path.iterdir()} == {"image.png", "red.png", "blue_square.png", "strip.png"}


def test_regional_prompts_example_runs(tmp_path, monkeypatch):
    module = load_example("regional_prompts")
    argv = ["regional_prompts.py", "--model", "tiny-sd", "--steps", "2", "--size", "32", "48", "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    module.main()
    assert {p.name for p in tmp_path.iterdir()} == {"uncontrolled.png", "regional.png", "layout.png", "strip.png"}


def test_layered_edits_example_runs(tmp_path, monkeypatch):
    module = load_example("layered_edits")
    monkeypatch.setattr("sys.argv", ["layered_edits.py", "--steps", "2", "--out", str(tmp_path)])
    module.main()
    names = {"input", "removed", "moved", "resized_flipped", "zoomed_out", "strip"}
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.png" for name in names}


def test_drag_and_compose_example_runs(tmp_path, monkeypatch):
    module = load_example("drag_and_compose")
    monkeypatch.setattr("sys.argv", ["drag_and_compose.py", "--steps", "2", "--out", str(tmp_path)])
    module.main()
    names = {"input", "dragged", "reference", "composed", "strip"}
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.png" for name in names}


def test_consistent_edit_example_runs(tmp_path, monkeypatch):
    module = load_example("consistent_edit")
    monkeypatch.setattr("sys.argv", ["consistent_edit.py", "--steps", "2", "--out", str(tmp_path)])
    module.main()
    names = {"source", "target", "unshared", "strip"}
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.png" for name in names}


def test_example_job_file_is_valid(capsys):
    """Every job of examples/jobs.yaml parses and its input files open (what `attncontrol batch --dry-run` checks)."""
    from attncontrol.batch import validate
    from attncontrol.cli import main
    from attncontrol.jobs import read_jobs

    jobs = read_jobs(EXAMPLES / "jobs.yaml")
    assert [job.kind for job in jobs] == ["generate", "regional", "remove", "move", "compose"]
    assert validate(jobs) == {}
    assert main(["batch", str(EXAMPLES / "jobs.yaml"), "--dry-run"]) == 0
    assert "5 of 5 jobs are valid" in capsys.readouterr().out


def test_concept_extraction_example_runs(tmp_path, monkeypatch):
    module = load_example("concept_extraction")
    argv = [
        "concept_extraction.py",
        "--phase1-steps",
        "2",
        "--phase2-steps",
        "2",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.setattr("sys.argv", argv)
    module.main()
    assert (tmp_path / "strip.png").exists()
    assert {p.name for p in (tmp_path / "run" / "learned_embeds").iterdir()} == {
        "asset0.safetensors",
        "asset1.safetensors",
    }
