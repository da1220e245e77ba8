"""Kernel benchmark: time, achieved FLOP rate and bandwidth of attncontrol's Triton kernels against SDPA (and
FlexAttention / NATTEN where installed), per kernel and shape, on a CUDA GPU.

Shapes (the issue's targets in brackets, for an H100):

- linear attention (LinFusion), SD1.5 self-attention: batch 2, 5 heads of 64, 4096 and 16384 tokens
  [>= 20x faster than SDPA at 16K; >= 60% of the memory-bandwidth roofline];
- local window (CLEAR, r = 16), Flux joint attention: 24 heads of 128, 512 text tokens, 4K / 16K / 64K image tokens
  [>= 4x faster than SDPA at 64K image tokens];
- region-masked attention: SD1.5 cross-attention (77 keys, 8 heads of 40, 4096 / 16384 queries, 4 regions) and
  Flux joint attention with regions (4096 + 512 tokens, 24 heads of 128) [within 1.2x of unmasked SDPA].

Rates: "effective" FLOPs count only the attended (query, key) pairs (4 x pairs x head dim forward; linear attention
4 x S x D x Dv); bytes count one read of q, k, v (and the bias table) and one write of the output: the ideal traffic.
The roofline reference is the device's measured copy bandwidth (read + write of 1 GiB), or ``--peak-gbps``.

Run on a GPU (results go to benchmarks/results/kernels-<device name>.json and .md):

    python benchmarks/kernel_bench.py --json            # forward; add --backward for forward + backward

On a machine without CUDA it says so and exits; ``--smoke`` instead runs tiny shapes under the Triton interpreter
on the CPU, to check that the script and every method run (its times mean nothing), and ``--compile-only [ARCH]``
compiles every kernel variant for a GPU architecture (default sm_90) with Triton's own compiler and ptxas, no GPU
needed: it catches what the interpreter lets through (illegal tile shapes, dtype errors) and reports each variant's
shared memory against the architecture's per-block limit, trying the autotune configs in order until one fits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _results import save_results

RESULTS = Path(__file__).resolve().parent / "results"

GPU_CASES = {
    "linear": [
        {"name": "sd15-64x64", "batch": 2, "tokens": 4096, "heads": 5, "dim": 64, "dtype": "float16"},
        {"name": "sd15-128x128", "batch": 2, "tokens": 16384, "heads": 5, "dim": 64, "dtype": "float16"},
    ],
    "local": [
        {
            "name": f"flux-{side}x{side}",
            "batch": 1,
            "grid": (side, side),
            "text": 512,
            "heads": 24,
            "dim": 128,
            "radius": 16,
            "dtype": "bfloat16",
        }
        for side in (64, 128, 256)
    ],
    "masked": [
        {
            "name": "sd15-cross-64x64",
            "batch": 2,
            "queries": 4096,
            "keys": 77,
            "heads": 8,
            "dim": 40,
            "regions": 4,
            "dtype": "float16",
        },
        {
            "name": "sd15-cross-128x128",
            "batch": 2,
            "queries": 16384,
            "keys": 77,
            "heads": 8,
            "dim": 40,
            "regions": 4,
            "dtype": "float16",
        },
        {
            "name": "flux-joint-64x64",
            "batch": 1,
            "queries": 4608,
            "keys": 4608,
            "heads": 24,
            "dim": 128,
            "regions": 4,
            "dtype": "bfloat16",
        },
    ],
}

SMOKE_CASES = {
    "linear": [{"name": "tiny", "batch": 1, "tokens": 77, "heads": 1, "dim": 64, "dtype": "float32"}],
    "local": [{"name": "tiny", "batch": 1, "grid": (8, 8), "text": 5, "heads": 1, "dim": 64, "radius": 3,
               "dtype": "float32"}],
    "masked": [{"name": "tiny", "batch": 1, "queries": 64, "keys": 77, "heads": 1, "dim": 40, "regions": 3,
                "dtype": "float32"}],
}  # fmt: skip

TARGETS = {
    "linear": "triton >= 20x faster than SDPA at 16384 tokens; >= 60% of the bandwidth roofline",
    "local": "triton (r = 16) >= 4x faster than SDPA at 65536 image tokens",
    "masked": "triton within 1.2x of unmasked SDPA",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=list(GPU_CASES), default=list(GPU_CASES))
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    parser.add_argument("--radii", type=int, nargs="+", default=None, help="local-window radii (default: 16)")
    parser.add_argument("--repeat", type=int, default=100, help="timing window in ms on a GPU, calls on the CPU")
    parser.add_argument("--peak-gbps", type=float, default=None, help="roofline bandwidth (default: measured copy)")
    parser.add_argument("--no-baselines", action="store_true", help="skip FlexAttention and NATTEN")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--json", nargs="?", const="auto", default=None, help="write results (default path: auto)")
    parser.add_argument(
        "--compile-only",
        nargs="?",
        type=int,
        const=90,
        default=None,
        metavar="ARCH",
        help="compile the kernels for sm_ARCH without a GPU (default 90) and report shared memory",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=["fp16", "bf16", "fp32"],
        default=["fp16", "bf16"],
        help="--compile-only: input dtypes (fp32 compiles slowly)",
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[40, 64, 80, 128, 160], help="--compile-only: head dims")
    parser.add_argument("--smem-limit", type=int, default=None, help="--compile-only: bytes of shared memory per block")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ timing
def timer(device: str, window_ms: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: triton's do_bench on a GPU (L2 flushed), wall clock on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        def on_gpu(function: Callable[[], object]) -> float:
            function()  # first call: autotuning and compilation
            return float(do_bench(function, warmup=25, rep=window_ms, return_mode="median"))

        return on_gpu

    def on_cpu(function: Callable[[], object]) -> float:
        function()
        times = []
        for _ in range(max(1, min(window_ms, 3))):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return on_cpu


def copy_bandwidth(torch) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + written): the achievable roofline."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    from triton.testing import do_bench

    milliseconds = do_bench(lambda: target.copy_(source), warmup=10, rep=100, return_mode="median")
    return 2 * source.numel() / (milliseconds * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------ cases
def linear_case(torch, F, case: dict, device: str, backward: bool) -> tuple[dict, dict]:
    from attncontrol.kernels.linear import linear_attention

    dtype = getattr(torch, case["dtype"])
    shape = (case["batch"], case["tokens"], case["heads"], case["dim"])
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v))
    methods = {
        "triton": lambda: linear_attention(q, k, v, backend="triton"),
        "torch": lambda: linear_attention(q, k, v, backend="torch"),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh),
    }
    batch, tokens, heads, dim = shape
    element = q.element_size()
    work = {
        "triton": (4 * batch * heads * tokens * dim * dim, 4 * batch * tokens * heads * dim * element),
        "torch": (4 * batch * heads * tokens * dim * dim, 4 * batch * tokens * heads * dim * element),
        "sdpa": (4 * batch * heads * tokens * tokens * dim, 4 * batch * tokens * heads * dim * element),
    }
    return methods, work


def window_pairs(grid: tuple[int, int], radius: float) -> int:
    """Image (query, key) pairs inside CLEAR's circle on the grid, exactly (offsets clipped at the borders)."""
    height, width = grid
    reach = math.ceil(radius) - 1
    total = 0
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx < radius * radius:
                total += max(0, height - abs(dy)) * max(0, width - abs(dx))
    return total


