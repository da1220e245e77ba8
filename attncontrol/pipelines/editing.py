"""Object removal and layered editing of real images (DesignEdit), for SD 1.x/2.x, SDXL and Flux.

    from attncontrol.pipelines import LayeredEditStableDiffusionPipeline, Layer, RemoveStableDiffusionPipeline

    remover = RemoveStableDiffusionPipeline.from_pretrained(model_id_or_path)       # or .from_pipe(pipe)
    clean = remover(image, mask_image=object_mask).images[0]

    editor = LayeredEditStableDiffusionPipeline.from_pipe(remover)
    moved = editor(image, layers=[Layer(object_mask, offset=(12, -4), scale=1.2, flip="horizontal")]).images[0]

How an edit runs (one batch row, no extra UNet pass per layer):

1. The image is DDIM-inverted (:mod:`attncontrol.pipelines.inversion`); every level's latent is kept.
2. Sampling starts from the inverted noise. Self-attention hides the keys of the region being emptied
   (:class:`attncontrol.controls.key_mask.KeyMaskedSelfAttention`), so the hole fills from its surroundings.
3. Until ``blend_until`` the latent outside the hole is reset to the source's latent of the same level after every
   step, so the rest of the image stays the source.
4. Layers: each moved/resized/flipped object is transformed at *image* level (the paper found this better than
   moving latents), that image is inverted too, and at ``fuse_at`` its latent is pasted under the transformed mask.
   The remaining steps denoise the fused canvas normally, which harmonizes the seams.

Pan and zoom-out are the same machinery: the canvas is shifted or shrunk, the uncovered border is pre-filled by
edge replication, and the border is the hole. Defaults are DesignEdit's (50 steps; key masking at steps 1..39,
background copy-in through step 41, fusion after step 42; mask dilation 20 px at 1024 px, scaled to the image).

The pipeline's own scheduler is replaced by DDIM with the same noise schedule for the call and restored afterwards,
as are its attention processors, also after an exception. The input image is never modified.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from attncontrol.controls.key_mask import DESIGNEDIT_KEY_MASK_STEPS, KEY_MASK_TARGETS, KeyMaskedSelfAttention
from attncontrol.core.controller import AttentionController
from attncontrol.core.errors import EditError
from attncontrol.core.masks import MaskLike, SpatialMask, dilate, load_mask, resize_to_grid
from attncontrol.pipelines.inversion import (
    ImageLike,
    Inversion,
    from_native,
    image_tensor,
    invert,
    matched_sampling,
    to_native,
)
from attncontrol.pipelines.stock import stock_call, twin_of

logger = logging.getLogger(__name__)

FLIPS = (None, "horizontal", "vertical")
HOLE_INITS = ("fill", "inverted", "noise")

#: DesignEdit's 20 px (removal, moves) and 30 px (pan/zoom) dilation at 1024 px, as fractions of the image side.
REMOVAL_DILATION = 20 / 1024
CANVAS_DILATION = 30 / 1024


@dataclass
class Layer:
    """One object of the image, lifted out as a layer and put back transformed.

    The transform is about the centre of the mask's bounding box: ``scale`` and ``flip`` keep that centre, then
    ``offset`` moves it. Parts pushed past the image border are cut off (documented clamping); a layer pushed off
    entirely is an error.

    Attributes:
        mask: the object (PIL image, array, tensor, or ``(x0, y0, x1, y1)`` pixel box).
        offset: ``(dx, dy)`` in pixels; positive moves right and down.
        scale: size factor (> 0).
        flip: ``None``, ``"horizontal"`` or ``"vertical"``.
        remove: erase the object instead of moving it (no transform allowed).
        order: paste order (lower first, so higher ends on top); default: the list order.
    """

    mask: MaskLike
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    flip: str | None = None
    remove: bool = False
    order: int | None = None

    @property
    def is_identity(self) -> bool:
        return tuple(self.offset) == (0.0, 0.0) and self.scale == 1.0 and self.flip is None


@dataclass
class _Paste:
    """A transformed layer ready for fusion: its image, its mask in the edited frame, its inversion."""

    image: torch.Tensor
    mask: torch.Tensor
    inversion: Inversion | None = None


def _transform(
    image: torch.Tensor,
    center: tuple[float, float],
    offset: tuple[float, float],
    scale: float,
    flip: str | None,
    *,
    padding: str = "border",
) -> torch.Tensor:
    """Resample ``[1, C, H, W]`` so the content at ``center`` is scaled/flipped about it and moved by ``offset``.

    Images repeat their border where the source lies outside (a moved object never drags blank space along);
    masks pass ``padding="zeros"``.
    """
    height, width = image.shape[-2:]
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = center
    # Output pixel p shows source pixel c + flip((p - c - offset) / scale).
    source_x = (grid_x - cx - offset[0]) / scale
    source_y = (grid_y - cy - offset[1]) / scale
    if flip == "horizontal":
        source_x = -source_x
    elif flip == "vertical":
        source_y = -source_y
    source_x, source_y = source_x + cx, source_y + cy
    grid = torch.stack([source_x / width * 2 - 1, source_y / height * 2 - 1], dim=-1)[None]
    return F.grid_sample(
        image.float(), grid.to(image.device), mode="bilinear", padding_mode=padding, align_corners=False
    )


def fill_from_surroundings(image: torch.Tensor, hole: torch.Tensor, *, iterations: int = 32) -> torch.Tensor:
    """Paint the hole of a ``[1, C, H, W]`` image with the colours of its rim (harmonic fill, coarse to fine).

    Each hole pixel ends as the average of its neighbours, so the hole holds a smooth blend of the colours on its
    boundary and nothing of the object it replaces (on a flat background: exactly that background). This is the
    "fill" masked-content mode of popular inpainting UIs. Solved on an image pyramid: each level starts from the
    coarser level's answer and runs ``iterations`` Jacobi sweeps with the known pixels held fixed.
    """
    known = (hole < 0.5).to(image)[None, None]
    pyramid = [(image, known)]
    while min(pyramid[-1][1].shape[-2:]) > 2:
        colour, weight = pyramid[-1]
        pooled_weight = F.avg_pool2d(weight, 2, ceil_mode=True)
        pooled = F.avg_pool2d(colour * weight, 2, ceil_mode=True) / pooled_weight.clamp_min(1e-8)
        # A coarse cell is known only if all its pixels are: partly covered cells would carry the object inwards.
        pyramid.append((pooled, (pooled_weight > 0.999).to(image)))
    kernel = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]], dtype=image.dtype)
    kernel = kernel.to(image.device).expand(image.shape[1], 1, 3, 3)
    filled = None
    for colour, weight in reversed(pyramid):
        if filled is None:
            known_mean = (colour * weight).sum((-2, -1), keepdim=True) / weight.sum((-2, -1), keepdim=True).clamp_min(1)
            filled = torch.where(weight > 0.5, colour, known_mean.expand_as(colour))
        else:
            start = F.interpolate(filled, size=colour.shape[-2:], mode="bilinear", align_corners=False)
            filled = torch.where(weight > 0.5, colour, start)
        for _ in range(iterations):
            smooth = F.conv2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), kernel, groups=image.shape[1])
            filled = torch.where(weight > 0.5, colour, smooth)
    return filled


def _object_mask(mask: MaskLike, size: tuple[int, int], name: str) -> torch.Tensor:
    """A binary ``[H, W]`` object mask of the image's size; an empty one is an error naming the argument."""
    plane = (load_mask(mask, name=name, image_size=size) > 0.5).float()
    if float(plane.max()) == 0.0:
        raise EditError(f"`{name}` has no pixel above 0.5")
    return plane


