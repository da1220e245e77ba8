"""The CLEAR distillation script resumes at its step and exports a file in the published layout that loads into the
teacher's pipeline (the tiny random Flux model: the machinery, not the quality)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from attncontrol import AttentionController
from attncontrol.controls import load_clear, unload_clear
from attncontrol.training.distill_clear import main, trainable_names
from tests.conftest import call_kwargs, tiny_pipeline

TINY = ["--model", "tiny-flux", "--pool-size", "16", "--batch", "2", "--checkpoint-every", "2", "--radius", "2"]


def test_distill_clear_resume_and_load(tmp_path):
    out = tmp_path / "run"
    main([*TINY, "--out", str(out), "--steps", "2", "--lr", "1e-2"])
    main([*TINY, "--out", str(out), "--steps", "4", "--lr", "1e-2", "--resume"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["history"]] == [2, 4]

    flux = tiny_pipeline("flux")
    exported = load_file(out / "clear_local_2.safetensors")
    assert set(exported) == set(trainable_names(flux.transformer))
    assert not any("add_q_proj" in name or "norm" in name for name in exported)
    before = flux(**call_kwargs("flux")).images
    window = load_clear(flux, out / "clear_local_2.safetensors")
    try:
        with AttentionController(flux, [window]):
            after = flux(**call_kwargs("flux")).images
    finally:
        unload_clear(flux)
    assert window.radius == 2 and np.abs(after - before).max() > 1e-4
    np.testing.assert_array_equal(flux(**call_kwargs("flux")).images, before)


def test_distill_clear_needs_a_flux_model(tmp_path):
    with pytest.raises(ValueError, match="--model is required"):
        main(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not a Flux pipeline"):
        main(["--model", "tiny-sd", "--out", str(tmp_path)])
