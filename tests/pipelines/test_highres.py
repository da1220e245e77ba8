"""The SDEdit ladder: each rung at its size, controls in every rung, memory savers restored also after an error."""

from __future__ import annotations

import pytest
import torch

from attncontrol.controls import LocalWindowAttention
from attncontrol.core.errors import EditError
from attncontrol.pipelines.highres import sdedit_ladder
from tests.conftest import tiny_pipeline


def test_ladder_upscales_rung_by_rung_with_controls():
    pipe = tiny_pipeline("sd")
    seen_grids = set()

    class Spy(LocalWindowAttention):
        def logit_bias(self, call, query, key):
            seen_grids.add(call.grid)
            return super().logit_bias(call, query, key)

    result = sdedit_ladder(
        pipe,
        "a red circle",
        sizes=[(32, 32), (64, 48)],
        strengths=[0.5],
        controls=[Spy(radius=2)],
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        feed_forward_chunks=2,
    )
    assert [image.size for image in result.images] == [(32, 32), (48, 64)]
    assert (16, 16) in seen_grids and (32, 24) in seen_grids  # the window ran in both rungs (latent grids)
    assert not pipe.vae.use_tiling  # restored


def test_ladder_checks_its_arguments_and_restores_after_errors():
    pipe = tiny_pipeline("sd")
    with pytest.raises(EditError, match="need 1 strengths"):
        sdedit_ladder(pipe, "x", sizes=[(32, 32), (64, 64)], strengths=[0.5, 0.3])
    with pytest.raises(EditError, match="multiples of 16"):
        sdedit_ladder(pipe, "x", sizes=[(30, 32)])

    def stop(*args):
        assert pipe.vae.use_tiling  # tiling is on while the ladder runs
        raise RuntimeError("stopped by the user")

    with pytest.raises(RuntimeError, match="stopped"):
        sdedit_ladder(pipe, "x", sizes=[(32, 32)], num_inference_steps=2, callback_on_step_end=stop)
    assert not pipe.vae.use_tiling
