"""Exceptions raised by attncontrol. Each names the argument or object at fault."""

from __future__ import annotations


class AttnControlError(Exception):
    """Base class for every error attncontrol raises on purpose."""


class UnsupportedModelError(AttnControlError, TypeError):
    """The model (or one of its attention layers) belongs to a family the processors do not know."""


class MaskError(AttnControlError, ValueError):
    """A mask argument has the wrong type, rank, aspect ratio or value range, or covers nothing."""


class TokenIndexError(AttnControlError, IndexError):
    """A token index or phrase does not point inside the prompt."""


class ProcessorsOverwrittenError(AttnControlError, RuntimeError):
    """attncontrol's processors were replaced after installation (xformers, set_default_attn_processor, ...)."""


class ControllerStateError(AttnControlError, RuntimeError):
    """The controller was used in an order that cannot work (e.g. removed twice, used before install)."""


class RegionError(AttnControlError, ValueError):
    """A region or layout that cannot be used; the message names the region and the argument."""


class EditError(AttnControlError, ValueError):
    """An image edit that cannot be done as asked (a layer moved off the canvas, an image size the model can't take)."""


class ConceptError(AttnControlError, ValueError):
    """Concept-extraction inputs that cannot train (tokens without masks, coinciding masks, a token already known)."""
