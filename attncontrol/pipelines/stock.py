"""Reaching the stock diffusers pipeline underneath ours, and borrowing its parts for one call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


def stock_call(pipe: Any, *, with_grad: bool = False) -> Callable[..., Any]:
    """The ``__call__`` of the first diffusers class in ``pipe``'s MRO, bound to ``pipe``.

    Our pipelines subclass the stock ones and override ``__call__``; this is how they run the original loop. With
    ``with_grad`` the undecorated function (diffusers wraps ``__call__`` in ``@torch.no_grad()`` and keeps the
    original as ``__wrapped__``) is returned, for optimizing through the sampler.
    """
    for cls in type(pipe).__mro__:
        function = cls.__dict__.get("__call__")
        if function is None or not cls.__module__.startswith("diffusers."):
            continue
        if with_grad:
            function = getattr(function, "__wrapped__", None)
            if function is None:
                raise TypeError(f"{cls.__name__}.__call__ has no undecorated form to run with gradients")
        return function.__get__(pipe, type(pipe))
    raise TypeError(f"{type(pipe).__name__} is not built on a diffusers pipeline class")


@contextlib.contextmanager
def swapped_scheduler(pipe: Any, scheduler: Any) -> Iterator[Any]:
    """Run the block with ``pipe.scheduler`` replaced; the user's scheduler is back afterwards, also on errors."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield scheduler
    finally:
        pipe.scheduler = original


@contextlib.contextmanager
def frozen(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Switch off ``requires_grad`` on ``modules`` for the block; their own flags are back afterwards."""
    saved = [(param, param.requires_grad) for module in modules for param in module.parameters()]
    try:
        for param, _ in saved:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)


def twin_of(pipe: Any, twins: Sequence[tuple[type, type]], what: str) -> Any:
    """The first ``twin`` class whose stock class ``pipe`` is, built with ``from_pipe`` (components shared, progress
    bar off). ``twins`` lists (stock class, twin class) with subclasses before their bases (SDXL is not SD)."""
    for stock_cls, twin_cls in twins:
        if isinstance(pipe, stock_cls):
            twin = twin_cls.from_pipe(pipe)
            twin.set_progress_bar_config(disable=True)
            if hasattr(pipe, "default_sample_size"):  # from_pipe resets it; a shipped Flux model's 64 px must stay
                twin.default_sample_size = pipe.default_sample_size
            return twin
    raise TypeError(f"{what} need an SD 1.x/2.x, SDXL or Flux pipeline, got {type(pipe).__name__}")
