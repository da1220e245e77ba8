"""Ready diffusers pipelines built on the controls; each restores the original processors, also on exceptions."""

from attncontrol.pipelines.editing import (
    Layer,
    LayeredEditFluxPipeline,
    LayeredEditStableDiffusionPipeline,
    LayeredEditStableDiffusionXLPipeline,
    RemoveFluxPipeline,
    RemoveStableDiffusionPipeline,
    RemoveStableDiffusionXLPipeline,
    to_editing,
)
from attncontrol.pipelines.highres import sdedit_ladder
from attncontrol.pipelines.inversion import Inversion, invert
from attncontrol.pipelines.regional import (
    RegionalFluxPipeline,
    RegionalStableDiffusionPipeline,
    RegionalStableDiffusionXLPipeline,
    to_regional,
)
from attncontrol.pipelines.sharing import (
    ComposeFluxPipeline,
    ComposeMixin,
    ComposeStableDiffusionPipeline,
    ComposeStableDiffusionXLPipeline,
    ConsistentEditFluxPipeline,
    ConsistentEditMixin,
    ConsistentEditStableDiffusionPipeline,
    ConsistentEditStableDiffusionXLPipeline,
    DragFluxPipeline,
    DragMixin,
    DragStableDiffusionPipeline,
    DragStableDiffusionXLPipeline,
    to_sharing,
)

__all__ = [
    "ComposeFluxPipeline",
    "ComposeMixin",
    "ComposeStableDiffusionPipeline",
    "ComposeStableDiffusionXLPipeline",
    "ConsistentEditFluxPipeline",
    "ConsistentEditMixin",
    "ConsistentEditStableDiffusionPipeline",
    "ConsistentEditStableDiffusionXLPipeline",
    "DragFluxPipeline",
    "DragMixin",
    "DragStableDiffusionPipeline",
    "DragStableDiffusionXLPipeline",
    "Inversion",
    "Layer",
    "LayeredEditFluxPipeline",
    "LayeredEditStableDiffusionPipeline",
    "LayeredEditStableDiffusionXLPipeline",
    "RegionalFluxPipeline",
    "RegionalStableDiffusionPipeline",
    "RegionalStableDiffusionXLPipeline",
    "RemoveFluxPipeline",
    "RemoveStableDiffusionPipeline",
    "RemoveStableDiffusionXLPipeline",
    "invert",
    "sdedit_ladder",
    "to_editing",
    "to_regional",
    "to_sharing",
]