def _mask_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """The ``(x0, y0, x1, y1)`` pixel box (exclusive ends) of a mask's pixels above 0.5."""
    rows = torch.nonzero(mask.amax(dim=1) > 0.5).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0.5).flatten()
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _box_center(mask: torch.Tensor) -> tuple[float, float]:
    x0, y0, x1, y1 = _mask_box(mask)
    return (x0 + x1) / 2, (y0 + y1) / 2


def _latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A binary ``[1, 1, h, w]`` latent mask: any latent pixel the image mask touches (DesignEdit binarizes > 0)."""
    return (resize_to_grid(mask, latent_size) > 1e-3).float()[None, None]


class DesignEditMixin:
    """The shared engine of :class:`RemoveStableDiffusionPipeline` and :class:`LayeredEditStableDiffusionPipeline`."""

    def _check_fractions(self, blend_until: float, fuse_at: float) -> None:
        for name, value in (("blend_until", blend_until), ("fuse_at", fuse_at)):
            if not 0.0 <= value <= 1.0:
                raise EditError(f"`{name}` must be a fraction of the schedule in [0, 1], got {value}")

    def _hole_mask(self, mask: MaskLike, size: tuple[int, int], dilation: int | None, name: str) -> torch.Tensor:
        plane = (load_mask(mask, name=name, image_size=size) > 0.5).float()
        if float(plane.min()) > 0.0:
            raise EditError(f"`{name}` covers the whole image: there is no surrounding context to fill it from")
        pixels = round(REMOVAL_DILATION * max(size)) if dilation is None else int(dilation)
        if pixels < 0:
            raise EditError(f"`dilation` must be >= 0 pixels, got {dilation}")
        return dilate(plane, pixels)

    def _design_edit(
        self,
        image: torch.Tensor,
        *,
        hole: torch.Tensor | None,
        pastes: Sequence[_Paste],
        prompt: str,
        num_inference_steps: int,
        guidance_scale: float,
        key_mask_target: str | None,
        key_mask_steps: tuple[float, float],
        refine_mask: MaskLike | None,
        blend_until: float,
        fuse_at: float,
        keep_outside: bool,
        keep_layers: bool,
        hole_init: str,
        generator: torch.Generator | None,
        output_type: str,
        return_dict: bool,
        callback_on_step_end: Callable | None,
        stock_kwargs: dict[str, Any],
        source: Inversion | None = None,
    ) -> Any:
        if key_mask_target is not None and key_mask_target not in KEY_MASK_TARGETS:
            raise EditError(f"`key_mask_target` must be one of {KEY_MASK_TARGETS} or None, got {key_mask_target!r}")
        if hole_init not in HOLE_INITS:
            raise EditError(f"`hole_init` must be one of {HOLE_INITS}, got {hole_init!r}")
        self._check_fractions(blend_until, fuse_at)
        size = tuple(image.shape[-2:])
        controls = []
        if hole is not None and key_mask_target is not None:
            # Built before any inversion: the control validates its steps and masks, so bad ones fail at once.
            controls.append(
                KeyMaskedSelfAttention(
                    SpatialMask(hole, size, name="mask_image"),
                    target=key_mask_target,
                    steps=key_mask_steps,
                    refine_mask=None if refine_mask is None else SpatialMask(refine_mask, size, name="refine_mask"),
                )
            )
        invert_kwargs = {**stock_kwargs, "num_inference_steps": num_inference_steps, "guidance_scale": 1.0}
        if source is not None and hole_init == "fill":
            raise EditError("`inversion` cannot be reused with hole_init='fill', which inverts the filled image")
        if source is not None and (source.num_steps != num_inference_steps or source.image_size != size):
            raise EditError("`inversion` was made with another number of steps or image size than this edit")
        if source is None:
            start_image = fill_from_surroundings(image, hole) if hole is not None and hole_init == "fill" else image
            source = invert(self, (start_image + 1) / 2, prompt, **invert_kwargs)
        for paste in pastes:
            paste.inversion = invert(self, (paste.image + 1) / 2, prompt, **invert_kwargs)

        latent_size = tuple(source.latents.shape[-2:])
        device = self._execution_device
        # Every level goes to the device once, not once per step.
        source = source.to(device)
        for paste in pastes:
            paste.inversion = paste.inversion.to(device)
        hole_latent = None if hole is None else _latent_mask(hole, latent_size).to(device)
        paste_latents = [_latent_mask(paste.mask, latent_size).to(device) for paste in pastes]
        edited = torch.zeros(1, 1, *latent_size, device=device)
        for mask in [hole_latent, *paste_latents]:
            if mask is not None:
                edited = torch.maximum(edited, mask)
        blend_steps = round(blend_until * num_inference_steps)
        fuse_step = round(fuse_at * num_inference_steps)

        start = source.noise.to(device)
        if hole_latent is not None and hole_init == "noise":
            noise = torch.randn(start.shape, generator=generator, device=generator.device if generator else "cpu")
            start = start * (1 - hole_latent) + noise.to(device) * hole_latent

        def step_end(pipe: Any, index: int, timestep: Any, kwargs: dict) -> dict:
            latents = from_native(self, kwargs["latents"], size)
            # after_step(last) is the encoded start image: with keep_outside the final latent outside the edit is
            # the source's own, so the rest of the image is its VAE round trip.
            level = source.after_step(index).to(latents)
            if hole_latent is not None and index < blend_steps:
                latents = latents * hole_latent + level * (1 - hole_latent)
            if keep_outside and index >= blend_steps:
                latents = latents * edited + level * (1 - edited)
            if index + 1 == fuse_step or (keep_layers and index + 1 > fuse_step):
                for paste, mask in zip(pastes, paste_latents, strict=True):
                    latents = latents * (1 - mask) + paste.inversion.after_step(index).to(latents) * mask
            kwargs["latents"] = to_native(self, latents)
            if callback_on_step_end is not None:
                kwargs = callback_on_step_end(pipe, index, timestep, kwargs)
            return kwargs

        call = {
            **stock_kwargs,
            "prompt": prompt,
            "latents": to_native(self, start),
            "height": size[0],
            "width": size[1],
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "output_type": output_type,
            "return_dict": True,
            "callback_on_step_end": step_end,
        }
        with matched_sampling(self), AttentionController(self, controls):
            output = stock_call(self)(**call)
        if not return_dict:
            return (output.images,)
        return StableDiffusionPipelineOutput(images=output.images, nsfw_content_detected=None)


_EDIT_DOC = """
        Args:
            image: the real image to edit (PIL, ``[H, W, 3]`` array, or ``[3, H, W]`` tensor in [0, 1]); its sides
                must suit the model (multiples of ``attncontrol.pipelines.inversion.size_multiple(pipe)``).
            prompt: conditioning for inversion and sampling; DesignEdit uses ``""``.
            num_inference_steps / guidance_scale: the DDIM schedule (inversion uses the same) and CFG while editing.
            dilation: pixels the hole is grown by (default DesignEdit's 20 px at 1024 px, scaled to the image).
            key_mask_target: ``"key"`` (default), ``"key-zero"``, ``"query"``, ``"value"``, or ``None`` for plain
                latent-blending inpainting (the baseline the bench compares against).
            key_mask_steps: fractions of the schedule where key masking is on (default steps 1..39 of 50).
            refine_mask: an extra region hidden during the first half (artifact suppression around leftovers).
            blend_until: the source is copied back outside the hole until this fraction of the schedule (41/50).
            keep_outside: keep copying the source outside the edited region (the hole and the pasted layers) to the
                last step, so the rest of the image is the VAE round trip of the input (default). DesignEdit lets
                the whole image run free after ``blend_until`` (``False``), which harmonizes more but can alter
                objects far from the edit.
            keep_layers (layered edits): after the fusion, keep resetting each pasted layer to its own inverted
                latent at every step, so a moved object arrives exactly as it looked (default); ``False`` lets the
                last steps redraw it with the rest of the canvas, as the paper does.
            hole_init: what the hole starts from: ``"fill"`` (default) inverts the image with the hole painted in
                the surrounding colours; ``"inverted"`` keeps the object's own inverted latent (DesignEdit's
                choice, which a small model rebuilds); ``"noise"`` starts from fresh noise.
            generator: for ``hole_init="noise"``.
            kwargs: further stock arguments for inversion and sampling (e.g. ``max_sequence_length`` for Flux).
