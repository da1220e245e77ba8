"""The Gradio editing app (``pip install attncontrol[app]``)."""
