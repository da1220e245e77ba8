"""``attncontrol`` command line: generate with attention controls and save images, maps and settings."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from attncontrol import __version__
from attncontrol.core.controller import AttentionController
from attncontrol.core.store import AttentionStore
from attncontrol.models import available_models, default_model, family_call_kwargs, load_pipeline

logger = logging.getLogger("attncontrol.cli")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "token"


def generate(args: argparse.Namespace) -> list[Path]:
    """Run one generation with an attention store installed; write the image, heat maps and a JSON sidecar."""
    pipe = load_pipeline(args.model, device=args.device)
    store = AttentionStore(guidance="cond")
    call_kwargs = {
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(args.seed),
    }
    if args.negative_prompt:
        call_kwargs["negative_prompt"] = args.negative_prompt
    if args.height:
        call_kwargs["height"] = args.height
    if args.width:
        call_kwargs["width"] = args.width

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with AttentionController(pipe, [store]) as controller:
        # Resolve words first: a typo should fail before the generation, not after it.
        heat_tokens = {word: controller.token_indices(args.prompt, word, name="--heatmap") for word in args.heatmap}
        image = pipe(**family_call_kwargs(pipe, call_kwargs, batch=1)).images[0]
    image.save(output)
    written = [output]
    for word, indices in heat_tokens.items():
        path = output.with_name(f"{output.stem}_heatmap_{_slug(word)}.png")
        store.heatmap(indices, image=image).save(path)
        written.append(path)

    settings = {
        "model": args.model or default_model(),
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "size": [image.height, image.width],
        "heatmaps": {word: indices for word, indices in heat_tokens.items()},
        "attncontrol": __version__,
    }
    sidecar = output.with_suffix(".json")
    sidecar.write_text(json.dumps(settings, indent=2))
    written.append(sidecar)
    return written


def bench(args: argparse.Namespace) -> list[Path]:
    """Score a model on the shapes world; print the markdown table and save images + JSON."""
    from attncontrol.shapes.bench import run_bench

    pipe = load_pipeline(args.model, device=args.device)
    extra = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    report = run_bench(
        pipe,
        model_name=args.model or default_model(),
        tasks=args.task or ["single", "two"],
        num_seeds=args.num_seeds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        out_dir=args.out,
        extra_call_kwargs=extra,
    )
    print(report.markdown())
    return [Path(args.out) / "report.md", Path(args.out) / "report.json"]


def edit_bench(args: argparse.Namespace) -> list[Path]:
    """Score removal, moves, drags and compositions on real (rendered, inverted) shapes scenes; print the table,
    save images + JSON."""
    from attncontrol.shapes.edit_bench import EDIT_TASKS, run_edit_bench

    pipe = load_pipeline(args.model, device=args.device)
    report = run_edit_bench(
        pipe,
        model_name=args.model or default_model(),
        tasks=args.task or list(EDIT_TASKS),
        methods=args.method,
        num_cases=args.num_cases,
        num_inference_steps=args.steps,
        out_dir=args.out,
    )
    print(report.markdown())
    return [Path(args.out) / "report.md", Path(args.out) / "report.json"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncontrol", description=__doc__)
    parser.add_argument("--version", action="version", version=f"attncontrol {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image and its attention heat maps")
    gen.add_argument("prompt", help="text prompt")
    gen.add_argument(
        "--model",
        default=None,
        help=f"a name ({', '.join(available_models())}), a local diffusers folder or a hub id "
        f"(default: {default_model()})",
    )
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=20, help="num_inference_steps (default: 20)")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--heatmap",
        action="append",
        default=[],
        metavar="WORD",
        help="save a cross-attention heat map of WORD (repeatable)",
    )
    gen.add_argument("--device", default="cpu")
    gen.add_argument("-o", "--output", default="outputs/attncontrol.png", help="image path; maps and JSON go beside it")
    gen.set_defaults(func=generate)

    bench_parser = commands.add_parser("bench", help="score a model on the shapes-world prompt suite")
    bench_parser.add_argument("--model", default=None, help=f"as for generate (default: {default_model()})")
    bench_parser.add_argument(
        "--task", action="append", default=None, help="task to run (repeatable; default: single and two)"
    )
    bench_parser.add_argument("--num-seeds", type=int, default=17, help="seeds per prompt (default: 17)")
    bench_parser.add_argument("--steps", type=int, default=25)
    bench_parser.add_argument("--guidance-scale", type=float, default=5.0)
    bench_parser.add_argument("--batch-size", type=int, default=16)
    bench_parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 length for Flux/SD3 models")
    bench_parser.add_argument("--device", default="cpu")
    bench_parser.add_argument("--out", default="outputs/bench", help="folder for images, report.json and report.md")
    bench_parser.set_defaults(func=bench)

    edit_parser = commands.add_parser(
        "edit-bench", help="score removal, moves, drags and compositions against their baselines on shapes scenes"
    )
    edit_parser.add_argument("--model", default=None, help=f"an SD-family model as for generate ({default_model()})")
    edit_parser.add_argument(
        "--task", action="append", default=None, help="remove, move, drag or compose (repeatable; default: all four)"
    )
    edit_parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="remove/move: designedit, designedit-inverted, inpaint-fill, inpaint, or the ablation inverted-key-zero, "
        "inverted-query, inverted-value; drag: drag, drag-unshared, drag-free-late, drag-free-late-masked, "
        "drag-free-late-unshared; compose: compose, compose-steered, compose-early-release, "
        "compose-early-release-unsteered, compose-early-release-shared; drag and compose: cut-paste-sdedit, regenerate "
        "(default: each task's own list)",
    )
    edit_parser.add_argument("--num-cases", type=int, default=100, help="cases per task (default: 100)")
    edit_parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50, as DesignEdit)")
    edit_parser.add_argument("--device", default="cpu")
    edit_parser.add_argument("--out", default="outputs/edit-bench", help="folder for images, report.json, report.md")
    edit_parser.set_defaults(func=edit_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        written = args.func(args)
    except Exception as error:  # a CLI reports, it does not dump a traceback for a bad argument
        if args.verbose:
            raise
        logger.error("%s: %s", type(error).__name__, error)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
