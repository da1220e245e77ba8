"""Local-window attention for image tokens (CLEAR for Flux), with the published checkpoint's loader.

CLEAR restricts each image query to the image keys inside a circle of radius ``r`` around it (in tokens of the
image grid, Euclidean, strict ``<``; rows do not wrap) plus every text key; text queries keep attending to everything.
The mask is a logit bias, so it composes with regions and key masking, and works in Flux's joint attention, SD3's and
in UNet self-attention alike. The published weights (``Huage001/CLEAR``: ``clear_local_{r}.safetensors``) replace the
image branch's ``to_q``/``to_k``/``to_v``/``to_out`` of every attention layer and load non-strictly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from attncontrol.core.bias import GroupedBias
from attncontrol.core.control import AttentionCall, AttentionControl, StepSpec
from attncontrol.core.errors import ControllerStateError, UnsupportedModelError
from attncontrol.core.layers import LayerSpec
from attncontrol.kernels.local import local_window_attention as kernel_local_window_attention
from attncontrol.kernels.local.reference import banded_window_attention_bhsd, window_mask

logger = logging.getLogger(__name__)

#: parameter name parts a CLEAR checkpoint holds (image-branch projections; the text branch stays)
CLEAR_PARAMETERS = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")


def local_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    radius: float,
    image_queries: slice,
    image_keys: slice,
    scale: float | None = None,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """CLEAR's attention on ``[B, H, S, D]`` without an S x S mask: the banded torch path
    (:func:`attncontrol.kernels.local.reference.banded_window_attention_bhsd`): image queries go in bands of grid
    rows, each against the text keys and the image rows within ``radius``; other queries attend to every key.

    Memory is O(S x band) instead of O(S^2); the result equals softmax attention under the window bias.
    """
    return banded_window_attention_bhsd(
        query, key, value, grid=grid, radius=radius, image_queries=image_queries, image_keys=image_keys, scale=scale,
        rows_per_chunk=rows_per_chunk,
    )  # fmt: skip


class LocalWindowAttention(AttentionControl):
    """Image queries see the image keys within ``radius`` tokens and all text keys (CLEAR's pattern).

    Args:
        radius: window radius in image tokens (CLEAR's r: 8, 16, 32 at FLUX's 1024 px = 64x64 tokens).
        backend: ``"bias"`` (a logit bias: composes with regions and masks in one softmax, O(S^2) memory) or
            ``"banded"`` (the window computed by :func:`attncontrol.kernels.local.local_window_attention` without an
            S x S mask: the block-sparse Triton kernel on CUDA, the banded torch path elsewhere; another control's
            bias on the same layer is refused).
        kernel_backend: for ``backend="banded"``: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"``,
            ``"flex"`` or ``"torch"`` (the banded path).
        layers / steps: where and when (default: every attention layer that has image queries and image keys).
    """

    def __init__(
        self,
        radius: float,
        *,
        backend: str = "bias",
        kernel_backend: str = "auto",
        layers: LayerSpec = None,
        steps: StepSpec = None,
    ) -> None:
        if not radius > 0:
            raise ValueError(f"`radius` must be > 0, got {radius!r}")
        if backend not in ("bias", "banded"):
            raise ValueError(f"`backend` must be 'bias' or 'banded', got {backend!r}")
        super().__init__(layers=layers, steps=steps, kernel_backend=kernel_backend)
        self.radius = float(radius)
        self.backend = backend
        self._cache: dict[tuple, torch.Tensor | None] = {}

    def applies_to_layer(self, layer: Any) -> bool:
        return layer.kind != "cross" and super().applies_to_layer(layer)

    def logit_bias(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        image_q, image_k = call.query_segments.get("image"), call.key_segments.get("image")
        if image_q is None or image_k is None or self.backend == "banded":
            return None
        shape = (query.shape[-2], key.shape[-2])
        cache_key = (call.grid, shape, image_q.start, image_k.start, query.device, query.dtype)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._bias(call.grid, shape, image_q, image_k, query.device, query.dtype)
        return self._cache[cache_key]

    def _bias(
        self,
        grid: tuple[int, int],
        shape: tuple[int, int],
        image_q: slice,
        image_k: slice,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        inside = window_mask(grid, self.radius, device)
        if bool(inside.all()):
            return None  # the window covers the image: plain attention, the dense path
        bias = torch.zeros(shape, device=device, dtype=dtype)
        bias[image_q, image_k] = torch.zeros_like(inside, dtype=dtype).masked_fill(~inside, float("-inf"))
        return bias

    def compute(
        self,
        call: AttentionCall,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | GroupedBias | None,
    ) -> torch.Tensor | None:
        image_q, image_k = call.query_segments.get("image"), call.key_segments.get("image")
        if self.backend != "banded" or image_q is None or image_k is None:
            return None
        if bias is not None:
            raise ControllerStateError(
                f"another control adds a logit bias at layer {call.layer.name}, which the banded local window cannot "
                "apply; use LocalWindowAttention(..., backend='bias') to combine them"
            )
        if image_q == image_k and query.shape[2] == key.shape[2]:
            out = kernel_local_window_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), grid=call.grid, radius=self.radius,
                image=image_q, scale=call.scale, backend=self.kernel_backend,
            )  # fmt: skip
            return out.transpose(1, 2)
        # Queries and keys laid out differently (a control appended keys): only the banded path handles that.
        return local_window_attention(
            query, key, value, grid=call.grid, radius=self.radius, image_queries=image_q, image_keys=image_k,
            scale=call.scale,
        )  # fmt: skip

    def reset(self) -> None:
        self._cache.clear()


# ------------------------------------------------------------------------------------------------ loading
_MOUNT_ATTRIBUTE = "_attncontrol_clear"


def radius_from_name(path: str | Path) -> int | None:
    """``clear_local_16.safetensors`` -> 16 (the published names say the radius)."""
    match = re.search(r"clear_local_(\d+)(?!_down)", Path(path).name)
    return int(match.group(1)) if match else None


def load_clear(pipe: Any, checkpoint: str | Path, *, radius: float | None = None) -> LocalWindowAttention:
    """Load CLEAR weights into ``pipe.transformer`` (non-strictly: only the image-branch projections) and return the
    local-window control; :func:`unload_clear` restores the original weights.

    ``checkpoint`` is a local ``.safetensors`` file or ``"<hub id>/<file>"`` (e.g.
    ``"Huage001/CLEAR/clear_local_16.safetensors"``). ``radius`` defaults to the one in the file name.
    """
    from safetensors.torch import load_file

    transformer = pipe.transformer if hasattr(pipe, "transformer") else pipe
    if getattr(transformer, _MOUNT_ATTRIBUTE, None) is not None:
        raise ControllerStateError("CLEAR is already loaded into this transformer: call unload_clear(pipe) first")
    path = Path(checkpoint)
    if not path.exists():
        from huggingface_hub import hf_hub_download

        repo, _, filename = str(checkpoint).rpartition("/")
        if not repo:
            raise FileNotFoundError(f"CLEAR checkpoint not found: {checkpoint}")
        path = Path(hf_hub_download(repo, filename))
    radius = radius if radius is not None else radius_from_name(path)
    if radius is None:
        raise ValueError(f"pass `radius`: it cannot be read from the file name {path.name!r}")
    state = load_file(str(path))
    if any("spatial_weight" in name for name in state):
        raise UnsupportedModelError(
            f"{path.name} is a down-sampled CLEAR checkpoint (it has `spatial_weight`); only the local-window "
            "checkpoints (clear_local_8/16/32) are supported"
        )
    own = dict(transformer.named_parameters())
    unexpected = [name for name in state if not any(part in f".{name}" for part in CLEAR_PARAMETERS)]
    if unexpected:
        raise UnsupportedModelError(f"{path.name} holds parameters CLEAR does not train, e.g. {unexpected[:3]}")
    for name, tensor in state.items():
        if name not in own:
            raise UnsupportedModelError(
                f"{path.name}: `{name}` is not a parameter of this {type(transformer).__name__}"
            )
        if own[name].shape != tensor.shape:
            raise UnsupportedModelError(
                f"{path.name}: `{name}` has shape {tuple(tensor.shape)}, the model's {tuple(own[name].shape)}: "
                "the checkpoint is for another model"
            )
    originals = {}
    with torch.no_grad():
        for name, tensor in state.items():
            originals[name] = own[name].detach().clone()
            own[name].copy_(tensor.to(own[name].dtype))
    object.__setattr__(transformer, _MOUNT_ATTRIBUTE, originals)
    logger.info("CLEAR r=%s: %d parameters loaded from %s", radius, len(state), path.name)
    return LocalWindowAttention(radius)


def unload_clear(pipe: Any) -> None:
    """Put back the weights :func:`load_clear` replaced."""
    transformer = pipe.transformer if hasattr(pipe, "transformer") else pipe
    originals = getattr(transformer, _MOUNT_ATTRIBUTE, None)
    if originals is None:
        raise ControllerStateError("no CLEAR checkpoint is loaded into this transformer")
    own = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, tensor in originals.items():
            own[name].copy_(tensor)
    object.__setattr__(transformer, _MOUNT_ATTRIBUTE, None)


__all__ = [
    "LocalWindowAttention",
    "load_clear",
    "local_window_attention",
    "radius_from_name",
    "unload_clear",
    "window_mask",
]
