"""Controls: one file per method, each an :class:`attncontrol.AttentionControl` subclass.

Filled by the capability issues (regional prompts, key masking, attention sharing, ...).
"""
