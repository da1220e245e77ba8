"""Linear-time self-attention for UNets (LinFusion) as a control, with the published checkpoint layout.

LinFusion replaces every UNet self-attention with normalized non-causal linear attention:

    q = W_q (x + MLP_q(x)),  k = W_k (x + MLP_k(x)),  v = W_v x,   phi(t) = elu(t) + 1
    o_i = phi(q_i) (phi(K)^T V / N) / (phi(q_i) . mean_j phi(k_j) + eps)

(the 1/N is numerics only). Each layer's MLP is Linear(C, m) -> LayerNorm(m) -> LeakyReLU -> Linear(m, C); the last
Linear starts at zero, so a fresh student projects exactly as its teacher. The checkpoint is a diffusers
``ModelMixin`` whose config lists the layers (``modules_list``: ``module_name``, ``dim_n``, ``heads``,
``projection_mid_dim``) and whose submodules ``"0"``, ``"1"``, ... hold ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and
the MLPs ``to_q_``, ``to_k_``: the layout of the published ``Yuanshi/LinFusion-*`` weights.

Cross-attention stays softmax, so LinFusion composes with regional prompts and the other controls in one pass.
The attention itself is :func:`attncontrol.kernels.linear.linear_attention` (Triton on CUDA, fp32 torch elsewhere;
``kernel_backend`` picks).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from attncontrol.core.bias import GroupedBias
from attncontrol.core.control import AttentionCall, AttentionControl
from attncontrol.core.errors import ControllerStateError, UnsupportedModelError
from attncontrol.kernels.linear import LINEAR_EPS, feature_map
from attncontrol.kernels.linear import linear_attention as kernel_linear_attention
from attncontrol.kernels.linear import linear_attention_reference as kernel_linear_reference

logger = logging.getLogger(__name__)


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    eps: float = LINEAR_EPS,
    backend: str = "torch",
) -> torch.Tensor:
    """Normalized non-causal linear attention on ``[B, H, S, D]`` tensors (the processors' layout), computed in fp32
    in O(S D^2): :func:`attncontrol.kernels.linear.linear_attention` on transposed views. ``backend`` as there
    (default ``"torch"``, this function's historic behaviour)."""
    out = kernel_linear_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), eps=eps, backend=backend
    )
    return out.transpose(1, 2)


def linear_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, eps: float = LINEAR_EPS
) -> torch.Tensor:
    """The same formula through the S x S matrix of phi(q_i) . phi(k_j) on ``[B, H, S, D]``: the O(S^2) check."""
    out = kernel_linear_reference(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), eps=eps)
    return out.transpose(1, 2)


def projection_mlp(dim: int, mid_dim: int | None) -> nn.Module:
    """LinFusion's non-linear input projection; ``mid_dim`` None means ``dim``, -1 means none (identity)."""
    if mid_dim == -1:
        return nn.Identity()
    mid = mid_dim or dim
    return nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(), nn.Linear(mid, dim))


