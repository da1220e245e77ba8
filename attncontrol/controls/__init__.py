"""Controls: one file per method, each an :class:`attncontrol.AttentionControl` subclass."""

from attncontrol.controls.key_mask import KeyMaskedSelfAttention
from attncontrol.controls.regions import Circle, Region, RegionalAttention, RegionError

__all__ = ["Circle", "KeyMaskedSelfAttention", "Region", "RegionError", "RegionalAttention"]
