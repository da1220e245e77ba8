"""Controls: one file per method, each an :class:`attncontrol.AttentionControl` subclass."""

from attncontrol.controls.key_mask import KeyMaskedSelfAttention
from attncontrol.controls.regions import Circle, Region, RegionalAttention, RegionError
from attncontrol.controls.sharing import AnchoredSharing, CorrelationSteering, SharedAttention, ShareRegion

__all__ = [
    "AnchoredSharing",
    "Circle",
    "CorrelationSteering",
    "KeyMaskedSelfAttention",
    "Region",
    "RegionError",
    "RegionalAttention",
    "ShareRegion",
    "SharedAttention",
]