def local_case(torch, F, case: dict, device: str, backward: bool, baselines: bool) -> tuple[dict, dict]:
    from attncontrol.kernels.local import local_window_attention

    dtype = getattr(torch, case["dtype"])
    grid, text, radius = case["grid"], case["text"], case["radius"]
    tokens = grid[0] * grid[1]
    length = tokens + text
    batch, heads, dim = case["batch"], case["heads"], case["dim"]
    q, k, v = (torch.randn(batch, length, heads, dim, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))  # fmt: skip
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v))
    window = {"grid": grid, "radius": radius}
    methods = {
        "triton": lambda: local_window_attention(q, k, v, backend="triton", **window),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh),
    }
    if baselines:
        methods["flex"] = lambda: local_window_attention(q, k, v, backend="flex", **window)
        natten = natten_method(torch, F, q, k, v, grid, text, radius)
        if natten is not None:
            methods["natten (square 2r-1, approx.)"] = natten
    pairs = text * length + tokens * text + window_pairs(grid, radius)
    io = 4 * batch * length * heads * dim * q.element_size()
    work = {name: (4 * batch * heads * pairs * dim, io) for name in methods}
    work["sdpa"] = (4 * batch * heads * length * length * dim, io)
    return methods, work


def natten_method(torch, F, q, k, v, grid, text, radius) -> Callable[[], object] | None:
    """NATTEN's fused neighborhood attention for the image queries (a square window of 2r - 1 that shifts at the
    borders: the tight superset of CLEAR's circle, not the same pattern) with the text as additional keys, plus
    SDPA for the text queries. None when natten is not installed."""
    try:
        import natten
    except ImportError:
        return None
    batch, length, heads, dim = q.shape
    height, width = grid

    def run() -> torch.Tensor:
        image = slice(text, length)
        grid_q, grid_k, grid_v = (t[:, image].reshape(batch, height, width, heads, dim) for t in (q, k, v))
        image_out = natten.na2d(
            grid_q, grid_k, grid_v, kernel_size=2 * radius - 1,
            additional_keys=k[:, :text], additional_values=v[:, :text],
        )  # fmt: skip
        text_out = F.scaled_dot_product_attention(
            q[:, :text].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
        return torch.cat([text_out, image_out.reshape(batch, height * width, heads, dim)], dim=1)

    return run


def masked_case(torch, F, case: dict, device: str, backward: bool, baselines: bool) -> tuple[dict, dict]:
    from attncontrol.kernels.masked import grouped_bias_dense, masked_attention

    dtype = getattr(torch, case["dtype"])
    batch, queries, keys, heads, dim = (case[name] for name in ("batch", "queries", "keys", "heads", "dim"))
    q = torch.randn(batch, queries, heads, dim, device=device, dtype=dtype, requires_grad=backward)
    k, v = (torch.randn(batch, keys, heads, dim, device=device, dtype=dtype, requires_grad=backward)
            for _ in range(2))  # fmt: skip
    # Regions: every query lies in one of `regions` vertical stripes (plus "outside"); each group hides the other
    # regions' keys, the shape of RegionalAttention's hard masks.
    count = case["regions"] + 1
    generator = torch.Generator(device="cpu").manual_seed(0)
    groups = (torch.arange(queries) * count // queries).to(torch.int32)[None].expand(batch, -1).contiguous()
    table = torch.zeros(1, 1, count, keys)
    owner = torch.randint(0, count, (keys,), generator=generator)
    table[0, 0] = torch.where(owner[None, :] == torch.arange(count)[:, None], 0.0, float("-inf"))
    table[0, 0, :, owner == 0] = 0.0  # unowned keys (the base prompt) are seen by all
    groups, table = groups.to(device), table.to(device)
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v))
    dense = grouped_bias_dense(groups, table).to(dtype)
    methods = {
        "triton": lambda: masked_attention(q, k, v, groups=groups, table=table, backend="triton", validate=False),
        "sdpa (unmasked)": lambda: F.scaled_dot_product_attention(qh, kh, vh),
        "sdpa (dense bias)": lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense),
    }
    if baselines:
        methods["flex"] = lambda: masked_attention(q, k, v, groups=groups, table=table, backend="flex")
    io = (2 * batch * queries + 2 * batch * keys) * heads * dim * q.element_size()
    work = {name: (4 * batch * heads * queries * keys * dim, io + table.numel() * 4) for name in methods}
    work["sdpa (dense bias)"] = (work["triton"][0], io + dense.numel() * dense.element_size())
    return methods, work


