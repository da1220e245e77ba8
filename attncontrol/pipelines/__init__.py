"""Ready diffusers pipelines built on the controls; each restores the original processors, also on exceptions."""
