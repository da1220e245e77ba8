"""Core: layers, state, masks, the control protocol, processors, the controller and the attention store."""

from attncontrol.core.compute import attention, attention_probs
from attncontrol.core.control import AttentionCall, AttentionControl
from attncontrol.core.controller import AttentionController, apply_attention_control_
from attncontrol.core.errors import (
    AttnControlError,
    ConceptError,
    ControllerStateError,
    EditError,
    MaskError,
    ProcessorsOverwrittenError,
    RegionError,
    TokenIndexError,
    UnsupportedModelError,
)
from attncontrol.core.layers import LayerInfo, discover_layers, make_layer_filter
from attncontrol.core.masks import SpatialMask, box_mask, circle_mask, dilate, feather, load_mask, resize_to_grid
from attncontrol.core.processors import FluxJointAttnProcessor, SD3JointAttnProcessor, UNetAttnProcessor
from attncontrol.core.state import BatchLayout, RowRole, StepState
from attncontrol.core.store import AttentionRecord, AttentionStore
from attncontrol.core.tokens import token_indices

__all__ = [
    "AttentionCall",
    "AttentionControl",
    "AttentionController",
    "AttentionRecord",
    "AttentionStore",
    "AttnControlError",
    "BatchLayout",
    "ConceptError",
    "ControllerStateError",
    "EditError",
    "FluxJointAttnProcessor",
    "LayerInfo",
    "MaskError",
    "ProcessorsOverwrittenError",
    "RegionError",
    "RowRole",
    "SD3JointAttnProcessor",
    "SpatialMask",
    "StepState",
    "TokenIndexError",
    "UNetAttnProcessor",
    "UnsupportedModelError",
    "apply_attention_control_",
    "attention",
    "attention_probs",
    "box_mask",
    "circle_mask",
    "dilate",
    "discover_layers",
    "feather",
    "load_mask",
    "make_layer_filter",
    "resize_to_grid",
    "token_indices",
]
