"""Which attention layer is which: family, self/cross/joint, block and resolution level.

Discovered once from the model's own structure (``attn_processors`` and the block modules), never from hard-coded
layer counts. The token grid of a layer is derived from the latent size the controller sees at run time, via the
layer's ``level`` (how many 2x downsamplings sit between the latent and the layer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatch

import torch

from attncontrol.core.errors import UnsupportedModelError

FAMILIES = ("unet", "flux", "sd3")
KINDS = ("self", "cross", "joint")

# Stock processor classes each family runs with; anything else (IP-Adapter, added-KV, xformers...) is refused so a
# user never loses a processor's behaviour silently.
_STOCK_PROCESSORS = {
    "unet": ("AttnProcessor2_0", "AttnProcessor"),
    "flux": ("FluxAttnProcessor", "FluxAttnProcessor2_0"),
    "sd3": ("JointAttnProcessor2_0",),
}

_MODEL_FAMILIES = {
    "UNet2DConditionModel": "unet",
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
}


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a denoiser.

    Attributes:
        name: module path inside the denoiser, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``.
        family: ``"unet"``, ``"flux"`` or ``"sd3"``.
        kind: ``"self"``, ``"cross"`` or ``"joint"`` (image and text tokens in one softmax).
        block: ``"down"``, ``"mid"``, ``"up"`` (UNet), ``"dual"``, ``"single"`` (Flux) or ``"joint"`` (SD3).
        block_index: index of the block within its group (``down_blocks.{block_index}``...).
        index: position of the layer in the model's processor order.
        level: number of 2x downsamplings between the base token grid and this layer (0 for transformers).
    """

    name: str
    family: str
    kind: str
    block: str
    block_index: int
    index: int
    level: int = 0

    @property
    def processor_key(self) -> str:
        return f"{self.name}.processor"

    def grid(self, base: tuple[int, int]) -> tuple[int, int]:
        """Token grid (height, width) of this layer for a base grid (latent size for UNets, patch grid for DiTs).

        UNet downsamplers are stride-2 convolutions with padding 1, so each level rounds odd sizes up.
        """
        height, width = base
        for _ in range(self.level):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        return height, width


LayerFilter = Callable[[LayerInfo], bool]
LayerSpec = None | str | Iterable[str] | LayerFilter


def make_layer_filter(spec: LayerSpec, *, argument: str = "layers") -> LayerFilter:
    """Turn a user's layer selection into a predicate.

    ``spec`` may be ``None`` (every layer), a kind (``"self"``, ``"cross"``, ``"joint"``), a block (``"down"``,
    ``"mid"``, ``"up"``, ``"dual"``, ``"single"``), a glob on the layer name (``"up_blocks.*attn2"``), a list of
    those (any may match), or a callable ``(LayerInfo) -> bool``.
    """
    if spec is None:
        return lambda layer: True
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"`{argument}` entries must be strings, got {type(pattern).__name__}: {pattern!r}")

    def matches(layer: LayerInfo) -> bool:
        return any(pattern in (layer.kind, layer.block) or fnmatch(layer.name, pattern) for pattern in patterns)

    return matches


def model_family(model: torch.nn.Module) -> str:
    """The attention family of a denoiser, by its class (subclasses included)."""
    for cls in type(model).__mro__:
        if cls.__name__ in _MODEL_FAMILIES:
            return _MODEL_FAMILIES[cls.__name__]
    raise UnsupportedModelError(
        f"model of type {type(model).__name__} is not supported: attncontrol knows "
        f"{', '.join(sorted(_MODEL_FAMILIES))} (pass a pipeline or one of those denoisers as `model`)"
    )


def _unet_levels(model: torch.nn.Module) -> dict[str, int]:
    """Resolution level of every UNet block prefix, walked from the blocks' own down/upsamplers."""
    levels: dict[str, int] = {}
    level = 0
    for index, block in enumerate(model.down_blocks):
        levels[f"down_blocks.{index}"] = level
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    levels["mid_block"] = level
    for index, block in enumerate(model.up_blocks):
        levels[f"up_blocks.{index}"] = level
        if getattr(block, "upsamplers", None) is not None:
            level -= 1
    return levels


_BLOCK_PATTERNS = {
    "unet": re.compile(r"^(?P<group>down_blocks|up_blocks|mid_block)\.?(?P<index>\d*)"),
    "flux": re.compile(r"^(?P<group>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)"),
    "sd3": re.compile(r"^(?P<group>transformer_blocks)\.(?P<index>\d+)"),
}
_BLOCK_NAMES = {
    "down_blocks": "down",
    "up_blocks": "up",
    "mid_block": "mid",
    "transformer_blocks": "dual",
    "single_transformer_blocks": "single",
}


def discover_layers(model: torch.nn.Module, *, allow: Iterable[type] = ()) -> list[LayerInfo]:
    """Describe every attention layer of ``model`` in processor order.

    ``allow`` lists extra processor classes accepted on top of the stock ones (attncontrol's own, so that a
    controller can describe a model that already carries them).
    """
    family = model_family(model)
    allowed_names = set(_STOCK_PROCESSORS[family]) | {cls.__name__ for cls in allow}
    levels = _unet_levels(model) if family == "unet" else {}
    layers = []
    for index, (key, processor) in enumerate(model.attn_processors.items()):
        name = key.removesuffix(".processor")
        if type(processor).__name__ not in allowed_names:
            raise UnsupportedModelError(
                f"attention layer {name!r} runs {type(processor).__name__}, which attncontrol cannot reproduce "
                f"(supported for {family}: {', '.join(_STOCK_PROCESSORS[family])}); "
                "call `set_default_attn_processor()` or load the model without that adapter first"
            )
        match = _BLOCK_PATTERNS[family].match(name)
        if match is None:
            raise UnsupportedModelError(
                f"attention layer {name!r} is outside the blocks attncontrol knows for {family}"
            )
        group, block_index = match["group"], int(match["index"] or 0)
        module = model.get_submodule(name)
        if family == "unet":
            kind = "cross" if module.is_cross_attention else "self"
            level = levels[group if group == "mid_block" else f"{group}.{block_index}"]
            block = _BLOCK_NAMES[group]
        elif family == "flux":
            kind, level, block = "joint", 0, _BLOCK_NAMES[group]
        else:
            # SD3.5's second attention per block ("attn2") is image-only self-attention.
            kind = "joint" if module.added_kv_proj_dim is not None else "self"
            level, block = 0, "joint"
        layers.append(LayerInfo(name, family, kind, block, block_index, index, level))
    if not layers:
        raise UnsupportedModelError(f"model of type {type(model).__name__} has no attention layers")
    return layers
