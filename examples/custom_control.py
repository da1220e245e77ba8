"""Write your own control in a few lines and compose it with others in one denoiser pass.

``TokenReweight`` scales the attention probability of chosen prompt tokens (prompt-to-prompt's "reweight" edit) and
renormalizes each query's row. It runs in the same processors as the attention store, so the stored maps show its
effect directly.

    python examples/custom_control.py --word red --weight 3
"""

from __future__ import annotations

import argparse

import torch

from attncontrol import AttentionCall, AttentionControl, AttentionController, AttentionStore
from attncontrol.models import load_pipeline


class TokenReweight(AttentionControl):
    """Multiply the cross-attention paid to ``tokens`` by ``weight`` (then renormalize), on conditional rows only."""

    def __init__(self, tokens: list[int], weight: float, **selection) -> None:
        super().__init__(layers="cross", **selection)
        if weight < 0:
            raise ValueError(f"`weight` must be >= 0, got {weight}")
        self.tokens = tokens
        self.weight = weight

    def wants_probs(self, call: AttentionCall) -> bool:
        return True  # edit_probs needs explicit probabilities

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        rows = call.batch.rows(guidance="cond")
        scale = torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        scale[self.tokens] = self.weight
        edited = probs.clone()
        edited[rows] = probs[rows] * scale
        edited[rows] = edited[rows] / edited[rows].sum(-1, keepdim=True).clamp_min(1e-12)
        return edited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--word", default="red")
    parser.add_argument("--weight", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    shares = {}
    for weight in (1.0, args.weight):
        store = AttentionStore(guidance="cond")
        controller = AttentionController(pipe, [store])
        tokens = controller.token_indices(args.prompt, args.word, name="--word")
        # Every control's edit_probs runs before any observe, so the store sees the reweighted maps.
        controller.add(TokenReweight(tokens, weight))
        with controller:
            pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        shares[weight] = float(store.maps()[..., tokens].sum(-1).mean())
    for weight, share in shares.items():
        print(f"weight {weight:g}: mean attention share of {args.word!r} = {share:.4f}")


if __name__ == "__main__":
    main()
