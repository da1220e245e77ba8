"""Shared fixtures: offline hub, deterministic threads, tiny pipelines of every family built once per session."""

from __future__ import annotations

import os

# Set before anything imports triton or huggingface_hub: both read these at import time.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from attncontrol import testing

torch.set_num_threads(min(2, torch.get_num_threads()))

FACTORIES = {
    "sd": testing.tiny_sd_pipeline,
    "sdxl": testing.tiny_sdxl_pipeline,
    "flux": testing.tiny_flux_pipeline,
    "sd3": testing.tiny_sd3_pipeline,
}
_CACHE: dict[str, object] = {}


def tiny_pipeline(name: str):
    """A session-wide tiny pipeline; tests must leave its processors as they found them (controllers restore)."""
    if name not in _CACHE:
        pipe = FACTORIES[name]()
        pipe.set_progress_bar_config(disable=True)
        _CACHE[name] = pipe
    return _CACHE[name]


def call_kwargs(name: str, **overrides) -> dict:
    """Fast, deterministic pipeline arguments for the tiny models (non-square on purpose)."""
    kwargs = {
        "prompt": "a red circle",
        "num_inference_steps": 3,
        "height": 32,
        "width": 48,
        "output_type": "np",
        "generator": torch.Generator("cpu").manual_seed(0),
    }
    if name in ("flux", "sd3"):
        kwargs["max_sequence_length"] = 16
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(params=list(FACTORIES))
def family_pipe(request):
    return request.param, tiny_pipeline(request.param)


@pytest.fixture
def sd_pipe():
    return tiny_pipeline("sd")


@pytest.fixture
def flux_pipe():
    return tiny_pipeline("flux")
