"""Tiny, offline model factories for tests, benchmarks and examples (random weights under a fixed seed)."""

from attncontrol.testing.tiny import (
    clip_tokenizer,
    t5_tokenizer,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

__all__ = [
    "clip_tokenizer",
    "t5_tokenizer",
    "tiny_flux_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]