# ------------------------------------------------------------------------------------------------ compile only
#: CUDA's opt-in maximum of shared memory per block, by compute capability
SMEM_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_FP32_POINTERS = {"state", "z", "den", "delta", "dstate", "dz", "lse", "tab", "dtab"}
_INT_POINTERS = {"grp", "full", "full_count", "part", "part_count"}
_FLOAT_SCALARS = {"inv_n", "eps", "qk_scale", "sm_scale", "R2"}


def compile_variants(dtypes: list[str], dims: list[int], ops: list[str]) -> list[tuple]:
    """(label, autotuned kernel, input dtype, constexprs) of every kernel variant the ops launch."""
    from attncontrol.kernels._triton import pow2
    from attncontrol.kernels.linear import triton as linear
    from attncontrol.kernels.local import triton as local
    from attncontrol.kernels.masked import triton as masked

    variants = []
    for dtype in dtypes:
        low = dtype != "fp32"
        if "linear" in ops:
            for kernel in (linear._state_kernel, linear._output_kernel, linear._grad_state_kernel,
                           linear._grad_query_kernel, linear._grad_key_kernel, linear._grad_value_kernel):  # fmt: skip
                variants.append((f"linear {kernel.fn.__name__} {dtype}", kernel, dtype, {"FEATURE": 1, "LOWP": low}))
        for block in sorted({pow2(dim, 16) for dim in dims}):
            sizes = {"BLOCK_D": block, "BLOCK_DV": block, "LOWP": low}
            if "masked" in ops:
                for dq in (False, True):
                    variants.append((f"masked rows dq={dq} D{block} {dtype}", masked._rows_kernel, dtype,
                                     {**sizes, "HAS_BIAS": True, "DQ": dq}))  # fmt: skip
                for table_grad in (False, True):
                    variants.append((f"masked keys dtable={table_grad} D{block} {dtype}", masked._keys_kernel, dtype,
                                     {**sizes, "HAS_BIAS": True, "TABLE_GRAD": table_grad, "BLOCK_G": 16}))  # fmt: skip
            if "local" in ops:
                tile_h, tile_w = local.default_tile((64, 64), block, 4 if dtype == "fp32" else 2)
                tiles = {**sizes, "TH": tile_h, "TW": tile_w}
                for image in (True, False):
                    for dq in (False, True):
                        variants.append((f"local queries image={image} dq={dq} D{block} {dtype}", local._query_kernel,
                                         dtype, {**tiles, "IMAGE": image, "HAS_POOLED": True, "DQ": dq}))  # fmt: skip
                for kind in (0, 1, 2):
                    variants.append((f"local keys kind={kind} D{block} {dtype}", local._key_kernel, dtype,
                                     {**tiles, "KIND": kind}))  # fmt: skip
    return variants


