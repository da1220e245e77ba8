"""The shapes world: scenes with exact ground truth, a detector that scores images, and the quality bench."""

from attncontrol.shapes.detector import UNKNOWN, DetectedObject, detect
from attncontrol.shapes.scenes import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    ObjectSpec,
    Scene,
    SceneGenerator,
    SceneObject,
    caption_for,
    render,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "UNKNOWN",
    "DetectedObject",
    "ObjectSpec",
    "Scene",
    "SceneGenerator",
    "SceneObject",
    "caption_for",
    "detect",
    "render",
]
