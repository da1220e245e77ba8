"""Overhead of attncontrol's processors with an empty control chain, relative to the stock diffusers processors.

Prints (controlled / stock) time ratios for:
- a full denoiser step of the SD1.5-shaped and Flux-shaped tiny models;
- single attention layers at real SD1.5 shapes: self-attention over 4096 tokens x 320 channels and
  cross-attention to 77 text tokens (768 channels), batch 2 (CFG), 8 heads.

Stock and controlled runs are interleaved in rounds and the median of each is taken, so machine noise hits both.
Run: python benchmarks/overhead.py [--rounds 15] [--threads 2] [--json benchmarks/results/overhead-cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _results import save_results
from diffusers.models.attention_processor import Attention

from attncontrol import AttentionController
from attncontrol.testing import tiny_flux_pipeline, tiny_sd_pipeline
from attncontrol.training.common import cpu_label


def median_times(
    stock: Callable[[], object],
    controlled: Callable[[], object],
    rounds: int,
    repeat: int,
    setup: Callable[[], object] = lambda: None,
    teardown: Callable[[], object] = lambda: None,
) -> tuple[float, float]:
    """Median seconds per call of ``stock`` and ``controlled``, interleaved round by round.

    ``setup``/``teardown`` run untimed around each block of controlled calls (installing the controller).
    """
    stock_times, controlled_times = [], []
    for round_index in range(rounds + 1):
        start = time.perf_counter()
        for _ in range(repeat):
            stock()
        stock_elapsed = (time.perf_counter() - start) / repeat
        setup()
        try:
            start = time.perf_counter()
            for _ in range(repeat):
                controlled()
            controlled_elapsed = (time.perf_counter() - start) / repeat
        finally:
            teardown()
        if round_index:  # round 0 is warm-up
            stock_times.append(stock_elapsed)
            controlled_times.append(controlled_elapsed)
    return statistics.median(stock_times), statistics.median(controlled_times)


def capture_inputs(pipe, **kwargs) -> tuple[tuple, dict]:
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    captured = {}
    handle = model.register_forward_pre_hook(
        lambda m, a, k: captured.setdefault("call", (a, {**k, "return_dict": False})), with_kwargs=True
    )
    try:
        pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
    finally:
        handle.remove()
    return model, *captured["call"]


def bench_step(name: str, pipe, rounds: int, **kwargs) -> list[dict]:
    """One denoiser forward on the inputs the pipeline really gives it, stock vs. controller installed."""
    pipe.set_progress_bar_config(disable=True)
    model, args, call_kwargs = capture_inputs(pipe, **kwargs)
    controller = AttentionController(pipe)

    def step():
        with torch.no_grad():
            model(*args, **call_kwargs)

    stock, ctrl = median_times(step, step, rounds, repeat=5, setup=controller.install, teardown=controller.remove)
    install_times = []
    for _ in range(rounds):
        start = time.perf_counter()
        controller.install()
        controller.remove()
        install_times.append(time.perf_counter() - start)
    return [
        {"case": f"{name} full denoiser step", "stock_ms": stock * 1e3, "controlled_ms": ctrl * 1e3},
        {
            "case": f"{name} install + remove (once per generation)",
            "stock_ms": None,
            "controlled_ms": statistics.median(install_times) * 1e3,
        },
    ]


def bench_layer(name: str, tokens: int, channels: int, context: int | None, context_dim: int, rounds: int) -> dict:
    torch.manual_seed(0)
    attn = Attention(channels, cross_attention_dim=context_dim if context else None, heads=8, dim_head=channels // 8)
    attn.eval()
    hidden = torch.randn(2, tokens, channels)
    text = torch.randn(2, context, context_dim) if context else None
    stock_processor = attn.processor

    from attncontrol.core.layers import LayerInfo
    from attncontrol.core.processors import UNetAttnProcessor

    class _Owner:  # the processor only reads state when a control is active
        base_grid = (64, 64)

    layer = LayerInfo(name, "unet", "cross" if context else "self", "down", 0, 0, 0)
    controlled_processor = UNetAttnProcessor(_Owner(), layer, [])

    def run(processor):
        def fn():
            with torch.no_grad():
                processor(attn, hidden, encoder_hidden_states=text)

        return fn

    stock, ctrl = median_times(run(stock_processor), run(controlled_processor), rounds, repeat=1)
    return {"case": name, "stock_ms": stock * 1e3, "controlled_ms": ctrl * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [
        *bench_step(
            "SD1.5-shaped tiny UNet", tiny_sd_pipeline(), args.rounds * 4, prompt="a red circle", height=64, width=64
        ),
        *bench_step(
            "Flux-shaped tiny transformer",
            tiny_flux_pipeline(),
            args.rounds * 4,
            prompt="a red circle",
            height=64,
            width=64,
            max_sequence_length=16,
        ),
        bench_layer("SD1.5 self-attention 4096 tok x 320 ch", 4096, 320, None, 320, args.rounds),
        bench_layer("SD1.5 cross-attention 4096 tok x 320 ch, 77 text", 4096, 320, 77, 768, args.rounds),
    ]
    device = cpu_label(args.threads)
    print(f"attncontrol processor overhead, empty control chain, on {device}; torch {torch.__version__}\n")
    print("| case | stock ms | controlled ms | ratio |")
    print("|---|---:|---:|---:|")
    for row in rows:
        if row["stock_ms"] is None:
            row["ratio"] = None
            print(f"| {row['case']} | | {row['controlled_ms']:.2f} | |")
            continue
        row["ratio"] = row["controlled_ms"] / row["stock_ms"]
        print(f"| {row['case']} | {row['stock_ms']:.2f} | {row['controlled_ms']:.2f} | {row['ratio']:.3f} |")
    if args.json:
        save_results(args.json, {"device": device, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
