"""Where pipelines come from: the built-in models by name, anything else through ``from_pretrained``."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


# Name -> factory in attncontrol.testing (imported lazily: diffusers and transformers are slow to import).
BUILTIN_MODELS = {
    "tiny-sd": "tiny_sd_pipeline",
    "tiny-sdxl": "tiny_sdxl_pipeline",
    "tiny-flux": "tiny_flux_pipeline",
    "tiny-sd3": "tiny_sd3_pipeline",
}
# The random-weight SD-shaped model until a trained built-in model ships; it shows the machinery, not pictures.
DEFAULT_MODEL = "tiny-sd"


def load_pipeline(model: str | None = None, *, torch_dtype: torch.dtype | None = None, device: str = "cpu") -> Any:
    """A ready pipeline: a built-in name (``tiny-sd``...), a local diffusers folder, or a hub id (needs network)."""
    from diffusers import DiffusionPipeline

    name = model or DEFAULT_MODEL
    if name in BUILTIN_MODELS:
        from attncontrol import testing

        pipeline = getattr(testing, BUILTIN_MODELS[name])()
        if torch_dtype is not None:
            pipeline = pipeline.to(torch_dtype=torch_dtype)
    else:
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        pipeline = DiffusionPipeline.from_pretrained(name, **kwargs)
    logger.info("loaded %s (%s)", name, type(pipeline).__name__)
    return pipeline.to(device)
