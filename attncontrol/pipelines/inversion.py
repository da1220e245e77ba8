"""Deterministic inversion of real images (DDIM for UNets, Euler flow matching for Flux), shared by every editor.

A real image has no sampling noise to start from; inversion runs the deterministic sampler backwards (the model
predicts the noise, or the velocity, at each level and the latent is pushed one level *up*) and keeps the latent of
every level. An edit then starts from the top latent and can pull any region back to the source at any step, because
it knows where the source was at that step.

The inversion runs the stock pipeline's own loop with a reversed scheduler swapped in for the call (diffusers'
``DDIMInverseScheduler``; :class:`FlowMatchInverseScheduler` for Flux), so prompt encoding, SDXL's size conditioning,
Flux's latent packing and every other stock detail are the pipeline's, not a copy. Null-prompt inversion is
``prompt=""``; prompted inversion passes the image's description. Latents are kept unpacked, ``[C, h, w]`` per level,
for every family.

    inversion = invert(pipe, image, num_inference_steps=50)
    with matched_sampling(pipe):
        image = pipe("", latents=to_native(pipe, inversion.noise), num_inference_steps=50, guidance_scale=1.0).images[0]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image

from attncontrol.core.errors import EditError
from attncontrol.pipelines.stock import stock_call, swapped_scheduler

logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray | torch.Tensor


@dataclass
class Inversion:
    """The latents of one image at every noise level of a DDIM schedule.

    Attributes:
        latents: ``[num_steps + 1, C, h, w]``; ``latents[0]`` is the encoded image, ``latents[k]`` the latent after
            ``k`` inversion steps, ``latents[-1]`` the starting noise of an edit.
        prompt: the prompt the model was conditioned on.
        guidance_scale: the guidance used while inverting (1.0: none, the usual choice).
        image_size: ``(height, width)`` of the image in pixels.
    """

    latents: torch.Tensor
    prompt: str
    guidance_scale: float
    image_size: tuple[int, int]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[0] - 1

    @property
    def noise(self) -> torch.Tensor:
        """``[1, C, h, w]``: the latent to start sampling from."""
        return self.latents[-1:].clone()

    def to(self, device: torch.device | str) -> Inversion:
        """The same inversion with every level on ``device`` (moved once, not once per step)."""
        return dataclasses.replace(self, latents=self.latents.to(device))

    def after_step(self, index: int) -> torch.Tensor:
        """``[1, C, h, w]``: where the source is after sampling step ``index`` (0-based) of the same schedule."""
        if not 0 <= index < self.num_steps:
            raise IndexError(f"step {index} is outside the {self.num_steps}-step schedule")
        return self.latents[self.num_steps - 1 - index][None]


class FlowMatchInverseScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler run backwards: the stock sigmas in reverse order, so every step moves one level *up*.

    ``step`` is the stock Euler update ``x + (sigma_next - sigma) * v``; with the sigmas reversed it starts at the
    clean image (sigma 0) and ends at the top of the schedule the stock pipeline would sample from.
    """

    # The stock pipelines inspect this signature for ``sigmas``/``timesteps``, so it is spelled out.
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.sigmas = self.sigmas.flip(0)
        self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(self.timesteps.dtype)


def is_flux(pipe: Any) -> bool:
    return getattr(pipe, "transformer", None) is not None and hasattr(pipe, "_pack_latents")


def size_multiple(pipe: Any) -> int:
    """Image sides must be multiples of this: the VAE factor times the UNet's downsamplings (Flux: its 2x2 packing)."""
    unet = getattr(pipe, "unet", None)
    downsamplings = len(unet.config.block_out_channels) - 1 if unet is not None else 1
    return int(pipe.vae_scale_factor) * 2**downsamplings


