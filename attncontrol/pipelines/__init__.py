"""Ready diffusers pipelines built on the controls; each restores the original processors, also on exceptions."""

from attncontrol.pipelines.editing import (
    Layer,
    LayeredEditStableDiffusionPipeline,
    LayeredEditStableDiffusionXLPipeline,
    RemoveStableDiffusionPipeline,
    RemoveStableDiffusionXLPipeline,
    to_editing,
)
from attncontrol.pipelines.inversion import Inversion, invert
from attncontrol.pipelines.regional import (
    RegionalFluxPipeline,
    RegionalStableDiffusionPipeline,
    RegionalStableDiffusionXLPipeline,
    to_regional,
)

__all__ = [
    "Inversion",
    "Layer",
    "LayeredEditStableDiffusionPipeline",
    "LayeredEditStableDiffusionXLPipeline",
    "RegionalFluxPipeline",
    "RegionalStableDiffusionPipeline",
    "RegionalStableDiffusionXLPipeline",
    "RemoveStableDiffusionPipeline",
    "RemoveStableDiffusionXLPipeline",
    "invert",
    "to_editing",
    "to_regional",
]
