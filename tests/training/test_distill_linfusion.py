"""The LinFusion distillation script resumes at the step it stopped and exports a checkpoint that loads into the
teacher's pipeline (how well the student matches its teacher is measured by the shapes bench, not here)."""

from __future__ import annotations

import json

import numpy as np

from attncontrol import AttentionController
from attncontrol.controls import load_linfusion, unload_linfusion
from attncontrol.training.distill_linfusion import main

TINY = ["--model", "shapes-sd", "--pool-size", "64", "--batch", "4", "--checkpoint-every", "3", "--lr", "3e-3"]


def test_distill_resume_and_load(tmp_path):
    out = tmp_path / "run"
    main([*TINY, "--out", str(out), "--steps", "3"])
    first = json.loads((out / "metrics.json").read_text())
    assert first["steps"] == 3 and first["history"][-1]["step"] == 3
    main([*TINY, "--out", str(out), "--steps", "6", "--resume"])
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == 6
    assert [entry["step"] for entry in resumed["history"]] == [3, 6]  # continued, not restarted
    assert set(resumed["history"][-1]) >= {"loss", "denoise", "match", "feature"}

    from attncontrol.models import load_pipeline

    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    linear = load_linfusion(pipe, str(out / "linfusion"))
    try:
        with AttentionController(pipe, [linear]):
            image = pipe("a red circle", num_inference_steps=2, output_type="np").images
        assert np.isfinite(image).all()
    finally:
        unload_linfusion(pipe)