class LinFusionLayer(nn.Module):
    """One self-attention layer's LinFusion weights: projections and the two input MLPs (checkpoint names)."""

    def __init__(self, dim: int, heads: int, projection_mid_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"`dim_n` {dim} is not divisible by `heads` {heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_q_ = projection_mlp(dim, projection_mid_dim)
        self.to_k_ = projection_mlp(dim, projection_mid_dim)

    def query_key(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, S, D]`` query and key of ``[B, S, C]`` inputs."""
        batch, length, _ = hidden_states.shape
        query = self.to_q(hidden_states + self.to_q_(hidden_states))
        key = self.to_k(hidden_states + self.to_k_(hidden_states))

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, length, self.heads, -1).transpose(1, 2)

        return heads(query), heads(key)


class LinFusion(ModelMixin, ConfigMixin):
    """LinFusion weights for every self-attention layer of a UNet (``from_pretrained`` / ``save_pretrained``).

    Build one for a UNet with :meth:`for_unet` (initialized from its own attention, the distillation start), or load
    the published ones with ``LinFusion.from_pretrained("Yuanshi/LinFusion-1-5")`` or a local folder.
    """

    @register_to_config
    def __init__(self, modules_list: list[dict[str, Any]]) -> None:
        super().__init__()
        for index, spec in enumerate(modules_list):
            layer = LinFusionLayer(spec["dim_n"], spec["heads"], spec.get("projection_mid_dim"))
            self.add_module(str(index), layer)

    @property
    def layers(self) -> dict[str, LinFusionLayer]:
        """Layers by the UNet module path they replace."""
        return {spec["module_name"]: self.get_submodule(str(i)) for i, spec in enumerate(self.config.modules_list)}

    @classmethod
    def for_unet(cls, unet: nn.Module, *, projection_mid_dim: int | None = None) -> LinFusion:
        """LinFusion for ``unet``'s self-attention layers, projections copied from the UNet and the MLPs' last
        layer at zero, so step 0 projects exactly as the teacher (the paper's "initialize from SD")."""
        modules_list = []
        for name, module in _self_attention_modules(unet).items():
            dim = module.to_q.weight.shape[0]
            modules_list.append(
                {"module_name": name, "dim_n": dim, "heads": module.heads, "projection_mid_dim": projection_mid_dim}
            )
        if not modules_list:
            raise UnsupportedModelError(f"{type(unet).__name__} has no UNet self-attention (attn1) layers")
        linfusion = cls(modules_list)
        attention = _self_attention_modules(unet)
        with torch.no_grad():
            for name, layer in linfusion.layers.items():
                source = attention[name]
                for projection in ("to_q", "to_k", "to_v"):
                    getattr(layer, projection).weight.copy_(getattr(source, projection).weight)
                layer.to_out[0].load_state_dict(source.to_out[0].state_dict())
                for mlp in (layer.to_q_, layer.to_k_):
                    if isinstance(mlp, nn.Sequential):
                        nn.init.zeros_(mlp[-1].weight)
                        nn.init.zeros_(mlp[-1].bias)
        parameter = next(unet.parameters())
        return linfusion.to(device=parameter.device, dtype=parameter.dtype)

    def check_fits(self, unet: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` naming the first layer that is missing or has another shape."""
        attention = _self_attention_modules(unet)
        for index, spec in enumerate(self.config.modules_list):
            name = spec["module_name"]
            module = attention.get(name)
            if module is None:
                raise UnsupportedModelError(
                    f"LinFusion layer {index} is for `{name}`, which this UNet does not have as a self-attention "
                    f"layer (it has {len(attention)}: {list(attention)[:3]}...): the checkpoint is for another model"
                )
            dim = module.to_q.weight.shape[0]
            if (spec["dim_n"], spec["heads"]) != (dim, module.heads):
                raise UnsupportedModelError(
                    f"LinFusion layer {index} (`{name}`) has dim_n={spec['dim_n']}, heads={spec['heads']}; the UNet's "
                    f"layer has {dim} and {module.heads}: the checkpoint is for another model"
                )
        missing = sorted(set(attention) - {spec["module_name"] for spec in self.config.modules_list})
        if missing:
            raise UnsupportedModelError(f"the LinFusion checkpoint has no weights for {len(missing)} layers: {missing}")


def _self_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn1"
    }


class LinearAttention(AttentionControl):
    """LinFusion's linear attention in the UNet's self-attention layers (the layers ``linfusion`` covers).

    The projections must be mounted (:func:`load_linfusion` does it) so that the layer's own ``to_v`` / ``to_out``
    are LinFusion's; this control re-projects the query and key through the MLPs and replaces softmax attention.
    A logit bias on those layers (key masking, sharing masks) cannot be honoured by linear attention and raises.
    ``kernel_backend``: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self, linfusion: LinFusion, *, eps: float = LINEAR_EPS, steps: Any = None, kernel_backend: str = "auto"
    ) -> None:
        names = set(linfusion.layers)
        super().__init__(layers=lambda layer: layer.name in names, steps=steps, kernel_backend=kernel_backend)
        self.linfusion = linfusion
        self.eps = eps

    def edit_qkv(
        self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if call.hidden_states is None:
            raise ControllerStateError(f"layer {call.layer.name} gave no input states: LinFusion needs a UNet layer")
        layer = self.linfusion.layers[call.layer.name]
        query, key = layer.query_key(call.hidden_states.to(layer.to_q.weight.dtype))
        return query.to(value.dtype), key.to(value.dtype), value

    def compute(
        self,
        call: AttentionCall,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | GroupedBias | None,
    ) -> torch.Tensor:
        if bias is not None:
            raise ControllerStateError(
                f"a control asked for a logit bias at layer {call.layer.name}, where LinFusion's linear attention "
                "runs and cannot apply one; restrict that control to cross-attention (layers='cross') or LinFusion's "
                "steps"
            )
        return linear_attention(query, key, value, eps=self.eps, backend=self.kernel_backend)


# ------------------------------------------------------------------------------------------------ loading
_MOUNT_ATTRIBUTE = "_attncontrol_linfusion"


def load_linfusion(pipe: Any, source: str | LinFusion | None = None, **from_pretrained_kwargs: Any) -> LinearAttention:
    """Mount LinFusion weights into ``pipe.unet`` and return the control that runs them.

    ``source`` is a hub id or a local folder in the published layout, the name of a shipped student
    (``"shapes-sd"``), a :class:`LinFusion`, or ``None`` for a fresh one initialized from the UNet (what distillation
    starts from). The UNet's self-attention projections are swapped
    for LinFusion's (the originals are kept); :func:`unload_linfusion` puts them back. Use the control in any
    controller, alone or beside others::

        linear = load_linfusion(pipe, "Yuanshi/LinFusion-1-5")
        with AttentionController(pipe, [linear, RegionalAttention(...)]):
            image = pipe(prompt).images[0]
        unload_linfusion(pipe)
    """
    unet = pipe.unet if hasattr(pipe, "unet") else pipe
    if getattr(unet, _MOUNT_ATTRIBUTE, None) is not None:
        raise ControllerStateError("LinFusion is already loaded into this UNet: call unload_linfusion(pipe) first")
    if source is None:
        linfusion = LinFusion.for_unet(unet)
    elif isinstance(source, LinFusion):
        linfusion = source
    else:
        from attncontrol.models import SHIPPED_LINFUSION

        linfusion = LinFusion.from_pretrained(str(SHIPPED_LINFUSION.get(source, source)), **from_pretrained_kwargs)
    linfusion.check_fits(unet)
    parameter = next(unet.parameters())
    linfusion.to(device=parameter.device, dtype=parameter.dtype)
    attention = _self_attention_modules(unet)
    originals = {}
    for name, layer in linfusion.layers.items():
        module = attention[name]
        originals[name] = {attr: getattr(module, attr) for attr in ("to_q", "to_k", "to_v", "to_out")}
        for attr in ("to_q", "to_k", "to_v", "to_out"):
            setattr(module, attr, getattr(layer, attr))
    object.__setattr__(unet, _MOUNT_ATTRIBUTE, (linfusion, originals))
    logger.info("LinFusion mounted on %d self-attention layers", len(originals))
    return LinearAttention(linfusion)


def unload_linfusion(pipe: Any) -> LinFusion:
    """Put the UNet's own self-attention projections back; returns the LinFusion that was mounted."""
    unet = pipe.unet if hasattr(pipe, "unet") else pipe
    mounted = getattr(unet, _MOUNT_ATTRIBUTE, None)
    if mounted is None:
        raise ControllerStateError("no LinFusion is loaded into this UNet")
    linfusion, originals = mounted
    attention = _self_attention_modules(unet)
    for name, saved in originals.items():
        for attr, module in saved.items():
            setattr(attention[name], attr, module)
    object.__setattr__(unet, _MOUNT_ATTRIBUTE, None)
    return linfusion


__all__ = [
    "LINEAR_EPS",
    "LinFusion",
    "LinFusionLayer",
    "LinearAttention",
    "feature_map",
    "linear_attention",
    "linear_attention_reference",
    "load_linfusion",
    "unload_linfusion",
]
