"""The Gradio editing app (``pip install attncontrol[app]``): ``attncontrol app`` or :func:`launch`."""

from attncontrol.app.server import build_app, launch

__all__ = ["build_app", "launch"]