"""
_INVERSION_DOC = """            inversion: a ready ``Inversion`` of ``image`` (from ``inversion.invert``), so
                several edits of one image invert it once.
"""


class RemoveMixin(DesignEditMixin):
    """Erase the masked object and fill the background from its surroundings."""

    def __call__(
        self,
        image: ImageLike,
        mask_image: MaskLike,
        prompt: str = "",
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        dilation: int | None = None,
        key_mask_target: str | None = "key",
        key_mask_steps: tuple[float, float] = DESIGNEDIT_KEY_MASK_STEPS,
        refine_mask: MaskLike | None = None,
        blend_until: float = 0.82,
        keep_outside: bool = True,
        hole_init: str = "fill",
        generator: torch.Generator | None = None,
        inversion: Inversion | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        pixels = image_tensor(self, image)
        hole = self._hole_mask(mask_image, tuple(pixels.shape[-2:]), dilation, "mask_image")
        return self._design_edit(
            pixels,
            hole=hole,
            pastes=[],
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            key_mask_target=key_mask_target,
            key_mask_steps=key_mask_steps,
            refine_mask=refine_mask,
            blend_until=blend_until,
            fuse_at=1.0,
            keep_outside=keep_outside,
            keep_layers=False,
            hole_init=hole_init,
            generator=generator,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            stock_kwargs=kwargs,
            source=inversion,
        )

    __call__.__doc__ = "Remove the object under ``mask_image``.\n" + _EDIT_DOC + _INVERSION_DOC


class LayeredEditMixin(DesignEditMixin):
    """Move, resize, flip or remove several objects at once, or pan/zoom out the whole canvas."""

    def _check_layers(self, layers: Sequence[Layer], size: tuple[int, int]) -> list[tuple[int, Layer, torch.Tensor]]:
        if isinstance(layers, Layer):
            layers = [layers]
        checked, orders = [], {}
        for index, layer in enumerate(layers):
            name = f"layers[{index}]"
            if not isinstance(layer, Layer):
                raise EditError(f"`{name}` must be a Layer, got {type(layer).__name__}")
            if not (math.isfinite(layer.scale) and layer.scale > 0):
                raise EditError(f"`{name}.scale` must be a positive finite number, got {layer.scale}")
            if len(layer.offset) != 2 or not all(math.isfinite(float(v)) for v in layer.offset):
                raise EditError(f"`{name}.offset` must be a finite (dx, dy) pair, got {layer.offset!r}")
            if layer.flip not in FLIPS:
                raise EditError(f"`{name}.flip` must be one of {FLIPS}, got {layer.flip!r}")
            if layer.remove and not layer.is_identity:
                raise EditError(f"`{name}` both removes the object and transforms it; do one or the other")
            order = index if layer.order is None else layer.order
            if order in orders:
                raise EditError(f"`{name}` and `layers[{orders[order]}]` have the same paste order {order}")
            orders[order] = index
            mask = _object_mask(layer.mask, size, f"{name}.mask")
            checked.append((order, layer, mask))
        return [(index, layer, mask) for index, (_, layer, mask) in enumerate(sorted(checked, key=lambda c: c[0]))]

    def __call__(
        self,
        image: ImageLike,
        layers: Sequence[Layer] = (),
        prompt: str = "",
        *,
        pan: tuple[float, float] = (0.0, 0.0),
        zoom: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        dilation: int | None = None,
        key_mask_target: str | None = "key",
        key_mask_steps: tuple[float, float] = DESIGNEDIT_KEY_MASK_STEPS,
        refine_mask: MaskLike | None = None,
        blend_until: float = 0.82,
        fuse_at: float = 0.84,
        keep_outside: bool = True,
        keep_layers: bool = True,
        hole_init: str = "fill",
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        pixels = image_tensor(self, image)
        canvas_edit = tuple(pan) != (0.0, 0.0) or zoom != 1.0
        if canvas_edit and layers:
            raise EditError("`pan`/`zoom` transform the whole canvas; edit `layers` in a separate call")
        if canvas_edit:
            pixels, hole = self._canvas(pixels, pan, zoom, dilation)
            pastes: list[_Paste] = []
        else:
            if not layers:
                raise EditError("nothing to edit: give `layers`, or `pan`/`zoom`")
            pixels, hole, pastes = self._layers(pixels, layers, dilation)
        return self._design_edit(
            pixels,
            hole=hole,
            pastes=pastes,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            key_mask_target=key_mask_target,
            key_mask_steps=key_mask_steps,
            refine_mask=refine_mask,
            blend_until=blend_until,
            fuse_at=fuse_at,
            keep_outside=keep_outside,
            keep_layers=keep_layers,
            hole_init=hole_init,
            generator=generator,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            stock_kwargs=kwargs,
        )

    __call__.__doc__ = (
        "Apply ``layers`` (move/resize/flip/remove objects) or ``pan``/``zoom`` (< 1 zooms out) to ``image``.\n"
        + _EDIT_DOC
    )

    def _layers(
        self, pixels: torch.Tensor, layers: Sequence[Layer], dilation: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, list[_Paste]]:
        size = tuple(pixels.shape[-2:])
        hole = torch.zeros(size)
        pastes = []
        for index, layer, mask in self._check_layers(layers, size):
            if layer.is_identity and not layer.remove:
                continue
            hole = torch.maximum(hole, mask)
            if layer.remove:
                continue
            center = _box_center(mask)
            moved = _transform(mask[None, None], center, layer.offset, layer.scale, layer.flip, padding="zeros")
            moved_mask = (moved[0, 0] > 0.5).float()
            if float(moved_mask.sum()) == 0.0:
                raise EditError(f"`layers[{index}]` moves its object entirely off the canvas")
            moved_image = _transform((pixels + 1) / 2, center, layer.offset, layer.scale, layer.flip) * 2 - 1
            pastes.append(_Paste(moved_image, moved_mask))
        if float(hole.max()) == 0.0:
            raise EditError("every layer is untransformed and kept: nothing to edit")
        pixels_hole = self._hole_mask(hole, size, dilation, "layers")
        return pixels, pixels_hole, pastes

    def _canvas(
        self, pixels: torch.Tensor, pan: tuple[float, float], zoom: float, dilation: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not (math.isfinite(zoom) and 0 < zoom <= 1.0):
            raise EditError(f"`zoom` must be in (0, 1] (zooming out; crop the image to zoom in), got {zoom}")
        size = tuple(pixels.shape[-2:])
        height, width = size
        if abs(pan[0]) >= width or abs(pan[1]) >= height:
            raise EditError(f"`pan` {tuple(pan)} moves the image entirely off its {height}x{width} canvas")
        center = (width / 2, height / 2)
        canvas = _transform((pixels + 1) / 2, center, pan, zoom, None) * 2 - 1
        # The canvas repeats the image's edge where the image no longer reaches; that border is the hole.
        covered = _transform(torch.ones(1, 1, *size), center, pan, zoom, None, padding="zeros")[0, 0]
        uncovered = (covered < 0.999).float()
        if float(uncovered.max()) == 0.0:
            raise EditError("`pan`/`zoom` leave no new canvas to fill")
        pixels_dilation = round(CANVAS_DILATION * max(size)) if dilation is None else dilation
        return canvas, self._hole_mask(uncovered, size, pixels_dilation, "pan/zoom border")


class RemoveStableDiffusionPipeline(RemoveMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x/2.x) that removes objects from real images."""


