"""Controls: one file per method, each an :class:`attncontrol.AttentionControl` subclass."""

from attncontrol.controls.key_mask import KeyMaskedSelfAttention
from attncontrol.controls.linear import LinearAttention, LinFusion, load_linfusion, unload_linfusion
from attncontrol.controls.local import LocalWindowAttention, load_clear, unload_clear
from attncontrol.controls.regions import Circle, Region, RegionalAttention, RegionError
from attncontrol.controls.sharing import AnchoredSharing, CorrelationSteering, SharedAttention, ShareRegion

__all__ = [
    "AnchoredSharing",
    "Circle",
    "CorrelationSteering",
    "KeyMaskedSelfAttention",
    "LinFusion",
    "LinearAttention",
    "LocalWindowAttention",
    "Region",
    "RegionError",
    "RegionalAttention",
    "ShareRegion",
    "SharedAttention",
    "load_clear",
    "load_linfusion",
    "unload_clear",
    "unload_linfusion",
]
