"""Where pipelines come from: shipped and tiny models by name, anything else through ``from_pretrained``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "models"
# Trained shapes-world models shipped inside the package (diffusers folders with fp16 weights); the first is the
# default. shapes-flux is the DiT path's model (joint attention, CLEAR): single objects, rough multi-object scenes.
SHIPPED_MODELS = {"shapes-sd": SHIPPED_DIR / "shapes-sd", "shapes-flux": SHIPPED_DIR / "shapes-flux"}
# Distilled LinFusion students of shipped models (``load_linfusion(pipe, "shapes-sd")``).
SHIPPED_LINFUSION = {"shapes-sd": SHIPPED_DIR.parent / "linfusion" / "shapes-sd"}
# Random-weight tiny models of every family: they exercise the machinery, their pictures are noise.
TINY_MODELS = {
    "tiny-sd": "tiny_sd_pipeline",
    "tiny-sdxl": "tiny_sdxl_pipeline",
    "tiny-flux": "tiny_flux_pipeline",
    "tiny-sd3": "tiny_sd3_pipeline",
}


def available_models() -> list[str]:
    """Names ``load_pipeline`` resolves without a path: shipped models present in this install, then tiny ones."""
    shipped = [name for name, path in SHIPPED_MODELS.items() if (path / "model_index.json").exists()]
    return shipped + list(TINY_MODELS)


def default_model() -> str:
    """The shipped SD-architecture shapes model when this install has it, else the tiny random one."""
    return available_models()[0]


def load_pipeline(model: str | None = None, *, torch_dtype: torch.dtype | None = None, device: str = "cpu") -> Any:
    """A ready pipeline from a name (:func:`available_models`), a local diffusers folder, or a hub id.

    Shipped models store fp16 weights; they load in ``torch_dtype`` (default float32, the CPU-friendly choice).
    """
    from diffusers import DiffusionPipeline

    name = model or default_model()
    if name in TINY_MODELS:
        from attncontrol import testing

        pipeline = getattr(testing, TINY_MODELS[name])()
        if torch_dtype is not None:
            pipeline = pipeline.to(torch_dtype=torch_dtype)
    else:
        source = SHIPPED_MODELS.get(name, name)
        if name in SHIPPED_MODELS and not (Path(source) / "model_index.json").exists():
            raise FileNotFoundError(f"the shipped model {name!r} is not in this install ({source})")
        pipeline = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype or torch.float32)
        if name in SHIPPED_MODELS and getattr(pipeline, "unet", None) is None:
            from attncontrol.shapes.scenes import IMAGE_SIZE

            # diffusers' Flux pipeline hard-codes 128 latent pixels a side (FLUX.1's 1024 px) and keeps no size in
            # any config; the shapes world is 64 px, which "the model's own size" must mean for shapes-flux
            pipeline.default_sample_size = IMAGE_SIZE // pipeline.vae_scale_factor
    logger.info("loaded %s (%s)", name, type(pipeline).__name__)
    return pipeline.to(device)


def default_image_size(pipe: Any) -> tuple[int, int]:
    """``(height, width)`` a pipeline generates when not told: the denoiser's sample size in pixels."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        sample = unet.config.sample_size
        height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
        return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor
    side = pipe.default_sample_size * pipe.vae_scale_factor
    return side, side


def is_flux_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` is a diffusers Flux pipeline, by its class hierarchy rather than its own class name: the
    Regional*/Compose*/Drag* twins (``RegionalFluxPipeline``) are Flux pipelines too."""
    return any(klass.__name__.startswith("Flux") for klass in type(pipe).__mro__)


def family_call_kwargs(pipe: Any, call_kwargs: dict, batch: int) -> dict:
    """Call arguments adapted to the pipeline's family, so one set of settings drives every shipped model.

    Flux without a guidance embedding (the shapes model, like FLUX.1-dev-style models before distillation) needs
    true CFG with an empty negative prompt; every Flux pipeline gets the T5 length its tokenizer was saved with; a
    guidance-distilled Flux (guidance embedding) and other pipelines take ``guidance_scale`` as is.
    """
    if not is_flux_pipeline(pipe):
        return call_kwargs
    call_kwargs = dict(call_kwargs)
    # FluxPipeline pads T5 to 512 unless told: a model trained on 32 tokens would attend to 480 unseen pads.
    call_kwargs.setdefault("max_sequence_length", min(512, pipe.tokenizer_2.model_max_length))
    if not getattr(pipe.transformer.config, "guidance_embeds", True):
        call_kwargs["true_cfg_scale"] = call_kwargs.pop("guidance_scale", 1.0)
        if call_kwargs.get("negative_prompt") is None:
            call_kwargs["negative_prompt"] = [""] * batch
    return call_kwargs
