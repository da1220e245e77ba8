"""Edits in which a target generation borrows attention from source rows of the same batch: object drag
(DiffUHaul), composition (PrimeComposer) and consistent edits (MasaCtrl), for SD 1.x/2.x, SDXL and Flux.

    from attncontrol.pipelines import ComposeStableDiffusionPipeline, DragStableDiffusionPipeline

    drag = DragStableDiffusionPipeline.from_pretrained(model_id_or_path)           # or .from_pipe(pipe)
    moved = drag(image, mask_image=object_mask, offset=(12, -4)).images[0]

    compose = ComposeStableDiffusionPipeline.from_pipe(drag)
    scene = compose(background, reference_image=photo, reference_mask=photo_mask, box=(8, 8, 30, 30)).images[0]

Every pipeline runs one batch whose rows have explicit roles (``BatchLayout`` branches): rows that *follow* an
inversion (their latent is reset to the inverted image's latent of the same level after each step, so their
attention is the real image's) and the target row that is generated. Real images are inverted with the shared
inversion of :mod:`attncontrol.pipelines.inversion`. The pipeline's scheduler and attention processors are restored
afterwards, also after an exception; the inputs are never modified.

- Drag: the object is cut out (its hole filled from the surroundings, as in removal), pasted at its new place and
  that composite is inverted: the target row starts from it, and the object's latent follows that inversion until
  ``hold_object_until`` (to the end by default). Outside the edited region the target keeps the source's latents;
  :class:`attncontrol.controls.sharing.AnchoredSharing` lets the object's tokens read the source object and all
  other tokens read only the source background (so the old place fills with background), blended with the
  target's own attention early and by localized feature passing late. DiffUHaul's BlobGEN model is not needed: the
  composite's inversion supplies the new layout.
- Compose: the reference object is placed in ``box`` (scaled to fit) and pasted onto the background; rows are
  background, reference (the transformed reference image) and target. The target is the inverted composite until
  ``paste_until`` (default 0.84; the paper's 0.2 lets a small model blur the object), then the background's latent
  outside the object and generated content inside until ``blend_until`` (PrimeComposer's tau_c and tau_b).
  With ``steering=True`` :class:`CorrelationSteering` steers its object tokens with the reference's keys until 10%
  past the release (the paper's tau_a - tau_c); ``object_phrase`` adds the region-constrained cross-attention.
- Consistent edit: a source and a target prompt from the same noise (or a real image's inversion); the target's
  decoder self-attention reads the source's keys and values from step 4 of 50 (MasaCtrl), so the appearance stays
  while the prompt changes pose or layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from attncontrol.controls.regions import RegionalAttention, ResolvedRegion, weight_schedule
from attncontrol.controls.sharing import (
    MASACTRL_LAYERS,
    MASACTRL_STEPS,
    PRIMECOMPOSER_STEPS,
    SHARE_MODES,
    AnchoredSharing,
    CorrelationSteering,
    SharedAttention,
    ShareRegion,
)
from attncontrol.core.control import AttentionControl
from attncontrol.core.controller import AttentionController
from attncontrol.core.errors import EditError
from attncontrol.core.layers import LayerSpec
from attncontrol.core.masks import MaskLike, SpatialMask, dilate, feather
from attncontrol.pipelines.editing import (
    DesignEditMixin,
    _box_center,
    _latent_mask,
    _mask_box,
    _object_mask,
    _transform,
    fill_from_surroundings,
)
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

DRAG_SHARING = ("anchored", "masked", None)
#: PrimeComposer's tau_c as its sampler runs it (the README's --tau_c never reaches it): the paste is released here
PRIMECOMPOSER_PASTE_UNTIL = 0.2
FITS = ("contain", "none")
Box = tuple[float, float, float, float]


@dataclass
class _Row:
    """One batch row: its branch, its start latent ``[1, C, h, w]``, and the inversion it follows (if any)."""

    branch: str
    start: torch.Tensor
    follows: Inversion | None = None


def _check_box(box: Sequence[float], size: tuple[int, int], name: str) -> Box:
    """A pixel box ``(x0, y0, x1, y1)`` inside the image, or relative when every value is <= 1."""
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise EditError(f"`{name}` must be four finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    height, width = size
    if max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    if not (x0 < x1 and y0 < y1):
        raise EditError(f"`{name}` {box!r} is empty: need x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise EditError(f"`{name}` {box!r} reaches outside the {width}x{height} image")
    return x0, y0, x1, y1


def _placement(object_box: Box, box: Box, fit: str, name: str) -> tuple[tuple[float, float], float]:
    """(offset of the object's box centre, scale) that put an object into ``box``.

    ``fit="contain"`` scales the object (up or down, aspect kept) to the largest size that fits the box;
    ``fit="none"`` keeps its size and refuses an object larger than the box.
    """
    if fit not in FITS:
        raise EditError(f"`fit` must be one of {FITS}, got {fit!r}")
    ow, oh = object_box[2] - object_box[0], object_box[3] - object_box[1]
    bw, bh = box[2] - box[0], box[3] - box[1]
    if fit == "contain":
        scale = min(bw / ow, bh / oh)
    else:
        if ow > bw or oh > bh:
            raise EditError(
                f"the object is {ow:.0f}x{oh:.0f} px but `{name}` is {bw:.0f}x{bh:.0f}; enlarge the box or pass "
                "fit='contain' to scale the object into it"
            )
        scale = 1.0
    center = ((object_box[0] + object_box[2]) / 2, (object_box[1] + object_box[3]) / 2)
    offset = ((box[0] + box[2]) / 2 - center[0], (box[1] + box[3]) / 2 - center[1])
    return offset, scale


def place_object(
    image: torch.Tensor, mask: torch.Tensor, offset: tuple[float, float], scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` ([1, 3, H, W] in [-1, 1]) and its object ``mask`` ([H, W]) moved by ``offset`` and scaled by
    ``scale`` about the centre of the mask's box: (transformed image, binary transformed mask)."""
    center = _box_center(mask)
    placed = (_transform(mask[None, None], center, offset, scale, None, padding="zeros")[0, 0] > 0.5).float()
    placed_image = _transform((image + 1) / 2, center, offset, scale, None) * 2 - 1
    return placed_image, placed


def cut_and_paste(
    image: torch.Tensor, mask: torch.Tensor, offset: tuple[float, float], scale: float, hole: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive drag: the ``hole`` filled from its surroundings and the object pasted at its new place.

    Returns (composite [1, 3, H, W] in [-1, 1], the object's new mask [H, W]).
    """
    moved_image, moved = place_object(image, mask, offset, scale)
    composite = fill_from_surroundings(image, hole)
    return composite * (1 - moved) + moved_image * moved, moved


def paste_reference(
    background: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, box: Sequence[float], fit: str = "contain"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive composition: the reference object placed into ``box`` (see :func:`_placement`) and pasted.

    Returns (composite, transformed reference image, the object's mask in the background), all at the background's
    size; ``box`` is checked against it.
    """
    size = tuple(background.shape[-2:])
    offset, scale = _placement(_mask_box(mask), _check_box(box, size, "box"), fit, "box")
    placed_reference, placed = place_object(reference, mask, offset, scale)
    return background * (1 - placed) + placed_reference * placed, placed_reference, placed


#: pixels the edited region is grown by before the input's own pixels are put back around it
OVERLAY_MARGIN = 2


def overlay_outside(images: torch.Tensor, original: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Put ``original``'s pixels back outside ``region`` (grown by :data:`OVERLAY_MARGIN` px, 1 px soft edge).

    ``images`` are ``[N, 3, H, W]`` in [0, 1], ``original`` ``[1, 3, H, W]`` in [-1, 1], ``region`` ``[H, W]``. What
    inpainting UIs call "overlay": the VAE round trip cannot change a pixel the edit did not touch.
    """
    soft = feather(dilate((region > 0.5).float(), OVERLAY_MARGIN), 1.0).to(images)
    return images * soft + ((original.to(images) + 1) / 2) * (1 - soft)


class SharingEditMixin(DesignEditMixin):
    """The engine shared by drag, composition and consistent edits: one batch, explicit row roles."""

    def _run_rows(
        self,
        rows: Sequence[_Row],
        *,
        size: tuple[int, int],
        controls: Sequence[AttentionControl],
        prompt: str | Sequence[str],
        num_inference_steps: int,
        guidance_scale: float,
        target_step: Callable[[int, torch.Tensor], torch.Tensor] | None,
        object_phrase: str | None = None,
        phrase_mask: SpatialMask | None = None,
        output_type: str,
        return_dict: bool,
        callback_on_step_end: Callable | None,
        stock_kwargs: dict[str, Any],
        keep_rows: bool = False,
        overlay: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        device = self._execution_device
        follows = [None if row.follows is None else row.follows.to(device) for row in rows]
        target = [row.branch for row in rows].index("target")
        prompts = [prompt] * len(rows) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(rows):
            raise EditError(f"got {len(prompts)} prompts for {len(rows)} rows")

        def step_end(pipe: Any, index: int, timestep: Any, kwargs: dict) -> dict:
            latents = from_native(self, kwargs["latents"], size).clone()
            for row, inversion in enumerate(follows):
                if inversion is not None:
                    latents[row] = inversion.after_step(index)[0].to(latents)
            if target_step is not None:
                latents[target] = target_step(index, latents[target : target + 1])[0]
            kwargs["latents"] = to_native(self, latents)
            if callback_on_step_end is not None:
                kwargs = callback_on_step_end(pipe, index, timestep, kwargs)
            return kwargs

        start = torch.cat([row.start.to(device) for row in rows])
        call = {
            **stock_kwargs,
            "prompt": prompts,
            "latents": to_native(self, start),
            "height": size[0],
            "width": size[1],
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "output_type": "pt" if overlay is not None and output_type != "latent" else output_type,
            "return_dict": True,
            "callback_on_step_end": step_end,
        }
        branches = [row.branch for row in rows]
        controller = AttentionController(self, controls, branches=branches)
        if object_phrase is not None:
            tokens = controller.token_indices(prompts[target], object_phrase, name="object_phrase")
            region = ResolvedRegion(phrase_mask, tokens, weight_schedule(1.0), name="object")
            controller.add(RegionalAttention([region], mode="hard", hide_leaks=not self._t5_text()))
        with matched_sampling(self), controller:
            output = stock_call(self)(**call)
        images = output.images if keep_rows else output.images[target : target + 1]
        if overlay is not None and call["output_type"] == "pt":
            original, region = overlay
            images = images.clone()
            row = target if keep_rows else 0
            images[row : row + 1] = overlay_outside(images[row : row + 1], original, region)
            if output_type != "pt":
                images = self.image_processor.pt_to_numpy(images)
                images = self.image_processor.numpy_to_pil(images) if output_type == "pil" else images
        if not return_dict:
            return (images,)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    def _t5_text(self) -> bool:
        return isinstance(self, FluxPipeline)

    def _invert(self, pixels: torch.Tensor, prompt: str, steps: int, kwargs: dict[str, Any]) -> Inversion:
        return invert(self, (pixels + 1) / 2, prompt, **{**kwargs, "num_inference_steps": steps, "guidance_scale": 1.0})


_SHARED_DOC = """\
            prompt: conditioning for inversion and sampling (``""`` works; a caption of the result may help).
            num_inference_steps / guidance_scale: the DDIM (Flux: Euler) schedule, shared with the inversion, and
                CFG while sampling.
            generator: unused by the deterministic schedule; accepted for symmetry with the stock pipelines.
            kwargs: further stock arguments (e.g. ``max_sequence_length`` for Flux).
"""


class DragMixin(SharingEditMixin):
    """Move an object of a real image to a new place (DiffUHaul-style attention sharing)."""

    def __call__(
        self,
        image: ImageLike,
        mask_image: MaskLike,
        offset: tuple[float, float] | None = None,
        *,
        target_box: Sequence[float] | None = None,
        fit: str = "contain",
        prompt: str = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        sharing: str | None = "anchored",
        interpolate_until: float = 0.5,
        pass_from: float = 0.5,
        hold_object_until: float = 1.0,
        dilation: int | None = None,
        keep_outside: bool = True,
        overlay_original: bool = True,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        """Drag the object under ``mask_image`` by ``offset`` (dx, dy pixels) or into ``target_box``.

        Args:
            image: the real image (PIL, ``[H, W, 3]`` array or ``[3, H, W]`` tensor in [0, 1]).
            mask_image: the object's mask, the image's size.
            offset: ``(dx, dy)`` in pixels, positive right and down; or give ``target_box`` instead.
            target_box: ``(x0, y0, x1, y1)`` where the object should go (pixels, or relative when all <= 1); the
                object is scaled into it as ``fit`` says.
            fit: ``"contain"`` (scale to the largest size that fits the box, aspect kept) or ``"none"`` (keep the
                size; an object larger than the box is an error).
            sharing: ``"anchored"`` (DiffUHaul: interpolation early, feature passing late; default), ``"masked"``
                (plain masked sharing at every step) or ``None`` (no sharing: the inverted composite alone, the
                cut-and-paste baseline).
            interpolate_until / pass_from: the two phases of anchored sharing (fractions of the schedule).
            hold_object_until: until this fraction the object's latent follows the inverted cut-and-paste image
                (the new layout; DiffUHaul gets it from a layout-conditioned model instead). The default holds it to
                the end, so the object arrives as it looked and sharing shapes the vacated place and the seams;
                lower values let the object's last steps run free under sharing (on the small shapes model it then
                blurs: 70 of 100 drags at 0.5 against 80+ held, see the README).
            dilation: pixels the old place is grown by before it is filled (default as for removal).
            keep_outside: keep the source's latents outside the edited region to the end (default); ``False``
                lets the last steps after 82% run free.
            overlay_original: put the input's own pixels back outside the edited region (the old and new place,
                grown by 2 px), so the VAE round trip cannot alter the rest of the image (default).
        """
        if (offset is None) == (target_box is None):
            raise EditError("give exactly one of `offset` (dx, dy) and `target_box` (x0, y0, x1, y1)")
        if sharing not in DRAG_SHARING:
            raise EditError(f"`sharing` must be one of {DRAG_SHARING}, got {sharing!r}")
        if not 0.0 <= hold_object_until <= 1.0:
            raise EditError(f"`hold_object_until` must be a fraction in [0, 1], got {hold_object_until}")
        pixels = image_tensor(self, image)
        size = tuple(pixels.shape[-2:])
        mask = _object_mask(mask_image, size, "mask_image")
        scale = 1.0
        if target_box is not None:
            offset, scale = _placement(_mask_box(mask), _check_box(target_box, size, "target_box"), fit, "target_box")
        if len(offset) != 2 or not all(math.isfinite(float(v)) for v in offset):
            raise EditError(f"`offset` must be a finite (dx, dy) pair, got {offset!r}")
        hole = self._hole_mask(mask, size, dilation, "mask_image")
        composite, moved = cut_and_paste(pixels, mask, offset, scale, hole)
        if float(moved.sum()) == 0.0:
            raise EditError("the drag moves the object entirely off the canvas")

        controls: list[AttentionControl] = []
        if sharing == "anchored":
            controls.append(
                AnchoredSharing(
                    target_mask=SpatialMask(moved, size, name="target mask"),
                    source_mask=SpatialMask(mask, size, name="mask_image"),
                    interpolate_until=interpolate_until,
                    pass_from=pass_from,
                )
            )
        elif sharing == "masked":
            controls.append(
                SharedAttention(target_mask=moved, source_mask=mask, image_size=size, layers=None, steps=None)
            )
        source = self._invert(pixels, prompt, num_inference_steps, kwargs)
        target = self._invert(composite, prompt, num_inference_steps, kwargs)
        device = self._execution_device
        latent_size = tuple(source.latents.shape[-2:])
        edited = torch.maximum(_latent_mask(hole, latent_size), _latent_mask(moved, latent_size)).to(device)
        moved_latent = _latent_mask(moved, latent_size).to(device)
        blend_steps = round(0.82 * num_inference_steps)
        hold_steps = round(hold_object_until * num_inference_steps)
        source, target = source.to(device), target.to(device)

        def keep_source_outside(index: int, latents: torch.Tensor) -> torch.Tensor:
            if index < blend_steps or keep_outside:
                latents = latents * edited + source.after_step(index).to(latents) * (1 - edited)
            if index < hold_steps:
                latents = latents * (1 - moved_latent) + target.after_step(index).to(latents) * moved_latent
            return latents

        rows = [_Row("source", source.noise, follows=source), _Row("target", target.noise)]
        overlay = (pixels, torch.maximum(hole, moved)) if overlay_original else None
        return self._run_rows(
            rows,
            size=size,
            controls=controls,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            target_step=keep_source_outside,
            overlay=overlay,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            stock_kwargs=kwargs,
        )

    __call__.__doc__ += _SHARED_DOC


class ComposeMixin(SharingEditMixin):
    """Put an object from a reference image into a background image (PrimeComposer)."""

    def __call__(
        self,
        image: ImageLike,
        reference_image: ImageLike,
        reference_mask: MaskLike,
        box: Sequence[float],
        *,
        fit: str = "contain",
        prompt: str = "",
        object_phrase: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        steering: bool = False,
        steer_steps: tuple[float, float] | None = None,
        share_background: bool = False,
        paste_until: float = 0.84,
        blend_until: float = 0.8,
        keep_outside: bool = True,
        overlay_original: bool = True,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        """Paste the object under ``reference_mask`` of ``reference_image`` into ``box`` of ``image``, harmonized.

        Args:
            image: the background (PIL, ``[H, W, 3]`` array or ``[3, H, W]`` tensor in [0, 1]).
            reference_image: the image holding the object; it must have the background's size.
            reference_mask: the object in ``reference_image``, the reference's size.
            box: ``(x0, y0, x1, y1)`` in the background (pixels, or relative when all <= 1).
            fit: ``"contain"`` scales the object to the largest size that fits the box (aspect kept, default);
                ``"none"`` keeps its size and refuses an object larger than the box.
            object_phrase: a phrase of ``prompt`` naming the object; its tokens are then visible only from inside
                the object (region-constrained cross-attention).
            steering: PrimeComposer's attention steering from the reference during ``steer_steps``. Off by default:
                on the small shapes model it lowers placement (68 vs 81 of 100 compositions, see the README).
            steer_steps: fractions of the schedule; default from the start to 10% past ``paste_until``, the gap the
                paper leaves between releasing the paste and ending the steering (tau_c 0.2, tau_a 0.3).
            share_background: also let background tokens read the background row and object tokens the
                reference row (TF-ICON-style composite self-attention) during ``steer_steps``.
            paste_until: the target is the inverted composite until this fraction (tau_c). Default 0.84, so the last
                8 of 50 steps harmonize the seams: on the small shapes model an object released at the paper's 0.2
                blurs (59 of 100 compositions land, see the README).
            blend_until: until this fraction the background's latent is kept outside the object (tau_b = 0.8).
            keep_outside: keep the background outside the object to the end (default), not only until
                ``blend_until``.
            overlay_original: put the background's own pixels back outside the object (grown by 2 px), so the
                VAE round trip cannot alter the rest of the image (default).
        """
        for name, value in (("paste_until", paste_until), ("blend_until", blend_until)):
            if not 0.0 <= value <= 1.0:
                raise EditError(f"`{name}` must be a fraction of the schedule in [0, 1], got {value}")
        if steer_steps is None:
            steer_steps = (0.0, min(1.0, paste_until + PRIMECOMPOSER_STEPS[1] - PRIMECOMPOSER_PASTE_UNTIL))
        background = image_tensor(self, image)
        reference = image_tensor(self, reference_image, name="reference_image")
        size = tuple(background.shape[-2:])
        if tuple(reference.shape[-2:]) != size:
            raise EditError(
                f"`reference_image` is {reference.shape[-1]}x{reference.shape[-2]} but `image` is "
                f"{size[1]}x{size[0]}; resize or pad the reference to the background's size first"
            )
        mask = _object_mask(reference_mask, size, "reference_mask")
        composite, placed_reference, placed = paste_reference(background, reference, mask, box, fit)
        object_mask = SpatialMask(placed, size, name="placed reference_mask")

        controls: list[AttentionControl] = []
        if steering:
            controls.append(CorrelationSteering(object_mask, steps=steer_steps))
        if share_background:
            regions = [
                ShareRegion("reference", object_mask, object_mask),
                ShareRegion("background", SpatialMask(1 - placed, size, name="background"), None),
            ]
            controls.append(SharedAttention(regions=regions, guidance=None, layers=None, steps=steer_steps))
        back = self._invert(background, prompt, num_inference_steps, kwargs)
        ref = self._invert(placed_reference, prompt, num_inference_steps, kwargs)
        start = self._invert(composite, prompt, num_inference_steps, kwargs)
        device = self._execution_device
        inside = _latent_mask(placed, tuple(back.latents.shape[-2:])).to(device)
        paste_steps = round(paste_until * num_inference_steps)
        blend_steps = round(blend_until * num_inference_steps)
        back, start = back.to(device), start.to(device)

        def blend(index: int, latents: torch.Tensor) -> torch.Tensor:
            if index < paste_steps:
                return start.after_step(index).to(latents)
            if index < blend_steps or keep_outside:
                latents = latents * inside + back.after_step(index).to(latents) * (1 - inside)
            return latents

        rows = [
            _Row("background", back.noise, follows=back),
            _Row("reference", ref.noise, follows=ref),
            _Row("target", start.noise),
        ]
        return self._run_rows(
            rows,
            size=size,
            controls=controls,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            target_step=blend,
            overlay=(background, placed) if overlay_original else None,
            object_phrase=object_phrase,
            phrase_mask=object_mask,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            stock_kwargs=kwargs,
        )

    __call__.__doc__ += _SHARED_DOC


class ConsistentEditMixin(SharingEditMixin):
    """Change pose or layout by prompt while keeping appearance (MasaCtrl's mutual self-attention)."""

    def __call__(
        self,
        prompt: str,
        target_prompt: str,
        *,
        image: ImageLike | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        mode: str = "replace",
        adain: bool = False,
        layers: LayerSpec = MASACTRL_LAYERS,
        steps: tuple[float, float] = MASACTRL_STEPS,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        return_source: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate ``target_prompt`` with the appearance of ``prompt``'s image (or of ``image``).

        Args:
            prompt: describes the source (generated from the same noise, or the real ``image``).
            target_prompt: the edit ("a running cat" for "a sitting cat").
            image: a real source image; it is inverted with ``prompt`` and its row follows the inversion.
            height / width: the generated size when there is no ``image`` (default: the model's).
            mode: ``"replace"`` (MasaCtrl) or ``"concat"`` (the target also reads its own keys).
            adain: StyleAligned's AdaIN of the target's queries and keys to the source's statistics.
            layers / steps: where and when sharing is on; default MasaCtrl's decoder layers from step 4 of 50.
            latents: ``[1, C, h, w]`` start noise (otherwise drawn from ``generator``).
            return_source: return ``[source, target]`` images instead of the target alone.
        """
        if mode not in SHARE_MODES:
            raise EditError(f"`mode` must be one of {SHARE_MODES}, got {mode!r}")
        controls = [SharedAttention(mode=mode, adain=adain, layers=layers, steps=steps)]
        if image is not None:
            pixels = image_tensor(self, image)
            size = tuple(pixels.shape[-2:])
            source = self._invert(pixels, prompt, num_inference_steps, kwargs)
            rows = [_Row("source", source.noise, follows=source), _Row("target", source.noise)]
        else:
            size = (height or self._default_height(), width or self._default_width())
            if latents is None:
                shape = self._latent_shape(size)
                latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
            rows = [_Row("source", latents), _Row("target", latents)]
        output = self._run_rows(
            rows,
            size=size,
            controls=controls,
            prompt=[prompt, target_prompt],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            target_step=None,
            output_type=output_type,
            return_dict=True,
            callback_on_step_end=callback_on_step_end,
            stock_kwargs=kwargs,
            keep_rows=return_source,
        )
        if not return_dict:
            return (output.images,)
        return output

    __call__.__doc__ += _SHARED_DOC

    def _default_height(self) -> int:
        if isinstance(self, FluxPipeline):
            return self.default_sample_size * self.vae_scale_factor
        return self.unet.config.sample_size * self.vae_scale_factor

    _default_width = _default_height

    def _latent_shape(self, size: tuple[int, int]) -> tuple[int, ...]:
        if isinstance(self, FluxPipeline):
            channels = self.transformer.config.in_channels // 4
            factor = self.vae_scale_factor
            return (1, channels, 2 * (size[0] // (factor * 2)), 2 * (size[1] // (factor * 2)))
        channels = self.unet.config.in_channels
        return (1, channels, size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)


class DragStableDiffusionPipeline(DragMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x/2.x) that drags objects of real images to new places."""


class DragStableDiffusionXLPipeline(DragMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` that drags objects of real images to new places."""


class DragFluxPipeline(DragMixin, FluxPipeline):
    """``FluxPipeline`` that drags objects of real images (image keys shared in the joint attention)."""


class ComposeStableDiffusionPipeline(ComposeMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x/2.x) that puts objects from reference images into backgrounds."""


class ComposeStableDiffusionXLPipeline(ComposeMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` that puts objects from reference images into backgrounds."""


class ComposeFluxPipeline(ComposeMixin, FluxPipeline):
    """``FluxPipeline`` that puts objects from reference images into backgrounds."""


class ConsistentEditStableDiffusionPipeline(ConsistentEditMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x/2.x) that edits by prompt keeping appearance (MasaCtrl)."""


class ConsistentEditStableDiffusionXLPipeline(ConsistentEditMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` that edits by prompt keeping appearance (MasaCtrl)."""


class ConsistentEditFluxPipeline(ConsistentEditMixin, FluxPipeline):
    """``FluxPipeline`` that edits by prompt keeping appearance (image keys shared in the joint attention)."""


_FAMILIES = (StableDiffusionXLPipeline, StableDiffusionPipeline, FluxPipeline)
_TWINS = {
    DragMixin: (DragStableDiffusionXLPipeline, DragStableDiffusionPipeline, DragFluxPipeline),
    ComposeMixin: (ComposeStableDiffusionXLPipeline, ComposeStableDiffusionPipeline, ComposeFluxPipeline),
    ConsistentEditMixin: (
        ConsistentEditStableDiffusionXLPipeline,
        ConsistentEditStableDiffusionPipeline,
        ConsistentEditFluxPipeline,
    ),
}


def to_sharing(pipe: Any, kind: type[SharingEditMixin]) -> Any:
    """The drag (``DragMixin``), composition (``ComposeMixin``) or consistent-edit (``ConsistentEditMixin``) twin of
    an SD, SDXL or Flux pipeline, sharing its components (``from_pipe``)."""
    if isinstance(pipe, kind):
        return pipe
    if kind not in _TWINS:
        raise TypeError(f"`kind` must be DragMixin, ComposeMixin or ConsistentEditMixin, got {kind!r}")
    return twin_of(pipe, list(zip(_FAMILIES, _TWINS[kind], strict=True)), "sharing edits")


__all__ = [
    "ComposeFluxPipeline",
    "ComposeStableDiffusionPipeline",
    "ComposeStableDiffusionXLPipeline",
    "ConsistentEditFluxPipeline",
    "ConsistentEditStableDiffusionPipeline",
    "ConsistentEditStableDiffusionXLPipeline",
    "DragFluxPipeline",
    "DragStableDiffusionPipeline",
    "DragStableDiffusionXLPipeline",
    "to_sharing",
]
