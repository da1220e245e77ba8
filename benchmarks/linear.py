"""Attention-layer time and peak memory against the number of image tokens: stock SDPA, LinFusion's linear attention
and CLEAR's local window (r = 8, 16, 32, banded torch path), at SD1.5 and Flux layer shapes.

- SD1.5 self-attention: 320 channels, 5 heads of 64 (the 64x64-latent layer; more tokens = higher resolution);
- Flux joint attention: 24 heads of 128, 512 text tokens first, then the image tokens.

Each case runs the attention core (after projections) on [batch 1, heads, tokens, dim] tensors in fp32 on the CPU or
in bf16 on a CUDA GPU. Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU, the tensors the method
must hold at once (S x S logits for SDPA, the d x d state for linear, the band for CLEAR), computed, not measured.
Cases predicted to exceed --max-seconds are estimated from the largest size measured (SDPA quadratic in the
sequence, linear attention and CLEAR linear) and marked "~".
Prints one table of times and ratios to SDPA, and on the CPU the token count where each method overtakes SDPA.

Run: python benchmarks/linear.py [--tokens 1024 4096 16384 65536] [--json benchmarks/results/linear-cpu.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _results import save_results

from attncontrol.controls.linear import linear_attention
from attncontrol.controls.local import local_window_attention

SHAPES = {"sd15": {"heads": 5, "dim": 64, "text": 0}, "flux": {"heads": 24, "dim": 128, "text": 512}}
RADII = (8, 16, 32)


def timed(function: Callable[[], torch.Tensor], repeat: int, device: str) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    function()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grid_of(tokens: int) -> tuple[int, int]:
    side = round(tokens**0.5)
    return side, tokens // side


def held_bytes(method: str, tokens: int, shape: dict, radius: int | None) -> int:
    """Bytes of the largest intermediate each method needs (fp32), per head, times heads."""
    heads, dim, text = shape["heads"], shape["dim"], shape["text"]
    total = tokens + text
    if method == "sdpa":
        return 4 * heads * total * total
    if method == "linear":
        return 4 * heads * (dim * dim + total)
    height, width = grid_of(tokens)
    query_rows = min(height, 2 * radius - 1)
    key_rows = min(height, query_rows + 2 * (radius - 1))
    return 4 * heads * (query_rows * width) * (text + key_rows * width)


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for shape_name, shape in SHAPES.items():
        measured: dict[str, dict[int, float]] = {}  # method -> total tokens -> seconds, for the estimates
        for tokens in args.tokens:
            height, width = grid_of(tokens)
            tokens = height * width
            total = tokens + shape["text"]
            generator = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (
                torch.randn(1, shape["heads"], total, shape["dim"], generator=generator).to(device, dtype)
                for _ in range(3)
            )
            image = slice(shape["text"], total)
            methods: dict[str, Callable[[], torch.Tensor]] = {
                "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                "linear": lambda q=q, k=k, v=v: linear_attention(q, k, v),
            }
            for radius in RADII:
                methods[f"clear-r{radius}"] = lambda q=q, k=k, v=v, r=radius, g=(height, width), s=image: (
                    local_window_attention(q, k, v, grid=g, radius=r, image_queries=s, image_keys=s)
                )
            for method, function in methods.items():
                estimate = False
                earlier = measured.setdefault(method, {})
                if earlier:
                    last = max(earlier)
                    # SDPA grows with the square of the sequence; linear attention and a fixed window linearly.
                    power = 2 if method == "sdpa" else 1
                    predicted = earlier[last] * (total / last) ** power
                    if predicted > args.max_seconds:
                        seconds, estimate = predicted, True
                if not estimate:
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    seconds = timed(function, args.repeat, device)
                    earlier[total] = seconds
                radius = int(method.split("-r")[1]) if method.startswith("clear") else None
                memory = (
                    torch.cuda.max_memory_allocated() if device == "cuda" and not estimate
                    else held_bytes(method, tokens, shape, radius)
                )  # fmt: skip
                rows.append(
                    {
                        "shape": shape_name,
                        "tokens": tokens,
                        "method": method,
                        "seconds": seconds,
                        "estimated": estimate,
                        "memory_bytes": memory,
                        "memory_measured": device == "cuda" and not estimate,
                    }
                )
                print(
                    f"{shape_name} {tokens:>6} {method:<9} {'~' if estimate else ' '}{seconds * 1e3:10.2f} ms",
                    flush=True,
                )
    for row in rows:
        sdpa = next(
            r for r in rows if r["shape"] == row["shape"] and r["tokens"] == row["tokens"] and r["method"] == "sdpa"
        )
        row["speedup_vs_sdpa"] = sdpa["seconds"] / row["seconds"]
        row["memory_vs_sdpa"] = row["memory_bytes"] / sdpa["memory_bytes"]
    crossover = {}
    for shape_name in SHAPES:
        for method in ["linear"] + [f"clear-r{r}" for r in RADII]:
            faster = [
                r["tokens"]
                for r in rows
                # Only a measured time counts; SDPA's side may be its (quadratic) estimate.
                if r["shape"] == shape_name
                and r["method"] == method
                and not r["estimated"]
                and r["speedup_vs_sdpa"] > 1
            ]
            crossover[f"{shape_name}/{method}"] = min(faster) if faster else None
    device_name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return {
        "device": device_name,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "rows": rows,
        "crossover": crossover,
    }


def table(result: dict) -> str:
    lines = [
        f"device: {result['device']}, {result['dtype']}, torch {result['torch']}",
        "",
        "| shape | image tokens | method | ms | x SDPA speed | memory MB | x SDPA memory |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        mark = "~" if row["estimated"] else ""
        memory = f"{row['memory_bytes'] / 2**20:.1f}" + ("" if row["memory_measured"] else " (held)")
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['method']} | {mark}{row['seconds'] * 1e3:.2f} | "
            f"{row['speedup_vs_sdpa']:.2f} | {memory} | {row['memory_vs_sdpa']:.4f} |"
        )
    lines += ["", "first token count where the method, measured, beats SDPA (None: not within the sizes measured):"]
    lines += [f"- {name}: {tokens}" for name, tokens in result["crossover"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="estimate cases predicted to be slower")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        result = run(args)
    text = table(result)
    print(text)
    if args.json:
        save_results(args.json, result, text)


if __name__ == "__main__":
    main()