def to_native(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` latents in the form the pipeline's ``latents=`` takes (Flux: packed 2x2 patches)."""
    if is_flux(pipe):
        batch, channels, height, width = latents.shape
        return pipe._pack_latents(latents, batch, channels, height, width)
    return latents


def from_native(pipe: Any, latents: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The pipeline's own latents (as its callbacks see them) back to ``[B, C, h, w]``."""
    if is_flux(pipe):
        return pipe._unpack_latents(latents, image_size[0], image_size[1], pipe.vae_scale_factor)
    return latents


def image_tensor(pipe: Any, image: ImageLike, *, name: str = "image") -> torch.Tensor:
    """``image`` as a new ``[1, 3, H, W]`` float tensor in [-1, 1] (the caller's object is never touched).

    Accepts PIL images, ``[H, W, 3]`` uint8 or [0, 1] float arrays, and ``[3, H, W]`` / ``[1, 3, H, W]`` tensors in
    [0, 1]. The size must suit the model; images are not silently resized.
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise EditError(f"`{name}` as an array must be [H, W, 3], got shape {image.shape}")
        array = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float()
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[:2] != (1, 3):
            raise EditError(f"`{name}` as a tensor must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
        tensor = tensor.clone()
    else:
        raise EditError(f"`{name}` must be a PIL image, numpy array or tensor, got {type(image).__name__}")
    if float(tensor.min()) < 0.0 or float(tensor.max()) > 1.0:
        raise EditError(f"`{name}` values must lie in [0, 1] (or 0..255 for uint8 arrays)")
    height, width = tensor.shape[-2:]
    multiple = size_multiple(pipe)
    if height % multiple or width % multiple:
        raise EditError(
            f"`{name}` is {height}x{width} but this model takes sides that are multiples of {multiple}; "
            f"resize or pad it to e.g. {height - height % multiple or multiple}x{width - width % multiple or multiple}"
        )
    return tensor * 2.0 - 1.0


@torch.no_grad()
def encode(pipe: Any, image: torch.Tensor) -> torch.Tensor:
    """VAE latents (mean of the posterior, scaled as the denoiser expects) of a ``[B, 3, H, W]`` image in [-1, 1]."""
    vae = pipe.vae
    pixels = image.to(device=pipe._execution_device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` images in [0, 1] from denoiser latents."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def matched_scheduler(pipe: Any, *, inverse: bool = False) -> Any:
    """The deterministic scheduler (or its inverse) with the pipeline's noise schedule and prediction type: DDIM
    (eta 0) for UNets, Euler flow matching for Flux."""
    if is_flux(pipe):
        cls = FlowMatchInverseScheduler if inverse else FlowMatchEulerDiscreteScheduler
    else:
        cls = DDIMInverseScheduler if inverse else DDIMScheduler
    return cls.from_config(pipe.scheduler.config)


@contextlib.contextmanager
def matched_sampling(pipe: Any) -> Iterator[Any]:
    """Sample in the block with the deterministic schedule an :class:`Inversion` matches (the user's scheduler is
    back afterwards)."""
    with swapped_scheduler(pipe, matched_scheduler(pipe)) as scheduler:
        yield scheduler


def invert(
    pipe: Any,
    image: ImageLike,
    prompt: str = "",
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> Inversion:
    """Invert ``image`` with ``pipe`` (SD 1.x/2.x, SDXL or Flux) and keep the latent of every level.

    Args:
        image: the image (see :func:`image_tensor` for the accepted forms); it is never modified.
        prompt: ``""`` for null-prompt inversion (DesignEdit's choice), or a description of the image.
        num_inference_steps: the schedule length; the edit must sample with the same number of steps.
        guidance_scale: CFG while inverting; above 1 the inversion drifts (null-text inversion exists to fix
            that), so keep 1.0 unless you know why.
        progress: show the stock progress bar.
        kwargs: further stock arguments (e.g. ``max_sequence_length`` for Flux).
    """
    if num_inference_steps < 1:
        raise EditError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}")
    pixels = image_tensor(pipe, image)
    height, width = pixels.shape[-2:]
    clean = encode(pipe, pixels)
    levels = [clean[0].float().cpu()]

    def keep_latents(_pipe: Any, _step: int, _timestep: Any, tensors: dict) -> dict:
        levels.append(from_native(pipe, tensors["latents"], (height, width))[0].float().cpu())
        return tensors

    call = {
        **kwargs,
        "prompt": prompt,
        "latents": to_native(pipe, clean),
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "output_type": "latent",
        "callback_on_step_end": keep_latents,
    }
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    previous_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous_bar, "disable": not progress, "desc": "inverting"})
    try:
        with swapped_scheduler(pipe, matched_scheduler(pipe, inverse=True)):
            stock_call(pipe)(**call)
    finally:
        pipe._progress_bar_config = previous_bar
    if len(levels) != num_inference_steps + 1:
        raise EditError(f"the pipeline ran {len(levels) - 1} steps instead of {num_inference_steps}; cannot invert")
    logger.debug("inverted a %dx%d image in %d steps", height, width, num_inference_steps)
    return Inversion(torch.stack(levels), prompt, guidance_scale, (int(height), int(width)))