def compile_only(args: argparse.Namespace) -> int:
    """Compile every variant for sm_ARCH; for each, the first autotune config (in preference order, pruned as at run
    time) whose shared memory fits the limit. Exit status 1 if some variant has none."""
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = args.compile_only
    limit = args.smem_limit or SMEM_LIMITS.get(arch)
    if limit is None:
        print(f"no known shared-memory limit for sm_{arch}: pass --smem-limit", file=sys.stderr)
        return 1
    failures = 0
    for label, kernel, dtype, constexprs in compile_variants(args.dtypes, args.dims, args.ops):
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, {}, **constexprs)
        fitted = None
        for config in configs:
            constants = {**constexprs, **config.kwargs}
            signature = {}
            for name in kernel.fn.arg_names:
                base = name.removesuffix("_ptr")
                if name in constants:
                    signature[name] = "constexpr"
                elif name.endswith("_ptr"):
                    signature[name] = (
                        "*fp32" if base in _FP32_POINTERS else "*i32" if base in _INT_POINTERS else f"*{dtype}"
                    )
                else:
                    signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            compiled = triton.compile(
                ASTSource(fn=kernel.fn, signature=signature, constexprs=constants),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
            shared = compiled.metadata.shared
            if shared <= limit:
                fitted = (config, shared)
                break
        if fitted is None:
            failures += 1
            print(f"FAIL {label}: no config fits {limit} bytes of shared memory", flush=True)
        else:
            config, shared = fitted
            print(f"ok   {label}: {shared} bytes shared ({config})", flush=True)
    print(f"sm_{arch}: {failures} variant(s) without a fitting config")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    device = "cpu" if args.smoke else "cuda"
    cases = SMOKE_CASES if args.smoke else GPU_CASES
    measure = timer(device, args.repeat)
    roofline = args.peak_gbps or (None if args.smoke else copy_bandwidth(torch))
    baselines = not args.no_baselines and not args.smoke
    rows = []
    for op in args.ops:
        for case in cases[op]:
            radii = args.radii if op == "local" and args.radii else [case.get("radius")]
            for radius in radii:
                case = {**case, "radius": radius} if op == "local" else case
                if op == "linear":
                    methods, work = linear_case(torch, F, case, device, args.backward)
                elif op == "local":
                    methods, work = local_case(torch, F, case, device, args.backward, baselines)
                else:
                    methods, work = masked_case(torch, F, case, device, args.backward, baselines)
                rows += measure_case(torch, op, case, methods, work, measure, args.backward, roofline)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()}, interpreter)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pass": "forward + backward" if args.backward else "forward",
        "roofline_gbps": roofline,
        "roofline_source": "--peak-gbps" if args.peak_gbps else "measured device copy",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "targets": targets(rows) if not args.smoke else {},
    }