class RemoveStableDiffusionXLPipeline(RemoveMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` that removes objects from real images."""


class RemoveFluxPipeline(RemoveMixin, FluxPipeline):
    """``FluxPipeline`` that removes objects from real images (image keys hidden in the joint attention; Euler
    flow-matching inversion)."""


class LayeredEditStableDiffusionPipeline(LayeredEditMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x/2.x) for layered edits of real images."""


class LayeredEditStableDiffusionXLPipeline(LayeredEditMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` for layered edits of real images."""


class LayeredEditFluxPipeline(LayeredEditMixin, FluxPipeline):
    """``FluxPipeline`` for layered edits of real images."""


_TWINS = {
    RemoveMixin: (
        (StableDiffusionXLPipeline, RemoveStableDiffusionXLPipeline),
        (StableDiffusionPipeline, RemoveStableDiffusionPipeline),
        (FluxPipeline, RemoveFluxPipeline),
    ),
    LayeredEditMixin: (
        (StableDiffusionXLPipeline, LayeredEditStableDiffusionXLPipeline),
        (StableDiffusionPipeline, LayeredEditStableDiffusionPipeline),
        (FluxPipeline, LayeredEditFluxPipeline),
    ),
}


def to_editing(pipe: Any, kind: type[DesignEditMixin] = RemoveMixin) -> Any:
    """The removal (``RemoveMixin``) or layered-edit (``LayeredEditMixin``) twin of an SD, SDXL or Flux pipeline,
    sharing its components (``from_pipe``)."""
    if isinstance(pipe, kind):
        return pipe
    if kind not in _TWINS:
        raise TypeError(f"`kind` must be RemoveMixin or LayeredEditMixin, got {kind!r}")
    return twin_of(pipe, _TWINS[kind], "edits")
