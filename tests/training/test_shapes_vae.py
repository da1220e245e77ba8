"""The autoencoder's colour codes: equal contrast for every colour, the right target per latent cell, and a loss the
trainer actually lowers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attncontrol.shapes import BACKGROUNDS, COLORS, ObjectSpec, render
from attncontrol.shapes.scenes import to_tensor
from attncontrol.training.shapes_vae import ShapesTrainingConfig, colour_code_image, palette_codes, train_vae


def test_every_object_colour_is_equally_far_from_every_background():
    codes = palette_codes(4)
    distances = torch.cdist(codes, codes)
    backgrounds, colours = range(len(BACKGROUNDS)), range(len(BACKGROUNDS), len(BACKGROUNDS) + len(COLORS))
    across = torch.stack([distances[b, c] for b in backgrounds for c in colours])
    assert torch.allclose(across, torch.full_like(across, 2**0.5))
    assert (distances + torch.eye(len(codes)) * 9).min() >= 2**0.5 - 1e-6  # no two colours share a code
    assert palette_codes(6)[:, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="--latent-channels"):
        palette_codes(3)


def test_code_image_gives_each_cell_its_pixels_colour_codes():
    codes = palette_codes(4)
    scene = render([ObjectSpec("yellow", "square", 21, 21, 6)], background="gray")  # pixels 15-26 in x and y
    target = colour_code_image(to_tensor([scene]), codes, factor=2)[0]
    assert target.shape == (4, 32, 32)
    gray, yellow = codes[list(BACKGROUNDS).index("gray")], codes[len(BACKGROUNDS) + list(COLORS).index("yellow")]
    assert torch.allclose(target[:, 10, 10], yellow)  # cell (10, 10) covers pixels 20-21: inside the square
    assert torch.allclose(target[:, 0, 0], gray)
    # A cell on the square's right edge (pixels 26-27 in x; the square ends at 26) averages the two codes.
    assert torch.allclose(target[:, 10, 13], (yellow + gray) / 2)


def test_training_with_codes_pulls_the_encoder_towards_them(tmp_path):
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    images = to_tensor([render([ObjectSpec(colour, "circle", 32, 32, 12)]) for colour in COLORS])
    target = colour_code_image(images, palette_codes(4), factor=2)
    base = ShapesTrainingConfig(vae_steps=10, vae_batch=4, vae_probe_scenes=4, vae_channels=(16, 32))
    errors = {}
    for weight in (0.0, 1.0):
        config = dataclasses.replace(base, out=str(tmp_path / f"w{weight}"), vae_colour_codes=weight)
        vae = AutoencoderKL.from_pretrained(train_vae(config, Accelerator(), resume=False))
        with torch.no_grad():
            errors[weight] = float((vae.encode(images).latent_dist.mean - target).square().mean())
    # Measured: 0.96 without the loss, 0.03 with it (10 steps).
    assert errors[1.0] < 0.2 * errors[0.0]
    with pytest.raises(ValueError, match="--vae-colour-codes"):
        bad = dataclasses.replace(base, out=str(tmp_path / "bad"), vae_colour_codes=-1.0)
        train_vae(bad, Accelerator(), resume=False)