def measure_case(torch, op, case, methods, work, measure, backward, roofline) -> list[dict]:
    """Time every method of one case; rates from the case's FLOPs and bytes; ratios to SDPA (unmasked)."""
    rows = []
    for method, function in methods.items():
        call = function
        if backward:

            def call(function: Callable = function) -> None:
                out = function()
                out.backward(torch.ones_like(out))

        row = {"op": op, "case": case["name"], "shape": {k: v for k, v in case.items() if k != "name"}}
        row["method"] = method
        try:
            milliseconds = measure(call)
        except Exception as error:  # a baseline that cannot run this shape is reported, not fatal
            rows.append({**row, "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"{op:<7} {case['name']:<20} {method:<32} failed: {type(error).__name__}", flush=True)
            continue
        flops, nbytes = work[method]
        flops *= 3.5 if backward else 1.0  # backward ~2.5x the forward's matmuls
        nbytes *= 3 if backward else 1
        row.update(
            ms=milliseconds, tflops=flops / (milliseconds * 1e-3) / 1e12, gbps=nbytes / (milliseconds * 1e-3) / 1e9
        )
        if roofline:
            row["roofline_fraction"] = row["gbps"] / roofline
        rows.append(row)
        print(f"{op:<7} {case['name']:<20} {method:<32} {milliseconds:10.3f} ms {row['tflops']:8.2f} TFLOP/s "
              f"{row['gbps']:8.1f} GB/s", flush=True)  # fmt: skip
    baseline = next((r for r in rows if r["method"] in ("sdpa", "sdpa (unmasked)") and "ms" in r), None)
    for row in rows:
        if baseline is not None and "ms" in row:
            row["speedup_vs_sdpa"] = baseline["ms"] / row["ms"]
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets, checked on these rows (an H100 is what they were set for)."""
    found = {}

    def triton_row(op: str, **shape: object) -> dict | None:
        for row in rows:
            matches = all(row["shape"].get(key) == value for key, value in shape.items())
            if row["op"] == op and row["method"] == "triton" and "ms" in row and matches:
                return row
        return None

    linear = triton_row("linear", tokens=16384)
    if linear:
        found["linear"] = {
            "speedup_vs_sdpa": linear.get("speedup_vs_sdpa"),
            "roofline_fraction": linear.get("roofline_fraction"),
            "met": linear.get("speedup_vs_sdpa", 0) >= 20 and linear.get("roofline_fraction", 0) >= 0.6,
        }
    local = triton_row("local", grid=(256, 256), radius=16)
    if local:
        found["local"] = {"speedup_vs_sdpa": local.get("speedup_vs_sdpa"), "met": local.get("speedup_vs_sdpa", 0) >= 4}
    masked = [row for row in rows if row["op"] == "masked" and row["method"] == "triton" and "ms" in row]
    if masked:
        slowdowns = {row["case"]: 1 / row["speedup_vs_sdpa"] for row in masked}
        found["masked"] = {"time_vs_unmasked_sdpa": slowdowns, "met": max(slowdowns.values()) <= 1.2}
    for op, text in TARGETS.items():
        if op in found:
            found[op]["target"] = text
    return found


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def markdown(result: dict) -> str:
    lines = [
        f"device: {result['device']}; torch {result['torch']}, triton {result['triton']}; {result['pass']}; "
        f"{result['date']}",
        f"roofline: {result['roofline_gbps'] or 'n/a'} GB/s ({result['roofline_source']})"
        if not result["smoke"]
        else "smoke run: tiny shapes under the Triton interpreter on the CPU; the times say nothing about the kernels",
        "",
        "| op | case | method | ms | TFLOP/s | GB/s | x SDPA |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "ms" not in row:
            lines.append(f"| {row['op']} | {row['case']} | {row['method']} | failed | | | |")
            continue
        speedup = row.get("speedup_vs_sdpa")
        lines.append(
            f"| {row['op']} | {row['case']} | {row['method']} | {row['ms']:.3f} | {row['tflops']:.2f} | "
            f"{row['gbps']:.1f} | {'' if speedup is None else f'{speedup:.2f}'} |"
        )
    for op, target in result["targets"].items():
        lines.append(f"\n{op}: {'met' if target['met'] else 'NOT met'} ({target['target']}): "
                     f"{json.dumps({k: v for k, v in target.items() if k not in ('met', 'target')})}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only is not None:
        return compile_only(args)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (triton reads it at decoration)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "benchmarks/kernel_bench.py measures the Triton kernels on a CUDA GPU, and torch sees none here.\n"
            "Run it on a GPU machine, or pass --smoke to check the script on the CPU under the Triton interpreter.",
            file=sys.stderr,
        )
        return 1
    with torch.no_grad() if not args.backward else torch.enable_grad():
        result = run(args)
    text = markdown(result)
    print("\n" + text)
    if args.json:
        slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
        path = Path(args.json) if args.json != "auto" else RESULTS / f"kernels-{slug}.json"
        save_results(path, result, text)
        print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
