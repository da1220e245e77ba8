"""attncontrol: steer where and how diffusers models attend.

Quick start::

    from attncontrol import AttentionController, AttentionStore

    store = AttentionStore()
    with AttentionController(pipe, [store]) as controller:
        image = pipe("a red circle").images[0]
    store.heatmap(controller.token_indices("a red circle", "red"), image=image).save("red.png")
"""

from attncontrol.core import *  # noqa: F403 - the core's __all__ is the public API
from attncontrol.core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = [*_core_all, "__version__"]
