"""Regional pipelines: the stock SD 1.x/2.x, SDXL and Flux pipelines plus ``regions=[...]``.

    from attncontrol.controls.regions import Region
    from attncontrol.pipelines import RegionalStableDiffusionPipeline

    pipe = RegionalStableDiffusionPipeline.from_pretrained(model_id_or_path)   # or .from_pipe(existing_pipe)
    image = pipe(
        "a red circle and a blue square",
        regions=[Region.box((0, 0, 0.5, 1), phrase="red circle"), Region.box((0.5, 0, 1, 1), phrase="blue square")],
    ).images[0]

Everything else (schedulers, LoRA, callbacks, ``output_type``...) is the stock pipeline's; the regional control is
installed for the call only and the original processors are back afterwards, also after an exception. With
``return_attention_maps=True`` the output carries ``attention_maps``, an :class:`attncontrol.AttentionStore`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from tqdm.auto import tqdm

from attncontrol.controls.regions import (
    REGION_MODES,
    Region,
    RegionalAttention,
    RegionError,
    ResolvedRegion,
    WeightSpec,
    region_mask,
    weight_schedule,
)
from attncontrol.core.controller import AttentionController
from attncontrol.core.state import StepState
from attncontrol.core.store import AttentionStore
from attncontrol.core.tokens import token_indices
from attncontrol.models import default_image_size
from attncontrol.pipelines.stock import frozen, twin_of
from attncontrol.pipelines.stock import stock_call as stock_call_of

logger = logging.getLogger(__name__)

DEFAULT_MAX_REGIONS = 16

#: ``loss_fn(images, regions)``: images ``[B, 3, H, W]`` in [0, 1] with their graph, the regions as given; a scalar.
RegionLoss = Callable[[torch.Tensor, list[Region]], torch.Tensor]


@dataclasses.dataclass
class RegionWeightOptimization:
    """What :meth:`RegionalMixin.optimize_region_weights` returns.

    Attributes:
        images: the last generation (made with the weights after ``epochs - 1`` updates), in the requested
            ``output_type`` (PIL images by default).
        weights: ``[num_regions, num_steps]``, the weights that made ``images``.
        losses: the loss of each generation, in order.
        initial_weights: ``[num_regions, num_steps]``, the starting point (the regions' own weights).
    """

    images: Any
    weights: torch.Tensor
    losses: list[float]
    initial_weights: torch.Tensor


class RegionalMixin:
    """What every regional pipeline shares: validating regions, encoding region prompts, running the control."""

    #: attribute of the tokenizer whose tokens the denoiser's cross-attention reads
    _phrase_tokenizer = "tokenizer"
    #: whether that text encoder is causal (CLIP): then tokens after a phrase carry it, and hard mode hides them
    #: inside other regions (``hide_leaks``)
    _causal_text = True

    # ------------------------------------------------------------------ family hooks
    def _encode_text(self, text: str, negative: str | None, device: torch.device, call: dict) -> dict[str, Any]:
        """Embeddings of ``text`` (and its negative) as the stock ``__call__`` keyword arguments, batch 1."""
        raise NotImplementedError

    def _sequence_keys(self) -> tuple[str, str]:
        return "prompt_embeds", "negative_prompt_embeds"

    def _default_size(self) -> tuple[int, int]:
        return default_image_size(self)

    # ------------------------------------------------------------------ validation
    def _check_regions(self, regions: Sequence[Region], max_regions: int) -> list[Region]:
        if isinstance(regions, Region):
            regions = [regions]
        if not isinstance(regions, Sequence) or isinstance(regions, (str, bytes)):
            raise RegionError(f"`regions` must be a list of Region, got {type(regions).__name__}")
        if len(regions) == 0:
            raise RegionError("`regions` is empty: give at least one Region, or leave `regions` out")
        if len(regions) > max_regions:
            raise RegionError(
                f"{len(regions)} regions exceed `max_regions`={max_regions}: every region adds text tokens (or a "
                "token set) to each cross-attention; raise `max_regions` if that is what you want"
            )
        for index, region in enumerate(regions):
            name = f"regions[{index}]"
            if not isinstance(region, Region):
                raise RegionError(f"`{name}` must be a Region, got {type(region).__name__}")
            if (region.phrase is None) == (region.prompt is None):
                raise RegionError(f"`{name}` needs exactly one of `phrase` (a span of the prompt) or `prompt`")
            text = region.phrase if region.phrase is not None else region.prompt
            if not isinstance(text, str) or not text.strip():
                raise RegionError(f"`{name}` has an empty {'phrase' if region.phrase is not None else 'prompt'}")
        return list(regions)

    def _resolve(
        self,
        regions: list[Region],
        prompt: str,
        image_size: tuple[int, int],
        num_steps: int,
        group_length: int,
    ) -> list[ResolvedRegion]:
        tokenizer = getattr(self, self._phrase_tokenizer)
        resolved: list[ResolvedRegion] = []
        owner: dict[int, int] = {}
        prompt_groups = 0
        for index, region in enumerate(regions):
            name = f"regions[{index}]"
            mask = region_mask(region, image_size, name)
            schedule = weight_schedule(region.weight, f"{name}.weight")
            for step in range(num_steps):  # a NaN in step 17 should fail now, not after 16 steps
                schedule(StepState(index=step, num_steps=num_steps))
            if region.phrase is not None:
                tokens = token_indices(tokenizer, prompt, region.phrase, name=f"{name}.phrase")
                for token in tokens:
                    if token in owner:
                        raise RegionError(
                            f"`{name}.phrase` {region.phrase!r} shares token {token} with `regions[{owner[token]}]`; "
                            "each token can belong to one region (use distinct phrases or per-region prompts)"
                        )
                    owner[token] = index
                group = None
            else:
                prompt_groups += 1
                group = slice(prompt_groups * group_length, (prompt_groups + 1) * group_length)
                tokens = list(range(group.start, group.stop))
            resolved.append(ResolvedRegion(mask=mask, tokens=tokens, weight=schedule, group=group, name=name))
        return resolved

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        regions: Sequence[Region] | None = None,
        region_mode: str = "hard",
        base_weight: WeightSpec = 1.0,
        region_strength: float = 1.0,
        max_regions: int = DEFAULT_MAX_REGIONS,
        return_attention_maps: bool | AttentionStore = False,
        region_options: dict[str, Any] | None = None,
        negative_prompt: str | list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The stock pipeline's ``__call__`` (keyword arguments after ``prompt``) plus regions.

        Args:
            regions: :class:`attncontrol.controls.regions.Region` s: a mask, box or circle, and either a ``phrase``
                of ``prompt`` or the region's own ``prompt``, with a ``weight`` (number, per-step list, function).
            region_mode: ``"hard"`` masking (default) or ``"soft"`` DenseDiffusion modulation.
            base_weight: weight of the base prompt inside regions that have their own prompts (same forms as a
                region weight); 0 lets a region's own prompt speak alone there.
            region_strength: soft mode's cross-attention strength (DenseDiffusion's lambda, default 1.0).
            max_regions: safety limit on the number of regions (default 16).
            return_attention_maps: attach an :class:`attncontrol.AttentionStore` of the conditional rows as
                ``output.attention_maps``; pass your own store to choose what it keeps.
            region_options: further :class:`attncontrol.controls.RegionalAttention` arguments
                (``hide_leaks``, ``self_strength``, ``modulation_until``, ``size_strength``, ``layers``, ``steps``).
        """
        return self._regional_call(
            super().__call__,
            prompt=prompt,
            negative_prompt=negative_prompt,
            regions=regions,
            region_mode=region_mode,
            base_weight=base_weight,
            region_strength=region_strength,
            max_regions=max_regions,
            return_attention_maps=return_attention_maps,
            region_options=region_options or {},
            kwargs=kwargs,
        )

    def optimize_region_weights(
        self,
        prompt: str,
        *,
        regions: Sequence[Region],
        loss_fn: RegionLoss,
        epochs: int = 3,
        lr: float = 0.1,
        seed: int = 0,
        progress: bool = True,
        region_mode: str = "hard",
        base_weight: WeightSpec = 1.0,
        region_strength: float = 1.0,
        max_regions: int = DEFAULT_MAX_REGIONS,
        region_options: dict[str, Any] | None = None,
        negative_prompt: str | None = None,
        output_type: str = "pil",
        **kwargs: Any,
    ) -> RegionWeightOptimization:
        """Spatial-Temporal control with optimized weights: learn one weight per region and step against a loss.

        As in the Spatial-Temporal Attention paper: the weights start from the regions' own (constant, list or
        function) and are updated with Adam by back-propagating ``loss_fn`` of the decoded image through every
        denoising step; each epoch is a full generation from the same noise (``seed``), and the result is the last
        one (the paper's 3 epochs: the image after two updates). The paper's loss is CLIP similarity of the image
        and of each region's crop to its text; any differentiable ``loss_fn(images, regions)`` works, e.g.
        :func:`attncontrol.shapes.losses.region_color_loss` on the shapes world.

        The paper's weights mix attention outputs linearly (Adam lr 0.005); here a weight multiplies its tokens'
        attention share (a ``log w`` logit bias), so the update is taken on ``log w``: weights stay positive and a
        step of ``lr`` scales a weight by about ``e^lr``.

        Memory grows with the number of steps (the whole sampling graph is kept: the paper needed ~45 GB for SD 1.4
        at 512 px); the pipeline's models are frozen during the call and their flags restored afterwards.

        Args:
            prompt, regions, region_mode, base_weight, region_strength, max_regions, region_options,
                negative_prompt: as in ``__call__``.
            loss_fn: ``loss_fn(images, regions) -> scalar tensor``; images ``[B, 3, H, W]`` in [0, 1].
            epochs: number of generations (>= 1); the weights are updated after each but the last.
            lr: Adam learning rate on the log-weights.
            seed: seed of the initial noise, the same for every epoch.
            progress: show a progress bar over the epochs, with the loss.
            **kwargs: the stock pipeline's arguments (``num_inference_steps``, ``guidance_scale``, ``height``...).
        """
        if not callable(loss_fn):
            raise RegionError(f"`loss_fn` must be callable as loss_fn(images, regions), got {type(loss_fn).__name__}")
        if not isinstance(epochs, int) or epochs < 1:
            raise RegionError(f"`epochs` must be an integer >= 1, got {epochs!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise RegionError(f"`lr` must be a finite number > 0, got {lr!r}")
        for key in ("generator", "latents", "output_type"):
            if key in kwargs:
                raise RegionError(f"`{key}` is set by optimize_region_weights (use `seed` and `output_type`)")
        checked = self._check_regions(regions, max_regions)
        num_steps = int(kwargs.get("num_inference_steps", 50))
        schedules = [weight_schedule(region.weight, f"regions[{i}].weight") for i, region in enumerate(checked)]
        steps = [StepState(index=step, num_steps=num_steps) for step in range(num_steps)]
        initial = torch.tensor([[float(schedule(step)) for step in steps] for schedule in schedules])
        # A zero weight (hidden text) starts just above zero, so it can grow if the loss asks for it.
        log_weights = torch.nn.Parameter(initial.clamp_min(1e-3).log())
        optimizer = torch.optim.Adam([log_weights], lr=lr)
        stock_call = stock_call_of(self, with_grad=True)
        device = self._execution_device
        losses: list[float] = []
        images = None
        models = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        bar = tqdm(range(epochs), desc="region weights", disable=not progress)
        with frozen(models):
            for epoch in bar:
                weights = log_weights.exp()
                live = [dataclasses.replace(region, weight=weights[i]) for i, region in enumerate(checked)]
                call = dict(kwargs, output_type="pt", generator=torch.Generator(device).manual_seed(seed))
                with torch.enable_grad():
                    output = self._regional_call(
                        stock_call,
                        prompt=prompt,
                        negative_prompt=negative_prompt,
                        regions=live,
                        region_mode=region_mode,
                        base_weight=base_weight,
                        region_strength=region_strength,
                        max_regions=max_regions,
                        return_attention_maps=False,
                        region_options=region_options or {},
                        kwargs=call,
                    )
                    images = output.images
                    loss = loss_fn(images, checked)
                    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                        raise RegionError("`loss_fn` must return a scalar tensor")
                    if not bool(torch.isfinite(loss)):
                        raise RegionError(f"`loss_fn` returned {loss.item()} at epoch {epoch}")
                    losses.append(loss.item())
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    if epoch < epochs - 1:
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                images = images.detach()
        logger.info("region weights: losses %s", ", ".join(f"{value:.4f}" for value in losses))
        if output_type == "pil":
            images = self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(images))
        elif output_type == "np":
            images = self.image_processor.pt_to_numpy(images)
        elif output_type != "pt":
            raise RegionError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}")
        return RegionWeightOptimization(
            images=images, weights=weights.detach().clone(), losses=losses, initial_weights=initial
        )

    def _regional_call(
        self,
        stock_call: Any,
        *,
        prompt: str | list[str] | None,
        negative_prompt: str | None,
        regions: Sequence[Region] | None,
        region_mode: str,
        base_weight: WeightSpec,
        region_strength: float,
        max_regions: int,
        return_attention_maps: bool | AttentionStore,
        region_options: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> Any:
        if isinstance(return_attention_maps, AttentionStore):
            store = return_attention_maps
        else:
            store = AttentionStore(guidance="cond") if return_attention_maps else None
        controls: list[Any] = []
        call = dict(kwargs)
        if negative_prompt is not None:
            call["negative_prompt"] = negative_prompt
        if regions is not None:
            if region_mode not in REGION_MODES:
                raise RegionError(f"`region_mode` must be one of {REGION_MODES}, got {region_mode!r}")
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise RegionError("regional generation takes one prompt (use `num_images_per_prompt` for more)")
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RegionError("`prompt` must be a string when `regions` are given")
            if isinstance(negative_prompt, list):
                negative_prompt = negative_prompt[0] if negative_prompt else None
            checked = self._check_regions(regions, max_regions)
            default_height, default_width = self._default_size()
            height = call.get("height") or default_height
            width = call.get("width") or default_width
            num_steps = int(call.get("num_inference_steps", 50))
            device = self._execution_device
            sequence_key, negative_key = self._sequence_keys()
            region_prompts = [region.prompt for region in checked if region.prompt is not None]
            with torch.no_grad():
                base = self._encode_text(prompt, negative_prompt, device, call)
                group_length = int(base[sequence_key].shape[1])
                resolved = self._resolve(checked, prompt, (height, width), num_steps, group_length)
                parts = [base[sequence_key]]
                for text in region_prompts:
                    parts.append(self._encode_text(text, negative_prompt, device, call)[sequence_key])
            if region_prompts:
                base[sequence_key] = torch.cat(parts, dim=1)
                if base.get(negative_key) is not None:
                    # Unconditional rows never see the region groups; tiling keeps the lengths equal.
                    base[negative_key] = base[negative_key].repeat(1, 1 + len(region_prompts), 1)
            call.pop("negative_prompt", None)
            call.update(base)
            base_tokens = slice(0, group_length) if region_prompts else None
            options = {"hide_leaks": self._causal_text, **region_options}
            controls.append(
                RegionalAttention(
                    resolved,
                    mode=region_mode,
                    base_weight=base_weight,
                    base_tokens=base_tokens,
                    cross_strength=region_strength,
                    **options,
                )
            )
        else:
            call["prompt"] = prompt
        if store is not None:
            controls.append(store)
        if not controls:
            return stock_call(**call)
        with AttentionController(self, controls):
            output = stock_call(**call)
        if store is not None:
            output.attention_maps = store
        return output


# ---------------------------------------------------------------------------------------------------- families
def _encode_sd(self, text: str, negative: str | None, device: torch.device, call: dict) -> dict[str, Any]:
    positive, negative_embeds = self.encode_prompt(
        text,
        device,
        1,
        float(call.get("guidance_scale", 7.5)) > 1.0,
        negative_prompt=negative,
        clip_skip=call.get("clip_skip"),
    )
    out = {"prompt_embeds": positive}
    if negative_embeds is not None:
        out["negative_prompt_embeds"] = negative_embeds
    return out


def _encode_sdxl(self, text: str, negative: str | None, device: torch.device, call: dict) -> dict[str, Any]:
    positive, negative_embeds, pooled, negative_pooled = self.encode_prompt(
        text,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=float(call.get("guidance_scale", 5.0)) > 1.0,
        negative_prompt=negative,
        clip_skip=call.get("clip_skip"),
    )
    out = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
    if negative_embeds is not None:
        out["negative_prompt_embeds"] = negative_embeds
        out["negative_pooled_prompt_embeds"] = negative_pooled
    return out


def _encode_flux(self, text: str, negative: str | None, device: torch.device, call: dict) -> dict[str, Any]:
    length = int(call.get("max_sequence_length", 512))
    positive, pooled, _ = self.encode_prompt(text, device=device, max_sequence_length=length)
    out = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
    if negative is not None and float(call.get("true_cfg_scale", 1.0)) > 1.0:
        negative_embeds, negative_pooled, _ = self.encode_prompt(negative, device=device, max_sequence_length=length)
        out["negative_prompt_embeds"] = negative_embeds
        out["negative_pooled_prompt_embeds"] = negative_pooled
    return out


class RegionalStableDiffusionPipeline(RegionalMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x/2.x) with ``regions=[...]``."""

    _encode_text = _encode_sd


class RegionalStableDiffusionXLPipeline(RegionalMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with ``regions=[...]`` (both CLIP encoders tokenize alike, so phrases agree)."""

    _encode_text = _encode_sdxl


class RegionalFluxPipeline(RegionalMixin, FluxPipeline):
    """``FluxPipeline`` with ``regions=[...]``: phrases are T5 tokens, the sequence Flux's joint attention reads."""

    _phrase_tokenizer = "tokenizer_2"
    _causal_text = False
    _encode_text = _encode_flux


def to_regional(pipe: Any) -> Any:
    """The regional twin of a stock SD, SDXL or Flux pipeline, sharing its components (``from_pipe``)."""
    if isinstance(pipe, RegionalMixin):
        return pipe
    twins = (
        (StableDiffusionXLPipeline, RegionalStableDiffusionXLPipeline),
        (FluxPipeline, RegionalFluxPipeline),
        (StableDiffusionPipeline, RegionalStableDiffusionPipeline),
    )
    return twin_of(pipe, twins, "regional prompts")


__all__ = [
    "Region",
    "RegionalFluxPipeline",
    "RegionalMixin",
    "RegionalStableDiffusionPipeline",
    "RegionalStableDiffusionXLPipeline",
    "to_regional",
]
