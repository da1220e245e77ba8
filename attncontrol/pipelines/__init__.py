"""Ready diffusers pipelines built on the controls; each restores the original processors, also on exceptions."""

from attncontrol.pipelines.regional import (
    RegionalFluxPipeline,
    RegionalStableDiffusionPipeline,
    RegionalStableDiffusionXLPipeline,
    to_regional,
)

__all__ = [
    "RegionalFluxPipeline",
    "RegionalStableDiffusionPipeline",
    "RegionalStableDiffusionXLPipeline",
    "to_regional",
]
