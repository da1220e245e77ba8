"""Tiny pipelines of every family survive save_pretrained -> from_pretrained offline, controls included."""

from __future__ import annotations

import os

import numpy as np

from attncontrol import AttentionController, AttentionStore
from tests.conftest import call_kwargs


def test_save_and_reload_offline(family_pipe, tmp_path):
    from diffusers import DiffusionPipeline

    name, pipe = family_pipe
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)

    expected = pipe(**call_kwargs(name)).images
    store = AttentionStore()
    with AttentionController(loaded, [store]):
        actual = loaded(**call_kwargs(name)).images
    assert np.abs(expected - actual).max() <= 1e-5
    assert store.records()


def test_load_pipeline_reads_fp16_folders_in_float32(tmp_path):
    import torch

    from attncontrol.models import TINY_MODELS, available_models, load_pipeline
    from attncontrol.testing import tiny_sd_pipeline

    tiny_sd_pipeline().to(torch.float16).save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert loaded.unet.dtype == torch.float32 and loaded.vae.dtype == torch.float32
    assert set(TINY_MODELS) <= set(available_models())
    assert type(load_pipeline("tiny-flux")).__name__ == "FluxPipeline"
