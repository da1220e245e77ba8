"""Install controlled processors on a diffusers model or pipeline, feed them state, and restore the originals.

The controller is the one owner of run-time state the processors read:

- ``base_grid``: the token grid at level 0, read from the denoiser's own inputs on every call (UNet: the latent
  ``sample``; Flux: the packed latents' ``img_ids``; SD3: the latent size over the patch size);
- ``step``: the timestep the denoiser was called with, mapped to a step index through the pipeline's scheduler,
  or set explicitly with :meth:`AttentionController.set_step` / :meth:`AttentionController.callback_on_step_end`;
- ``batch_layout``: the roles of the batch rows (uncond/cond x branches).

All three are captured by a forward pre-hook on the denoiser (``register_forward_pre_hook``), not by patching
``forward`` and not by counting attention calls. Pipelines that run guidance as separate passes (Flux's true CFG)
name each pass with ``transformer.cache_context("cond" | "uncond")``; a stateful diffusers hook hears that name, so
the negative pass is laid out as ``uncond`` rows and controls meant for the prompt leave it alone.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from attncontrol.core.control import AttentionControl
from attncontrol.core.errors import ControllerStateError, ProcessorsOverwrittenError, UnsupportedModelError
from attncontrol.core.layers import LayerInfo, LayerSpec, discover_layers, make_layer_filter, model_family
from attncontrol.core.processors import PROCESSOR_CLASSES, ControlledProcessor
from attncontrol.core.state import BatchLayout, RowRole, StepState
from attncontrol.core.tokens import TokenSelector, token_indices

logger = logging.getLogger(__name__)

_DENOISER_ATTRIBUTES = ("unet", "transformer")
_PASS_HOOK_NAME = "attncontrol_pass_name"


def _pass_name_hook(on_change: Any) -> Any | None:
    """A diffusers stateful hook whose only job is to report the name of the pipeline's current denoiser pass.

    diffusers hands the ``cache_context`` of a pass to every stateful hook's ``StateManager``; ours forwards the name.
    Returns ``None`` on diffusers versions without cache contexts.
    """
    try:
        from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
    except ImportError:  # pragma: no cover - older diffusers
        return None

    class PassNameProbe(StateManager):
        def set_context(self, context: Any) -> None:
            super().set_context(context)
            on_change(None if context is None else context.name)

    class PassNameHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.probe = PassNameProbe(BaseState)

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            return module

    return PassNameHook()


def resolve_denoiser(target: Any) -> tuple[Any | None, torch.nn.Module]:
    """Split ``target`` into (pipeline or None, denoiser model)."""
    if hasattr(target, "attn_processors") and isinstance(target, torch.nn.Module):
        return None, target
    for attribute in _DENOISER_ATTRIBUTES:
        denoiser = getattr(target, attribute, None)
        if isinstance(denoiser, torch.nn.Module) and hasattr(denoiser, "attn_processors"):
            return target, denoiser
    raise UnsupportedModelError(
        f"`target` of type {type(target).__name__} is neither a diffusers pipeline with a `unet`/`transformer` nor a "
        "denoiser model with attention processors"
    )


class AttentionController:
    """Installs attncontrol's processors and runs ``controls`` in them.

    Example::

        store = AttentionStore()
        with AttentionController(pipe, [store]):
            image = pipe("a red circle").images[0]
        store.heatmap(token=2, image=image).save("red.png")

    Args:
        target: a diffusers pipeline (``pipe.unet`` or ``pipe.transformer`` is controlled) or a denoiser model.
        controls: controls to run, in order.
        layers: which layers get a controlled processor (others keep theirs). Default: every attention layer.
        branches: names of the prompts of a batch, in order (``("source", "target")``), used to build the default
            batch layout. Default: one branch, ``"main"``.
        scheduler: used to map the denoiser's timestep to a step index. Default: the pipeline's scheduler.
    """

    def __init__(
        self,
        target: Any,
        controls: Iterable[AttentionControl] = (),
        *,
        layers: LayerSpec = None,
        branches: Sequence[str] = ("main",),
        scheduler: Any | None = None,
    ) -> None:
        self.pipeline, self.model = resolve_denoiser(target)
        self.family = model_family(self.model)
        self.layers: list[LayerInfo] = discover_layers(self.model, allow=PROCESSOR_CLASSES.values())
        self._layer_filter = make_layer_filter(layers)
        self.controls: list[AttentionControl] = []
        for control in controls:
            self._check_control(control)
            self.controls.append(control)
        self.branches = tuple(branches)
        self.scheduler = scheduler if scheduler is not None else getattr(self.pipeline, "scheduler", None)

        self.step = StepState()
        self.base_grid: tuple[int, int] | None = None
        self.batch_layout = BatchLayout()
        self._explicit_layout: BatchLayout | None = None
        self._layout_key: tuple[int, bool, str | None] | None = None
        self._pass_name: str | None = None

        self._originals: dict[str, Any] | None = None
        self._installed: list[tuple[torch.nn.Module, ControlledProcessor]] = []
        self._hook_handle: torch.utils.hooks.RemovableHandle | None = None
        self._forward_signature = inspect.signature(self.model.forward)
        self._warned_unknown_timestep = False
        self._schedule_source: object | None = None
        self._schedule: list[float] = []

    # ------------------------------------------------------------------ install / remove
    @property
    def installed(self) -> bool:
        return self._originals is not None

    def install(self) -> AttentionController:
        """Replace the selected layers' processors with controlled ones and start tracking state."""
        if self.installed:
            raise ControllerStateError("this AttentionController is already installed; call remove() first")
        current = self.model.attn_processors
        foreign = [key.removesuffix(".processor") for key, p in current.items() if isinstance(p, ControlledProcessor)]
        if foreign:
            raise ControllerStateError(
                f"another AttentionController is installed on this model (layer {foreign[0]!r} runs its processor); "
                "add your controls to that controller with add(), or remove() it first"
            )
        # Re-describe the model now: processors may have changed since construction.
        self.layers = discover_layers(self.model, allow=PROCESSOR_CLASSES.values())
        processor_cls = PROCESSOR_CLASSES[self.family]
        replacement: dict[str, Any] = dict(current)
        self._installed = []
        for layer in self.layers:
            if not self._layer_filter(layer):
                continue
            controls = [control for control in self.controls if control.applies_to_layer(layer)]
            processor = processor_cls(self, layer, controls)
            replacement[layer.processor_key] = processor
            self._installed.append((self.model.get_submodule(layer.name), processor))
        self.model.set_attn_processor(replacement)
        self._originals = current
        self._hook_handle = self.model.register_forward_pre_hook(self._before_denoiser, with_kwargs=True)
        self._register_pass_hook()
        self.reset()
        logger.debug("installed %d controlled processors on %s", len(self._installed), type(self.model).__name__)
        return self

    def remove(self) -> None:
        """Put back the exact processor objects that were there before :meth:`install`."""
        if not self.installed:
            raise ControllerStateError("this AttentionController is not installed; nothing to remove")
        try:
            self.model.set_attn_processor(self._originals)
        finally:
            if self._hook_handle is not None:
                self._hook_handle.remove()
            self._hook_handle = None
            self._remove_pass_hook()
            self._originals = None
            self._installed = []

    def _set_pass_name(self, name: str | None) -> None:
        self._pass_name = name

    def _register_pass_hook(self) -> None:
        if not hasattr(self.model, "cache_context"):
            return
        hook = _pass_name_hook(self._set_pass_name)
        if hook is None:
            return
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).register_hook(hook, _PASS_HOOK_NAME)

    def _remove_pass_hook(self) -> None:
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_PASS_HOOK_NAME) is not None:
            registry.remove_hook(_PASS_HOOK_NAME, recurse=False)
        self._pass_name = None

    def __enter__(self) -> AttentionController:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ controls
    def _check_control(self, control: AttentionControl) -> None:
        if not isinstance(control, AttentionControl):
            raise TypeError(f"`controls` entries must be AttentionControl instances, got {type(control).__name__}")

    def add(self, control: AttentionControl) -> AttentionControl:
        """Append a control; takes effect at once if the controller is installed."""
        self._check_control(control)
        self.controls.append(control)
        self._refresh_processor_controls()
        return control

    def discard(self, control: AttentionControl) -> None:
        """Stop running ``control``."""
        self.controls.remove(control)
        self._refresh_processor_controls()

    def _refresh_processor_controls(self) -> None:
        for _, processor in self._installed:
            processor.controls = [c for c in self.controls if c.applies_to_layer(processor.layer)]

    def reset(self) -> None:
        """Forget the step state and every control's per-generation state."""
        self.step = StepState()
        for control in self.controls:
            control.reset()

    def token_indices(self, prompt: str, selector: TokenSelector, *, name: str = "selector") -> list[int]:
        """Positions of ``selector`` (words, phrases or indices) in the text sequence this model attends to.

        Flux attends to T5 tokens only (``tokenizer_2``); SD3's sequence starts with the 77 CLIP tokens, whose
        positions are returned; UNets use ``tokenizer``.
        """
        attribute = "tokenizer_2" if self.family == "flux" else "tokenizer"
        tokenizer = getattr(self.pipeline, attribute, None)
        if tokenizer is None:
            raise ControllerStateError(
                f"the controller was built on a bare model, so it has no `{attribute}`; build it on the pipeline or "
                "call attncontrol.token_indices(tokenizer, prompt, selector) yourself"
            )
        return token_indices(tokenizer, prompt, selector, name=name)

    # ------------------------------------------------------------------ state feeding
    def set_step(self, index: int, timestep: float | None = None, num_steps: int | None = None) -> None:
        """Tell the controller which step comes next (used by attncontrol's own pipelines)."""
        self.step = StepState(index=index, timestep=timestep, num_steps=num_steps or self.step.num_steps)

    def callback_on_step_end(self, pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """Pass as ``callback_on_step_end=`` to a stock pipeline whose scheduler cannot map timesteps to steps."""
        self.step = StepState(index=step + 1, timestep=None, num_steps=self.step.num_steps)
        return callback_kwargs

    def set_batch_layout(self, layout: BatchLayout | None) -> None:
        """Fix the batch-row roles explicitly (``None`` returns to the default derived per call)."""
        self._explicit_layout = layout

    def _check_processors(self) -> None:
        for module, processor in self._installed:
            if module.processor is not processor:
                raise ProcessorsOverwrittenError(
                    f"attention layer {processor.layer.name!r} now runs {type(module.processor).__name__} instead of "
                    "attncontrol's processor, so its controls would be silently ignored. Something replaced the "
                    "processors after install (enable_xformers_memory_efficient_attention, enable_attention_slicing, "
                    "set_attn_processor...): call controller.remove() and install() again afterwards."
                )

    def _before_denoiser(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._check_processors()
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        latents = bound.get("sample", bound.get("hidden_states"))
        self.base_grid = self._base_grid(latents, bound)
        self._update_step(bound.get("timestep"))
        self.batch_layout = self._layout_for(latents.shape[0])
        return None

    def _base_grid(self, latents: torch.Tensor, bound: dict) -> tuple[int, int]:
        if self.family == "unet":
            return int(latents.shape[-2]), int(latents.shape[-1])
        if self.family == "sd3":
            patch = self.model.config.patch_size
            return int(latents.shape[-2]) // patch, int(latents.shape[-1]) // patch
        ids = bound.get("img_ids")
        if ids is None:
            raise ValueError("the Flux transformer was called without `img_ids`; attncontrol needs them for the grid")
        if ids.ndim == 3:
            ids = ids[0]
        if ids.shape[-1] == 3 and bool((ids[:, 0] != 0).any()):
            ids = ids[ids[:, 0] == 0]  # extra image tokens (reference images) carry a non-zero first id
        height, width = ids[:, 1:3].amax(0).tolist()
        return int(height) + 1, int(width) + 1

    def _update_step(self, timestep: Any) -> None:
        if timestep is None:
            return
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        index, num_steps = self._lookup_step(value)
        if index is None:
            # Keep an explicitly fed index (set_step / callback_on_step_end); only the timestep is new.
            index = self.step.index
            if index is None and not self._warned_unknown_timestep:
                logger.warning(
                    "timestep %s is not in the scheduler's schedule; step-restricted controls stay inactive unless the "
                    "step is fed by controller.set_step() or callback_on_step_end=controller.callback_on_step_end",
                    value,
                )
                self._warned_unknown_timestep = True
        self.step = StepState(index=index, timestep=value, num_steps=num_steps or self.step.num_steps)

    def _lookup_step(self, value: float) -> tuple[int | None, int | None]:
        schedule = getattr(self.scheduler, "timesteps", None)
        if schedule is None or len(schedule) == 0:
            return None, None
        # Pipelines set a new timesteps tensor per generation; convert it once, not on every denoiser call.
        if self._schedule_source is not schedule:
            self._schedule_source = schedule
            self._schedule = [float(t) for t in torch.as_tensor(schedule).flatten().tolist()]
        # Flow-matching pipelines (Flux, SD3) pass timestep / 1000 to the transformer.
        for divisor in (1.0, 1000.0):
            index = min(range(len(self._schedule)), key=lambda i: abs(self._schedule[i] / divisor - value))
            if abs(self._schedule[index] / divisor - value) <= 1e-4 * max(1.0, abs(value)):
                return index, len(self._schedule)
        return None, len(self._schedule)

    def _layout_for(self, batch_size: int) -> BatchLayout:
        if self._explicit_layout is not None:
            if len(self._explicit_layout) != batch_size:
                raise ValueError(
                    f"the batch layout set with set_batch_layout() has {len(self._explicit_layout)} rows but the "
                    f"denoiser got a batch of {batch_size}"
                )
            return self._explicit_layout
        # A named pass (Flux true CFG) holds one guidance half; otherwise stock pipelines stack both halves.
        if self._pass_name in ("cond", "uncond"):
            cfg = False
        else:
            cfg = bool(getattr(self.pipeline, "do_classifier_free_guidance", False)) and batch_size % 2 == 0
        key = (batch_size, cfg, self._pass_name)
        if self._layout_key == key:
            return self.batch_layout
        self._layout_key = key
        try:
            layout = BatchLayout.standard(batch_size, cfg=cfg, branches=self.branches)
        except ValueError:
            logger.warning(
                "batch of %d rows does not fit branches %s; treating every row as its own 'main' image",
                batch_size,
                list(self.branches),
            )
            layout = BatchLayout.standard(batch_size, cfg=cfg and batch_size % 2 == 0)
        if self._pass_name == "uncond":
            layout = BatchLayout([RowRole("uncond", role.branch, role.image) for role in layout.roles])
        return layout


def apply_attention_control_(
    target: Any,
    controls: Iterable[AttentionControl],
    filter_fn: LayerSpec = None,
    **kwargs: Any,
) -> AttentionController:
    """Install ``controls`` on ``target`` in place and return the installed controller (call ``.remove()`` later)."""
    return AttentionController(target, controls, layers=filter_fn, **kwargs).install()
