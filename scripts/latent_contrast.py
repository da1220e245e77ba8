"""How far each shapes colour sits from the background in a pipeline's normalized latent space.

    python scripts/latent_contrast.py runs/shapes-flux/pipeline/vae

A denoiser trained with a latent MSE weighs each colour by this distance: a colour close to the background costs
little to get wrong, so a small model learns it last (the diagnosis of the second Flux attempt).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL

from attncontrol.shapes import BACKGROUNDS, COLORS, ObjectSpec, render
from attncontrol.shapes.scenes import to_tensor


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae", help="an AutoencoderKL folder (its shift_factor/scaling_factor are applied)")
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    shift = vae.config.shift_factor or 0.0
    scale = vae.config.scaling_factor
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    print("| background | colour | latent distance from the background |")
    print("|---|---|---:|")
    for background in BACKGROUNDS:
        for color in COLORS:
            # A 24-pixel square in the middle; compare the latent inside it with a background corner.
            scene = render([ObjectSpec(color, "square", 32, 32, 12)], background=background)
            latent = (vae.encode(to_tensor([scene])).latent_dist.mean[0] - shift) * scale
            inner = latent[:, 24 // factor : 40 // factor, 24 // factor : 40 // factor].mean((1, 2))
            corner = latent[:, : 8 // factor, : 8 // factor].mean((1, 2))
            print(f"| {background} | {color} | {float((inner - corner).norm()):.2f} |")


if __name__ == "__main__":
    main()
