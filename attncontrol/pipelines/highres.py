"""High-resolution generation by the SDEdit ladder: generate small, then upscale and re-noise at decreasing strength.

LinFusion's and CLEAR's recipe for resolutions the model never saw: each rung keeps the layout of the previous one and
adds detail; with linear or local-window self-attention a rung's cost grows linearly with its pixels. The VAE works
in tiles (``enable_tiling``) and the UNet's feed-forward in chunks while the ladder runs; both are restored after,
also when a rung raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from attncontrol.core.control import AttentionControl
from attncontrol.core.controller import AttentionController
from attncontrol.core.errors import EditError

logger = logging.getLogger(__name__)

#: LinFusion's SD1.5 ladder: 1024x512, then 2x per rung at strengths 0.4, 0.3, 0.2, 0.1
LINFUSION_STRENGTHS = (0.4, 0.3, 0.2, 0.1)


@dataclass
class LadderResult:
    images: list[Image.Image] = field(default_factory=list)  # one per rung, smallest first

    @property
    def image(self) -> Image.Image:
        return self.images[-1]


@contextlib.contextmanager
def memory_savers(pipe: Any, *, tile_vae: bool, feed_forward_chunks: int | None) -> Iterator[None]:
    """VAE tiling and chunked feed-forward for the length of the block; the pipeline's own settings come back."""
    vae = getattr(pipe, "vae", None)
    was_tiling = bool(getattr(vae, "use_tiling", False))
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    try:
        if tile_vae and vae is not None and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        if feed_forward_chunks and hasattr(denoiser, "enable_forward_chunking"):
            denoiser.enable_forward_chunking(chunk_size=feed_forward_chunks, dim=1)
        yield
    finally:
        if vae is not None and hasattr(vae, "disable_tiling") and not was_tiling:
            vae.disable_tiling()
        if feed_forward_chunks and hasattr(denoiser, "disable_forward_chunking"):
            denoiser.disable_forward_chunking()


def sdedit_ladder(
    pipe: Any,
    prompt: str,
    *,
    sizes: Sequence[tuple[int, int]],
    strengths: Sequence[float] | None = None,
    controls: Sequence[AttentionControl] = (),
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    generator: Any = None,
    tile_vae: bool = True,
    feed_forward_chunks: int | None = None,
    **call_kwargs: Any,
) -> LadderResult:
    """Generate at ``sizes[0]`` (height, width), then for each next size upscale and run image-to-image with the next
    strength (default LinFusion's 0.4, 0.3, 0.2, 0.1, ...). ``controls`` (e.g. the LinFusion control from
    :func:`attncontrol.controls.load_linfusion`, or ``LocalWindowAttention``) run in every rung."""
    from diffusers import AutoPipelineForImage2Image

    if not sizes:
        raise EditError("`sizes` is empty: give at least the first (height, width)")
    for index, size in enumerate(sizes):
        if len(size) != 2 or any(int(v) % 16 for v in size):
            raise EditError(f"`sizes[{index}]` must be (height, width) in multiples of 16, got {size!r}")
    strengths = tuple(strengths) if strengths is not None else LINFUSION_STRENGTHS[: len(sizes) - 1]
    if len(strengths) != len(sizes) - 1:
        raise EditError(f"{len(sizes)} sizes need {len(sizes) - 1} strengths (one per upscale), got {len(strengths)}")
    if any(not 0 < s <= 1 for s in strengths):
        raise EditError(f"`strengths` must be in (0, 1], got {strengths}")
    refine = AutoPipelineForImage2Image.from_pipe(pipe)
    common = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": generator,
        **call_kwargs,
    }
    result = LadderResult()
    controller = AttentionController(pipe, list(controls)) if controls else contextlib.nullcontext()
    with memory_savers(pipe, tile_vae=tile_vae, feed_forward_chunks=feed_forward_chunks), controller:
        height, width = sizes[0]
        result.images.append(pipe(height=height, width=width, **common).images[0])
        for (height, width), strength in zip(sizes[1:], strengths, strict=True):
            upscaled = result.images[-1].resize((width, height), Image.Resampling.LANCZOS)
            logger.info("ladder: %dx%d at strength %.2f", width, height, strength)
            result.images.append(
                refine(image=upscaled, strength=strength, height=height, width=width, **common).images[0]
            )
    return result


__all__ = ["LINFUSION_STRENGTHS", "LadderResult", "memory_savers", "sdedit_ladder"]
